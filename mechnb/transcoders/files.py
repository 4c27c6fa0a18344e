"""Transcoder sets on disk: mechnb's layout, SAELens 6's and circuit-tracer's, read from a directory.

mechnb's layout (`TranscoderSet.save`): `transcoders.json` (name, what the set reads, the model it was
made for, kind, k, width) and one `layer_{L}.safetensors` per layer with `W_enc` (`d_in
width`), `W_dec` (`width d_out`), `b_enc`, `b_dec`, and `threshold` (jumprelu) and `W_skip`
(`d_out d_in`) where present.

Read by `load` as well:
- SAELens 6 transcoders: a directory holding `cfg.json` (architecture `transcoder`,
  `skip_transcoder`, `jumprelu_transcoder` or `jumprelu_skip_transcoder`, with
  `metadata.hook_name` and `metadata.hook_name_out`) and `sae_weights.safetensors`, or a
  directory of such directories, one per layer. Their tensors are oriented as mechnb's.
- circuit-tracer's per-layer transcoders: `config.yaml` (`feature_input_hook`,
  `feature_output_hook`, optionally `transcoders:` file paths by layer) and
  `layer_{L}.safetensors` with `W_enc` stored `width d_in` (transposed on reading),
  `activation_function.threshold` (jumprelu), `k` (topk) or neither (relu).

Only safetensors are read (nothing is unpickled) and nothing is downloaded: fetch a hub
directory first and pass its path.

Gotchas: circuit-tracer's topk keeps the k largest pre-activations even when negative;
mechnb's, like SAELens', zeroes negative ones (trained transcoders rarely have negative
top-k values; the difference is said in the set's `meta["notes"]`). SAELens' jumprelu
applies ReLU before its threshold, which is the same as mechnb's wherever thresholds
are non-negative (checked).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ..core.errors import TranscoderError
from .model import FORMAT, Transcoder, TranscoderSet

_SAELENS = {"transcoder": ("relu", False), "skip_transcoder": ("relu", True),
            "jumprelu_transcoder": ("jumprelu", False), "jumprelu_skip_transcoder": ("jumprelu", True)}
# Hook names (after `blocks.L.`) -> what the transcoder reads / writes.
_READS = {"ln2.hook_normalized": "mlp_in", "mlp.hook_in": "mlp_in", "hook_mlp_in": "mlp_in",
          "hook_resid_mid": "resid_mid"}
_WRITES = ("hook_mlp_out", "mlp.hook_out")


def load(source, device=None) -> TranscoderSet:
    """A `TranscoderSet` from a directory in mechnb's, SAELens 6's or circuit-tracer's layout."""
    import os

    if not isinstance(source, (str, os.PathLike)):
        raise TranscoderError(f"load takes the path of a transcoder directory, got {type(source).__name__}")
    path = Path(source).expanduser()
    if not path.is_dir():
        raise TranscoderError(f"{str(source)!r} is not a directory: transcoders load from a directory in "
                              "mechnb's, SAELens 6's or circuit-tracer's layout (mechnb downloads nothing)")
    if (path / "transcoders.json").is_file():
        tcs = _load_mechnb(path)
    elif (path / "config.yaml").is_file():
        tcs = _load_circuit_tracer(path)
    elif (path / "cfg.json").is_file() or any((p / "cfg.json").is_file() for p in path.iterdir() if p.is_dir()):
        tcs = _load_saelens(path)
    else:
        raise TranscoderError(f"{str(source)!r} holds no transcoders.json (mechnb), config.yaml "
                              "(circuit-tracer) or cfg.json (SAELens 6)")
    return tcs.to(device=device) if device is not None else tcs


def _tensors(file: Path) -> dict:
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(file))
    except Exception as error:  # truncated or not safetensors
        raise TranscoderError(f"cannot read {file}: {type(error).__name__}: {error}") from None
    for key, value in tensors.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise TranscoderError(f"{file} holds NaN or infinite values in {key}: the file is damaged")
    return tensors


def _need(tensors: dict, keys, file: Path) -> None:
    for key in keys:
        if key not in tensors:
            raise TranscoderError(f"{file} has no {key}: its keys are {sorted(tensors)}")


def _made(tensors: dict, kind: str, k, transpose_enc: bool = False, threshold_key: str = "threshold") -> Transcoder:
    W_enc = tensors["W_enc"].T if transpose_enc else tensors["W_enc"]
    d_in, width = W_enc.shape
    d_out = tensors["W_dec"].shape[1]
    if tensors["W_dec"].shape[0] != width or tensors["b_enc"].shape != (width,) or tensors["b_dec"].shape != (d_out,):
        raise TranscoderError(f"inconsistent transcoder shapes: W_enc {tuple(W_enc.shape)}, W_dec "
                              f"{tuple(tensors['W_dec'].shape)}, b_enc {tuple(tensors['b_enc'].shape)}, b_dec "
                              f"{tuple(tensors['b_dec'].shape)}")
    tc = Transcoder(d_in, width, d_out, kind=kind, k=k, skip="W_skip" in tensors, dtype=W_enc.dtype)
    with torch.no_grad():
        tc.W_enc.copy_(W_enc)
        for key in ("W_dec", "b_enc", "b_dec", "W_skip"):
            if key in tensors:
                getattr(tc, key).copy_(tensors[key])
        if kind == "jumprelu":
            tc.threshold.copy_(tensors[threshold_key])
    tc.requires_grad_(False)
    return tc


def _load_mechnb(path: Path) -> TranscoderSet:
    config = json.loads((path / "transcoders.json").read_text())
    if config.get("format") != FORMAT:
        raise TranscoderError(f"{path / 'transcoders.json'} is not a mechnb transcoder set (format "
                              f"{config.get('format')!r})")
    made = {}
    for layer in config["layers"]:
        file = path / f"layer_{layer}.safetensors"
        if not file.is_file():
            raise TranscoderError(f"{file} is missing: transcoders.json lists layer {layer}")
        tensors = _tensors(file)
        _need(tensors, ("W_enc", "W_dec", "b_enc", "b_dec"), file)
        made[layer] = _made(tensors, config["kind"], config.get("k"))
    tcs = TranscoderSet(made, reads=config["reads"], model=config.get("model"), name=config.get("name", "tc"),
                        meta=config.get("meta"))
    if (path / "history.csv").is_file():
        import pandas as pd

        tcs.history = pd.read_csv(path / "history.csv")
    return tcs


def _hook(name: str | None, what: str, where: Path) -> tuple[int | None, str]:
    """`(layer, rest)` of a TransformerLens hook name `blocks.L.rest` (layer None without it)."""
    if not name:
        raise TranscoderError(f"{where} does not say which hook the transcoder {what}")
    match = re.fullmatch(r"blocks\.(\d+)\.(.+)", name)
    return (int(match[1]), match[2]) if match else (None, name)


def _reads(rest: str, where: Path) -> str:
    if rest not in _READS:
        raise TranscoderError(f"{where}: transcoders reading {rest!r} are not supported; mechnb reads "
                              f"{', '.join(sorted(_READS))}")
    return _READS[rest]


def _writes(rest: str, where: Path) -> None:
    if rest not in _WRITES:
        raise TranscoderError(f"{where}: transcoders writing {rest!r} are not supported; mechnb's write "
                              f"the MLP's output ({', '.join(_WRITES)})")


def _load_saelens(path: Path) -> TranscoderSet:
    directories = [path] if (path / "cfg.json").is_file() else sorted(p for p in path.iterdir()
                                                                         if (p / "cfg.json").is_file())
    made, reads, notes = {}, set(), []
    for directory in directories:
        cfg = json.loads((directory / "cfg.json").read_text())
        architecture = cfg.get("architecture")
        if architecture not in _SAELENS:
            raise TranscoderError(f"{directory / 'cfg.json'}: architecture {architecture!r} is not a transcoder "
                                  f"(mechnb reads {', '.join(_SAELENS)}); SAEs load with mechnb.sae.load")
        if cfg.get("normalize_activations", "none") not in (None, "none"):
            raise TranscoderError(f"{directory / 'cfg.json'}: normalize_activations "
                                  f"{cfg['normalize_activations']!r} is not supported (fold it into the weights)")
        if cfg.get("apply_b_dec_to_input"):
            raise TranscoderError(f"{directory / 'cfg.json'}: apply_b_dec_to_input is true, which SAELens "
                                  "forbids for transcoders")
        metadata = {**cfg, **(cfg.get("metadata") or {})}
        layer, rest = _hook(metadata.get("hook_name"), "reads", directory)
        out_layer, out_rest = _hook(metadata.get("hook_name_out"), "writes", directory)
        if layer is None or out_layer != layer:
            raise TranscoderError(f"{directory}: hook_name {metadata.get('hook_name')!r} and hook_name_out "
                                  f"{metadata.get('hook_name_out')!r} must name one layer's blocks.L.*")
        reads.add(_reads(rest, directory))
        _writes(out_rest, directory)
        file = directory / "sae_weights.safetensors"
        if not file.is_file():
            raise TranscoderError(f"{directory} has cfg.json but no sae_weights.safetensors")
        tensors = _tensors(file)
        kind, skip = _SAELENS[architecture]
        _need(tensors, ("W_enc", "W_dec", "b_enc", "b_dec") + (("threshold",) if kind == "jumprelu" else ())
              + (("W_skip",) if skip else ()), file)
        if kind == "jumprelu" and (tensors["threshold"] < 0).any():
            raise TranscoderError(f"{file}: negative jumprelu thresholds, where SAELens' ReLU-then-threshold "
                                  "differs from a plain threshold")
        if layer in made:
            raise TranscoderError(f"two transcoders for layer {layer} in {path}")
        made[layer] = _made(tensors, kind, None)
    if len(reads) > 1:
        raise TranscoderError(f"the transcoders in {path} read different sites ({sorted(reads)}): a set reads one")
    name = (json.loads((directories[0] / "cfg.json").read_text()).get("metadata") or {}).get("model_name")
    return TranscoderSet(made, reads=reads.pop(), model={"name": name} if name else None, name="tc",
                         meta={"format": "saelens", "source": str(path), "notes": notes})


def _load_circuit_tracer(path: Path) -> TranscoderSet:
    import yaml

    config = yaml.safe_load((path / "config.yaml").read_text()) or {}
    if config.get("model_kind", "transcoder_set") != "transcoder_set":
        raise TranscoderError(f"{path / 'config.yaml'}: model_kind {config.get('model_kind')!r}: mechnb reads "
                              "per-layer transcoder sets, not cross-layer transcoders")
    reads = _reads(str(config.get("feature_input_hook")), path / "config.yaml")
    _writes(str(config.get("feature_output_hook")), path / "config.yaml")
    listed = config.get("transcoders")
    if listed:
        files = {}
        for layer, entry in enumerate(listed):
            entry = entry.get("filepath") if isinstance(entry, dict) else entry
            if str(entry).startswith(("hf://", "http")):
                raise TranscoderError(f"{path / 'config.yaml'} names {entry}: mechnb downloads nothing; fetch "
                                      "the files and list their local paths")
            files[layer] = (path / entry) if not Path(entry).is_absolute() else Path(entry)
    else:
        files = {int(m[1]): p for p in path.iterdir() if (m := re.fullmatch(r"layer_(\d+)\.safetensors", p.name))}
    if not files:
        raise TranscoderError(f"{path} has config.yaml but no layer_L.safetensors files")
    made, notes = {}, []
    for layer, file in sorted(files.items()):
        if not file.is_file():
            raise TranscoderError(f"{file} is missing: config.yaml lists it for layer {layer}")
        tensors = _tensors(file)
        _need(tensors, ("W_enc", "W_dec", "b_enc", "b_dec"), file)
        if "activation_function.threshold" in tensors:
            kind, k = "jumprelu", None
        elif "k" in tensors or config.get("activation") == "topk":
            kind, k = "topk", int(tensors["k"]) if "k" in tensors else int(config["k"])
        else:
            kind, k = "relu", None
        made[layer] = _made(tensors, kind, k, transpose_enc=True, threshold_key="activation_function.threshold")
    if next(iter(made.values())).kind == "topk":
        notes.append("circuit-tracer's topk keeps negative top-k pre-activations; mechnb zeroes them")
    return TranscoderSet(made, reads=reads, model={"name": config.get("model_name")} if config.get("model_name") else None,
                         name="tc", meta={"format": "circuit-tracer", "scan": config.get("scan", path.name),
                                          "source": str(path), "notes": notes})
