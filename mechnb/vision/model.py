"""The embedded vision model: a tiny ViT trained on scikit-learn's 8x8 digits, offline.

The problem: the vision methods need a real, trained vision transformer to be tested and
taught on, without a download. The mechanism: `tiny_vit()` trains a small Hugging Face
`ViTForImageClassification` (8x8 images in 2x2 patches: 16 patches and `[CLS]`, 17
positions; d_model 64, 4 layers of 4 heads, d_mlp 128) on the digits' training split
(`mechnb.datasets.digits`), seeded, in about 28 s on one CPU thread, to 95.8 % test accuracy
(seed 0; training always uses one thread, so a seed gives the same weights on any
machine with the same torch build). The weights are saved as safetensors with `save_pretrained` in the mechnb
cache (`$MECHNB_CACHE`, else the user cache dir) under a name that holds the recipe's
version and the seed; every later call loads them in well under a second.

    >>> vit = mechnb.vision.tiny_vit()
    >>> test = mechnb.datasets.digits("test")
    >>> vit.cache(test.images[:2], "resid_post.3@0").shape     # batch d_model, at [CLS]
    torch.Size([2, 64])

Inputs are the digits' normalised tensors (`batch 1 8 8`, as `digits()` gives them) or
PIL images, which `preprocess` turns into the same form: greyscale, 8x8, ink bright on
a dark background as in the data, scaled by `mechnb.datasets.digit_pixels`, the one
place the digits' scaling lives.

Gotchas: another seed is another model (and another cache entry). A change of the
recipe changes `VERSION`, so an old cache entry is never read for a new recipe. The
training run is deterministic for a given seed and torch build; the cached weights
make every later load identical whatever the machine.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

VERSION = "tiny-vit-digits-v3"
CONFIG = dict(image_size=8, patch_size=2, num_channels=1, hidden_size=64, num_hidden_layers=4,
              num_attention_heads=4, intermediate_size=128, hidden_dropout_prob=0.0,
              attention_probs_dropout_prob=0.0, num_labels=10)
EPOCHS = 40
BATCH = 64
LEARNING_RATE = 3e-3
WEIGHT_DECAY = 0.05
THREADS = 1


def tiny_vit(seed: int = 0, device=None):
    """The embedded digits ViT as a `mechnb.Model`, trained on first use and then cached.

    Args:
        seed: the seed of the initial weights and of the batches' order (also of the
            data split, `digits(seed=seed)`); each seed is its own cached model.
        device: where the model runs (default CPU: it is small enough that a GPU
            gains nothing).

    Returns:
        A `mechnb.Model` of a `ViTForImageClassification` with classes "0"-"9"; its
        sites are those of every vision transformer (`resid_post.3@0` is `[CLS]`,
        `head.2.1`, `pattern.1` `batch head 17 17`, `logits` `batch 10`).
        Example: `mechnb.vision.tiny_vit().top(mechnb.datasets.digits("test").images[0])`.
    """
    from transformers import ViTForImageClassification

    from ..core.loading import api_class

    from transformers.utils import logging as hf_logging

    directory = trained(seed)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a bar for a tenth of a second is noise in a cell
    try:
        hf_model = ViTForImageClassification.from_pretrained(directory, local_files_only=True)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    if device is not None:
        hf_model.to(device)
    return api_class()(hf_model, preprocess, name=f"tiny ViT (digits, seed {seed})")


def trained(seed: int = 0) -> Path:
    """The cached directory of the tiny ViT of `seed`, trained and saved first if absent."""
    from ..core.embedded import cache_root

    target = cache_root() / f"{VERSION}-seed{seed}"
    if (target / "model.safetensors").is_file() and (target / "config.json").is_file():
        return target
    from transformers.utils import logging as hf_logging

    model, _ = train(seed)
    hf_logging.disable_progress_bar()
    target.parent.mkdir(parents=True, exist_ok=True)
    # Saved under a temporary name and renamed: a run stopped half-way leaves no half a model.
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def train(seed: int = 0):
    """Train the tiny ViT on the digits' training split: `(hf_model, seconds)`, the model in
    eval mode on CPU."""
    import torch

    from ..datasets import digits

    start = time.perf_counter()
    data = digits("train", seed=seed)
    threads = torch.get_num_threads()
    # One thread whatever the machine: the sums' order, and so the trained weights, depend on
    # the thread count; fixed, a seed gives the same model in a notebook and a test worker. One
    # is as fast as two for a model this small, and never fights other processes for the cores
    # (two threads in each of four test workers on 2 cores made training 25x slower).
    torch.set_num_threads(THREADS)
    try:
        return _train(data, seed, start)
    finally:
        torch.set_num_threads(threads)


def _train(data, seed: int, start: float):
    import torch
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    config = ViTConfig(**CONFIG, id2label={i: c for i, c in enumerate(data.classes)},
                       label2id={c: i for i, c in enumerate(data.classes)})
    model = ViTForImageClassification(config)
    model.set_attn_implementation("eager")
    model.train()
    steps = EPOCHS * -(-len(data) // BATCH)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, LEARNING_RATE, total_steps=steps, pct_start=0.1)
    order = torch.Generator().manual_seed(seed)
    for _ in range(EPOCHS):
        for rows in torch.randperm(len(data), generator=order).split(BATCH):
            logits = model(pixel_values=data.images[rows]).logits
            loss = torch.nn.functional.cross_entropy(logits, data.labels[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()
    return model, time.perf_counter() - start


def preprocess(images) -> "torch.Tensor":
    """PIL images (a list) as the tiny ViT reads them: `batch 1 8 8`, greyscale, resized to
    8x8, ink bright, scaled by `mechnb.datasets.digit_pixels`."""
    import numpy as np
    import torch

    from ..datasets import DIGIT_MAX, digit_pixels

    arrays = [np.asarray(image.convert("L").resize((8, 8)), dtype=np.float32) for image in images]
    return digit_pixels(torch.tensor(np.stack(arrays))[:, None] * (DIGIT_MAX / 255.0))


def accuracy(model, data) -> float:
    """The share of `data` (`Images`) a `Model` or transformers classifier labels right."""
    import torch

    hf_model = getattr(model, "hf", model)
    with torch.no_grad():
        predicted = hf_model(pixel_values=data.images.to(hf_model.device)).logits.argmax(-1).cpu()
    return (predicted == data.labels).float().mean().item()


def main() -> None:
    """Train the tiny ViT of seed 0 (without the cache) and report its time and test accuracy."""
    from ..datasets import digits

    model, seconds = train(0)
    print(f"tiny ViT trained in {seconds:.1f} s on {THREADS} thread(s); "
          f"test accuracy {accuracy(model, digits('test')):.4f}")


if __name__ == "__main__":
    main()
