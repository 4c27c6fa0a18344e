"""Attribution graphs over a cross-layer transcoder (CLT): mechnb against circuit-tracer 0.5 on
the same files, in one run.

    .venv/bin/python bench/clt_graphs.py [DIR] [--width 512] [--active 4800] [--threads 2]
        [--clt CLT_DIR] [--peer-out OUT_DIR]

(`--clt`: an existing CLT in circuit-tracer's layout instead of a new random one; `--peer-out`: a
circuit-tracer result already made by `bench/circuit_tracer_peer.py` on it, not run again.)

A random jumprelu CLT of width `--width` for SmolLM2-135M (30 layers, each feature writing to
its own and every later layer), its thresholds set so that about `--active` features are
active on the Eiffel prompt (position 0, the special token, aside), is saved in
circuit-tracer's layout (`W_enc_L` / `W_dec_L` safetensors and config.yaml). Then both build
the graph of "The Eiffel Tower is located in the city of" with at most 4,096 feature nodes,
batches of 256 targets, decoders read lazily from the files, float32, `--threads` threads:
- mechnb (`model.graph`), with its seconds split into recording the prompt, reading the
  active features' decoders, the logit rows and the feature rows;
- circuit-tracer 0.5.0 with its nnsight backend, in its own venv (`bench/.venv-circuit-tracer`,
  made on first use by `bench/circuit_tracer_env.py`; `bench/circuit_tracer_peer.py` times
  `attribute` alone, model loading excluded).
Printed: both times and their ratio; whether the active features are the same set; and the
edges on the nodes both graphs keep (features both visited, errors, tokens, logits): the
largest difference relative to the largest edge, and how many edges were compared.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import mechnb  # noqa: E402
from mechnb.transcoders import Transcoder  # noqa: E402
from mechnb.transcoders.clt import CrossLayerTranscoder  # noqa: E402

PROMPT = "The Eiffel Tower is located in the city of"


def random_clt(model, width: int, active: int, seed: int = 0) -> CrossLayerTranscoder:
    """Random encoders and decoders; each layer's threshold lets through its share of `active`
    features over the prompt's positions after the first."""
    from mechnb.graphs.build import _tokens
    from mechnb.graphs.replacement import record

    g = torch.Generator().manual_seed(seed)
    n, d = model.n_layers, model.d_model
    ids, _, _ = _tokens(model, PROMPT, sink=True)
    with torch.no_grad():
        reads = record(model, ids, "mlp_in").reads
    encoders, decoders = {}, {}
    for layer in range(n):
        tc = Transcoder(d, width, kind="jumprelu", decoder=False)
        with torch.no_grad():
            tc.W_enc.copy_(torch.randn(d, width, generator=g) / d ** 0.5)
            pre = (reads[layer, 1:] @ tc.W_enc).flatten()
            tc.threshold.fill_(float(pre.topk(active // n + 1).values[-1]))
        tc.requires_grad_(False)
        encoders[layer] = tc
        decoders[layer] = torch.randn(width, n - layer, d, generator=g) / (width * (n - layer)) ** 0.5
    return CrossLayerTranscoder(encoders, decoders, reads="mlp_in",
                                model={"name": model.name, "n_layers": n, "d_model": d}, name="random-clt")


def compare(graph, folder: Path, result: dict) -> None:
    from safetensors.torch import load_file

    ct = load_file(str(folder / "graph.safetensors"))
    ids = graph.input_ids[0].tolist()
    print(f"inputs: mechnb {ids}, circuit-tracer {result['input_ids']} ({'same' if ids == result['input_ids'] else 'DIFFERENT'})")
    every = ct["active_features"].long()
    ours = {(layer, int(p), int(f)) for layer, (pos, feat, _) in graph.replacement.features.items()
            for p, f in zip(pos, feat)}
    theirs = {tuple(map(int, row)) for row in every.tolist()}
    print(f"active features: mechnb {len(ours)}, circuit-tracer {len(theirs)}, shared {len(ours & theirs)}")
    selected = every[ct["selected_features"].long()]
    their_index = {tuple(map(int, row)): i for i, row in enumerate(selected.tolist())}
    our_index = {(int(l), int(p), int(f)): i for i, (l, p, f) in
                 enumerate(zip(graph.feature_layer, graph.feature_pos, graph.feature_id))}
    shared = sorted(set(their_index) & set(our_index))
    n_ct_features = len(selected)
    n_errors = graph.n_layers * graph.n_pos
    logits = [int(t) for t in ct["logit_token_ids"].tolist()]
    ours_rows = [our_index[key] for key in shared]
    theirs_rows = [their_index[key] for key in shared]
    # errors and tokens share one layout; logits matched by token id.
    ours_rows += list(range(graph.error_start, graph.logit_start))
    theirs_rows += list(range(n_ct_features, n_ct_features + n_errors + graph.n_pos))
    common = [t for t in graph.logit_ids if t in logits]
    ours_rows += [graph.logit_start + graph.logit_ids.index(t) for t in common]
    theirs_rows += [n_ct_features + n_errors + graph.n_pos + logits.index(t) for t in common]
    a = graph.adjacency[ours_rows][:, ours_rows]
    b = ct["adjacency_matrix"].float()[theirs_rows][:, theirs_rows]
    gap = float((a - b).abs().max() / b.abs().max())
    print(f"edges on {len(shared)} shared feature nodes, {n_errors} errors, {graph.n_pos} tokens and {len(common)} "
          f"logits ({int((b != 0).sum())} non-zero edges): largest difference {gap:.1e} of the largest edge")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("directory", nargs="?", default=None)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--active", type=int, default=4800)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clt", default=None)
    parser.add_argument("--peer-out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    folder = Path(args.directory or tempfile.mkdtemp(prefix="mechnb-clt-bench-"))
    model = mechnb.load()
    clt_dir = Path(args.clt) if args.clt else folder / f"clt-{args.width}"
    if not (clt_dir / "W_enc_0.safetensors").is_file():
        random_clt(model, args.width, args.active).save(clt_dir)
    clt = mechnb.transcoders.load(clt_dir)
    print(f"{clt!r} in {clt_dir}")
    model.graph(PROMPT, clt, max_feature_nodes=64)  # warm: first-call costs (imports, allocator)
    start = time.perf_counter()
    graph = model.graph(PROMPT, clt, max_feature_nodes=4096, batch_size=256)
    ours = time.perf_counter() - start
    split = ", ".join(f"{k} {v:.1f} s" for k, v in graph.meta["seconds"].items() if k != "total")
    print(f"mechnb: {ours:.1f} s ({split}); {graph.n_active} active features, {graph.n_features} rows; scores "
          f"{ {k: round(v, 3) for k, v in graph.scores.items()} }")
    from circuit_tracer_env import run_peer

    from mechnb.core.embedded import converted

    peer = Path(args.peer_out) if args.peer_out else folder / "circuit-tracer"
    if args.peer_out:
        result = json.loads((peer / "result.json").read_text())
    else:
        result = run_peer(converted(), clt_dir, PROMPT, peer, max_feature_nodes=4096, batch_size=256,
                          threads=args.threads, quiet=True)
    print(f"circuit-tracer {result.get('version', '0.5.0')}: {result['seconds']:.1f} s; {result['n_active']} active "
          f"features, {result['n_selected']} rows")
    print(f"mechnb is x{result['seconds'] / ours:.1f} faster on this graph")
    compare(graph, peer, result)
    print(json.dumps({"mechnb_seconds": ours, "circuit_tracer_seconds": result["seconds"]}))


if __name__ == "__main__":
    main()
