"""Pictures of results: labelled matplotlib heatmaps, for the notebook and for files.

`heatmap(values, meta)` draws a 1-D result as bars, a 2-D result as one heatmap, and
a 3-D result as a row of heatmaps over its first axis... except that a trailing `pos`
axis is kept on the x-axis of every panel, tokens as tick labels. Colours are
centred on zero (red positive, blue negative) unless the values are all of one sign.

Example:
    >>> figure = heatmap(values, {"axes": ["layer", "pos"], "labels": {"pos": tokens},
    ...                           "title": "resid_pre patching"})
"""

from __future__ import annotations

MAX_PANELS = 16


def heatmap(values, meta: dict, ax=None):
    """A figure of `values` labelled by `meta["axes"]`, `meta["labels"]`, `meta["title"]`."""
    import matplotlib.pyplot as plt

    data = values.detach().float().cpu().numpy()
    axes = list(meta.get("axes", [f"axis {i}" for i in range(data.ndim)]))
    labels = meta.get("labels", {})
    title = meta.get("title", "")
    if data.ndim == 1:
        data, axes = data[None], ["", *axes]
    if data.ndim == 3:
        # Panels over the leading axis (site, kind), or over heads when the grid is
        # layer x head x pos, so that each panel keeps layers against positions.
        panel_axis = 1 if axes[0] == "layer" and axes[-1] == "pos" else 0
        count = min(data.shape[panel_axis], MAX_PANELS)
        figure, grid = plt.subplots(1, count, figsize=(min(3.2 * count, 20), 4), squeeze=False)
        for i in range(count):
            panel = data.take(i, axis=panel_axis)
            rest = [a for j, a in enumerate(axes) if j != panel_axis]
            names = labels.get(axes[panel_axis])
            name = names[i] if names else f"{axes[panel_axis]} {i}"
            _draw(grid[0, i], panel, rest, labels, str(name), figure)
        figure.suptitle(title)
        figure.tight_layout()
        return figure
    if ax is None:
        width = min(20, 3 + 0.45 * data.shape[1])
        height = min(14, 2 + 0.25 * data.shape[0])
        figure, ax = plt.subplots(figsize=(width, height))
    else:
        figure = ax.figure
    _draw(ax, data, axes, labels, title, figure)
    notes = meta.get("annotations")
    if notes is not None and data.size <= 1200:
        for row, texts in enumerate(notes):
            for column, text in enumerate(texts):
                ax.text(column, row, str(text)[:8], ha="center", va="center", fontsize=6,
                        color="white" if data[row, column] < 0.5 * float(data.max() or 1) else "black")
    figure.tight_layout()
    return figure


def _draw(ax, data, axes, labels, title, figure) -> None:
    """One heatmap on `ax`: rows are axes[0], columns axes[1]."""
    import numpy as np

    bound = float(np.nanmax(np.abs(data))) if data.size else 1.0
    bound = bound or 1.0
    if (data >= 0).all() or (data <= 0).all():
        image = ax.imshow(data, aspect="auto", cmap="viridis")
    else:
        image = ax.imshow(data, aspect="auto", cmap="RdBu_r", vmin=-bound, vmax=bound)
    figure.colorbar(image, ax=ax, fraction=0.046, pad=0.02)
    ax.set_ylabel(axes[0])
    ax.set_xlabel(axes[1])
    ax.set_title(title, fontsize=10)
    for axis_index, setter in ((1, ax.set_xticks), (0, ax.set_yticks)):
        name = axes[axis_index]
        n = data.shape[axis_index]
        if name in labels:
            setter(range(n))
            ticks = [str(t) for t in labels[name]][:n]
            if axis_index == 1:
                ax.set_xticklabels(ticks, rotation=90, fontsize=8)
            else:
                ax.set_yticklabels(ticks, fontsize=8)
        elif n <= 40:
            setter(range(n))
