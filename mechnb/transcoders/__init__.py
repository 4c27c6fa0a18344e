"""Transcoders: sparse stand-ins for MLPs, one per layer, the nodes of attribution graphs.

    >>> tcs = mechnb.transcoders.load(directory)   # mechnb's, SAELens 6's or circuit-tracer's layout
    >>> model.graph("The Eiffel Tower is located in the city of", tcs)
    >>> tcs.save(other_directory)

The pieces: `Transcoder` and `TranscoderSet` (`model`), `load` and `save` (`files`).
"""

from .files import load
from .model import KINDS, Transcoder, TranscoderSet

__all__ = ["Transcoder", "TranscoderSet", "KINDS", "load"]
