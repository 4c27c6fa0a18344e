"""Attention patterns and token activations, shown as circuitsvis views.

`Model.attention(prompts, layers, heads)` reads `pattern.L` for the chosen layers
and shows each layer as circuitsvis `AttentionHeads` (one small heatmap per head,
click one to enlarge), with the prompt's real tokens. `Model.activations(what,
prompts)` colours each token by a value: a neuron (`neuron.12.301`), a head (the
norm of its output, `head.9.6`), any scalar site, or a direction (a `d_model`
vector) projected on a residual site; one prompt shows as `ColoredTokens`, several
as `TextNeuronActivations` (a selector over prompts).

On a vision model `attention(image, layers)` has the same values over `[CLS]` and the
patches, and shows each layer as `mechnb.vision.attention_over_image` draws it: a panel
per head, the attention of `[CLS]` laid over the image on the patch grid.

    >>> model.attention("When Mary and John went to the store", layers="20:26")
    >>> model.activations("neuron.12.301", ["The cat sat", "A dog ran"])
"""

from __future__ import annotations

import torch

from ..core.batch import Batch
from ..core.checks import is_int
from ..core.errors import SiteError, ViewError
from ..core.remote import local_only
from ..core.sites import Site, indices, parse
from ..display.render import compact, view
from ..display.results import Result


@local_only
def attention(model, prompts, layers=None, heads=None) -> Result:
    """Attention patterns `layer head pos_q pos_k` of a prompt, as circuitsvis views.

    `layers` / `heads`: None (all), an int, a list, or a range string `"20:26"`.
    Shown per layer as circuitsvis `AttentionHeads` with the real tokens; with several
    prompts, the first is shown. On a vision model `prompts` are images (the first is
    shown), positions are `[CLS]` and the patches, and each layer shows as the figure of
    `mechnb.vision.attention_over_image` ([CLS]'s attention over the image, per head).
    Example: `model.attention(prompt, layers="20:26")`; `vit.attention(image, layers=2)`.
    """
    layer_list = _choose(model, layers, model.n_layers, "layer")
    head_list = _choose(model, heads, model.n_heads, "head")
    if model.reads_images:
        return _attention_over_image(model, prompts, layer_list, head_list)
    prompt = Batch.of(model.tokenizer, prompts).prompts[0]
    values, rows, meta = _patterns(model, prompt, layer_list, head_list, causal=True)
    tokens = meta["tokens"]
    meta.update(title=f"attention of layers {_span(layer_list)}", prompt=prompt)

    def html(result):
        return "\n".join(
            view("AttentionHeads", {"attention": compact(result.values[i].tolist()), "tokens": tokens,
                                    "attentionHeadNames": [f"L{l}H{h}" for h in head_list],
                                    "maskUpperTri": True}, title=f"Layer {l}")
            for i, l in enumerate(layer_list))

    return Result(values, rows, meta, html=html)


def _attention_over_image(model, images, layer_list: list[int], head_list: list[int]) -> Result:
    """`attention` on a vision model: the patterns of the first image, each layer drawn over it."""
    import base64

    from ..display.viz import png
    from ..vision.views import draw

    image = Batch.of(model.tokenizer, images).pixel_values[:1]
    values, rows, meta = _patterns(model, image, layer_list, head_list, causal=False)
    meta["title"] = f"attention of layers {_span(layer_list)} over the image"

    def html(result):
        # Drawn from the result's own values, whatever the model has become since.
        pictures = (png(draw(result.values[i], image[0], model.tokenizer.grid, l, head_list))
                    for i, l in enumerate(layer_list))
        return "\n".join(f'<div>Layer {l}</div><img src="data:image/png;base64,{base64.b64encode(p).decode()}"/>'
                         for l, p in zip(layer_list, pictures))

    return Result(values, rows, meta, html=html)


def _patterns(model, inputs, layer_list: list[int], head_list: list[int], causal: bool):
    """`(values layer head pos_q pos_k, DataFrame, meta)` of the patterns of one input: rows
    over the key positions a query sees (`causal`: those up to it)."""
    import pandas as pd

    cache = model.cache(inputs, [f"pattern.{l}" for l in layer_list])
    tokens = cache.tokens[0]
    values = torch.stack([cache[f"pattern.{l}"][0, head_list] for l in layer_list]).float().cpu()
    rows = [{"layer": l, "head": h, "pos_q": q, "pos_k": k, "token_q": tokens[q], "token_k": tokens[k],
             "value": values[i, j, q, k].item()}
            for i, l in enumerate(layer_list) for j, h in enumerate(head_list)
            for q in range(len(tokens)) for k in range(q + 1 if causal else len(tokens))]
    meta = {"tokens": tokens, "scale": "probability", "layers": layer_list, "heads": head_list,
            "model": model.name, "axes": ["layer", "head", "pos_q", "pos_k"],
            "labels": {"layer": layer_list, "head": head_list, "pos_q": tokens, "pos_k": tokens}}
    return values, pd.DataFrame(rows), meta


def activations(model, site_or_direction, prompts, site: str | None = None) -> Result:
    """Tokens coloured by a neuron, a head (its output norm) or a direction.

    Args:
        site_or_direction: a site (`neuron.12.301`, `head.9.6`), or a `d_model` vector
            read off the residual site `site`.
        prompts: a prompt or a list of them.
        site: the residual site a direction lives on (`resid_post.12`).

    Returns:
        A `Result` with values `batch pos` (0 at padding), shown as circuitsvis
        `ColoredTokens` (one prompt) or `TextNeuronActivations` (several).
        Example: `model.activations("neuron.12.301", ["The cat sat", "A dog ran"])`.
    """
    what = site_or_direction
    import pandas as pd

    prompt_list = Batch.of(model.tokenizer, prompts).prompts
    if torch.is_tensor(what):
        if what.dim() != 1 or what.shape[0] != model.d_model:
            raise ViewError(f"a direction is a vector of d_model={model.d_model} numbers, got shape "
                            f"{tuple(what.shape)}")
        if not torch.isfinite(what).all():
            raise ViewError("the direction has NaN or infinite entries: give a finite d_model vector")
        if site is None:
            raise ViewError("a direction needs the residual site it lives on: site='resid_post.12'")
        read = parse(site)
        if read.kind not in ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "embed"):
            raise SiteError(f"project a direction on a d_model site (resid_*, attn_out, mlp_out), not {site}")
        label = f"direction on {site}"
    else:
        read = parse(what)
        label = str(read)
    concrete = read.expand(model)
    if len(concrete) != 1:
        raise SiteError(f"{read} names {len(concrete)} sites: show one at a time")
    concrete = Site(concrete[0].kind, concrete[0].layer, concrete[0].index)
    cache = model.cache(prompt_list, concrete.base.name)
    value = cache[str(concrete)].float()
    if torch.is_tensor(what):
        direction = what.to(value)
        value = value @ direction
    elif value.dim() == 4 and concrete.kind == "pattern":
        raise SiteError("patterns are shown by model.attention; activations takes neurons, heads, "
                        "directions or other per-token values")
    elif value.dim() == 3:
        value = value.norm(dim=-1)  # a head's output or a d_model site: its size per token
    elif value.dim() == 4:
        value = value.flatten(2).norm(dim=-1)
    value = value * cache.attention_mask.to(value.device)
    values = value.cpu()
    rows = [{"prompt": b, "pos": p, "token": tok, "value": values[b, p].item()}
            for b, toks in enumerate(cache.tokens) for p, tok in enumerate(toks)]
    meta = {"title": f"activations of {label}", "prompts": prompt_list, "site": label,
            "model": model.name, "axes": ["prompt", "pos"],
            "labels": {"prompt": [str(i) for i in range(len(prompt_list))]}}

    def html(result):
        if len(prompt_list) == 1:
            tokens = cache.tokens[0]
            return view("ColoredTokens", {"tokens": tokens, "values": compact(values[0, :len(tokens)].tolist(), 4)},
                        title=meta["title"])
        acts = [[[[round(values[b, p].item(), 4)]] for p in range(len(toks))]
                for b, toks in enumerate(cache.tokens)]
        return view("TextNeuronActivations", {"tokens": cache.tokens, "activations": acts,
                                             "firstDimensionName": "Layer", "secondDimensionName": "Neuron",
                                             "firstDimensionLabels": [label], "secondDimensionLabels": [label]},
                    title=meta["title"])

    return Result(values, pd.DataFrame(rows), meta, html=html)


def _choose(model, chosen, size: int, what: str) -> list[int]:
    """Indices from None (all), an int, a list, or a range string `20:26`."""
    if chosen is None:
        return list(range(size))
    if isinstance(chosen, int):
        chosen = [chosen]
    elif isinstance(chosen, str):
        return indices(chosen, size, what)
    if not isinstance(chosen, (list, tuple, range)) or not chosen:
        raise ViewError(f"{what}s are None (all), an int, a non-empty list of ints or a range such as "
                        f"'0:{size}', got {chosen!r}")
    found = list(chosen)
    for index in found:
        if not is_int(index) or not 0 <= index < size:
            raise ViewError(f"{what} {index!r} out of range: this model has {what}s 0-{size - 1}")
    return found


def _span(indices: list[int]) -> str:
    if len(indices) > 1 and indices == list(range(indices[0], indices[-1] + 1)):
        return f"{indices[0]}-{indices[-1]}"
    return ", ".join(map(str, indices))
