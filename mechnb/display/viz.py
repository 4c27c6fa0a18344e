"""Pictures of results: labelled matplotlib heatmaps that read at a glance in a notebook column.

`heatmap(values, meta)` draws a 1-D result as one row, a 2-D result as one heatmap, and a
3-D result as a grid of heatmaps over its first axis (or over heads, when the grid is
`layer head pos`, so that every panel keeps layers against positions). The rules every
figure follows:

- Colour says what the numbers are. Values that can be negative (a patching metric, an
  attribution, a logit contribution) use a diverging map centred on zero, red positive
  and blue negative, symmetric around it; values that cannot (probabilities, scores,
  norms) use a sequential map that starts at zero. `meta["scale"]` says which
  (`"signed"`, `"positive"`, `"probability"` for [0, 1]); without it the values decide.
- Ticks are readable: at most about 32 labels an axis. An axis that `meta["groups"]`
  groups (`{"head": "layer"}`), with labels `G.i` (head `L.H`, unit `cluster.unit`),
  gets a separator between groups and each group's name at the middle of its block;
  other long axes (layers, tokens) show every k-th label.
- The title says what was measured, and a second line on what prompt
  (`meta["prompt"]`, or the clean and corrupt prompts).
- The size fits a notebook column: at most 9 x 8 inches (720 x 640 pixels at 80 dpi).

Example:
    >>> figure = heatmap(values, {"axes": ["layer", "pos"], "labels": {"pos": tokens},
    ...                           "title": "resid_pre patching", "scale": "signed"})
"""

from __future__ import annotations

import re

MAX_PANELS = 16
MAX_TICKS = 32
WIDTH, HEIGHT = 9.0, 8.0  # inches: a notebook column
_HEAD = re.compile(r"^(\d+)\.(\d+)$")


def png(figure, tight: bool = True) -> bytes:
    """A figure as PNG bytes (80 dpi, cropped to its content unless `tight=False`); closes it."""
    import io

    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80, **({"bbox_inches": "tight"} if tight else {}))
    plt.close(figure)
    return buffer.getvalue()


def heatmap(values, meta: dict, ax=None):
    """A figure of `values` labelled by `meta["axes"]`, `meta["labels"]`, `meta["title"]`."""
    import matplotlib.pyplot as plt

    data = values.detach().float().cpu().numpy()
    axes = list(meta.get("axes", [f"axis {i}" for i in range(data.ndim)]))
    labels = meta.get("labels", {})
    scale = scale_of(data, meta)
    if data.ndim == 1:
        data, axes = data[None], ["", *axes]
    if data.ndim == 3 and ax is None:
        # Panels over the leading axis (site, kind), or over heads when the grid is
        # layer x head x pos, so that each panel keeps layers against positions.
        panel_axis = 1 if axes[0] == "layer" and axes[-1] == "pos" else 0
        count = min(data.shape[panel_axis], MAX_PANELS)
        columns = min(count, 4 if panel_axis == 1 else 3)
        rows = -(-count // columns)
        rest = [a for j, a in enumerate(axes) if j != panel_axis]
        panel_shape = [n for j, n in enumerate(data.shape) if j != panel_axis]
        width, height = _size(panel_shape, columns, rows)
        figure, grid = plt.subplots(rows, columns, figsize=(width, height), squeeze=False)
        limits = _limits(data, scale)
        for i in range(rows * columns):
            panel = grid[i // columns, i % columns]
            if i >= count:
                panel.axis("off")
                continue
            names = labels.get(axes[panel_axis])
            name = names[i] if names else f"{axes[panel_axis]} {i}"
            _draw(panel, data.take(i, axis=panel_axis), rest, labels, f"{axes[panel_axis]} {name}"
                  if not names else str(name), figure, scale, limits, colorbar=(i % columns == columns - 1),
                  groups=meta.get("groups", {}))
        figure.suptitle(title(meta), fontsize=10)
        figure.tight_layout()
        return figure
    if data.ndim == 3:
        data = data[0]
    if ax is None:
        figure, ax = plt.subplots(figsize=_size(data.shape, 1, 1))
    else:
        figure = ax.figure
    _draw(ax, data, axes, labels, title(meta), figure, scale, _limits(data, scale), groups=meta.get("groups", {}))
    notes = meta.get("annotations")
    if notes is not None and data.size <= 1200:
        top = float(data.max()) if data.size else 1.0
        for row, texts in enumerate(notes):
            for column, text in enumerate(texts):
                ax.text(column, row, str(text)[:8], ha="center", va="center", fontsize=6,
                        color="white" if data[row, column] < 0.5 * (top or 1) else "black")
    figure.tight_layout()
    return figure


def scale_of(data, meta: dict) -> str:
    """`signed`, `positive` or `probability`: from `meta["scale"]`, else from the values."""
    import numpy as np

    scale = meta.get("scale")
    if scale in ("signed", "positive", "probability"):
        return scale
    finite = data[np.isfinite(data)]
    return "signed" if finite.size and finite.min() < 0 else "positive"


def _limits(data, scale: str) -> tuple[float, float]:
    """Colour limits: symmetric around zero for signed values, from zero for the others."""
    import numpy as np

    finite = data[np.isfinite(data)]
    if scale == "probability":
        return 0.0, 1.0
    if scale == "signed":
        bound = float(np.abs(finite).max()) if finite.size else 1.0
        return -(bound or 1.0), bound or 1.0
    top = float(finite.max()) if finite.size else 1.0
    return 0.0, top if top > 0 else 1.0


def _size(shape, columns: int, rows: int) -> tuple[float, float]:
    """Inches for `rows x columns` panels of `shape` cells, within a notebook column."""
    n_rows, n_columns = (shape[0], shape[1]) if len(shape) > 1 else (1, shape[0])
    width = min(WIDTH, max(6.0, columns * (n_columns * 0.42 + 1.8)))
    height = min(HEIGHT, max(2.4, rows * (n_rows * 0.22 + 1.6)))
    return width, height


def title(meta: dict, width: int = 72) -> str:
    """What was measured, and on what prompt, wrapped to a notebook column's width."""
    import textwrap

    lines = [meta.get("title", "")]
    shorten = lambda text: repr(text if len(text) <= 60 else text[:57] + "...")
    prompt = meta.get("prompt")
    clean, corrupt = meta.get("clean"), meta.get("corrupt")
    if isinstance(prompt, str):
        lines.append(f"on {shorten(prompt)}")
    elif isinstance(clean, list) and isinstance(corrupt, list) and clean:
        more = f" (and {len(clean) - 1} more pairs)" if len(clean) > 1 else ""
        lines += [f"clean {shorten(clean[0])}{more}", f"corrupt {shorten(corrupt[0])}"]
    return "\n".join(wrapped for line in lines for wrapped in textwrap.wrap(line, width) or [""])


def _draw(ax, data, axes, labels, title, figure, scale, limits, colorbar: bool = True, groups=None) -> None:
    """One heatmap on `ax`: rows are axes[0], columns axes[1]."""
    cmap = "RdBu_r" if scale == "signed" else "viridis"
    image = ax.imshow(data, aspect="auto", cmap=cmap, vmin=limits[0], vmax=limits[1], interpolation="nearest")
    if colorbar:
        figure.colorbar(image, ax=ax, fraction=0.046, pad=0.02)
    ax.set_ylabel(axes[0])
    ax.set_xlabel(axes[1])
    ax.set_title(title, fontsize=9)
    for axis_index in (1, 0):
        name = axes[axis_index]
        n = data.shape[axis_index]
        names = [str(t) for t in labels[name]][:n] if name in labels else [str(i) for i in range(n)]
        _ticks(ax, axis_index, names, (groups or {}).get(name))


def _ticks(ax, axis_index: int, names: list[str], group: str | None = None) -> None:
    """Readable tick labels: grouped (heads by layer) when `group` names the groups, else at
    most MAX_TICKS of them."""
    set_ticks, set_labels = (ax.set_xticks, ax.set_xticklabels) if axis_index == 1 else \
        (ax.set_yticks, ax.set_yticklabels)
    lines = ax.axvline if axis_index == 1 else ax.axhline
    n = len(names)
    heads = [_HEAD.match(name) for name in names]
    if group and n > MAX_TICKS and all(heads):
        layers = [int(match.group(1)) for match in heads]
        starts = [i for i in range(n) if i == 0 or layers[i] != layers[i - 1]]
        blocks = list(zip(starts, starts[1:] + [n]))
        step = max(1, -(-len(blocks) // MAX_TICKS))
        for start, _ in blocks[1:]:
            lines(start - 0.5, color="0.5", linewidth=0.5, alpha=0.6)
        shown = blocks[::step]
        set_ticks([(start + stop - 1) / 2 for start, stop in shown])
        set_labels([str(layers[start]) for start, _ in shown], fontsize=7)
        (ax.set_xlabel if axis_index == 1 else ax.set_ylabel)(
            f"{(ax.get_xlabel() if axis_index == 1 else ax.get_ylabel())} (by {group})")
        return
    step = max(1, -(-n // MAX_TICKS))
    positions = list(range(0, n, step))
    set_ticks(positions)
    long = max((len(names[i]) for i in positions), default=0) > 3
    if axis_index == 1:
        set_labels([names[i] for i in positions], rotation=90 if long else 0, fontsize=7)
    else:
        set_labels([names[i] for i in positions], fontsize=7)
