"""The quality run of the issue: an SAE on 2M tokens of SmolLM2's resid_post.12, on CPU.

    .venv/bin/python bench/sae_quality.py collect DIR     # ~30 min: 2M activations into DIR
    .venv/bin/python bench/sae_quality.py train DIR       # train topk (d_sae 4608, k 32), evaluate

Collection is resumable (run it again after an interruption). Training saves the SAE
to DIR/sae (SAELens layout) and prints its evaluation.
"""

import sys
import time

import mechnb
from mechnb.datasets import python_docs

SITE = "resid_post.12"
N_TOKENS = 2_000_000


def corpus():
    while True:  # several passes over Python's documentation
        yield from python_docs("train")


def main():
    phase, directory = sys.argv[1], sys.argv[2]
    model = mechnb.load()
    if phase == "collect":
        start = time.perf_counter()
        store = model.collect(SITE, corpus(), n_tokens=N_TOKENS, batch_size=32, store=f"{directory}/store")
        seconds = time.perf_counter() - start
        print(f"collected {len(store)} tokens in {seconds:.0f} s ({len(store) / seconds:.0f} tokens/s)")
        return
    from mechnb.sae.store import open_store

    store = open_store(f"{directory}/store")
    start = time.perf_counter()
    sae = mechnb.sae.train(store, kind="topk", d_sae=4608, k=int(sys.argv[3]) if len(sys.argv) > 3 else 32,
                           batch_size=4096, epochs=float(sys.argv[4]) if len(sys.argv) > 4 else 1.0)
    print(f"trained on {sae.meta['tokens']} tokens in {time.perf_counter() - start:.0f} s")
    print(sae.history.tail(3).to_string())
    sae.save(f"{directory}/sae")
    print(sae.evaluate(model, python_docs("eval"), n_tokens=50_000).to_string())


if __name__ == "__main__":
    main()
