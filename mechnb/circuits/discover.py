"""Score every edge (or node) of the graph from a few forward and backward passes.

    score(u -> v) = sum over prompts and positions of
                    (u's clean output - u's corrupt output) . d metric / d (v's input)

- `eap` (edge attribution patching, Syed et al. 2023): the gradient at the clean run.
  The score estimates how much the metric drops when the edge carries the corrupt
  value instead (positive: the edge helps the clean answer).
- `eap-ig` (Hanna et al. 2024): the gradient averaged over `steps` runs whose input
  embeddings lie on the straight line from the corrupt to the clean prompt (at
  k/steps, k = 1..steps): integrated gradients, so scores add up closer to the real
  effect where the metric saturates.
- `gim`: `eap` under GIM's backward rules (`mechnb.methods.gim`, Edin et al. 2025).
- `exact` (nodes only): each head, MLP and the embeddings patched from the corrupt
  run into the clean one, one node at a time, by the batched patching engine:
  `score = metric(clean) - metric(patched)`.

Node scores of the gradient methods are the sums of the node's outgoing edge
scores (the gradient at a writer's output is the sum of the gradients at every
input that reads it). Costs: `eap` and `gim` one forward and backward per batch of
pairs, `eap-ig` `steps` of them, whatever the number of edges.

Gemma 2 and 3 normalise the sum of their heads: a head's output difference is taken
through that norm with its scale frozen at the clean run, an approximation described
in `mechnb.circuits.engine`. `exact` node scores stay exact there.
"""

from __future__ import annotations

import time
from contextlib import nullcontext

import torch

from ..core.errors import CircuitError, MetricError
from ..core.model import language_only
from ..core.remote import local_only
from .engine import embeddings, reader_gradients, scale_heads, writer_outputs
from .graph import Graph
from .task import Task

METHODS = ("eap", "eap-ig", "gim", "exact")
LEVELS = ("edge", "node")


def edge_scores(model, graph: Graph, task: Task, method: str, steps: int, batch_size: int) -> torch.Tensor:
    """`upstream downstream` scores (NaN where no edge), averaged over the task's pairs."""
    scores = torch.zeros(graph.n_upstream, graph.n_downstream, device=model.device)
    alphas = [k / steps for k in range(1, steps + 1)] if method == "eap-ig" else [1.0]

    def chunk_scores(rows, clean, corrupt):
        clean_embeds, corrupt_embeds = embeddings(model, clean), embeddings(model, corrupt)
        # Before the first token where a pair differs, every writer's clean and corrupt
        # outputs are equal (attention is causal): those positions add nothing to a score,
        # so the readers' gradients are kept from there on only.
        start = _first_difference(clean, corrupt)
        readers = torch.zeros(graph.n_downstream, len(rows), clean_embeds.shape[1] - start, model.d_model,
                              device=model.device)
        for alpha in alphas:
            inputs = corrupt_embeds + alpha * (clean_embeds - corrupt_embeds)
            with model.gim() if method == "gim" else nullcontext():
                reader_gradients(model, graph, clean, lambda l: task.metric(l, rows), inputs, readers, start)
        # After the gradients, and in place: the largest tensors are never held together.
        clean_writers = writer_outputs(model, graph, clean)
        differences = clean_writers.outputs[:, :, start:]
        differences -= writer_outputs(model, graph, corrupt).outputs[:, :, start:]
        if clean_writers.scales is not None:  # Gemma: heads differ at the clean run's frozen scale
            for layer in range(graph.n_layers):
                scale_heads(graph, differences, layer, clean_writers.scales[layer, :, start:])
        return differences.flatten(1) @ readers.flatten(1).T / len(alphas)

    for _, part in task.chunks(chunk_scores, batch_size, f"{method} edge scores"):
        scores += part
    scores = (scores / len(task)).cpu()
    return scores.masked_fill(~graph.valid, float("nan"))


def _first_difference(clean, corrupt) -> int:
    """The first position at which any pair's clean and corrupt tokens differ."""
    differs = (clean.input_ids != corrupt.input_ids).any(0).nonzero()
    return int(differs[0]) if len(differs) else clean.input_ids.shape[1]


def exact_node_scores(model, graph: Graph, task: Task, batch_size: int | None) -> torch.Tensor:
    """`upstream`: metric(clean) - metric(clean with the node's output from corrupt)."""
    scores = torch.zeros(graph.n_upstream)
    common = dict(answer=task.answers, wrong=task.wrongs, metric=task.metric_name, per_position=False,
                  direction="noising", batch_size=batch_size, progress=False)
    heads = model.patch(task.clean, task.corrupt, "head.*.*", **common)
    mlps = model.patch(task.clean, task.corrupt, "mlp_out.*", **common)
    embed = model.patch(task.clean, task.corrupt, "embed", **common)
    clean = heads.meta["clean_metric"]
    scores[0] = clean - embed.values.reshape(-1)[0]
    for layer in range(graph.n_layers):
        first = graph.head(layer, 0)
        scores[first:first + graph.n_heads] = clean - heads.values[layer]
        scores[graph.mlp(layer)] = clean - mlps.values[layer]
    return scores


@local_only
@language_only
def circuit(model, clean, corrupt, answer, wrong=None, method: str = "eap-ig", level: str = "edge",
            steps: int = 5, metric="logit_diff", batch_size: int | None = None):
    """Score every edge (or node) of the model's graph for a clean/corrupt task.

    Args:
        clean, corrupt: a prompt each, or equal-length lists of pairs (scores average
            over pairs). A pair must tokenize to one length; pairs may differ.
        answer, wrong: single-token answers (one for all pairs or one per pair), or
            sets of single tokens (`{" 5", " 6"}`: logit_diff uses their mean logit,
            prob and prob_diff their summed probability).
        method: `eap`, `eap-ig` (integrated over `steps` inputs from corrupt to
            clean), `gim` (eap under GIM's backward rules) or `exact` (node
            patching, `level="node"` only). See the module docstring.
        level: `edge` (each writer into each head's q, k, v input, MLP, logits) or
            `node` (heads and MLPs). On Gemma 2 and 3 a head's edges pass through the
            norm of the heads' sum with its scale frozen at the run being scored (see
            `mechnb.circuits.engine`).
        steps: integration steps of `eap-ig`.
        metric: `logit_diff`, `prob`, `logprob`, `prob_diff`, `kl` or a function of
            the last position's logits (`batch vocab -> batch`).
        batch_size: prompt pairs per forward (default 8; rows per forward for
            `exact`); a chunk that runs out of memory is halved and run again.

    Returns:
        A `Circuit`: `.scores` (`upstream downstream`, NaN where no edge; `upstream`
        at node level), `.df`, `.top(n)`, `.plot()`, `.faithfulness()`, `.save()`.
        Example: `model.circuit(clean, corrupt, " Mary", " John").top("2%")`.
    """
    from .circuit import Circuit

    start = time.perf_counter()
    if method not in METHODS:
        raise CircuitError(f"unknown circuit method {method!r}: use one of {', '.join(METHODS)}")
    if level not in LEVELS:
        raise CircuitError(f"unknown level {level!r}: use 'edge' or 'node'")
    if method == "exact" and level != "node":
        raise CircuitError("method='exact' patches nodes one at a time: use level='node' "
                           "(edges are too many to patch one by one; use eap-ig for edges)")
    if not isinstance(steps, int) or steps < 1:
        raise CircuitError(f"steps must be a positive integer, got {steps!r}")
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise CircuitError(f"batch_size must be a positive integer, got {batch_size!r}")
    graph = Graph.of(model)
    try:
        task = Task(model, clean, corrupt, answer, wrong, metric)
    except MetricError as error:
        raise CircuitError(str(error)) from None
    if method == "exact":
        scores = exact_node_scores(model, graph, task, batch_size)
    else:
        scores = edge_scores(model, graph, task, method, steps, batch_size or 8)
        if level == "node":
            scores = scores.nan_to_num().sum(1)
    meta = {"method": method, "level": level, "steps": steps if method == "eap-ig" else None,
            "model": model.name, "n_pairs": len(task), "notes": task.notes,
            "seconds": round(time.perf_counter() - start, 3), **task.describe()}
    return Circuit(graph, scores, meta, model=model, task=task)
