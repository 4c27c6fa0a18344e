"""resid_mid is the residual stream: a write to it reaches the MLP and the skip connection.

The problem: transformers' decoder layers keep the residual after attention in a local
variable. The MLP's norm reads it (its input is where mechnb reads `resid_mid`), and the
layer adds the MLP's output to the same variable:

    residual = hidden_states                    # resid_mid
    hidden_states = self.post_attention_layernorm(hidden_states)
    hidden_states = residual + self.mlp(hidden_states)

A write to the norm's input alone reaches the MLP but not `residual`, so the layer's
output would still carry the value from before the write; TransformerLens'
`hook_resid_mid`, and anyone patching the residual stream, expect both to change.

The mechanism, installed at load on every layer that has a resid_mid (`install`):

- a forward pre-hook on the norm, first of all its hooks, keeps the value it is about to
  receive before any edit (`Carry.before`);
- every write of the site `resid_mid` (an intervention or the patching engine's edits
  through `reporting`, a trace's `model[...] = ` through `written`) hands the new whole value
  to the layer's `Carry`, which keeps its difference from that value (`Carry.pending`);
- a forward hook on the layer, first of its forward hooks, adds the difference to the
  layer's output, so `resid_post` and everything later see the written residual, and
  hooks on `resid_post` act on it.

Edits of the MLP's input that are not writes of the residual (circuit discovery's
separate reader inputs, a transcoder's splice) do not report, and stay the MLP's alone.
Without a write the layer's output is untouched. Reads and gradients need nothing:
`resid_mid` read at the norm's input is the residual itself, the very tensor the skip
connection adds.

Example:
    >>> install(hf_model, arch, "post_attention_layernorm")   # ModelBase does this at load
    >>> hook = reporting(model, site, fn)                      # for a write of resid_mid
    >>> value = carried(model, site, value)                    # a trace's read of resid_post
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

ATTRIBUTE = "mechnb_carry"


class Carry:
    """The state of one layer's resid_mid during a forward."""

    def __init__(self):
        self.before: torch.Tensor | None = None
        self.pending: torch.Tensor | None = None

    def wrote(self, value: torch.Tensor) -> None:
        """A write of the whole resid_mid: the layer's output gets its difference."""
        if self.before is not None:
            self.pending = value - self.before

    def cancel(self) -> None:
        """A later write of the layer's whole output replaces what the difference would have moved."""
        self.pending = None


def _first(args, kwargs):
    return args[0] if args else next(iter(kwargs.values()))


def _before(norm, args, kwargs):
    carry = norm.__dict__[ATTRIBUTE]
    carry.before, carry.pending = _first(args, kwargs), None


def _add(layer, args, output):
    carry = layer.__dict__[ATTRIBUTE]
    pending, carry.pending, carry.before = carry.pending, None, None
    if pending is None:
        return None
    if isinstance(output, tuple):
        return (output[0] + pending, *output[1:])
    return output + pending


def install(hf_model, arch, resid_mid: str | None) -> None:
    """Carry writes of resid_mid into the skip connection on every layer of `hf_model`
    (`resid_mid`: the module whose input it is, relative to a layer; None: no resid_mid).
    The layer and its norm hold the same `Carry` (a deep copy of the model copies it once),
    and the hooks find it there."""
    from .arch import submodule

    if resid_mid is None:
        return
    for layer in submodule(hf_model, arch.layers):
        if isinstance(layer.__dict__.get(ATTRIBUTE), Carry):
            continue
        norm = submodule(layer, resid_mid)
        layer.__dict__[ATTRIBUTE] = norm.__dict__[ATTRIBUTE] = Carry()
        norm.register_forward_pre_hook(_before, with_kwargs=True, prepend=True)
        layer.register_forward_hook(_add, prepend=True)


def carry_of(layer) -> Carry | None:
    """The `Carry` of a decoder layer (None where the model has no resid_mid)."""
    return layer.__dict__.get(ATTRIBUTE)


def _carry_at(model, site) -> Carry | None:
    """The `Carry` of a site's layer (None remotely, outside the decoder layers, or where the
    model has no resid_mid)."""
    if model.remote or site.kind not in ("resid_mid", "resid_post") or not isinstance(site.layer, int):
        return None  # checked first: a remote trace runs this code where mechnb is not installed
    from .arch import submodule

    return carry_of(submodule(model.hf, model.arch.layers)[site.layer])


def written(model, site, value) -> None:
    """A trace wrote `value`, a site's whole value: resid_mid's reaches the skip connection
    too, and a write of the layer's whole output replaces what it would have carried."""
    carry = _carry_at(model, site)
    if carry is not None and site.kind == "resid_mid":
        carry.wrote(value)
    elif carry is not None and site.kind == "resid_post":
        carry.cancel()


def carried(model, site, value):
    """A layer output (`resid_post`) as the rest of the model will see it: with the difference
    a write of resid_mid in this forward has still to add (nnsight hands the output over before
    the layer's hooks run)."""
    carry = _carry_at(model, site)
    if site.kind == "resid_post" and carry is not None and carry.pending is not None:
        return value + carry.pending
    return value


def reporting(model, site, fn):
    """`fn` (an edit of a site's whole value, as `arch.hook_value` calls it), which for a
    write of `resid_mid` also hands the value it returns to the layer's `Carry`."""
    carry = _carry_at(model, site) if site.kind == "resid_mid" else None
    if carry is None:
        return fn

    def edit(value):
        new = fn(value)
        if new is not None:
            carry.wrote(new)
        return new

    return edit
