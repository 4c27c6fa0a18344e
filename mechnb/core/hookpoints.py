"""Hook points inside attention: give patterns and per-head outputs a module to live in.

The problem: transformers computes attention inside a function (`sdpa`, `eager`,
flash), where no module boundary exists, so nnsight cannot read or write a head's
pattern or output. The mechanism, as TransformerLens does with its `HookPoint`s: at
load we give every attention module two identity submodules, `hook_pattern` and
`hook_z`, and register our own attention function under the name "mechnb" with
`transformers.AttentionInterface`. It computes eager attention and passes

- the softmax pattern, `batch head pos_q pos_k`, through `hook_pattern`, and
- the per-head output, `batch pos head d_head`, through `hook_z`,

so nnsight reads and writes them like any module output (`head.L.H` is
`hook_z.output[:, :, H]`). The function is the one place every architecture's
attention runs through, so its extras are mirrored here: grouped-query key/value
heads, Gemma's logit soft-capping, scaling as the model passes it.

Example:
    >>> install(hf_model, arch)          # before wrapping with nnsight
    >>> hf_model.config._attn_implementation
    'mechnb'

Gotchas:
- A mask function must be registered under the same name: without it transformers
  hands the attention function `mask=None` and causality is silently lost.
- Sliding windows (Gemma 2) arrive inside the mask, which `eager_mask` builds.
- Patterns are real probabilities whatever implementation the model was loaded
  with, because install() always switches to this function.
- Two module attributes serve the patching engine (`mechnb.core.runner`): a list in
  `mechnb_record` receives each call's keys and values, and a `(keys, values)` pair
  in `mechnb_prefix` is prepended to them, so a forward can recompute only the
  positions after a given one.
- Two more serve circuit discovery (`mechnb.circuits`): a list in `mechnb_capture`
  receives the query, key and value each head uses (`batch head pos d_head`, keys
  and values repeated per query head), and an object in `mechnb_split` picks each
  head's query, key and value from a batch that stacks one input per head and kind
  (`select`), then stacks the output back (`expand`): that is how one head's query
  can read a residual stream different from its key's.
"""

from __future__ import annotations

import torch
from einops import rearrange

ATTN_IMPLEMENTATION = "mechnb"


class HookPoint(torch.nn.Module):
    """An identity module: a named place in the forward pass for nnsight to read and write."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention through the module's hook points.

    Args:
        query: `batch head pos_q d_head`.
        key, value: `batch kv_head pos_k d_head` (kv_head divides head).
        attention_mask: additive mask broadcastable to `batch head pos_q pos_k`, or None.
        scaling: multiplier of the scores (default `d_head ** -0.5`).
        dropout: dropout probability, applied only in training mode.
        softcap: Gemma's attention logit soft-capping, or None.

    Returns:
        `(z, pattern)`: z is `batch pos_q head d_head`, pattern `batch head pos_q pos_k`.
    """
    record = getattr(module, "mechnb_record", None)
    if record is not None:
        record.append((key, value))
    prefix = getattr(module, "mechnb_prefix", None)
    if prefix is not None:
        # Keys and values of earlier positions, computed by an earlier run (see
        # mechnb.core.runner): this forward computes only the positions after them.
        key = torch.cat([prefix[0], key], dim=2)
        value = torch.cat([prefix[1], value], dim=2)
    rules = getattr(module, "mechnb_gim", None)
    if rules is not None:
        # GIM's backward rules (mechnb.methods.gim): forward values unchanged, gradients scaled.
        query = scale_gradient(query, rules.q_scale)
        key = scale_gradient(key, rules.k_scale)
        value = scale_gradient(value, rules.v_scale)
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    split = getattr(module, "mechnb_split", None)
    if split is not None:
        query, key, value, attention_mask = split.select(query, key, value, attention_mask)
    capture = getattr(module, "mechnb_capture", None)
    if capture is not None:
        capture.append((query, key, value))
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    # In place where autograd allows (the backward of matmul and of a product with a number
    # needs no output): the scores are a forward's largest tensor, and each copy counts.
    scores = torch.matmul(query, key.transpose(2, 3)).mul_(scaling)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None:
        scores = scores.add_(attention_mask[..., : key.shape[-2]])
    # Softmax in float32 as every stock eager implementation does, then back.
    pattern = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    if rules is not None and rules.softmax_temperature != 1:
        # The gradient of softmax(scores / T), the value of softmax(scores).
        hot = torch.softmax(scores / rules.softmax_temperature, dim=-1, dtype=torch.float32).to(query.dtype)
        pattern = pattern.detach() + (hot - hot.detach())
    pattern = module.hook_pattern(pattern)
    pattern_used = torch.nn.functional.dropout(pattern, p=dropout, training=module.training)
    z = rearrange(torch.matmul(pattern_used, value), "batch head pos d_head -> batch pos head d_head").contiguous()
    z = module.hook_z(z)
    if split is not None:
        z = split.expand(z)
    return z, pattern


def scale_gradient(x: torch.Tensor, scale: float) -> torch.Tensor:
    """`x` in the forward pass; its gradient multiplied by `scale` in the backward pass."""
    if scale == 1:
        return x
    scaled = x * scale
    return x.detach() + (scaled - scaled.detach())


def _register() -> None:
    """Register the attention and mask functions with transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, eager_mask)


def install(hf_model: torch.nn.Module, arch) -> None:
    """Add `hook_pattern` and `hook_z` to every attention module and switch to our function."""
    from .arch import submodule

    _register()
    for layer in submodule(hf_model, arch.layers):
        attn = submodule(layer, arch.attn)
        if not hasattr(attn, "hook_pattern"):
            attn.hook_pattern = HookPoint()
            attn.hook_z = HookPoint()
    hf_model.set_attn_implementation(ATTN_IMPLEMENTATION)
