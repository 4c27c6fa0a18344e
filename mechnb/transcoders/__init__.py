"""Transcoders: sparse stand-ins for MLPs, one per layer, the nodes of attribution graphs.

    >>> tcs = TranscoderSet({layer: Transcoder(576, 2304, kind="topk", k=32) for layer in range(30)})
    >>> model.graph("The Eiffel Tower is located in the city of", tcs)

The pieces: `Transcoder` and `TranscoderSet` (`model`).
"""

from .model import KINDS, Transcoder, TranscoderSet

__all__ = ["Transcoder", "TranscoderSet", "KINDS"]
