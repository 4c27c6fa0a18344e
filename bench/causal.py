"""Causal abstraction on the embedded model: mechnb against pyvene 0.1.8, the same work, one run.

The work (the pronoun task, `mechnb.causal.tasks.pronouns`, pairs the model gets right):
1. a full-vector IIA sweep: the residual stream leaving each of the 30 layers, at the name's
   last token and at the last token, on 256 pairs (15,360 interchanges);
2. rank-1 DAS at layer 24, at the name: 200 training pairs x 3 epochs, batch 16, Adam, lr 0.01,
   cross-entropy over the whole vocabulary; held-out IIA on the rest.

pyvene runs in its own environment (`bench/.venv-pyvene`, made on first use: torch 2.13.0 CPU,
pyvene 0.1.8, transformers 4.x; never a dependency of mechnb) on the same pairs, given as
token ids with each example's base and source positions, with one intervenable model per
layer and position as its users build them (`bench/pyvene_peer.py`).

Printed: seconds of each side and their ratio; where mechnb's time goes; whether both give the
same IIA (the sweep, cell by cell; the DAS rotation mechnb trained, evaluated by pyvene on the
held-out pairs); and whether MIB's loader rebuilds the rotation mechnb exports.

Timings need an idle machine: with other work on two cores, torch's threads are descheduled
inside small operations and both sides slow down 5-15x (the load average is printed).

Run: `.venv/bin/python bench/causal.py [--pairs 256] [--threads 2]`.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import mechnb
from mechnb.causal import tasks
from mechnb.causal.mib import export_mib

ROOT = Path(__file__).resolve().parent
PEER = ROOT / ".venv-pyvene"
PEER_PYTHON = PEER / "bin" / "python"
LAYER, K, EPOCHS, BATCH, LR = 24, 1, 3, 16, 0.01


def ensure_peer() -> None:
    """pyvene's own environment: torch first (the CPU build), then pyvene with transformers 4.x
    (pyvene 0.1.8 asks only transformers>=4.45.1, and 5.x is another library)."""
    check = [str(PEER_PYTHON), "-c", "import pyvene, transformers; assert transformers.__version__.startswith('4.')"]
    if PEER_PYTHON.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return
    print("making bench/.venv-pyvene (about 2 minutes, once)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(PEER)], check=True)
    pip = [str(PEER_PYTHON), "-m", "pip", "install", "--quiet"]
    subprocess.run(pip + ["torch==2.13.0"], check=True)
    subprocess.run(pip + ["torch==2.13.0", "pyvene==0.1.8", "transformers>=4.45.1,<5"], check=True)


def pairs_of(model, data):
    """The examples as pyvene's side reads them: token ids, positions, the expected answer id."""
    cm = data.causal_model
    ids = {" he": 384, " she": 1041}
    made = []
    for example in data:
        row = {}
        for role, setting in (("base", example.base), ("source", example.sources["gender"])):
            prompt, spans = cm.render(cm.run(setting))
            tokens = model.tokenizer(prompt)["input_ids"]
            from mechnb.causal.data import token_fields

            row[f"{role}_ids"] = tokens
            row[f"{role}_pos"] = {"name": token_fields(model.tokenizer, prompt, spans)["name"][-1],
                                  "last": len(tokens) - 1}
        row["expected"] = ids[cm.interchange(example.base, example.sources)["pronoun"]]
        made.append(row)
    return made


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ensure_peer()
    print(f"load average {os.getloadavg()[0]:.2f} (timings need an idle machine)")
    model = mechnb.load()
    cm = tasks.pronouns()
    data = cm.counterfactuals(args.pairs + 64, intervene="gender", seed=0).filter(model, quiet=True)
    if len(data) < args.pairs:
        raise SystemExit(f"only {len(data)} pairs left after the filter")
    sweep_data = data[:args.pairs]
    train, test = data[:200], data[200:args.pairs]
    sites = ["resid_post.*@'{name}'", "resid_post.*@-1"]
    model.interchange(sweep_data[:8], "resid_post.20@-1", progress=False)  # first-call costs out of the timing

    started = time.perf_counter()
    iia = model.interchange(sweep_data, sites, variable="gender", progress=False)
    sweep_seconds = time.perf_counter() - started
    das = model.das(train, f"resid_post.{LAYER}@'{{name}}'", variable="gender", k=K, epochs=EPOCHS,
                    batch_size=BATCH, lr=LR, test=test, progress=False)
    meta = das.meta
    das_seconds = meta["seconds_preparing"] + meta["seconds_training"]

    with tempfile.TemporaryDirectory() as scratch:
        das.meta["model_class"] = type(model.hf).__name__
        folder = export_mib(das, scratch, task="pronoun_task")
        pairs = pairs_of(model, sweep_data)
        spec = {"model_dir": str(mechnb.core.embedded.converted()), "threads": args.threads, "pairs": pairs,
                "labels": [384, 1041],
                "sweep": {"layers": list(range(model.n_layers)), "positions": ["name", "last"], "batch_size": 64},
                "das": {"layer": LAYER, "position": "name", "k": K, "train": list(range(200)),
                        "test": list(range(200, len(pairs))), "epochs": EPOCHS, "batch_size": BATCH, "lr": LR,
                        "seed": 0},
                "evaluate_rotation": {"layer": LAYER, "position": "name", "k": K, "pairs": list(range(200, len(pairs))),
                                      "weight": das.basis.detach().tolist()},
                "mib_featurizer": str(next(folder.glob("*)_featurizer")))}
        (Path(scratch) / "in.json").write_text(json.dumps(spec))
        subprocess.run([str(PEER_PYTHON), str(ROOT / "pyvene_peer.py"), str(Path(scratch) / "in.json"),
                        str(Path(scratch) / "out.json")], check=True, stdout=subprocess.DEVNULL)
        peer = json.loads((Path(scratch) / "out.json").read_text())

    theirs = peer["sweep"]
    mine = iia.values.T  # position layer
    theirs_values = torch.tensor([theirs["iia"]["name"], theirs["iia"]["last"]])
    agree = int((mine - theirs_values).abs().lt(1.5 / len(sweep_data)).sum())
    print(f"versions: pyvene {peer['versions']['pyvene']}, transformers {peer['versions']['transformers']} "
          f"(mechnb: {__import__('transformers').__version__}), torch {torch.__version__}; {args.threads} threads")
    print(f"full-vector IIA sweep, 30 layers x 2 positions x {len(sweep_data)} pairs "
          f"({30 * 2 * len(sweep_data)} interchanges):")
    print(f"  mechnb {sweep_seconds:.1f} s, pyvene {theirs['seconds']:.1f} s: x{theirs['seconds'] / sweep_seconds:.1f}")
    print(f"  mechnb's time: one forward of the {len(sweep_data)} pairs' distinct prompts, recording the bases and "
          f"keeping the sources' values, {iia.meta['seconds_recording']:.1f} s; {len(sweep_data) * 60} rows, each "
          f"from its layer and position, {iia.meta['seconds_rows']:.1f} s; the rest (rendering, tables) "
          f"{sweep_seconds - iia.meta['seconds_recording'] - iia.meta['seconds_rows']:.1f} s")
    print(f"  pyvene's: {theirs['forward_passes']} forwards of the whole model (a source and a base for each "
          "interchange, logits at every position), one intervenable model per layer and position")
    print(f"  IIA cells within one pair of each other: {agree} of {mine.numel()}; largest difference "
          f"{float((mine - theirs_values).abs().max()):.4f}")
    print(f"  mechnb's best: {iia.best}; at the name, layers 0-24 {mine[0, :25].min():.2f}-{mine[0, :25].max():.2f}, "
          f"layer 25 {mine[0, 25]:.2f}; at the last token layer 26 {mine[1, 26]:.2f}")
    theirs = peer["das"]
    print(f"rank-{K} DAS at layer {LAYER}, {len(train)} pairs x {EPOCHS} epochs, batch {BATCH}, lr {LR}:")
    print(f"  mechnb {das_seconds:.2f} s (recording the bases and sources once {meta['seconds_preparing']:.2f} s, "
          f"{meta['steps']} steps {meta['seconds_training']:.2f} s, {meta['seconds_per_step']:.3f} s a step; "
          f"{meta['seconds']:.2f} s with a held-out IIA after each epoch)")
    print(f"  pyvene {theirs['seconds']:.2f} s ({theirs['steps']} steps, {theirs['seconds_per_step']:.3f} s a step): "
          f"x{theirs['seconds'] / das_seconds:.1f}")
    print(f"  held-out IIA on {len(test)} pairs: mechnb {meta['iia']:.3f}, pyvene's own training {theirs['iia']:.3f}; "
          f"mechnb's rotation in pyvene {peer['evaluate_rotation']['iia']:.3f}")
    print(f"MIB: the exported rotation rebuilt as MIB loads it differs by {peer['mib_featurizer']['max_abs_difference']:.2e}")
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
