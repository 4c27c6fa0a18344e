"""Concepts of a vision model: an SAE's features on images, shown as the images they fire on
and where in each image, summarised in words, and named by a labeller.

    >>> concepts = mechnb.vision.image_concepts(vit, sae, test.images, test.labels, test.classes)
    >>> concepts.grid([3, 17, 40])         # a row per concept: its top images, heatmap over the patches
    >>> concepts.summary(17)               # "top 20 images: 7 (85 %), 1 (15 %); strongest at row 0, ..."
    >>> concepts.record(sae)               # then sae.label(features, labeler=...) names them

A concept's value for an image is the SAE's feature at the [CLS] position (`position=0`);
its map is the same feature at each patch, on the model's patch grid. `record` gives the
SAE its top and quiet images as labelling contexts (`mechnb.sae.label`): a multimodal
labeller (an OpenAI-compatible URL, or a function) receives the images themselves as PNG
data URLs in the chat message; the local text model receives the summary in words (class
distribution, where in the image it fires), and judges held-out images from their class.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass

import torch

from ..core.errors import SAEError


@dataclass
class ImageConcepts:
    """An SAE's features over a set of images (see the module docstring).

    Attributes:
        images: `n C H W`, scaled to 0..1 for display.
        labels: `n` class indices, or None; `classes` their names.
        activations: `n d_sae`, each feature at the concept position ([CLS]).
        maps: `n rows cols d_sae`, each feature at each patch, or None.
    """

    images: torch.Tensor
    labels: torch.Tensor | None
    classes: list
    activations: torch.Tensor
    maps: torch.Tensor | None = None

    def _feature(self, feature) -> int:
        if not isinstance(feature, int) or isinstance(feature, bool) or not 0 <= feature < self.activations.shape[1]:
            raise SAEError(f"feature must be an index 0..{self.activations.shape[1] - 1}, got {feature!r}")
        return feature

    def top(self, feature: int, k: int = 8) -> list[int]:
        """The images where `feature` is strongest (only those where it fires), best first."""
        values = self.activations[:, self._feature(feature)]
        order = values.argsort(descending=True)[:k]
        return [int(i) for i in order if values[i] > 0]

    def class_distribution(self, feature: int, k: int = 20) -> dict:
        """The share of each class among the feature's top `k` images, largest first."""
        top = self.top(feature, k)
        if self.labels is None or not top:
            return {}
        counts = torch.bincount(self.labels[top], minlength=len(self.classes)).float() / len(top)
        return {self.classes[i]: float(counts[i]) for i in counts.argsort(descending=True) if counts[i] > 0}

    def position_map(self, feature: int, k: int = 20) -> torch.Tensor | None:
        """The feature's mean map over its top `k` images (`rows cols`), or None without maps."""
        top = self.top(feature, k)
        if self.maps is None or not top:
            return None
        return self.maps[top, :, :, self._feature(feature)].mean(0)

    def summary(self, feature: int, k: int = 20) -> str:
        """The feature in words: which classes its top images are, and where it fires in them."""
        top = self.top(feature, k)
        if not top:
            return f"concept {feature} never fires on these images"
        shares = ", ".join(f"{name} ({share:.0%})" for name, share in list(self.class_distribution(feature, k).items())[:4])
        words = [f"top {len(top)} images: {shares}" if shares else f"fires on {len(top)} images"]
        grid = self.position_map(feature, k)
        if grid is not None and grid.max() > 0:
            rows, cols = grid.shape
            row, col = divmod(int(grid.argmax()), cols)
            vertical = "top" if row < rows / 3 else "bottom" if row >= 2 * rows / 3 else "middle"
            horizontal = "left" if col < cols / 3 else "right" if col >= 2 * cols / 3 else "centre"
            words.append(f"strongest at patch row {row}, column {col} ({vertical} {horizontal} of the image)")
        return "; ".join(words)

    def contexts(self, per_feature: int = 20) -> dict:
        """Labelling contexts per feature that fires: its top images and as many quiet ones."""
        made = {}
        generator = torch.Generator().manual_seed(0)
        for feature in range(self.activations.shape[1]):
            top = self.top(feature, per_feature)
            if not top:
                continue
            quiet_pool = (self.activations[:, feature] <= 0).nonzero()[:, 0]
            quiet = quiet_pool[torch.randperm(len(quiet_pool), generator=generator)[:len(top)]].tolist()
            made[feature] = {"positive": [self._context(i, feature) for i in top],
                             "negative": [self._context(i, feature) for i in quiet],
                             "summary": self.summary(feature, per_feature)}
        return made

    def _context(self, index: int, feature: int) -> dict:
        label = self.classes[int(self.labels[index])] if self.labels is not None else None
        return {"activation": float(self.activations[index, feature]), "index": index, "class": label,
                "image": self.images[index], "map": None if self.maps is None else self.maps[index, :, :, feature]}

    def record(self, sae, per_feature: int = 20) -> dict:
        """Give `sae` these images as its labelling contexts (`sae.label` then names features)."""
        sae.contexts = self.contexts(per_feature)
        return sae.contexts

    def grid(self, features, k: int = 6):
        """A matplotlib figure: one row per feature, its top `k` images with its patch map laid
        over each (red, stronger where it fires), titled with activation and class."""
        import matplotlib.pyplot as plt

        features = [features] if isinstance(features, int) else list(features)
        if not features:
            raise SAEError("grid needs at least one feature")
        figure, axes = plt.subplots(len(features), k, figsize=(1.3 * k, 1.5 * len(features)), squeeze=False)
        for row, feature in enumerate(features):
            top = self.top(feature, k)
            for col in range(k):
                axis = axes[row][col]
                axis.set_xticks([])
                axis.set_yticks([])
                if col >= len(top):
                    axis.axis("off")
                    continue
                index = top[col]
                image = self.images[index]
                axis.imshow(image.permute(1, 2, 0).squeeze(-1).cpu().numpy(), cmap="gray_r" if image.shape[0] == 1
                            else None, vmin=0, vmax=1)
                if self.maps is not None:
                    heat = self.maps[index, :, :, feature].float()
                    if heat.max() > 0:
                        height, width = image.shape[1:]
                        axis.imshow((heat / heat.max()).cpu().numpy(), cmap="Reds", alpha=0.45,
                                    extent=(-0.5, width - 0.5, height - 0.5, -0.5), vmin=0, vmax=1)
                label = self.classes[int(self.labels[index])] if self.labels is not None else ""
                axis.set_title(f"{label} · {float(self.activations[index, feature]):.2g}", fontsize=7)
            axes[row][0].set_ylabel(f"concept {feature}", fontsize=8)
        figure.tight_layout()
        plt.close(figure)
        return figure


def image_concepts(model, sae, images, labels=None, classes=None, position: int = 0,
                   batch_size: int = 256) -> ImageConcepts:
    """The SAE's features on `images` through `model`: at `position` ([CLS]) and at every patch.

    Args:
        model: a mechnb vision `Model`; `sae` an SAE on one of its per-token sites.
        images: what the model takes (`n C H W` tensor, PIL images); `labels` class indices.
        classes: class names (default the labels' indices).
    """
    if getattr(sae, "site", None) is None:
        raise SAEError("image_concepts needs an SAE that knows its site (sae.site = 'resid_post.3')")
    values = model.cache(images, sae.site, batch_size=batch_size)[sae.site]
    with torch.no_grad():
        features = sae.encode(values.to(sae.W_enc.device, sae.W_enc.dtype)).float().cpu()  # n positions d_sae
    patches = [p for p in range(features.shape[1]) if p != position]
    side = int(round(len(patches) ** 0.5))
    maps = features[:, patches].reshape(len(features), side, side, -1) if side * side == len(patches) else None
    shown = _as_tensor(images)
    shown = (shown - shown.amin()) / (shown.amax() - shown.amin()).clamp(min=1e-6)
    labels = torch.as_tensor(labels).long() if labels is not None else None
    if classes is None:
        classes = list(range(int(labels.max()) + 1)) if labels is not None else []
    return ImageConcepts(shown, labels, list(classes), features[:, position], maps)


def _as_tensor(images) -> torch.Tensor:
    """Images for display, `n C H W` float: a tensor as it is, PIL images through numpy."""
    import numpy as np

    if torch.is_tensor(images):
        shown = images.detach().float().cpu()
    else:
        pictures = images if isinstance(images, (list, tuple)) else [images]
        arrays = [np.asarray(picture, dtype=np.float32) for picture in pictures]
        shown = torch.stack([torch.from_numpy(a[None] if a.ndim == 2 else a.transpose(2, 0, 1)) for a in arrays])
    return shown[None] if shown.dim() == 3 else shown


def png_data_url(image: torch.Tensor, size: int = 96) -> str:
    """An image `C H W` (0..1) as a PNG data URL, enlarged to about `size` pixels (nearest)."""
    from PIL import Image

    array = (image.clamp(0, 1) * 255).byte().permute(1, 2, 0).cpu().numpy()
    picture = Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array)
    scale = max(1, size // max(picture.size))
    picture = picture.resize((picture.size[0] * scale, picture.size[1] * scale), Image.NEAREST)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
