"""Transcoders for every layer of the embedded model, and the attribution graphs they give.

    .venv/bin/python bench/transcoders.py DIR [--tokens 200000] [--width 2304] [-k 32]

Trains topk transcoders (width 2304, k 32) on all 30 layers of SmolLM2-135M from Python's
documentation, one forward per batch of 4,064 tokens, checkpointed in DIR (run it again
after an interruption and it goes on), then prints:
- training: tokens/s, and the seconds of one step spent in the model's forward against
  the transcoders' updates (measured on one extra batch);
- per layer on held-out text: FVU of the MLP output, cosine, L0, dead features;
- the replacement model (every MLP replaced) on held-out text: loss against the clean
  model's and against all MLPs zeroed, top-1 agreement;
- graph replacement and completeness scores on three prompts.
The issue's goals: FVU < 0.3 on every layer, top-1 agreement > 50 %, replacement score
> 0.5 on the Eiffel prompt.
"""

import argparse
import time
from pathlib import Path

import torch

import mechnb
from mechnb.datasets import python_docs

PROMPTS = ["The Eiffel Tower is located in the city of",
           "When Mary and John went to the store, John gave a drink to",
           "The opposite of hot is"]


def corpus():
    while True:  # several passes over Python's documentation, if asked for that many tokens
        yield from python_docs("train")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("directory")
    parser.add_argument("--tokens", type=int, default=240_000)
    parser.add_argument("--width", type=int, default=2304)
    parser.add_argument("-k", type=int, default=32)
    parser.add_argument("--eval-tokens", type=int, default=10_000)
    args = parser.parse_args()
    model = mechnb.load()
    folder = Path(args.directory)
    start = time.perf_counter()
    tcs = mechnb.transcoders.train(model, corpus(), width=args.width, k=args.k, n_tokens=args.tokens,
                                   checkpoint=folder / "checkpoint")
    seconds = time.perf_counter() - start
    tcs.save(folder / "transcoders")
    print(f"trained {len(tcs)} layers, width {args.width}, k {args.k}: {tcs.meta['tokens']} tokens in "
          f"{tcs.meta['seconds']:.0f} s of training ({tcs.meta['tokens'] / tcs.meta['seconds']:.0f} tokens/s; "
          f"this run {seconds:.0f} s)")
    split_of_a_step(model, tcs)
    print(tcs.history.tail(3).to_string(index=False))
    start = time.perf_counter()
    evaluation = tcs.evaluate(model, python_docs("eval"), n_tokens=args.eval_tokens)
    print(f"\nheld-out evaluation ({time.perf_counter() - start:.0f} s):")
    print(evaluation)
    fvu = evaluation.layers.fvu
    print(f"FVU: mean {fvu.mean():.3f}, worst {fvu.max():.3f} (layer {int(evaluation.layers.layer[fvu.idxmax()])}); "
          f"layers under 0.3: {(fvu < 0.3).sum()} of {len(fvu)}")
    for prompt in PROMPTS:
        start = time.perf_counter()
        graph = model.graph(prompt, tcs)
        scores = graph.scores
        top = model.tokenizer.decode([graph.logit_ids[0]])
        print(f"graph of {prompt!r}: replacement {scores['replacement']:.3f}, completeness "
              f"{scores['completeness']:.3f}, {graph.n_features} features ({time.perf_counter() - start:.1f} s) {top!r}")


def split_of_a_step(model, tcs):
    """Seconds of one training step alone, and of its model forward: a two-step run on held-out
    text (the second step's time), and one more forward of the same size."""
    from mechnb.sae.store import padded
    from mechnb.transcoders.mlp import mlp_values
    from mechnb.transcoders.train import token_windows

    first = tcs[tcs.layers[0]]
    probe = mechnb.transcoders.train(model, python_docs("eval"), width=first.width, k=first.k, n_tokens=2 * 4064,
                                     log_every=1, progress=False)
    step = float(probe.history.seconds.diff().iloc[-1])
    windows = token_windows(model, python_docs("eval"), 128)
    ids, mask = padded(model, [next(windows) for _ in range(32)])
    start = time.perf_counter()
    inputs, _ = mlp_values(model, tcs.layers, tcs.reads, ids, mask)
    forward = time.perf_counter() - start
    print(f"one step of {inputs.shape[1]} tokens alone: {step:.1f} s ({inputs.shape[1] / step:.0f} tokens/s), of "
          f"which the model's forward {forward:.1f} s and the {len(tcs)} transcoders' updates {step - forward:.1f} s")


if __name__ == "__main__":
    torch.set_num_threads(torch.get_num_threads())
    main()
