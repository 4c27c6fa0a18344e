"""Circuit discovery on the embedded model: methods against random, as MIB scores them.

For IOI (32 pairs by default) and greater-than (16 pairs), in one process:

- each method's edge scores (`eap`, `eap-ig` at 5 steps, `gim`) and their seconds;
- faithfulness at MIB's fractions, CPR from the signed ranking and CMD from the
  absolute one (as MIB reports them), and CPR of the absolute ranking too, for each
  method and for a random ranking;
- IOI only: the top-10 nodes of `eap-ig` (node level) against the top-10 of exact node
  patching (one patched run per head and MLP), by |score|.

Run: `make bench` or `.venv/bin/python bench/circuits.py [--pairs 32] [--quick] [--no-nodes]`
(`--quick`: three fractions, for a first look; `--no-nodes`: skip the node comparison,
whose exact patching takes minutes).
"""

import argparse
import time

import mechnb
from mechnb.circuits import FRACTIONS
from mechnb.datasets import greater_than, ioi

METHODS = ("eap", "eap-ig", "gim")


def columns(pairs):
    return ([p["clean"] for p in pairs], [p["corrupt"] for p in pairs],
            [p["answer"] for p in pairs], [p["wrong"] for p in pairs])


def table(model, name, pairs, metric, fractions):
    print(f"\n{name}: {len(pairs)} pairs, metric {metric}")
    print(f"{'method':8} {'seconds':>8} {'CPR':>7} {'CMD':>7} {'CPR|s|':>7}   f at 1%, 10% (|score| ranking)")
    circuit = None
    for method in METHODS + ("random",):
        start = time.perf_counter()
        if method == "random":
            circuit, seconds = circuit.randomized(seed=0), 0.0
        else:
            circuit = model.circuit(*columns(pairs), method=method, metric=metric)
            seconds = time.perf_counter() - start
        signed = circuit.faithfulness(fractions, absolute=False, progress=False)
        absolute = circuit.faithfulness(fractions, absolute=True, progress=False)
        at = dict(zip(fractions, absolute.values.tolist()))
        print(f"{method:8} {seconds:8.1f} {signed.meta['cpr']:7.3f} {absolute.meta['cmd']:7.3f} "
              f"{absolute.meta['cpr']:7.3f}   "
              f"{at.get(0.01, float('nan')):.3f}, {at.get(0.1, float('nan')):.3f}", flush=True)


def overlap(model, pairs):
    start = time.perf_counter()
    exact = model.circuit(*columns(pairs), method="exact", level="node")
    exact_seconds = time.perf_counter() - start
    start = time.perf_counter()
    gradient = model.circuit(*columns(pairs), method="eap-ig", level="node")
    gradient_seconds = time.perf_counter() - start
    top_exact = list(exact.df["node"].head(10))
    top_gradient = list(gradient.df["node"].head(10))
    shared = sorted(set(top_exact) & set(top_gradient))
    print(f"\nIOI nodes: exact patching {exact_seconds:.1f} s, eap-ig {gradient_seconds:.1f} s "
          f"(x{exact_seconds / gradient_seconds:.1f})")
    print(f"top-10 exact:  {top_exact}")
    print(f"top-10 eap-ig: {top_gradient}")
    print(f"overlap: {len(shared)} of 10 {shared}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-nodes", action="store_true", help="skip exact node patching (minutes)")
    args = parser.parse_args()
    fractions = (0.01, 0.1, 1.0) if args.quick else FRACTIONS
    model = mechnb.load()
    table(model, "IOI", ioi(args.pairs, model.tokenizer, seed=0), "logit_diff", fractions)
    table(model, "greater-than", greater_than(max(args.pairs // 2, 4), model.tokenizer, seed=0),
          "prob_diff", fractions)
    if not args.no_nodes:
        overlap(model, ioi(args.pairs, model.tokenizer, seed=0))


if __name__ == "__main__":
    main()
