"""circuit-tracer peer: circuit-tracer 0.5.0's attribution graph over a cross-layer transcoder (CLT).

Runs inside its own venv (bench/.venv-circuit-tracer; circuit-tracer 0.5.0, transformers 4.57,
nnsight, torch 2.13 CPU; made by `bench/circuit_tracer_env.py`):

    bench/.venv-circuit-tracer/bin/python bench/circuit_tracer_peer.py IN.json OUT_DIR
    bench/.venv-circuit-tracer/bin/python bench/circuit_tracer_peer.py --make-random-clt DIR \
        [--width 512] [--seed 0] [--threshold 0.3] [--model MODEL_DIR]

IN.json: `model` (a local Hugging Face Llama folder, e.g. mechnb's converted SmolLM2-135M-Instruct),
`clt` (a directory in circuit-tracer's CLT layout: W_enc_{L}.safetensors holding W_enc_{L}
(width, d_model), b_enc_{L}, b_dec_{L}, threshold_{L}; W_dec_{L}.safetensors holding W_dec_{L}
(width, n_layers - L, d_model)), `prompt`, and optionally `max_feature_nodes` [4096; null = all
active features], `batch_size` [256], `max_n_logits` [10], `desired_logit_prob` [0.95],
`threads` [2], `feature_input_hook` ["mlp.hook_in"], `feature_output_hook` ["mlp.hook_out"],
`offload` [null], `update_interval` [4].

Hook names: circuit-tracer names hook points the TransformerLens way and maps them to nnsight
envoys per architecture (circuit_tracer/utils/tl_nnsight_mapping.py). For LlamaForCausalLM:
    "mlp.hook_in"    -> model.layers[L].post_attention_layernorm output  (MLP input, after the norm)
    "mlp.hook_out"   -> model.layers[L].mlp output                      (MLP output)
    ("hook_mlp_out" is the same location as "mlp.hook_out"; "hook_resid_mid" is the norm's input.)
load_clt's own defaults are hook_resid_mid / hook_mlp_out, i.e. reading BEFORE the norm.

What is measured: wall clock of `circuit_tracer.attribute(...)` only (tokenisation, the
precompute pass, the batched forward pass, logit and feature backward passes, packaging);
model and CLT loading are excluded. torch.set_num_threads(threads). float32 throughout: the
model is loaded with dtype=float32 and load_clt is given dtype=float32 (its default is
bfloat16, and the ReplacementModel's later `.to(float32)` would not undo the rounding).
Decoders are lazy (circuit-tracer's default): each attribution run slices W_dec_{L} from disk.

Output: OUT_DIR/result.json (timings, sizes, token and logit ids, versions, notes),
OUT_DIR/attribute_log.txt (circuit-tracer's verbose log: phase times, tqdm progress) and
OUT_DIR/graph.safetensors (no pickle) with the tensors of circuit_tracer.graph.Graph:
adjacency_matrix (N, N; rows = targets, columns = sources), active_features (n_active, 3:
layer, pos, feature), activation_values (n_active: every active feature, not only the selected
ones), selected_features (indices into active_features, ascending), input_tokens,
logit_token_ids, logit_probabilities; the strings (input_string, logit token strings, cfg,
node layout) are in the safetensors metadata. Node order (rows and columns):
[selected features (in selected_features order), error nodes (layer-major: layer * n_pos + pos),
token nodes (pos), logit nodes]. Error and token rows are zero (they have no inputs).

Quirks of circuit-tracer 0.5.0 worth knowing when comparing:
- it tokenises without special tokens and PREPENDS a special token (the first non-falsy of
  bos, pad, eos, then all_special_ids; note `filter(None, ...)` would skip an id of 0). For
  SmolLM2 that is bos = <|im_start|> (id 1). result.json's input_ids include it.
- position 0 (that token) is ignored: its transcoder activations are zeroed and its error
  vectors are zeroed, so nothing at position 0 is a feature or error node (its MLP outputs
  are simply unattributed); the token node at position 0 still exists.
- model config fixes: transformers 4.x ignores v5's `rope_parameters` (silently rope_theta
  10000), so the copied config gets a top-level rope_theta; v5's tokenizer_class
  "TokenizersBackend" does not exist in 4.x, so it becomes "PreTrainedTokenizerFast".
"""
import argparse
import io
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from importlib.metadata import version

import torch

DEFAULTS = {"max_feature_nodes": 4096, "batch_size": 256, "max_n_logits": 10,
            "desired_logit_prob": 0.95, "threads": 2, "feature_input_hook": "mlp.hook_in",
            "feature_output_hook": "mlp.hook_out", "offload": None, "update_interval": 4}
PHASES = {"precompute": r"Precomputation completed in ([\d.]+)s",
          "forward": r"Forward pass completed in ([\d.]+)s",
          "input_vectors": r"Input vectors built in ([\d.]+)s",
          "logit_attribution": r"Logit attributions completed in ([\d.]+)s",
          "feature_attribution": r"Feature attributions completed in ([\d.]+)s",
          "total_logged": r"Attribution completed in ([\d.]+)s"}


def prepare_model_dir(model_dir, notes):
    """A temp copy of the model folder that transformers 4.x reads as the v5 folder means."""
    tmp = tempfile.mkdtemp(prefix="circuit-tracer-peer-")
    target = os.path.join(tmp, "model")
    shutil.copytree(model_dir, target)
    path = os.path.join(target, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    rope = cfg.get("rope_parameters") or {}
    if "rope_theta" not in cfg and "rope_theta" in rope:
        cfg["rope_theta"] = rope["rope_theta"]
        notes.append(f"config: copied rope_parameters.rope_theta={rope['rope_theta']} to top level")
    if rope.get("rope_type", "default") != "default" and "rope_scaling" not in cfg:
        cfg["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
        notes.append(f"config: copied rope_parameters to rope_scaling ({rope.get('rope_type')})")
    with open(path, "w") as f:
        json.dump(cfg, f, indent=1)
    path = os.path.join(target, "tokenizer_config.json")
    if os.path.exists(path):
        with open(path) as f:
            tok = json.load(f)
        if tok.get("tokenizer_class") == "TokenizersBackend":
            tok["tokenizer_class"] = "PreTrainedTokenizerFast"
            notes.append("tokenizer_config: tokenizer_class TokenizersBackend -> PreTrainedTokenizerFast")
            with open(path, "w") as f:
                json.dump(tok, f, indent=1)
    return tmp, target, cfg


def check_rope(model, cfg):
    """The rotary frequencies the loaded model really uses come from the fixed rope_theta."""
    theta = cfg.get("rope_theta")
    hf = getattr(model, "_model", None)
    rotary = getattr(getattr(hf, "model", None), "rotary_emb", None)
    if theta is None or rotary is None:
        return None
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    expected = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    got = rotary.inv_freq.double().cpu()
    assert torch.allclose(got, expected, rtol=1e-5), "rope_theta not applied to rotary_emb"
    return float(theta)


class _Tee(io.TextIOBase):
    """stderr copy, to read circuit-tracer's own phase timings (its verbose log) afterwards."""

    def __init__(self, stream):
        self.stream, self.parts = stream, []

    def write(self, s):
        self.parts.append(s)
        return self.stream.write(s)

    def flush(self):
        self.stream.flush()


def run(spec_path, out_dir):
    with open(spec_path) as f:
        spec = {**DEFAULTS, **json.load(f)}
    torch.set_num_threads(int(spec["threads"]))
    os.makedirs(out_dir, exist_ok=True)

    import circuit_tracer
    from circuit_tracer import ReplacementModel, attribute
    from circuit_tracer.transcoder.cross_layer_transcoder import load_clt

    notes = []
    tmp, model_dir, cfg = prepare_model_dir(spec["model"], notes)
    try:
        started = time.perf_counter()
        clt = load_clt(spec["clt"], feature_input_hook=spec["feature_input_hook"],
                       feature_output_hook=spec["feature_output_hook"], device=torch.device("cpu"),
                       dtype=torch.float32, lazy_decoder=True, lazy_encoder=False)
        model = ReplacementModel.from_pretrained_and_transcoders(
            model_dir, clt, backend="nnsight", device=torch.device("cpu"), dtype=torch.float32)
        load_seconds = time.perf_counter() - started
        rope_theta = check_rope(model, cfg)
        assert clt.dtype == torch.float32 and model.dtype == torch.float32

        tee = _Tee(sys.stderr)
        saved, sys.stderr = sys.stderr, tee
        try:
            started = time.perf_counter()
            graph = attribute(spec["prompt"], model, max_n_logits=spec["max_n_logits"],
                              desired_logit_prob=spec["desired_logit_prob"],
                              batch_size=spec["batch_size"],
                              max_feature_nodes=spec["max_feature_nodes"], offload=spec["offload"],
                              update_interval=spec["update_interval"], verbose=True)
            seconds = time.perf_counter() - started
        finally:
            sys.stderr = saved
        log = "".join(tee.parts)
        with open(os.path.join(out_dir, "attribute_log.txt"), "w") as f:
            f.write(log)  # circuit-tracer's verbose log and tqdm progress (elapsed per update)
        phases = {name: float(m.group(1)) for name, pattern in PHASES.items()
                  if (m := re.search(pattern, log))}

        tokenizer = model.tokenizer
        input_ids = graph.input_tokens.cpu().tolist()
        bare = tokenizer(spec["prompt"], add_special_tokens=False)["input_ids"]
        prepended = input_ids[:len(input_ids) - len(bare)] if input_ids[-len(bare):] == bare else None
        n_pos, n_layers = len(input_ids), graph.cfg.n_layers
        n_selected, n_logits = len(graph.selected_features), len(graph.logit_targets)
        adjacency = graph.adjacency_matrix.cpu().float().contiguous()
        layout = {"features": [0, n_selected],
                  "errors": [n_selected, n_selected + n_layers * n_pos],
                  "tokens": [n_selected + n_layers * n_pos, n_selected + (n_layers + 1) * n_pos],
                  "logits": [n_selected + (n_layers + 1) * n_pos, adjacency.shape[0]]}
        assert layout["logits"][1] - layout["logits"][0] == n_logits
        logit_ids = graph.logit_token_ids.cpu().tolist()
        result = {
            "seconds": seconds,
            "phases": phases,
            "load_seconds": load_seconds,
            "versions": {name: version(name) for name in
                         ("circuit-tracer", "torch", "transformers", "nnsight")},
            "circuit_tracer_version": circuit_tracer.__version__,
            "threads": torch.get_num_threads(),
            "dtype": str(model.dtype),
            "clt_dtype": str(clt.dtype),
            "backend": model.backend,
            "feature_input_hook": spec["feature_input_hook"],
            "feature_output_hook": spec["feature_output_hook"],
            "feature_input_location": model._feature_input_pattern + "." + model._feature_input_io,
            "feature_output_location": model._feature_output_pattern + ".output",
            "zero_positions": [model.zero_positions.start, model.zero_positions.stop],
            "rope_theta": rope_theta,
            "n_layers": n_layers,
            "d_transcoder": clt.d_transcoder,
            "n_active": int(graph.active_features.shape[0]),
            "n_active_per_layer": torch.bincount(graph.active_features[:, 0].cpu(),
                                                 minlength=n_layers).tolist(),
            "n_selected": n_selected,
            "max_feature_nodes": spec["max_feature_nodes"],
            "batch_size": spec["batch_size"],
            "n_pos": n_pos,
            "input_ids": input_ids,
            "input_tokens": tokenizer.convert_ids_to_tokens(input_ids),
            "prepended_ids": prepended,
            "prepended_tokens": tokenizer.convert_ids_to_tokens(prepended) if prepended else None,
            "logit_token_ids": logit_ids,
            "logit_tokens": [t.token_str for t in graph.logit_targets],
            "logit_probabilities": graph.logit_probabilities.cpu().float().tolist(),
            "adjacency_shape": list(adjacency.shape),
            "n_edges": int(adjacency.count_nonzero()),
            "node_layout": layout,
            "notes": notes,
        }
        tensors = {
            "adjacency_matrix": adjacency,
            "active_features": graph.active_features.cpu().long().contiguous(),
            "activation_values": graph.activation_values.cpu().float().contiguous(),
            "selected_features": graph.selected_features.cpu().long().contiguous(),
            "input_tokens": graph.input_tokens.cpu().long().contiguous(),
            "logit_token_ids": graph.logit_token_ids.cpu().long().contiguous(),
            "logit_probabilities": graph.logit_probabilities.cpu().float().contiguous(),
        }
        metadata = {"input_string": graph.input_string,
                    "logit_tokens": json.dumps(result["logit_tokens"]),
                    "vocab_size": str(graph.vocab_size),
                    "n_pos": str(graph.n_pos),
                    "scan": json.dumps(graph.scan),
                    "cfg": json.dumps({**{k: v for k, v in graph.cfg.to_dict().items()
                                          if isinstance(v, (int, float, str))},
                                       "model_name": spec["model"], "tokenizer_name": spec["model"]}),
                    "model": spec["model"],
                    "clt": spec["clt"],
                    "prompt": spec["prompt"],
                    "node_layout": json.dumps(layout),
                    "circuit_tracer_version": circuit_tracer.__version__}
        from safetensors.torch import save_file

        save_file(tensors, os.path.join(out_dir, "graph.safetensors"), metadata=metadata)
        with open(os.path.join(out_dir, "result.json"), "w") as f:
            json.dump(result, f, indent=1)
        return result
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def make_random_clt(directory, width, seed, threshold, model_dir=None, n_layers=30, d_model=576,
                    feature_input_hook="mlp.hook_in", feature_output_hook="mlp.hook_out"):
    """A random jump-ReLU CLT written by circuit-tracer's own CrossLayerTranscoder.to_safetensors.

    W_enc ~ N(0, 1/d_model), W_dec ~ N(0, 1/width), b_enc = b_dec = 0, every threshold = T.
    With the MLP input after the norm (rms about 0.1-0.4 on SmolLM2-135M), T = 0.3 leaves about
    5,000 features active on "The Eiffel Tower is located in the city of" at width 512.
    """
    from circuit_tracer.transcoder.cross_layer_transcoder import CrossLayerTranscoder

    if model_dir is not None:
        with open(os.path.join(model_dir, "config.json")) as f:
            cfg = json.load(f)
        n_layers, d_model = cfg["num_hidden_layers"], cfg["hidden_size"]
    clt = CrossLayerTranscoder(n_layers, width, d_model, activation_function="jump_relu",
                               lazy_decoder=False, feature_input_hook=feature_input_hook,
                               feature_output_hook=feature_output_hook,
                               device=torch.device("cpu"), dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        clt.W_enc.copy_(torch.randn(n_layers, width, d_model, generator=g) / math.sqrt(d_model))
        for layer in range(n_layers):
            clt.W_dec[layer].copy_(torch.randn(width, n_layers - layer, d_model, generator=g)
                                   / math.sqrt(width))
        clt.b_enc.zero_()
        clt.b_dec.zero_()
        clt.activation_function.threshold.fill_(threshold)
    clt.to_safetensors(directory)
    info = {"width": width, "seed": seed, "threshold": threshold, "n_layers": n_layers,
            "d_model": d_model, "activation_function": "jump_relu",
            "feature_input_hook": feature_input_hook, "feature_output_hook": feature_output_hook,
            "W_enc": "N(0, 1/d_model)", "W_dec": "N(0, 1/width)", "b_enc": 0, "b_dec": 0,
            "made_by": f"bench/circuit_tracer_peer.py --make-random-clt, circuit-tracer "
                       f"{version('circuit-tracer')}, torch {torch.__version__}"}
    with open(os.path.join(directory, "random_clt.json"), "w") as f:
        json.dump(info, f, indent=1)
    return info


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("spec", nargs="?", help="IN.json")
    parser.add_argument("out_dir", nargs="?", help="OUT_DIR")
    parser.add_argument("--make-random-clt", metavar="DIR")
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threshold", type=float, default=0.3)
    parser.add_argument("--model", help="take n_layers and d_model from this model folder")
    parser.add_argument("--n-layers", type=int, default=30)
    parser.add_argument("--d-model", type=int, default=576)
    args = parser.parse_args()
    if args.make_random_clt:
        info = make_random_clt(args.make_random_clt, args.width, args.seed, args.threshold,
                               model_dir=args.model, n_layers=args.n_layers, d_model=args.d_model)
        print(json.dumps(info))
        return
    if not (args.spec and args.out_dir):
        parser.error("give IN.json and OUT_DIR, or --make-random-clt DIR")
    result = run(args.spec, args.out_dir)
    print(json.dumps({k: result[k] for k in ("seconds", "n_active", "n_selected", "n_edges")}))


if __name__ == "__main__":
    main()
