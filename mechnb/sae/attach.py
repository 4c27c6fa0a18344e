"""Splicing an SAE into a model, so that its features are sites (`sae.12.1234`).

`Model.attach(sae)` registers the SAE as a submodule of the layer that holds its
site and activates a `Splice` intervention there: the site's value `x` becomes
`decode(features) + (x - decode(encode(x)))`, the SAE's reconstruction of its
(possibly edited) features plus its error on `x`. With no edit that is `x` again
(to rounding), so attaching changes nothing until a feature is read, written,
ablated, patched or steered. The features pass through `sae.hook_features`, which
is what the site `sae.L.F` reads.

    >>> model.attach(sae)                 # at sae.site, e.g. resid_post.12
    >>> model.ablate("sae.12.1234")       # the error term keeps everything else
    >>> model.detach(sae)
"""

from __future__ import annotations

from dataclasses import dataclass

from ..core.errors import SAEError
from ..core.interventions import Intervention
from ..core.remote import local_only
from .model import SAE

HOSTS = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "neuron", "head")


@dataclass(eq=False, repr=False)
class Splice(Intervention):
    """Pass a site's value through an attached SAE, keeping the SAE's error term."""

    sae: SAE = None

    kind = "sae"

    def replacement(self, part):
        return self._splice(part, self.sae.hook_features)

    def replay(self, full, model):
        """The splice outside the forward (a read of the host site inside a trace): the features
        do not pass through `sae.hook_features`, whose every call nnsight counts (the forward's
        own call is the one `sae.L` reads); their edits (ablations, hooks at `sae.L.F`) are
        applied here by hand instead."""
        import torch

        from ..core.interventions import Context, apply

        context = model.context or Context()
        edits = [i for i in model.interventions
                 if i.site.kind == "sae" and model.sae_at(i.site, required=False) is self.sae]

        def edit(features):
            for intervention in edits:
                features = apply(intervention, features, context)
            return features

        updated = self._splice(full, edit)
        if context.active is not None:
            rows = torch.tensor(context.active, device=full.device).reshape(-1, *[1] * (full.dim() - 1))
            updated = torch.where(rows, updated, full)
        return updated

    def _splice(self, part, edit):
        """`decode(edit(features)) + error` of a value; heads' z flattened as TransformerLens'
        hook_z SAEs read it."""
        x = (part.flatten(-2) if self.site.kind == "head" else part).to(self.sae.W_enc.dtype)
        return self.sae.splice(x, edit).to(part.dtype).view(part.shape)

    def detail(self) -> str:
        return f"{self.sae.name}: {self.sae.kind}, {self.sae.d_sae} features (sae.{self.site.layer}.F)"


@local_only
def attach(model, sae: SAE, site=None, name: str | None = None) -> Splice:
    """Splice an SAE in at `site` (default its own): its features become sites `sae.L.F`.

    Args:
        sae: a mechnb `SAE` (trained, or loaded with `mechnb.sae.load`).
        site: a whole per-token site of the width the SAE reads (default `sae.site`).
        name: a name for `sae.NAME.F` sites (default `sae.name`).

    Returns:
        The active `Splice`. Example: `model.attach(sae); model.ablate("sae.12.1234")`.
    """
    from ..core.arch import submodule
    from ..core.sites import parse

    if not isinstance(sae, SAE):
        raise SAEError(f"attach takes a mechnb SAE, got {type(sae).__name__}")
    site = site or sae.site
    if site is None:
        raise SAEError("this SAE does not say which site it reads: model.attach(sae, site='resid_post.12')")
    parsed = parse(site)
    found = parsed.expand(model) if parsed.kind in HOSTS else [None]
    concrete = found[0] if len(found) == 1 else None
    if concrete is None or concrete.index is not None or concrete.positions is not None:
        raise SAEError(f"an SAE attaches to a whole per-token site ({', '.join(HOSTS)} with a layer), "
                       f"not {site}")
    from ..core.hub import same_model

    if not same_model(getattr(sae, "model", None), model.name):
        raise SAEError(f"{sae.name} was trained on {sae.model}, not {model.name}; if it fits anyway (a copy "
                       f"under another name), set sae.model = None and attach again")
    width = {"neuron": model.d_mlp, "head": model.n_heads * model.d_head}.get(concrete.kind, model.d_model)
    if width != sae.d_in:
        made_for = f" (trained on {sae.model})" if getattr(sae, "model", None) else ""
        raise SAEError(f"{sae.name} reads {sae.d_in}-wide activations but {concrete} of {model.name} is "
                       f"{width} wide: attach it where it was trained{made_for}")
    sae.name = name or sae.name
    if any(other.name == sae.name for other in model.saes):
        raise SAEError(f"an SAE named {sae.name!r} is already attached: attach(sae, name='another')")
    sae.site = str(concrete)
    sae.module_name = f"mechnb_sae_{sae.name}"
    layer = submodule(model.hf, model.arch.layers)[concrete.layer]
    from ..core.devices import execution_device

    sae.to(device=execution_device(layer) or model.device)  # its layer's device (device_map)
    sae.requires_grad_(False)
    model.attach_module(f"{model.arch.layers}.{concrete.layer}", sae.module_name, sae)
    splice = Splice(concrete, sae=sae)
    model.add(splice)
    return splice


def detach(model, sae: SAE) -> None:
    """Remove an attached SAE (and every intervention on its features)."""
    from ..core.sites import parse

    splices = [i for i in model.interventions if isinstance(i, Splice) and i.sae is sae]
    if not splices:
        raise SAEError(f"{sae.name} is not attached to this model")
    on_features = [i for i in model.interventions if i.site.kind == "sae" and
                   model.sae_at(i.site, required=False) is sae]
    model.remove(splices + on_features)
    model.detach_module(f"{model.arch.layers}.{parse(sae.site).layer}", sae.module_name)
