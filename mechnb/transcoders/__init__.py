"""Transcoders: sparse stand-ins for MLPs, one per layer, the nodes of attribution graphs.

    >>> tcs = mechnb.transcoders.train(model, python_docs("train"), width=2304, k=32)  # all layers
    >>> tcs.evaluate(model, python_docs("eval"))   # per-layer FVU; the replacement model's loss
    >>> tcs = mechnb.transcoders.load(directory)   # mechnb's, SAELens 6's or circuit-tracer's layout
    >>> model.graph("The Eiffel Tower is located in the city of", tcs)
    >>> model.attach(tcs); model.ablate("tc.14.1203@-1")
    >>> tcs.save(other_directory)

The pieces: `Transcoder` and `TranscoderSet` (`model`), `train`, `evaluate`, `load` and
`save` (`files`), and `attach` (features as sites, `splice`).
"""

from .files import load
from .model import KINDS, Transcoder, TranscoderSet
from .train import train

__all__ = ["Transcoder", "TranscoderSet", "KINDS", "load", "train"]
