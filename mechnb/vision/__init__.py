"""Vision models: an embedded digits ViT, concepts found by an SAE on images, and a concept
bottleneck built on them.

    >>> vit = mechnb.vision.tiny_vit()                       # trained once on sklearn's digits, cached
    >>> head = mechnb.vision.bottleneck(vit, sae, (digits("train"), digits("test")))

The pieces: `tiny_vit` (`mechnb.vision.model`: the embedded digits ViT, trained once and
cached); `image_concepts` (`mechnb.vision.concepts`: an SAE's features on images, their top
images, patch maps, summaries and grids, and labelling contexts); `bottleneck` and
`concept_ablation` (`mechnb.vision.bottleneck`: a sparse linear classifier on concept
activations, its accuracy against the model's, the concepts each class uses, test-time
interventions, and the class concepts ablated in the real model against random ones);
`attention_over_image` (`mechnb.vision.views`: each head's attention over the patches).
"""

from .bottleneck import Bottleneck, bottleneck, concept_ablation
from .concepts import ImageConcepts, image_concepts
from .model import tiny_vit
from .views import attention_over_image

__all__ = ["Bottleneck", "bottleneck", "concept_ablation", "ImageConcepts", "image_concepts", "tiny_vit",
           "attention_over_image"]
