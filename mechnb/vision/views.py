"""Attention drawn over the image: where each head of a vision transformer looks.

    >>> mechnb.vision.attention_over_image(vit, image, layer=2)    # a panel per head

For one image and one layer, each panel is the image with the attention of one query
position ([CLS] by default, `query=0`) over the patches laid over it as a heatmap on the
patch grid; the panel's title says how much of that attention goes to the prefix tokens
([CLS] itself) rather than to any patch, which a patch map alone cannot show.
"""

from __future__ import annotations

import torch

from ..core.errors import SiteError


def attention_over_image(model, image, layer: int, query: int = 0, heads=None):
    """A matplotlib figure: for each head (or those in `heads`), the attention of position
    `query` over the patches of `image`, on the patch grid, laid over the image."""
    if not getattr(model.tokenizer, "reads_images", False):
        raise SiteError(f"attention_over_image needs a vision model; {model.name} reads text "
                        "(model.attention(prompt) draws its patterns)")
    site = f"pattern.{layer}"
    pattern = model.cache(image, site)[site]
    if pattern.shape[0] != 1:
        raise SiteError(f"attention_over_image draws one image, got {pattern.shape[0]}")
    n_heads = pattern.shape[1]
    heads = list(range(n_heads)) if heads is None else [heads] if isinstance(heads, int) else list(heads)
    for head in heads:
        if not isinstance(head, int) or not 0 <= head < n_heads:
            raise SiteError(f"head {head!r} out of range: layer {layer} has heads 0..{n_heads - 1}")
    return draw(pattern[0, heads], image if torch.is_tensor(image) else None, model.tokenizer.grid, layer,
                heads, query)


def draw(pattern: torch.Tensor, image, grid: tuple[int, int], layer: int, heads: list[int], query: int = 0):
    """The figure of `attention_over_image` from patterns already computed: `pattern` is
    `head q k` for the heads `heads` of `layer`, `image` a tensor (`C H W`, or None to draw
    the patch grid alone) and `grid` the model's patch grid `(rows, cols)`."""
    import matplotlib.pyplot as plt

    from .concepts import _as_tensor

    pattern = pattern.float().cpu()
    n_positions = pattern.shape[-1]
    if not -n_positions <= query < n_positions:
        raise SiteError(f"query {query} out of range: the image has positions 0..{n_positions - 1}")
    rows, cols = grid
    prefix = n_positions - rows * cols
    shown = _as_tensor(image)[0] if image is not None else None
    figure, axes = plt.subplots(1, len(heads), figsize=(1.9 * len(heads), 2.2), squeeze=False)
    for axis, head, weights in zip(axes[0], heads, pattern[:, query]):
        patches = weights[prefix:].reshape(rows, cols)
        if shown is not None:
            picture = (shown - shown.min()) / (shown.max() - shown.min()).clamp(min=1e-6)
            height, width = picture.shape[1:]
            axis.imshow(picture.permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray_r" if picture.shape[0] == 1
                        else None)
            axis.imshow(patches.numpy(), cmap="Reds", alpha=0.55, extent=(-0.5, width - 0.5, height - 0.5, -0.5),
                        vmin=0, vmax=float(patches.max().clamp(min=1e-6)))
        else:
            axis.imshow(patches.numpy(), cmap="Reds", vmin=0)
        axis.set_xticks([])
        axis.set_yticks([])
        axis.set_title(f"L{layer}H{head} · prefix {float(weights[:prefix].sum()):.0%}", fontsize=8)
    figure.tight_layout()
    plt.close(figure)
    return figure
