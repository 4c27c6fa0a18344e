"""Sparse autoencoders: collect activations, train, evaluate, save and load (SAELens layout).

    >>> acts = model.collect("resid_post.12", mechnb.datasets.python_docs(), n_tokens=200_000)
    >>> sae = mechnb.sae.train(acts, kind="topk", d_sae=4608, k=32)
    >>> sae.evaluate(model, mechnb.datasets.python_docs(split="eval"))
    >>> model.attach(sae)            # features become sites: sae.12.F

The pieces: `SAE` (the autoencoder, four activation kinds), `train` (the loop),
`ActivationStore` and `collect` (activations in memory or memory-mapped on disk; over ranks,
shards and their union: `mechnb.sae.shards`, `open_store`),
`load` (a directory, a hub repository or a named release in SAELens', Gemma Scope's,
Gemma Scope 2's, sparsify's or Llama Scope's format; `mechnb.sae.files`), `releases` (the
named ones, `mechnb.sae.releases`).
"""

from .files import load
from .model import KINDS, SAE
from .releases import releases
from .shards import open_store
from .store import ActivationStore
from .train import train

__all__ = ["SAE", "KINDS", "train", "load", "releases", "ActivationStore", "open_store"]
