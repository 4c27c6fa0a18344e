"""Steering: add a direction to the residual stream and watch the model's behaviour move.

A steering vector is the difference of mean activations between prompts that show
a property and prompts that do not (ActAdd, Turner et al. 2023; contrastive
activation addition, Rimsky et al. 2024). Added to a site at every forward, scaled,
it pushes generation toward the property; an SAE feature's decoder direction works
the same way.

    >>> v = model.steering_vector(["I love this", ...], ["I hate this", ...], "resid_pre.12")
    >>> model.steer("resid_pre.12", v, scale=8)          # persistent, like an ablation
    >>> model.generate("I think the movie was", compare=True)
    >>> model.steer("resid_post.12", "sae.12.1234", scale=4)   # along an SAE feature
    >>> model.steer("mlp_out.14", "tc.14.1203", scale=4)       # a transcoder feature's output direction

On a vision model the two sides are images (a tensor `batch channel height width`, or
PIL images), and the vector is their mean over every position (`[CLS]` and the
patches), or at one position (`positions=0`, `[CLS]`):

    >>> v = vit.steering_vector(sevens, ones, "resid_post.1")
    >>> with vit.steered("resid_post.1", v, scale=1): vit.top(a_one)

Gotchas: the scale is in units of the vector; a difference of means is small next to
the residual stream's norm in late layers, so useful scales are often 4-16. Steering
acts on every position unless `positions` says otherwise, prompt and generated
tokens alike.
"""

from __future__ import annotations

import torch

from ..core.checks import is_int
from ..core.errors import SiteError, SteerError
from ..core.interventions import Scoped, Steer, with_positions
from ..core.remote import local_only


def steering_vector(model, positive, negative, site, positions=None) -> torch.Tensor:
    """Mean activation of the `positive` prompts minus that of the `negative` ones at `site`.

    Args:
        positive, negative: prompts that show the property, and prompts that do not; on a
            vision model, images (`batch channel height width`, or PIL images).
        site: one residual-stream site (`resid_pre.12`, `resid_post.12`, `mlp_out.3`, ...).
        positions: -1 takes each prompt's last token, `"mean"` the mean over all its
            tokens (each prompt weighs the same). None: -1 for prompts, `"mean"` (over
            `[CLS]` and every patch) for images, where an int names one position (0: `[CLS]`).

    Returns:
        A `d_model` vector. Example: `v = model.steering_vector(["I love it"], ["I hate it"], "resid_pre.12")`.
    """
    from ..core.sites import parse

    parsed = parse(site)
    concrete = parsed.expand(model)
    if len(concrete) != 1 or parsed.kind not in ("resid_pre", "resid_mid", "resid_post", "attn_out",
                                                 "mlp_out", "embed") or parsed.positions is not None:
        raise SiteError(f"a steering vector lives at one residual-stream site (resid_pre.L, "
                        f"resid_post.L, attn_out.L, mlp_out.L, ...), not {site!r}")
    if model.reads_images:
        positions = "mean" if positions is None else positions
        n = len(model.tokenizer.labels)
        if positions != "mean" and not (is_int(positions) and -n <= positions < n):
            raise SteerError(f"positions must be 'mean' (every position of each image) or a position "
                             f"{-n}..{n - 1} (0 is [CLS]), got {positions!r}")
    else:
        positions = -1 if positions is None else positions
        if positions not in (-1, "mean"):
            raise SteerError(f"positions must be -1 (each prompt's last token) or 'mean', got {positions!r}")
    return _mean(model, positive, concrete[0], positions, "positive") - \
        _mean(model, negative, concrete[0], positions, "negative")


def _mean(model, prompts, site, positions, role: str) -> torch.Tensor:
    if model.reads_images:
        return _image_mean(model, prompts, site, positions, role)
    prompts = [prompts] if isinstance(prompts, str) else list(prompts or [])
    if not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise SteerError(f"the {role} prompts must be a non-empty list of non-empty strings")
    cache = model.cache(prompts, site.name)
    values = cache[site.name].float()  # batch pos d
    mask = cache.attention_mask.bool().to(values.device)
    if positions == -1:
        last = mask.sum(1) - 1
        per_prompt = values[torch.arange(len(prompts)), last]
    else:
        per_prompt = (values * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    return per_prompt.mean(0)


def _image_mean(model, images, site, positions, role: str) -> torch.Tensor:
    """The images' mean value at `site`, over every position or at one."""
    from ..core.errors import PromptError

    try:
        pixels = model.tokenizer.pixels(images)
    except PromptError as problem:
        raise SteerError(f"the {role} images: {problem}") from None
    values = model.cache(pixels, site.name)[site.name].float()  # batch pos d
    return (values.mean(1) if positions == "mean" else values[:, positions]).mean(0)


@local_only
def steer(model, site, vector, scale: float = 1.0, positions=None) -> list:
    """Add `scale * vector` to a site's value in every forward, until removed.

    Args:
        site: a vector-valued site (`resid_pre.12`, `mlp_out.3`, `head.9.6`, ranges).
        vector: a tensor as wide as the site (`d_model`), or an attached SAE feature
            (`"sae.12.1234"`, `"tc.14.1203"`: its decoder direction).
        scale: the multiplier (0 leaves the model as it is).
        positions: positions (`-1`, `"3:7"`, a slice); default every position.

    Returns:
        The `Steer` interventions added. Example: `model.steer("resid_pre.12", v, 8)`;
        `with model.steered("resid_pre.12", v, 8):` for one block only.
    """
    return model.add(steerings(model, site, vector, scale, positions))


def steered(model, *args, **kwargs) -> Scoped:
    """`with model.steered(site, vector, scale):` the steering `steer(...)` adds (the same
    arguments), active inside the block only."""
    return Scoped(model, steer(model, *args, **kwargs))


def steerings(model, site, vector, scale: float, positions) -> list[Steer]:
    """The `Steer` interventions of `steer` (validated)."""
    from ..core.sites import parse

    source = "vector"
    if isinstance(vector, str):
        feature = parse(vector)
        if feature.kind not in ("sae", "tc") or not isinstance(feature.index, int) \
                or (feature.kind == "tc" and not isinstance(feature.layer, int)):
            raise SteerError(f"steer takes a vector, an SAE feature such as 'sae.12.1234' or a transcoder "
                             f"feature such as 'tc.14.1203', got {vector!r}")
        if feature.kind == "sae":
            decoder = model.sae_at(feature).W_dec
        else:
            (feature,) = feature.expand(model)  # checked: an attached set covers it, in range
            decoder = model.transcoders_at(feature)[feature.layer].W_dec
        if not 0 <= feature.index < len(decoder):
            raise SiteError(f"{vector}: there are features 0-{len(decoder) - 1}")
        source, vector = vector, decoder[feature.index].detach()
    if not torch.is_tensor(vector):
        raise SteerError(f"steer takes a tensor (d_model) or an SAE feature name, got {type(vector).__name__}")
    if not torch.isfinite(vector).all():
        raise SteerError("the steering vector has NaN or infinite entries")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not abs(scale) < float("inf"):
        raise SteerError(f"scale must be a number (a finite multiple of the vector), got {scale!r}")
    made = []
    for concrete in with_positions(site, positions).expand(model):
        width = _width(model, concrete)
        if width is None and vector.dim() != 1:
            raise SteerError(f"steering adds one vector to {concrete}, got a tensor of shape {tuple(vector.shape)}")
        if width is not None and vector.shape != (width,):
            raise SteerError(f"{concrete} holds {width}-wide values but the vector has shape "
                            f"{tuple(vector.shape)}: steer with a ({width},) vector")
        made.append(Steer(concrete, vector=vector.detach().clone(), scale=float(scale), source=source))
    return made


def _width(model, site) -> int | None:
    """The width of the vectors `site` holds (a plain module's: its recorded shape's last
    axis, None where `load(module, example=...)` recorded none)."""
    if model.arch.plain:
        shape = model.shapes.get(site.name)
        return shape[-1] if shape else None
    if site.kind == "head" and site.index is not None:
        return model.d_head
    if site.kind == "neuron" and site.index is None:
        return model.d_mlp
    if site.kind in ("pattern", "logits") or site.index is not None:
        raise SiteError(f"steering adds a vector: {site} is not a vector-valued site")
    return model.d_model
