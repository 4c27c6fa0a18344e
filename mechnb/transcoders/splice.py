"""Splicing a transcoder set into a model, so that its features are sites (`tc.14.1203`).

`Model.attach(tcs)` registers each layer's transcoder as a submodule of that layer and
activates one `TranscoderSplice` per covered layer, at `mlp_out.L`: it keeps what the
MLP read in the same forward (`mlp_in` or `resid_mid`, as the set reads) and replaces the
MLP's output `y` by `decode(features) + (y - decode(encode(x)))`, the transcoder's
reconstruction of its (possibly edited) features plus its error on this input. With no
edit that is `y` again (to rounding), so attaching changes nothing until a feature is
read, written, ablated, patched or steered; the rest of the model, attention included,
is the real one. The features pass through each transcoder's `hook_features`, which is
what `tc.L.F` reads.

    >>> model.attach(tcs)                          # every layer the set covers
    >>> model.ablate("tc.14.1203@-1"); model.top(prompt)
    >>> model.cache(prompt, "tc.14.*")["tc.14.*"]  # batch pos width
    >>> model.detach(tcs)

A cross-layer transcoder (`mechnb.transcoders.clt`) is spliced in the same way, one
`CrossLayerSplice` per layer: its features are `tc.L.F` sites too (named by the layer they
read, as graph nodes are; `tc.NAME.L.F` by its name), and an edit of a feature changes every
MLP output it writes to. A per-layer set and a CLT on the same layers are refused.

This module's `attach` also takes SAEs, for `Model.attach`: it hands them to
`mechnb.sae.attach`.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..core.errors import TranscoderError
from ..core.interventions import Intervention
from ..core.remote import local_only
from .model import Transcoder, TranscoderSet


@dataclass(eq=False, repr=False)
class TranscoderSplice(Intervention):
    """Pass one layer's MLP output through its transcoder, keeping the transcoder's error term."""

    tcs: TranscoderSet = None
    transcoder: Transcoder = None

    kind = "transcoder"

    def reads(self, model):
        from .mlp import read_path

        def keep(value):
            self.x = value  # this forward's input of the MLP, read again at its output

        return [(read_path(model, self.site.layer, self.tcs.reads), "input", keep)]

    def replacement(self, part):
        tc = self.transcoder
        x = getattr(self, "x", None)
        if x is None or x.shape[:-1] != part.shape[:-1]:
            raise TranscoderError(f"the transcoder at {self.site} did not see this forward's MLP input")
        return tc.splice(x.to(tc.W_enc.dtype), part.to(tc.W_enc.dtype)).to(part.dtype)

    def detail(self) -> str:
        tc = self.transcoder
        k = f", k={tc.k}" if tc.k else ""
        return f"{self.tcs.name}: {tc.kind}{k}, {tc.width} features (tc.{self.site.layer}.F)"


@dataclass(eq=False, repr=False)
class CrossLayerSplice(TranscoderSplice):
    """One layer of a cross-layer transcoder spliced in: the MLP's output `y` plus what the edits of
    this layer's and earlier layers' features write here (their change times their decoders at this
    layer). With no edit that is `y` itself, exactly. `state` (shared by the CLT's layers) holds
    each edited layer's change during one forward; the first layer clears it."""

    state: dict = None

    def replacement(self, part):
        clt, layer, tc = self.tcs, self.site.layer, self.transcoder
        x = getattr(self, "x", None)
        if x is None or x.shape[:-1] != part.shape[:-1]:
            raise TranscoderError(f"the transcoder at {self.site} did not see this forward's MLP input")
        if layer == clt.layers[0]:
            self.state.clear()  # a new forward
        clean = tc.encode(x.to(tc.W_enc.dtype))
        change = (tc.hook_features(clean) - clean).reshape(-1, tc.width)
        ids = (change != 0).any(0).nonzero().squeeze(-1)
        if len(ids):
            self.state[layer] = (part.shape[:-1], change[:, ids].float(), clt.rows(layer, ids))
        out = part
        for source, (shape, values, rows) in self.state.items():
            if shape == part.shape[:-1] and layer in clt.targets(source):
                written = values @ rows[:, layer - source].to(values.device)
                out = out + written.view(*part.shape[:-1], -1).to(part.dtype)
        return out

    def detail(self) -> str:
        tc = self.transcoder
        k = f", k={tc.k}" if tc.k else ""
        return (f"{self.tcs.name}: cross-layer, {tc.kind}{k}, {tc.width} features writing to layers "
                f"{self.site.layer}-{self.tcs.targets(self.site.layer)[-1]} (tc.{self.site.layer}.F)")


@local_only
def attach(model, what, site=None, name: str | None = None):
    """Splice in an SAE (see `mechnb.sae.attach`) or a `TranscoderSet`: their features become
    sites, `sae.L.F` or `tc.L.F` (`tc.NAME.L.F` with several sets).

    Args:
        what: a mechnb `SAE` or `TranscoderSet`.
        site: for an SAE, where (default its own); transcoders sit at their layers' MLPs.
        name: a name for the sites (default the SAE's or the set's `name`).

    Returns:
        The active splice interventions (one per covered layer for a transcoder set).
        Example: `model.attach(tcs); model.ablate("tc.14.1203@-1")`.
    """
    from ..core.arch import submodule
    from ..core.devices import execution_device
    from ..core.sites import Site
    from ..sae import attach as sae_attach

    if not isinstance(what, TranscoderSet):
        return sae_attach.attach(model, what, site=site, name=name)
    tcs = what
    if site is not None:
        raise TranscoderError("transcoders sit at the MLPs of the layers they cover: attach(tcs) takes no site")
    tcs.check_model(model)
    if name is not None:
        if not isinstance(name, str) or not name.isidentifier():
            raise TranscoderError(f"a transcoder set's name is an identifier (tc.NAME.L.F), got {name!r}")
        tcs.name = name
    if any(other is tcs for other in model.transcoder_sets):
        raise TranscoderError(f"the transcoder set {tcs.name!r} is already attached")
    if any(other.name == tcs.name for other in model.transcoder_sets):
        raise TranscoderError(f"a transcoder set named {tcs.name!r} is already attached: attach(tcs, name='another')")
    for other in model.transcoder_sets:
        shared = sorted(set(other.layers) & set(tcs.layers))
        if shared and (other.cross_layer or tcs.cross_layer):
            from .model import layer_ranges

            raise TranscoderError(f"layers {layer_ranges(shared)} already have the "
                                  f"{'cross-layer' if other.cross_layer else 'per-layer'} set {other.name!r} attached: "
                                  "a per-layer set and a cross-layer transcoder would both rewrite those MLP outputs; "
                                  "detach one first")
    tcs.module_name = f"mechnb_tc_{tcs.name}"
    layers = submodule(model.hf, model.arch.layers)
    for layer, tc in tcs.transcoders.items():
        tc.to(device=execution_device(layers[layer]) or model.device)  # its layer's device (device_map)
        tc.requires_grad_(False)
    model.attach_modules([(f"{model.arch.layers}.{layer}", tcs.module_name, tc) for layer, tc in tcs.transcoders.items()])
    if tcs.cross_layer:
        state: dict = {}
        return model.add([CrossLayerSplice(Site("mlp_out", layer), tcs=tcs, transcoder=tc, state=state)
                          for layer, tc in tcs.transcoders.items()])
    return model.add([TranscoderSplice(Site("mlp_out", layer), tcs=tcs, transcoder=tc)
                      for layer, tc in tcs.transcoders.items()])


def detach(model, what) -> None:
    """Remove an attached SAE or transcoder set (and every intervention on its features)."""
    from ..sae import attach as sae_attach

    if not isinstance(what, TranscoderSet):
        return sae_attach.detach(model, what)
    splices = [i for i in model.interventions if isinstance(i, TranscoderSplice) and i.tcs is what]
    if not splices:
        raise TranscoderError(f"the transcoder set {what.name!r} is not attached to this model")
    on_features = [i for i in model.interventions if i.site.kind == "tc" and model.transcoders_at(i.site) is what]
    model.remove(splices + on_features)
    model.detach_modules([(f"{model.arch.layers}.{layer}", what.module_name) for layer in what.layers])
