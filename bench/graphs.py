"""Attribution graphs on the embedded model: time of one graph, and the ratio to one backward
pass per node, in the same process.

The graph is the one circuit-tracer 0.5 (nnsight backend) builds in 32 s on this kind of
machine: the Eiffel prompt (10 tokens), random top-16 transcoders of width 2304 on all 30
layers (4,800 active features), at most 4,096 feature nodes, batches of 256 targets.

Printed:
- the graph's seconds, split into recording the prompt, the logit rows and the feature rows;
- the loop batching replaces: one autograd backward per node through the frozen model (the
  Hugging Face modules with patterns, norm scales and MLP outputs held by hooks, one
  forward kept for every backward), timed on `--sample` feature nodes and scaled to the
  graph's rows, with its ratio to the batched graph;
- the same with mechnb's own hand-written backward, one target at a time (batch size 1),
  which already stops at each target's layer and position: the part of the gain that is
  batching alone.

Run: `make bench` or `.venv/bin/python bench/graphs.py [--sample 128] [--threads 2]`.
"""

import argparse
import time

import torch

import mechnb
from mechnb.graphs import build
from mechnb.transcoders import Transcoder, TranscoderSet

PROMPT = "The Eiffel Tower is located in the city of"


def random_transcoders(model, width: int, k: int, seed: int = 0) -> TranscoderSet:
    g = torch.Generator().manual_seed(seed)
    d = model.d_model
    made = {}
    for layer in range(model.n_layers):
        tc = Transcoder(d, width, kind="topk", k=k)
        with torch.no_grad():
            tc.W_enc.copy_(torch.randn(d, width, generator=g) / d ** 0.5)
            tc.W_dec.copy_(torch.randn(width, d, generator=g) / width ** 0.5)
        made[layer] = tc
    return TranscoderSet(made, model={"name": model.name, "n_layers": model.n_layers, "d_model": d})


def autograd_loop(model, graph, chosen) -> float:
    """Seconds per row of one autograd backward per feature node (`chosen`), on the frozen model."""
    from mechnb.core.arch import submodule
    from mechnb.core.engine import run

    rep, arch = graph.replacement, model.arch
    rec, tcs = rep.rec, graph.tcs
    layers = list(submodule(model.hf, arch.layers))
    mlp_leaves = rec.mlp_out.clone().requires_grad_()
    resid0 = rec.resid0.clone().requires_grad_()
    reads = {}

    def frozen(norm):
        return lambda module, args, kwargs, output: norm.forward(args[0][0].float())[None]

    with run(model, None, grad=True) as r:
        r.hook(layers[0], "input", lambda value: resid0[None])
        for l, layer in enumerate(layers):
            r.hook(submodule(layer, f"{arch.attn}.hook_pattern"), "output", lambda v, l=l: rec.patterns[l][None])
            r.torch_hook(submodule(layer, arch.attn_norm), frozen(rec.attn_norms[l]), with_kwargs=True)
            r.torch_hook(submodule(layer, arch.mlp_norm), frozen(rec.mlp_norms[l]), with_kwargs=True)
            r.hook(submodule(layer, arch.mlp), "input", lambda v, l=l: reads.__setitem__(l, v[0]))
            r.hook(submodule(layer, arch.mlp_out), "output", lambda v, l=l: mlp_leaves[l][None])
        model.hf(input_ids=rec.input_ids, use_cache=False)
        start = time.perf_counter()
        for i in chosen.tolist():
            layer, pos, feat = int(graph.feature_layer[i]), int(graph.feature_pos[i]), int(graph.feature_id[i])
            target = reads[layer][pos] @ tcs[layer].W_enc[:, feat].detach()
            g_mlp, g_embed = torch.autograd.grad(target, [mlp_leaves, resid0], retain_graph=True,
                                                 allow_unused=True)
            # Reading the row's edges, as the batched graph does.
            for grad, vectors in ((g_mlp, rep.errors), (g_embed, rec.resid0)):
                if grad is not None:
                    (grad * vectors).sum(-1)
        return (time.perf_counter() - start) / len(chosen)


def single_loop(graph, chosen) -> float:
    """Seconds per row of mechnb's hand-written backward, one feature node (`chosen`) at a time."""
    rep = graph.replacement

    def sink(kind, layer, g):
        vectors = rep.rec.resid0 if kind == "embed" else rep.errors[layer]
        (g * vectors[:g.shape[1]]).sum(-1)

    start = time.perf_counter()
    with torch.no_grad():
        for i in chosen.tolist():
            layer, feat = int(graph.feature_layer[i]), int(graph.feature_id[i])
            vector = graph.tcs[layer].W_enc[:, feat].detach()[None]
            rep.backward(graph.feature_layer[i:i + 1], graph.feature_pos[i:i + 1], vector, sink)
    return (time.perf_counter() - start) / len(chosen)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sample", type=int, default=128, help="targets timed one per backward pass")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--width", type=int, default=2304)
    parser.add_argument("--k", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = mechnb.load()
    tcs = random_transcoders(model, args.width, args.k)
    build(model, PROMPT, tcs, max_feature_nodes=256)  # warm-up: first-call costs out of the timing

    start = time.perf_counter()
    graph = build(model, PROMPT, tcs, max_feature_nodes=4096, batch_size=256)
    seconds = time.perf_counter() - start
    split = graph.meta["seconds"]
    rows = graph.n_features + len(graph.logit_ids)
    print(f"graph: {graph.n_active} active features, {graph.n_features} feature nodes, "
          f"{len(graph.logit_ids)} logits, {graph.n_nodes} nodes")
    print(f"batched (256 targets per pass): {seconds:.1f} s (record {split['record']:.2f}, logit rows "
          f"{split['logit rows']:.2f}, feature rows {split['feature rows']:.1f})")

    # The loop batching replaces, timed on the same random sample of the graph's features.
    chosen = torch.randperm(graph.n_features, generator=torch.Generator().manual_seed(0))[:args.sample]
    per_row = autograd_loop(model, graph, chosen)
    print(f"one autograd backward per node: {per_row * 1000:.1f} ms a row, {per_row * rows:.0f} s for the "
          f"graph's {rows} rows (timed on {len(chosen)}, scaled); ratio {per_row * rows / seconds:.1f}x")
    per_row = single_loop(graph, chosen)
    print(f"mechnb's backward, one target at a time: {per_row * 1000:.1f} ms a row, {per_row * rows:.0f} s "
          f"for the graph (timed on {len(chosen)}, scaled); ratio {per_row * rows / seconds:.1f}x")
    print("circuit-tracer 0.5 (nnsight backend), same graph on this kind of machine: 32 s "
          f"(ratio {32 / seconds:.1f}x)")


if __name__ == "__main__":
    main()
