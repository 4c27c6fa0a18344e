"""Which units fire together? Principal components and neuron clusters of a site's activations.

    >>> pca = model.coactivation("mlp_out.12", texts, components=10)
    >>> pca.values                    # explained variance ratio of the first 10 components
    >>> pca                           # each component's top tokens in context, coloured
    >>> clusters = model.coactivation("neuron.12", texts, components=8, method="kmeans")

- `pca`: the site's activations over every real token of `texts` (up to
  `max_tokens`), centred, decomposed by SVD. `meta["explained_variance"]` holds the
  ratio of every component (it sums to 1); each of the first `components` gets its
  top-scoring tokens with the tokens before them.
- `kmeans`: units (neurons, residual dimensions) grouped by the correlation of their
  activations over tokens: k-means (k = `components`, seeded) on each unit's row of
  the correlation matrix. `.values` is that matrix with units ordered by cluster.
"""

from __future__ import annotations

import torch

from ..core.checks import as_list, is_int
from ..core.errors import CoactivationError, SiteError

METHODS = ("pca", "kmeans")
CONTEXT = 8
TOKENS = 256  # tokens kept per text


def coactivation(model, site, texts, components: int = 10, method: str = "pca", max_tokens: int = 20_000,
                 seed: int = 0, batch_size: int = 8):
    """Which units fire together: principal components or correlation clusters of units.

    Args:
        site: one per-token vector site (`mlp_out.12`, `resid_post.5`, `neuron.12`, `head.9.6`).
        texts: a list of texts; the first 256 tokens of each are used.
        components: principal components shown (`pca`) or clusters (`kmeans`).
        method: `pca` or `kmeans` (see the module docstring).
        max_tokens: tokens used in all.
        seed: k-means' initial centres.
        batch_size: texts per forward (halved when a chunk runs out of memory).

    Returns:
        A `Result`: explained variance per component with each one's top tokens in
        context, or the unit correlation matrix ordered by cluster. Example:
        `model.coactivation("mlp_out.12", texts, components=6)`.
    """
    from ..core.sites import parse

    if method not in METHODS:
        raise CoactivationError(f"unknown method {method!r}: use 'pca' or 'kmeans'")
    parsed = parse(site)
    concrete = parsed.expand(model)
    if len(concrete) != 1 or parsed.kind in ("pattern", "logits") or parsed.index is not None and parsed.kind != "head":
        raise SiteError(f"coactivation reads one per-token vector site (mlp_out.12, resid_post.5, "
                        f"neuron.12, head.9.6), not {site!r}")
    texts = as_list(texts) or []
    if not texts or not all(isinstance(t, str) and t for t in texts):
        raise CoactivationError("coactivation needs a non-empty list of non-empty texts")
    for name, value in (("components", components), ("max_tokens", max_tokens)):
        if not is_int(value) or value < 1:
            raise CoactivationError(f"{name} must be a positive integer, got {value!r}")
    values, tokens, where = _activations(model, concrete[0], texts, max_tokens, batch_size)
    if len(values) < 2:
        raise CoactivationError("the texts hold fewer than 2 tokens: give more text")
    if method == "pca":
        return _pca(model, str(concrete[0]), values, tokens, where, components)
    return _clusters(model, str(concrete[0]), values, components, seed)


def _activations(model, site, texts, max_tokens: int, batch_size: int):
    """Values `tokens width`, each text's tokens, and (text, position) per value row."""
    from ..core.batch import Batch
    from ..core.cache import cache as run_cache
    from ..core.memory import Chunks

    # One budget for every call: a size halved after running out of memory stays halved.
    chunks = Chunks(batch_size, "coactivation", "texts", advice="use shorter texts")
    rows, tokens, where = [], [], []
    count = 0
    for start in range(0, len(texts), batch_size):
        # Only the first TOKENS tokens of a text are kept, so only they are run: with causal
        # attention their values do not depend on what follows.
        ids = [model.tokenizer(text[:2000])["input_ids"][:TOKENS] for text in texts[start:start + batch_size]]
        cache = run_cache(model, Batch.of_ids(model.tokenizer, ids), site.name, batch_size=chunks)
        part = cache[site.name].float()
        for i, text_tokens in enumerate(cache.tokens):
            n = len(text_tokens)
            index = len(tokens)
            tokens.append(text_tokens)
            rows.append(part[i, :n].reshape(n, -1).cpu())
            where += [(index, p) for p in range(n)]
            count += n
        if count >= max_tokens:
            break
    values = torch.cat(rows)[:max_tokens]
    return values, tokens, where[:max_tokens]


def _pca(model, site: str, values, tokens, where, components: int):
    import pandas as pd

    from ..display.render import compact, view
    from ..display.results import Result

    centred = values - values.mean(0)
    _, singular, directions = torch.linalg.svd(centred, full_matrices=False)
    variance = singular ** 2
    ratio = variance / variance.sum()
    components = min(components, len(ratio))
    scores = centred @ directions[:components].T  # tokens components
    rows, views = [], []
    row_of = {place: i for i, place in enumerate(where)}
    for c in range(components):
        top = scores[:, c].topk(min(5, len(scores))).indices.tolist()
        shown_tokens, shown_values = [], []
        for rank, index in enumerate(top):
            text, position = where[index]
            window = tokens[text][max(0, position - CONTEXT):position + 1]
            rows.append({"component": c, "explained_variance": ratio[c].item(), "rank": rank,
                         "token": tokens[text][position], "context": "".join(window),
                         "score": scores[index, c].item()})
            first = max(0, position - CONTEXT)
            context_scores = [scores[row_of[(text, p)], c].item() if (text, p) in row_of else 0.0
                              for p in range(first, position + 1)]
            shown_tokens += window + [" | "]
            shown_values += context_scores + [0.0]
        views.append(view("ColoredTokens", {"tokens": shown_tokens, "values": compact(shown_values, 3)},
                          title=f"component {c}: {ratio[c].item():.1%} of the variance"))
    meta = {"title": f"PCA of {site} over {len(values)} tokens: explained variance", "site": site,
            "method": "pca", "scale": "probability",
            "explained_variance": ratio.tolist(), "n_tokens": len(values), "model": model.name,
            "axes": ["component"], "labels": {"component": [str(c) for c in range(components)]}}
    return Result(ratio[:components], pd.DataFrame(rows), meta, html=lambda result: "".join(views))


def _clusters(model, site: str, values, k: int, seed: int):
    import pandas as pd

    from ..display.results import Result

    centred = values - values.mean(0)
    spread = centred.norm(dim=0).clamp(min=1e-8)
    correlation = (centred.T @ centred) / (spread[:, None] * spread[None, :])
    k = min(k, len(correlation))
    generator = torch.Generator().manual_seed(seed)
    centres = correlation[torch.randperm(len(correlation), generator=generator)[:k]].clone()
    for _ in range(50):
        labels = torch.cdist(correlation, centres).argmin(1)
        moved = torch.stack([correlation[labels == c].mean(0) if (labels == c).any() else centres[c]
                             for c in range(k)])
        if torch.allclose(moved, centres):
            break
        centres = moved
    order = torch.argsort(labels, stable=True)
    within = []
    for c in range(k):
        members = (labels == c).nonzero().flatten()
        block = correlation[members][:, members]
        off = block.sum() - block.diagonal().sum()
        within.append((off / max(len(members) * (len(members) - 1), 1)).item())
    df = pd.DataFrame({"unit": range(len(labels)), "cluster": labels.tolist(),
                       "cluster_size": [(labels == c).sum().item() for c in labels.tolist()],
                       "mean_correlation_within": [within[c] for c in labels.tolist()]})
    meta = {"title": f"{site}: {k} clusters of co-activating units (correlation, ordered by cluster)",
            "scale": "signed",
            "site": site, "method": "kmeans", "clusters": k, "n_tokens": len(values), "model": model.name,
            "axes": ["unit", "unit_"], "order": order.tolist(), "mean_correlation_within": within,
            # Units in cluster order, labelled `cluster.unit`: the figure's ticks mark the clusters.
            "labels": {axis: [f"{labels[u]}.{u}" for u in order.tolist()] for axis in ("unit", "unit_")},
            "groups": {"unit": "cluster", "unit_": "cluster"}}
    return Result(correlation[order][:, order], df, meta)
