"""pyvene peer for bench/causal.py: the same causal-intervention work as mechnb, done with pyvene.

Runs inside its own venv (bench/.venv-pyvene; pyvene 0.1.8, transformers 4.x, torch 2.13 CPU):

    bench/.venv-pyvene/bin/python bench/pyvene_peer.py IN.json OUT.json

IN.json gives the model folder, token-id pairs (base/source with per-example positions), the
candidate answer ids (`labels`) and the work to do. What is measured (wall clock, model load
excluded, torch.set_num_threads(threads)):

1. sweep: full-vector interchange (VanillaIntervention) on `block_output` of every layer in
   sweep.layers, at each named position; base <- source; IIA = share of pairs whose argmax over
   the `labels` logits at the base's last real token equals `expected`.
2. das: rank-k DAS (LowRankRotatedSpaceIntervention) at das.layer/das.position, Adam, cross-entropy
   over the full vocabulary at the base's last token; seconds, steps, seconds a step, held-out IIA.
3. evaluate_rotation (optional): the same intervention with a given 576 x k rotation, no training.
4. mib_featurizer (optional): a `{UNIT}_featurizer` file mechnb exported, rebuilt the way MIB's
   CausalAbstraction loads it (pyvene's LowRankRotateLayer wrapped in torch's orthogonal
   parametrisation, then its state dict loaded); the largest difference from the saved basis.

Exactness: batches are padded on the RIGHT with an attention mask. The model is causal and
transformers 4.x Llama uses position ids 0..n-1 whatever the mask, so every real token computes
what an unpadded single run computes; logits are read at each base's own last real token.
Positions are passed per example as unit_locations {"sources->base": ([[[s_0],[s_1],..]],
[[[b_0],[b_1],..]])} -- the fully nested form; pyvene's short forms (an int, a flat list) switch
it to `use_fast`, which silently applies the FIRST example's positions to the whole batch.
"""
import json
import os
import random
import shutil
import sys
import tempfile
import time
from importlib.metadata import version

import torch
from pyvene import (IntervenableConfig, IntervenableModel, LowRankRotatedSpaceIntervention,
                    RepresentationConfig, VanillaIntervention)
from transformers import LlamaForCausalLM

PAD_ID = 2  # any id works: right padding is never attended to by real tokens


def load_model(model_dir, notes):
    """Load the Llama model with transformers 4.x, fixing the v5-style config first.

    transformers 4.x ignores `rope_parameters` and would silently use rope_theta 10000, so we
    build a temp folder (config.json rewritten, other files symlinked) with a top-level rope_theta.
    """
    tmp = tempfile.mkdtemp(prefix="pyvene-peer-")
    for name in os.listdir(model_dir):
        if name != "config.json":
            os.symlink(os.path.join(os.path.abspath(model_dir), name), os.path.join(tmp, name))
    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    rope = cfg.get("rope_parameters") or {}
    if "rope_theta" not in cfg and "rope_theta" in rope:
        cfg["rope_theta"] = rope["rope_theta"]
        notes.append(f"config: copied rope_parameters.rope_theta={rope['rope_theta']} to top level")
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(cfg, f)
    try:
        model = LlamaForCausalLM.from_pretrained(tmp, dtype=torch.float32,
                                                 attn_implementation="eager")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    model.eval()
    assert model.config.rope_theta == cfg["rope_theta"], "rope_theta not applied"
    return model


def pad_right(seqs):
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def make_batch(pairs, position):
    """Inputs and per-example unit_locations for one batch of pairs."""
    base = pad_right([p["base_ids"] for p in pairs])
    source = pad_right([p["source_ids"] for p in pairs])
    src_locs = [[p["source_pos"][position]] for p in pairs]   # batch x units
    base_locs = [[p["base_pos"][position]] for p in pairs]
    # one intervention -> outer list of length 1
    unit_locations = {"sources->base": ([src_locs], [base_locs])}
    last = torch.tensor([len(p["base_ids"]) - 1 for p in pairs])
    expected = torch.tensor([p["expected"] for p in pairs])
    return base, source, unit_locations, last, expected


def last_logits(out, last):
    return out.logits[torch.arange(len(last)), last]


def intervenable_for(model, layer, intervention_type, k=None):
    rep = RepresentationConfig(layer, "block_output", "pos", 1, low_rank_dimension=k)
    config = IntervenableConfig(representations=[rep], intervention_types=intervention_type)
    iv = IntervenableModel(config, model)
    iv.disable_model_gradients()  # freezes the model, puts it in eval mode
    return iv


def count_correct(iv, pairs, position, labels, batch_size):
    correct = 0
    with torch.no_grad():
        for i in range(0, len(pairs), batch_size):
            base, source, locs, last, expected = make_batch(pairs[i:i + batch_size], position)
            _, out = iv(base, [source], unit_locations=locs)
            pred = labels[last_logits(out, last)[:, labels].argmax(-1)]
            correct += int((pred == expected).sum())
    return correct


def run_sweep(model, pairs, labels, spec):
    layers, positions, bs = spec["layers"], spec["positions"], spec.get("batch_size", 64)
    iia = {pos: [] for pos in positions}
    c0, t0 = time.process_time(), time.perf_counter()
    for pos in positions:
        for layer in layers:
            iv = intervenable_for(model, layer, VanillaIntervention)
            iia[pos].append(count_correct(iv, pairs, pos, labels, bs) / len(pairs))
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"seconds": seconds, "cpu_seconds": cpu, "layers": layers, "pairs": len(pairs),
            "forward_passes": 2 * len(pairs) * len(layers) * len(positions), "iia": iia}


def run_das(model, pairs, labels, spec):
    torch.manual_seed(spec.get("seed", 0))
    rng = random.Random(spec.get("seed", 0))
    train = [pairs[i] for i in spec["train"]]
    test = [pairs[i] for i in spec["test"]]
    pos, bs = spec["position"], spec.get("batch_size", 16)
    iv = intervenable_for(model, spec["layer"], LowRankRotatedSpaceIntervention, spec.get("k", 1))
    params = iv.get_trainable_parameters()
    assert all(p.requires_grad for p in params) and not any(
        p.requires_grad for p in model.parameters()), "only the rotation may train"
    opt = torch.optim.Adam(params, lr=spec.get("lr", 1e-3))
    loss_fn = torch.nn.CrossEntropyLoss()
    steps, losses = 0, []
    iv.train()  # interventions in train mode; the model stays in eval mode
    model.eval()
    c0, t0 = time.process_time(), time.perf_counter()
    for _ in range(spec.get("epochs", 3)):
        order = list(range(len(train)))
        rng.shuffle(order)
        for i in range(0, len(order), bs):
            base, source, locs, last, expected = make_batch([train[j] for j in order[i:i + bs]], pos)
            _, out = iv(base, [source], unit_locations=locs)
            loss = loss_fn(last_logits(out, last), expected)
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
            losses.append(loss.item())
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    iv.eval()
    test_iia = count_correct(iv, test, pos, labels, 64) / len(test) if test else None
    train_iia = count_correct(iv, train, pos, labels, 64) / len(train) if train else None
    return {"seconds": seconds, "cpu_seconds": cpu, "steps": steps,
            "seconds_per_step": seconds / max(steps, 1),
            "iia": test_iia, "train_iia": train_iia, "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None}


def set_rotation(iv, weight):
    """Load a 576 x k matrix R with orthonormal columns into pyvene's rotate_layer.

    pyvene computes rotated = x @ W with W = rotate_layer.weight of shape (576, k) and returns
    base + (rotated_source - rotated_base) @ W.T, i.e. exactly x_b + (x_s - x_b) @ R @ R.T
    with W = R. Assigning to the parametrised weight goes through torch's orthogonal
    right_inverse, which keeps R's columns (it completes them to a square orthogonal base).
    """
    intervention = next(iter(iv.interventions.values()))
    w = torch.tensor(weight, dtype=torch.float32)
    with torch.no_grad():
        intervention.rotate_layer.weight = w
    got = intervention.rotate_layer.weight.detach()
    return float((got - w).abs().max())


def run_evaluate_rotation(model, pairs, labels, spec):
    iv = intervenable_for(model, spec["layer"], LowRankRotatedSpaceIntervention,
                          spec.get("k", len(spec["weight"][0])))
    err = set_rotation(iv, spec["weight"])
    iv.eval()
    chosen = [pairs[i] for i in spec["pairs"]]
    iia = count_correct(iv, chosen, spec["position"], labels, 64) / len(chosen)
    return {"iia": iia, "weight_max_abs_error": err, "pairs": len(chosen)}


def run_mib_featurizer(path):
    """Rebuild an exported subspace featurizer as CausalAbstraction's Featurizer.load_modules does."""
    from pyvene.models.layers import LowRankRotateLayer

    saved = torch.load(path, weights_only=True)
    rotation = saved["model_info"]["additional_config"]["rotation_matrix"]
    layer = LowRankRotateLayer(*rotation.shape, init_orth=False)
    layer.weight.data.copy_(rotation)
    layer = torch.nn.utils.parametrizations.orthogonal(layer)
    holder = torch.nn.Module()
    holder.rotate = layer
    holder.load_state_dict(saved["state_dict"])
    return {"max_abs_difference": float((holder.rotate.weight.detach() - rotation).abs().max()),
            "shape": list(rotation.shape)}


def main(in_path, out_path):
    with open(in_path) as f:
        spec = json.load(f)
    torch.set_num_threads(int(spec.get("threads", 2)))
    notes = []
    t0 = time.perf_counter()
    model = load_model(spec["model_dir"], notes)
    notes.append(f"model load {time.perf_counter() - t0:.2f} s (not timed below); "
                 f"attn_implementation=eager, float32, right padding + attention mask")
    pairs, labels = spec["pairs"], torch.tensor(spec["labels"])
    out = {"versions": {name: version(name) for name in ("pyvene", "torch", "transformers")},
           "threads": torch.get_num_threads(), "notes": notes}
    # Timings need an idle machine: with other CPU-bound work on the 2 cores, torch's OpenMP
    # threads get descheduled inside each small op and runs were seen to slow down 5-15x.
    notes.append("load average at start %.2f" % os.getloadavg()[0])
    if spec.get("sweep"):
        out["sweep"] = run_sweep(model, pairs, labels, spec["sweep"])
        print(f"sweep {out['sweep']['seconds']:.1f} s", file=sys.stderr)
    if spec.get("das"):
        out["das"] = run_das(model, pairs, labels, spec["das"])
        print(f"das {out['das']['seconds']:.1f} s, iia {out['das']['iia']}", file=sys.stderr)
    if spec.get("evaluate_rotation"):
        out["evaluate_rotation"] = run_evaluate_rotation(model, pairs, labels,
                                                         spec["evaluate_rotation"])
    if spec.get("mib_featurizer"):
        out["mib_featurizer"] = run_mib_featurizer(spec["mib_featurizer"])
    notes.append("load average at end %.2f" % os.getloadavg()[0])
    with open(out_path, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
