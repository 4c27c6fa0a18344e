"""Images as a batch: what a vision model reads in place of prompts.

The problem: every core verb (traces, caches, interventions, patching) runs on a `Batch`
whose rows know their tokens, so that positions such as `@-1` or `@'John'` resolve. A
vision transformer reads pixels, and its positions are its learned prefix tokens
(`[CLS]`, DeiT's `[DIST]`) followed by the patches. The mechanism: a vision model's
`ImageReader` plays its tokenizer's part. `Batch.of(reader, images)` hands the images to
it, and it returns an `ImageBatch`: a `Batch` whose `pixel_values` are the forward's
input and whose tokens are position labels, `["[CLS]", "patch 0,0", "patch 0,1", ...]`
(row, column of the patch grid, row-major), so `@0` is `[CLS]` and `@'patch 3,4'` one
patch, with the grammar and displays of text unchanged.

Images are a tensor `batch channel height width` (or `channel height width` for one),
a PIL image, or a list of PIL images. PIL images go through the model's own image
processor (a transformers image processor, or a function of a list of PIL images
returning `batch channel height width`, as `mechnb.vision.tiny_vit` gives); tensors are
taken as the model reads them, already processed.

    >>> reader = ImageReader(arch, config)          # ViT, 8x8 images, patches of 2
    >>> batch = reader.batch(torch.zeros(2, 1, 8, 8))
    >>> batch.tokens[0][:3], batch.pixel_values.shape
    (['[CLS]', 'patch 0,0', 'patch 0,1'], torch.Size([2, 1, 8, 8]))

Gotchas: an image of another size or number of channels is a `PromptError` naming both
shapes before any forward. Attention is bidirectional: every position sees every other,
so nothing computed before a changed patch stays as it was (patching sweeps recompute
whole images).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .batch import Batch
from .errors import PromptError


@dataclass
class ImageBatch(Batch):
    """Images ready for a vision model: `pixel_values` `batch channel height width`; the
    `Batch` fields hold one row per image (`input_ids` zeros, `tokens` position labels)."""

    pixel_values: torch.Tensor = None

    def select(self, rows) -> "ImageBatch":
        """The images at `rows` (a range or a list of indices)."""
        rows = list(rows)
        return ImageBatch([self.prompts[r] for r in rows], self.input_ids[rows], self.attention_mask[rows],
                          [self.tokens[r] for r in rows], self.pixel_values[rows])

    def inputs(self, device) -> dict[str, torch.Tensor]:
        """Model keyword inputs on `device`."""
        return {"pixel_values": self.pixel_values.to(device)}


class ImageReader:
    """A vision model's reader of images (its tokenizer's stand-in; see the module docstring).

    Args:
        arch: the model's `mechnb.core.arch.Arch` (its prefix tokens).
        config: the transformers config (`image_size`, `patch_size`, `num_channels`).
        processor: a transformers image processor, or a function of a list of PIL
            images returning `batch channel height width`; None takes tensors only.
    """

    reads_images = True

    def __init__(self, arch, config, processor=None):
        size, patch = _pair(config.image_size), _pair(config.patch_size)
        self.shape = (int(config.num_channels), *size)
        self.grid = (size[0] // patch[0], size[1] // patch[1])
        self.prefix = tuple(arch.prefix_tokens)
        self.processor = processor
        self.labels = [*self.prefix] + [f"patch {r},{c}" for r in range(self.grid[0]) for c in range(self.grid[1])]

    @property
    def shape_text(self) -> str:
        """The image shape the model reads, as `1x8x8`."""
        return "x".join(map(str, self.shape))

    def batch(self, images) -> ImageBatch:
        """The `ImageBatch` of a tensor, a PIL image or a list of PIL images (or of tensors)."""
        pixels = self.pixels(images)
        n = pixels.shape[0]
        positions = len(self.labels)
        return ImageBatch([f"image {i}" for i in range(n)], torch.zeros(n, positions, dtype=torch.long),
                          torch.ones(n, positions, dtype=torch.long), [list(self.labels) for _ in range(n)],
                          pixels)

    def pixels(self, images) -> torch.Tensor:
        """Images as the checked `batch channel height width` float tensor the model reads."""
        if isinstance(images, (list, tuple)) and images and all(torch.is_tensor(i) for i in images):
            images = torch.stack([torch.as_tensor(i) for i in images]) if len({tuple(i.shape) for i in images}) == 1 \
                else self._raise_shape(next(i for i in images if tuple(i.shape[-3:]) != self.shape))
        if torch.is_tensor(images):
            pixels = images[None] if images.dim() == 3 else images
            if pixels.dim() != 4 or pixels.shape[0] == 0:
                raise PromptError(f"images must be a batch x channel x height x width tensor (or channel x height x "
                                  f"width for one), got shape {tuple(images.shape)}: the model reads "
                                  f"{self.shape_text} images")
        elif _is_pil(images) or (isinstance(images, (list, tuple)) and images and all(map(_is_pil, images))):
            pixels = self._processed([images] if _is_pil(images) else list(images))
        else:
            raise PromptError(f"this vision model reads images, not {_what(images)}: give a tensor batch x "
                              f"{' x '.join(map(str, self.shape))}, a PIL image or a list of PIL images")
        if tuple(pixels.shape[1:]) != self.shape:
            self._raise_shape(pixels[0])
        return pixels.float().cpu()

    def _processed(self, images: list) -> torch.Tensor:
        """PIL images through the model's processor."""
        if self.processor is None:
            raise PromptError(f"this model has no image processor to read PIL images with: give a tensor "
                              f"batch x {' x '.join(map(str, self.shape))}, already processed")
        if hasattr(self.processor, "preprocess"):  # a transformers image processor
            return torch.as_tensor(self.processor(images, return_tensors="pt")["pixel_values"])
        return torch.as_tensor(self.processor(images))

    def _raise_shape(self, image: torch.Tensor):
        got = "x".join(map(str, tuple(image.shape)))
        raise PromptError(f"the model reads {self.shape_text} images, got {got}: resize the image, or give "
                          f"{self.shape[0]} channel(s), as the model was trained on")


def _pair(value) -> tuple[int, int]:
    return (int(value[0]), int(value[1])) if isinstance(value, (list, tuple)) else (int(value), int(value))


def _is_pil(value) -> bool:
    return type(value).__module__.startswith("PIL.")


def _what(value) -> str:
    if isinstance(value, str):
        return f"text ({value!r:.40})"
    return f"{type(value).__name__} {value!r:.40}"


def top_classes(model, image, k: int = 10):
    """The k most likely classes of one image: a DataFrame of `rank`, `class`, `class_id`,
    `prob`, `logit` (see `ModelBase.top`)."""
    import pandas as pd

    from .checks import is_int
    from .errors import ArgumentError, ModelError

    if not model.n_classes:
        raise ModelError(f"top lists a classifier's classes; {model.name} is a {model.arch.name} backbone "
                         "without a classification head: load the ...ForImageClassification model")
    if not is_int(k) or k < 1:
        raise ArgumentError(f"k, the classes listed, must be a positive int, got {k!r}")
    batch = Batch.of(model.tokenizer, image)
    if len(batch) != 1:
        raise PromptError(f"top takes one image, got {len(batch)}: give image[i], or model.cache(images, "
                          "'logits') for many")
    k = min(k, model.n_classes)
    with model.trace(batch):
        logits = model["logits"].save()
    logits = logits[0].detach().float().cpu()
    top = torch.softmax(logits, dim=-1).topk(k)
    ids = top.indices.tolist()
    return pd.DataFrame({"rank": range(1, k + 1), "class": [model.classes[i] for i in ids], "class_id": ids,
                         "prob": top.values.tolist(), "logit": logits[top.indices].tolist()})
