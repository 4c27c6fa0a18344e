"""Vision models: an embedded digits ViT, concepts found by an SAE on images, and a concept
bottleneck built on them.

    >>> vit = mechnb.vision.tiny_vit()                       # trained once on sklearn's digits, cached
    >>> head = mechnb.vision.bottleneck(features_train, y_train, features_test, y_test)

The pieces: `tiny_vit` (`mechnb.vision.model`: the embedded digits ViT, trained once and
cached), `bottleneck` (`mechnb.vision.bottleneck`: a sparse linear classifier on concept
activations, its accuracy, the concepts each class uses, test-time interventions).
"""

from .bottleneck import Bottleneck, bottleneck
from .model import tiny_vit

__all__ = ["Bottleneck", "bottleneck", "tiny_vit"]
