"""The static picture of an attribution graph (matplotlib).

Token embeddings along the bottom, one column per prompt position (its token below), a row
per layer above them, the logits on top. Nodes at one (layer, position) sit side by side
in their cell: features as circles, error nodes as grey squares. Edges are lines, their
width by |weight| relative to the largest shown, blue for positive and red for negative;
only the `max_edges` largest are drawn.
"""

from __future__ import annotations

POSITIVE, NEGATIVE = "#2166ac", "#b2182b"
COLOURS = {"feature": "#f4a261", "error": "#9e9e9e", "embedding": "#4c956c", "logit": "#6a4c93"}


def layout(graph) -> dict:
    """Node index -> (x, y) for the kept nodes."""
    kept = graph.node_mask.nonzero().squeeze(-1).tolist()
    cells: dict = {}
    for i in kept:
        if i < graph.error_start:
            key = (int(graph.feature_layer[i]), int(graph.feature_pos[i]))
        elif i < graph.token_start:
            key = divmod(i - graph.error_start, graph.n_pos)
        elif i < graph.logit_start:
            key = (-1, i - graph.token_start)
        else:
            key = (graph.n_layers, graph.n_pos - 1 + (i - graph.logit_start))
        cells.setdefault(key, []).append(i)
    where = {}
    for (layer, pos), members in cells.items():
        n = len(members)
        for k, i in enumerate(members):
            offset = 0.0 if n == 1 else (k / (n - 1) - 0.5) * 0.7
            where[i] = (pos + offset, layer)
    return where


def figure(graph, ax=None, max_edges: int = 300):
    import matplotlib.pyplot as plt
    from matplotlib.collections import LineCollection

    if ax is None:
        fig, ax = plt.subplots(figsize=(min(9.0, 2.0 + 0.6 * (graph.n_pos + len(graph.logit_ids))), 6.5))
    else:
        fig = ax.figure
    where = layout(graph)
    targets, sources = graph.edge_mask.nonzero(as_tuple=True)
    weights = graph.adjacency[targets, sources]
    if len(weights) > max_edges:
        keep = weights.abs().topk(max_edges).indices
        targets, sources, weights = targets[keep], sources[keep], weights[keep]
    largest = float(weights.abs().max()) if len(weights) else 1.0
    segments, widths, colours = [], [], []
    for t, s, w in zip(targets.tolist(), sources.tolist(), weights.tolist()):
        if s in where and t in where:
            segments.append([where[s], where[t]])
            widths.append(0.3 + 3.0 * abs(w) / largest)
            colours.append(POSITIVE if w > 0 else NEGATIVE)
    ax.add_collection(LineCollection(segments, linewidths=widths, colors=colours, alpha=0.55, zorder=1))
    for kind, marker, mask in zip(("feature", "error", "embedding", "logit"), "osD^", graph.kind_masks()):
        chosen = [i for i in where if mask[i]]
        if chosen:
            xs, ys = zip(*(where[i] for i in chosen))
            ax.scatter(xs, ys, s=36, marker=marker, color=COLOURS[kind], edgecolors="black", linewidths=0.4,
                       zorder=2, label={"error": "error (MLP minus transcoder)"}.get(kind, kind))
    for j, vocab in enumerate(graph.logit_ids):
        i = graph.logit_start + j
        if i in where:
            x, y = where[i]
            ax.annotate(f"{graph.model.tokenizer.decode([vocab])!r}\n{float(graph.logit_probs[j]):.2f}", (x, y),
                        textcoords="offset points", xytext=(0, 8), ha="center", fontsize=7)
    ax.set_xticks(range(graph.n_pos))
    ax.set_xticklabels([repr(t)[1:-1] for t in graph.tokens], rotation=45, ha="right", fontsize=8)
    step = max(1, graph.n_layers // 10)
    ticks = [-1, *range(0, graph.n_layers, step), graph.n_layers]
    ax.set_yticks(ticks)
    ax.set_yticklabels(["embed", *[f"layer {l}" for l in ticks[1:-1]], "logits"], fontsize=8)
    ax.set_xlim(-0.8, graph.n_pos - 0.2 + len(graph.logit_ids))
    ax.set_ylim(-1.8, graph.n_layers + 1.2)
    ax.set_title(f"{graph._title()}\n{int(graph.node_mask.sum())} nodes, {len(segments)} edges shown "
                 f"(blue +, red -)", fontsize=9)
    ax.legend(loc="upper left", fontsize=7, frameon=False)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    fig.tight_layout()
    return fig
