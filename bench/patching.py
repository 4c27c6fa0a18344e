"""Activation patching on the embedded model: the batched engine against a naive loop.

The IOI pair, `resid_pre.*` at every position (30 layers x 14 positions = 420
patches), measured in one process:

- naive loop: one nnsight trace per patch (`model[site] = clean value`), as a user
  would write it; this is the reference the exact engine must equal;
- `Model.patch(method="exact")`: the batched engine of `mechnb.core.runner`;
- `Model.patch(method="attribution")`: one forward and backward, with its Pearson
  correlation against the exact values.

Run: `make bench` or `.venv/bin/python bench/patching.py`.
"""

import time

import torch

import mechnb

CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPT = "When Mary and John went to the store, Mary gave a drink to"


def naive_loop(model, cache, mary, john):
    values = torch.empty(model.n_layers, len(model.tokens(CLEAN)))
    for layer in range(model.n_layers):
        for pos in range(values.shape[1]):
            site = f"resid_pre.{layer}@{pos}"
            with model.trace(CORRUPT):
                model[site] = cache[site]
                logits = model["logits@-1"].save()
            values[layer, pos] = logits[0, mary] - logits[0, john]
    return values


def main():
    model = mechnb.load()
    mary, john = model.tokenizer.encode(" Mary")[0], model.tokenizer.encode(" John")[0]
    kwargs = dict(answer=" Mary", wrong=" John", progress=False)
    model.patch(CLEAN, CORRUPT, "resid_pre.0", **kwargs)  # warm up

    start = time.perf_counter()
    cache = model.cache(CLEAN, "resid_pre.*")
    reference = naive_loop(model, cache, mary, john)
    naive = time.perf_counter() - start

    start = time.perf_counter()
    exact = model.patch(CLEAN, CORRUPT, "resid_pre.*", **kwargs)
    engine = time.perf_counter() - start

    start = time.perf_counter()
    attribution = model.patch(CLEAN, CORRUPT, "resid_pre.*", method="attribution", **kwargs)
    gradient = time.perf_counter() - start

    patches = exact.values.numel()
    error = (exact.values - reference).abs().max().item()
    pearson = torch.corrcoef(torch.stack([attribution.values.flatten(), exact.values.flatten()]))[0, 1]
    print(f"SmolLM2-135M, IOI pair, resid_pre.* per position: {patches} patches, "
          f"{torch.get_num_threads()} threads")
    print(f"naive loop (one nnsight trace per patch) {naive:7.2f} s  {naive / patches * 1000:6.1f} ms/patch")
    print(f"Model.patch exact (batched engine)       {engine:7.2f} s  {engine / patches * 1000:6.1f} ms/patch"
          f"  x{naive / engine:.1f} faster, max |diff| {error:.2e}")
    print(f"Model.patch attribution (1 fwd + 1 bwd)  {gradient:7.2f} s  x{naive / gradient:.1f} faster,"
          f" Pearson r with exact {pearson:.3f}")


if __name__ == "__main__":
    main()
