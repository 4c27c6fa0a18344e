"""Per-layer transcoders against a cross-layer transcoder (CLT) on the embedded model, and the
attribution graphs they give.

    .venv/bin/python bench/transcoders.py DIR [--tokens 200000] [--width 2304] [-k 32]
        [--clt-width 512] [--clt-k 16] [--window W] [--only per-layer|clt] [--batch-size 4096] [--skip]

Trains, on Python's documentation, one forward per batch of 4,064 tokens (`--batch-size`; at a
small budget more, smaller steps fit better: 100k tokens in batches of 1,024 beat 200k in
batches of 4,096 for both kinds), checkpointed in DIR
(run it again after an interruption and it goes on; a finished set is loaded), both
- a per-layer topk set (width `--width`, k `-k`, all 30 layers), and
- a topk CLT (width `--clt-width` per layer, k `--clt-k`, each feature writing to its own
  and every later layer, or the next `--window`),
on the same tokens, then prints for each, side by side:
- parameters, and training tokens/s split into the model's forward and the updates;
- per-layer FVU of the MLP outputs on held-out text (mean, worst, each layer);
- the replacement model (every MLP replaced) on held-out text: loss against the clean
  model's and all MLPs zeroed, top-1 agreement;
- graph replacement and completeness on three prompts (a special token first, position 0
  left out, as circuit-tracer), the graph's features and seconds, and where the replacement
  score goes: each layer's error nodes' share of the influence;
- how much bfloat16 autocast changes what the MLPs read and write (relative difference on a
  batch), and the forward's time with and without it.
The parameter count of a CLT of width w is n w d + w d n (n + 1) / 2 (encoders and decoder
blocks, n layers, width d), against 2 n w d per-layer: at equal parameters a CLT is about
2 / 16.5 as wide on this 30-layer model.
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


def parameters(tcs) -> int:
    if tcs.cross_layer:
        return sum(tc.W_enc.numel() + tc.b_enc.numel() + tc.b_dec.numel() for tc in tcs) + sum(
            tcs.width * len(tcs.targets(layer)) * tcs.d_model for layer in tcs.layers)
    return sum(sum(p.numel() for p in tc.parameters() if p is not None) for tc in tcs)


def trained(model, folder: Path, label: str, tokens: int, **options):
    """A set trained on `tokens` tokens (checkpointed in folder/label), or loaded when finished."""
    done = folder / label / "set"
    if done.is_dir():
        tcs = mechnb.transcoders.load(done, lazy=False)
        print(f"{label}: loaded from {done}")
        return tcs, None
    start = time.perf_counter()
    tcs = mechnb.transcoders.train(model, corpus(), n_tokens=tokens, checkpoint=folder / label / "checkpoint",
                                   **options)
    seconds = time.perf_counter() - start
    tcs.save(done)
    meta = tcs.meta
    forward = meta["forward_seconds"]
    print(f"{label}: {meta['tokens']} tokens, this run {seconds:.0f} s for {meta['tokens'] / meta['seconds']:.0f} tokens/s "
          f"overall; of this run, the model's forward {forward:.0f} s ({forward / seconds:.0%}) and the updates "
          f"{seconds - forward:.0f} s")
    return tcs, seconds


def error_shares(graph) -> str:
    """Where the replacement score goes: each layer's error nodes' share of the influence that
    reaches tokens or errors (the score is the tokens' share), the largest first."""
    from mechnb.graphs import prune

    features, errors, tokens, _ = graph.kind_masks()
    reach = prune.influence(prune.normalised(graph.adjacency), graph.weights)
    total = float(reach[tokens].sum() + reach[errors].sum())
    table = graph.node_table()
    layers = table[table.kind == "error"].assign(share=(reach[errors] / total).numpy()).groupby("layer").share.sum()
    largest = layers.sort_values(ascending=False).head(5)
    return (f"error share {layers.sum():.3f}: " + ", ".join(f"layer {layer} {share:.3f}" for layer, share in largest.items())
            + f"; layers 0-9 {layers.loc[:9].sum():.3f}, 10-19 {layers.loc[10:19].sum():.3f}, 20+ {layers.loc[20:].sum():.3f}")


def autocast_change(model):
    """Relative difference of the MLP values under bfloat16 autocast, and both forwards' seconds."""
    from mechnb.sae.store import padded
    from mechnb.transcoders.mlp import mlp_values
    from mechnb.transcoders.train import token_windows

    windows = token_windows(model, python_docs("eval"), 128)
    ids, mask = padded(model, [next(windows) for _ in range(16)])
    figures = {}
    for autocast in (False, True):
        mlp_values(model, list(range(model.n_layers)), "mlp_in", ids[:2], mask[:2], autocast=autocast)  # warm
        start = time.perf_counter()
        figures[autocast] = (*mlp_values(model, list(range(model.n_layers)), "mlp_in", ids, mask, autocast=autocast),
                             time.perf_counter() - start)
    (x, y, t), (xb, yb, tb) = figures[False], figures[True]
    rel = lambda a, b: float(((a - b).norm(dim=-1) / b.norm(dim=-1).clamp_min(1e-6)).mean())
    print(f"bfloat16 autocast: MLP inputs differ by {rel(xb, x):.2%} and outputs by {rel(yb, y):.2%} of their norm "
          f"(mean over {x.shape[1]} tokens and 30 layers); forward {t:.2f} s in float32, {tb:.2f} s autocast "
          f"(x{t / tb:.2f}; this CPU has {'no ' if tb > t else ''}fast bf16)")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("directory")
    parser.add_argument("--tokens", type=int, default=200_000)
    parser.add_argument("--width", type=int, default=2304)
    parser.add_argument("-k", type=int, default=32)
    parser.add_argument("--clt-width", type=int, default=512)
    parser.add_argument("--clt-k", type=int, default=16)
    parser.add_argument("--window", type=int, default=None)
    parser.add_argument("--only", choices=["per-layer", "clt"], default=None)
    parser.add_argument("--eval-tokens", type=int, default=10_000)
    parser.add_argument("--batch-size", type=int, default=4096, help="tokens per step (both kinds)")
    parser.add_argument("--skip", action="store_true", help="a linear skip beside the features (both kinds)")
    args = parser.parse_args()
    model = mechnb.load()
    folder = Path(args.directory)
    common = dict(batch_size=args.batch_size, skip=args.skip)
    tail = (f"-b{args.batch_size}" if args.batch_size != 4096 else "") + ("-skip" if args.skip else "")
    sets = {}
    if args.only != "clt":
        sets[f"per-layer w{args.width} k{args.k}"] = trained(model, folder, f"per-layer-{args.width}-{args.k}{tail}",
                                                             args.tokens, width=args.width, k=args.k, **common)
    if args.only != "per-layer":
        label = f"clt-{args.clt_width}-{args.clt_k}" + (f"-window{args.window}" if args.window else "") + tail
        sets[f"CLT w{args.clt_width} k{args.clt_k}" + (f" window {args.window}" if args.window else "")] = trained(
            model, folder, label, args.tokens, width=args.clt_width, k=args.clt_k, cross_layer=True,
            window=args.window, **common)
    for name, (tcs, _) in sets.items():
        print(f"\n== {name}: {parameters(tcs) / 1e6:.1f} M parameters, {tcs.meta.get('tokens')} tokens ==")
        start = time.perf_counter()
        evaluation = tcs.evaluate(model, python_docs("eval"), n_tokens=args.eval_tokens)
        fvu = evaluation.layers.fvu
        s = evaluation.summary
        print(f"held-out ({time.perf_counter() - start:.0f} s): FVU mean {fvu.mean():.3f}, worst {fvu.max():.3f} "
              f"(layer {int(evaluation.layers.layer[fvu.idxmax()])}); loss clean {s['loss_clean']:.3f}, replaced "
              f"{s['loss_replaced']:.3f}, zeroed {s['loss_zero']:.3f} (recovered {s['loss_recovered']:.3f}); "
              f"top-1 agreement {s['agreement']:.1%}")
        print("FVU per layer: " + " ".join(f"{v:.2f}" for v in fvu))
        for prompt in PROMPTS:
            start = time.perf_counter()
            graph = model.graph(prompt, tcs)
            scores = graph.scores
            top = model.tokenizer.decode([graph.logit_ids[0]])
            print(f"graph of {prompt!r} -> {top!r}: replacement {scores['replacement']:.3f}, completeness "
                  f"{scores['completeness']:.3f}, {graph.n_features} features ({time.perf_counter() - start:.1f} s)")
            print("  " + error_shares(graph))
    autocast_change(model)


if __name__ == "__main__":
    torch.set_num_threads(torch.get_num_threads())
    main()
