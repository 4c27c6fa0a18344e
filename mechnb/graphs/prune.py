"""Influence, pruning and the two scores of an attribution graph (Ameisen et al. 2025).

The adjacency `A[target, source]` holds direct effects. Normalise each row by the sum of
its absolute values: row t then says which share of t's input each source gives. A
node's influence on the output is the total, over every path to the logits, of these
shares multiplied along the path and weighted by each logit's probability:
`w (A + A^2 + ...)`, a finite sum because the graph has no cycles (each step goes to an
earlier layer).

Pruning keeps the fewest nodes holding `node_threshold` of the total influence (token
embeddings, error nodes and logits always kept, so what the transcoders miss stays in
view), then the fewest edges holding `edge_threshold` of the edge scores (an edge's share
of its target's input times the target's influence), then drops features and errors
left without a kept edge out of them (and features without one into them).

Scores, both 1 for a graph the transcoders explain completely:
- replacement: the share of the influence reaching the tokens that does not pass
  through an error node first (`infl(tokens) / (infl(tokens) + infl(errors))`);
- completeness: the share of each node's input, weighted by its influence, that comes
  from nodes other than error nodes.

    >>> influence(normalised(adjacency), weights)
"""

from __future__ import annotations

import torch

from ..core.errors import GraphError


def normalised(adjacency: torch.Tensor) -> torch.Tensor:
    """`|A|` with each row divided by its sum (rows summing to zero stay zero)."""
    a = adjacency.detach().abs()
    return a / a.sum(1, keepdim=True).clamp(min=1e-10)


def influence(a: torch.Tensor, weights: torch.Tensor, max_steps: int = 10_000) -> torch.Tensor:
    """`weights (A + A^2 + ...)` for a normalised acyclic adjacency `a`."""
    current = weights @ a
    total = current.clone()
    for _ in range(max_steps):
        if not current.any():
            return total
        current = current @ a
        total += current
    raise GraphError("the graph's influence did not converge: its adjacency has a cycle")


def influence_of_rows(rows: torch.Tensor, row_nodes: torch.Tensor, weights: torch.Tensor,
                      max_steps: int = 10_000) -> torch.Tensor:
    """`influence` of an adjacency given by its nonzero rows only: `rows` (normalised, `k nodes`)
    are the rows of nodes `row_nodes`; every other row is zero (what a graph whose rows are
    still being computed holds), so no `nodes x nodes` matrix is made."""
    current = weights[row_nodes] @ rows
    total = current.clone()
    for _ in range(max_steps):
        if not current.any():
            return total
        current = current[row_nodes] @ rows
        total += current
    raise GraphError("the graph's influence did not converge: its adjacency has a cycle")


def edge_scores(adjacency: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Each edge's share of its target's input times the target's influence plus weight."""
    a = normalised(adjacency)
    return a * (influence(a, weights) + weights)[:, None]


def threshold_of(scores: torch.Tensor, share: float) -> float:
    """The smallest score among the fewest largest scores that sum to `share` of the total."""
    ordered = scores.flatten().sort(descending=True).values
    total = ordered.sum()
    if total <= 0:
        return float("inf")
    cumulative = ordered.cumsum(0) / total
    index = min(int(torch.searchsorted(cumulative, torch.tensor(share, dtype=cumulative.dtype))),
                len(ordered) - 1)
    return float(ordered[index])


def prune(adjacency: torch.Tensor, weights: torch.Tensor, features: torch.Tensor, errors: torch.Tensor,
          tokens: torch.Tensor, node_threshold: float = 0.8, edge_threshold: float = 0.98):
    """`(node_mask, edge_mask, node_influence)` of a pruned graph (see the module docstring).

    Args:
        adjacency: `node node` (target, source).
        weights: `node`, each logit node's probability, zero elsewhere.
        features, errors, tokens: `node` bools saying which nodes are of each kind.
    """
    for name, value in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value <= 1:
            raise GraphError(f"{name} is a share of the total influence, in (0, 1]; got {value!r}")
    logits = weights > 0
    node_influence = influence(normalised(adjacency), weights)
    node_mask = (node_influence >= threshold_of(node_influence, node_threshold)) | errors | tokens | logits
    pruned = adjacency.clone()
    pruned[~node_mask] = 0
    pruned[:, ~node_mask] = 0
    scored = edge_scores(pruned, weights)
    edge_mask = (scored >= threshold_of(scored, edge_threshold)) & (scored > 0)
    while True:
        edge_mask[~node_mask] = False
        edge_mask[:, ~node_mask] = False
        keep = node_mask.clone()
        # Features and errors need a kept edge out of them; features one into them as well.
        keep[features | errors] &= edge_mask[:, features | errors].any(0)
        keep[features] &= edge_mask[features].any(1)
        if torch.equal(keep, node_mask):
            return node_mask, edge_mask, node_influence
        node_mask = keep


def scores(adjacency: torch.Tensor, weights: torch.Tensor, errors: torch.Tensor, tokens: torch.Tensor) -> dict:
    """The replacement and completeness scores (see the module docstring)."""
    a = normalised(adjacency)
    infl = influence(a, weights)
    token_part, error_part = infl[tokens].sum(), infl[errors].sum()
    replacement = float(token_part / (token_part + error_part).clamp(min=1e-30))
    reach = infl + weights
    non_error = 1 - a[:, errors].sum(-1)
    completeness = float((non_error * reach).sum() / reach.sum().clamp(min=1e-30))
    return {"replacement": replacement, "completeness": completeness}
