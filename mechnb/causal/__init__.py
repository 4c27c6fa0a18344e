"""Causal abstraction: high-level causal models mapped onto the network, checked by intervention.

A hypothesis about what a representation encodes is a causal model (`CausalModel`: name ->
gender -> pronoun) plus an alignment of one of its variables with a site of the network,
in some coordinates (a featurizer). Interchange interventions test it: run a base input
with the site's value taken from a source input, and see whether the output changes as the
causal model says. The share of examples where it does is the interchange intervention
accuracy (IIA).

    >>> cm = mechnb.causal.CausalModel(variables=..., parents=..., mechanisms=...,
    ...                                template="<|endoftext|>{name} walked because")
    >>> data = cm.counterfactuals(512, intervene="gender", seed=0).filter(model)
    >>> iia = model.interchange(data, "resid_post.*@'{name}'", variable="gender")   # every layer, batched
    >>> das = model.das(data, "resid_post.4@'{name}'", variable="gender", k=1)      # a trained subspace
    >>> das.save("gender-das"); mechnb.causal.load("gender-das")
    >>> mechnb.causal.probe(data, "resid_post.*@'{name}'", "gender")                # probes beside IIA

Modules: `model` (`CausalModel`), `data` (`Counterfactuals`: rendering, positions, filter),
`featurizers` (`Identity`, `Subspace`, `PCA`, `Rotation`, `Boundless`, `SAEFeatures`,
`Mask`), `engine` (`interchange`: the batched sweep), `training` (`das`: DAS, Boundless
DAS, DBM), `probes` (`probe`), `mib` (MIB's dataset and submission formats), `results` and
`views` (what they return and draw).
"""

from __future__ import annotations

_LAZY = {
    "CausalModel": "model", "Counterfactuals": "data", "Example": "data",
    "Featurizer": "featurizers", "Identity": "featurizers", "Subspace": "featurizers", "PCA": "featurizers",
    "Rotation": "featurizers", "Boundless": "featurizers", "SAEFeatures": "featurizers", "Mask": "featurizers",
    "load": "featurizers", "InterchangeResult": "results", "ProbeResult": "results", "probe": "probes",
    "read_mib": "mib", "write_mib": "mib", "export_mib": "mib", "import_mib": "mib",
}

_SUBMODULES = ("tasks",)

__all__ = [*_LAZY, *_SUBMODULES]


def __getattr__(name):
    import importlib

    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'mechnb.causal' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
