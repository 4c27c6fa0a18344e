"""Which input tokens drive a prediction? Gradient attribution of one logit to every token.

    >>> model.attribute("The Eiffel Tower is located in the city of", method="gim")

Methods, each giving one number per input token (the target's logit at the last
position, by default the model's top prediction):

    gradient              |d logit / d embedding|, the L2 norm over d_model (saliency)
    grad_x_input          (d logit / d embedding) . embedding, summed over d_model
    integrated_gradients  (embedding - baseline) . mean gradient along the straight path
                          from the baseline (default: zeros) in `steps` points, summed
                          over d_model; the values add up to logit(x) - logit(baseline)
    gim                   grad_x_input under GIM's backward rules (`mechnb.methods.gim`)

The result shows as circuitsvis coloured tokens (HTML-escaped); `.df` has `pos`,
`token`, `value`. Gotcha: with RMSNorm models the zero baseline is a singular point
(the norm divides by ~0 near it), so integrated gradients converge slowly from zeros;
a real token's embedding as `baseline` (a `d_model` vector) adds up to
logit(x) - logit(baseline) within a few percent at 64 steps (tested). Gradients flow into the embeddings only: the weights' `.grad` is
left untouched.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from ..core.arch import submodule
from ..core.batch import Batch, Pair
from ..core.checks import is_int
from ..core.engine import run
from ..core.errors import AttributionError
from ..core.metrics import token_id
from ..core.remote import local_only
from ..core.sites import read_part
from ..display.render import compact, view
from ..display.results import Result

METHODS = ("gim", "gradient", "grad_x_input", "integrated_gradients")


@local_only
def attribute(model, prompt: str, target=None, method: str = "gim", steps: int = 20,
              baseline: torch.Tensor | None = None, sites=None) -> Result:
    """Attribution of the target token's logit to every input token (or to components).

    Args:
        prompt: one prompt string.
        target: a token string or id (default: the model's top prediction).
        method: `gim`, `gradient`, `grad_x_input` or `integrated_gradients` (see the
            module docstring).
        steps, baseline: integrated gradients' points on the path, and its start (a
            `d_model` embedding or one per token; default zeros).
        sites: `head.*.*`, `mlp_out.*`, ...: attribute to components instead, value .
            gradient summed over positions and dimensions (`grad_x_input`, `gim`) or
            the gradient's norm (`gradient`), as a `layer [head]` grid.

    Returns:
        A `Result` (`pos`, `token`, `value`) shown as coloured tokens, or with `sites`
        a grid. Example: `model.attribute("The Eiffel Tower is in", method="gim")`.
    """
    import pandas as pd

    if method not in METHODS:
        raise AttributionError(f"unknown attribution method {method!r}: use one of {', '.join(METHODS)}")
    if not isinstance(prompt, str) or not prompt:
        raise AttributionError("attribute reads one non-empty prompt string")
    if not is_int(steps) or steps < 1:
        raise AttributionError(f"steps must be an integer of at least 1, got {steps!r}")
    if baseline is not None and (not torch.is_tensor(baseline) or not torch.isfinite(baseline).all()):
        raise AttributionError(f"baseline must be a finite tensor: a d_model={model.d_model} embedding, or one "
                               f"per token; got {type(baseline).__name__}"
                               f"{' with NaN or infinite entries' if torch.is_tensor(baseline) else ''}")
    if sites is not None:
        return _components(model, prompt, target, method, sites)
    batch = Batch.of(model.tokenizer, prompt)
    inputs = batch.inputs(model.device)
    embed = submodule(model.hf, model.arch.embed)
    with torch.no_grad():
        embeddings = embed(inputs["input_ids"]).float()
    notes = []
    with run(model, batch.tokens):
        if target is None:
            target = int(_logits(model, embeddings, inputs)[0, -1].argmax())
        else:
            target, note = token_id(model, target, "target")
            notes += [note] if note else []
    if method == "integrated_gradients":
        try:
            base = torch.zeros_like(embeddings) if baseline is None else \
                baseline.to(embeddings).expand_as(embeddings)
        except RuntimeError:
            raise AttributionError(f"a baseline of shape {tuple(baseline.shape)} does not fit the prompt's "
                                   f"embeddings, {tuple(embeddings.shape[1:])}: give ({model.d_model},) or one "
                                   "embedding per token") from None
        alphas = (torch.arange(1, steps + 1, dtype=embeddings.dtype) / steps).to(embeddings.device)
        path = base + alphas[:, None, None] * (embeddings - base)  # steps pos d
        grads = _gradient(model, batch, path, {k: v.expand(steps, -1) for k, v in inputs.items()}, target)
        values = ((embeddings - base)[0] * grads.mean(0)).sum(-1)
    elif method == "gim":
        with model.gim():
            grads = _gradient(model, batch, embeddings, inputs, target)
        values = (grads[0] * embeddings[0]).sum(-1)
    else:
        grads = _gradient(model, batch, embeddings, inputs, target)
        values = grads[0].norm(dim=-1) if method == "gradient" else (grads[0] * embeddings[0]).sum(-1)
    values = values.detach().cpu()
    tokens = batch.tokens[0]
    target_token = model.tokenizer.decode([target])
    df = pd.DataFrame({"pos": range(len(tokens)), "token": tokens, "value": values.tolist()})
    meta = {"title": f"{method} attribution of {target_token!r}", "prompt": prompt, "method": method, "scale": "signed",
            "target": target_token, "target_id": target, "steps": steps, "model": model.name,
            "axes": ["pos"], "labels": {"pos": [f"{t!r}" for t in tokens]}, "notes": notes}

    def html(result):
        return view("ColoredTokens", {"tokens": tokens, "values": compact(values.tolist(), 4)},
                    title=meta["title"])

    def rerun(**changes):
        settings = dict(prompt=prompt, target=target, method=method, steps=steps, baseline=baseline)
        return attribute(model, **{**settings, **changes})

    return Result(values, df, meta, html=html, rerun=rerun)


def _logits(model, embeddings, inputs):
    return model.hf(inputs_embeds=embeddings.to(model.dtype), attention_mask=inputs["attention_mask"],
                    use_cache=False).logits


def _gradient(model, batch, embeddings, inputs, target: int) -> torch.Tensor:
    """d logit(target) at the last position / d embeddings, for each row of `embeddings`."""
    leaf = embeddings.detach().requires_grad_()
    with run(model, batch.tokens, grad=True):
        logits = _logits(model, leaf, inputs)
        (grad,) = torch.autograd.grad(logits[:, -1, target].sum(), leaf)
    return grad.float()


def _components(model, prompt: str, target, method: str, sites) -> Result:
    """Attribution of the target logit to the components named by `sites`."""
    from .grid import Grid

    if method == "integrated_gradients":
        raise AttributionError("integrated gradients attribute to input tokens; for components use "
                               "grad_x_input, gradient or gim")
    batch = Batch.of(model.tokenizer, prompt)
    tokens = batch.tokens[0]
    grid = Grid(model, sites, False, Pair(prompt, prompt, tokens, tokens))
    inputs = batch.inputs(model.device)
    notes = []
    rules = model.gim() if method == "gim" else nullcontext()
    with rules, run(model, batch.tokens, grad=True) as forward:
        captured = forward.capture(grid.base_names)
        logits = model.hf(**inputs, use_cache=False).logits[0, -1]
        if target is None:
            target = int(logits.argmax())
        else:
            target, note = token_id(model, target, "target")
            notes += [note] if note else []
        names = list(grid.base_names)
        grads = torch.autograd.grad(logits[target], [captured[n] for n in names], allow_unused=True)
    values = []
    per_site = {}
    for name, grad in zip(names, grads):
        grad = torch.zeros_like(captured[name]) if grad is None else grad
        per_site[name] = (grad.float(), captured[name].detach().float())
    for site, _ in grid.cells:
        grad, value = per_site[site.base.name]
        part_grad, part_value = read_part(grad, site, None), read_part(value, site, None)
        value = part_grad.norm() if method == "gradient" else (part_grad * part_value).sum()
        values.append(value.cpu())  # sites of layers on several devices (device_map)
    target_token = model.tokenizer.decode([target])
    meta = {"title": f"{method} attribution of {target_token!r} to {', '.join(grid.patterns)}",
            "prompt": prompt, "method": method, "target": target_token, "target_id": target,
            "sites": grid.patterns, "model": model.name, "notes": notes, "scale": "signed"}
    result = grid.result(torch.stack(values).cpu().reshape(grid.shape), meta)
    result.rerun = lambda **changes: attribute(
        model, **{**dict(prompt=prompt, target=target, method=method, sites=sites), **changes})
    return result
