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

- circuit-tracer's cross-layer transcoders: `config.yaml` with `model_kind:
  cross_layer_transcoder` and `W_enc_L` / `W_dec_L` files (`mechnb.transcoders.clt`; the
  decoders read lazily), from a directory or a hub repository (its folder as `tc_id`).

Published transcoders, one folder per layer, read by `load(source, tc_id)`: Gemma Scope's
(`params.npz`, reading the MLP's input), Gemma Scope 2's (`params.safetensors` and
`config.json`, with the `affine_skip_connection` as `W_skip`) and EleutherAI sparsify's
(`cfg.json` with `transcode: true`, `sae.safetensors`). A release name or a hub repo id is
downloaded through the Hugging Face cache (`mechnb.core.hub`); a directory never touches the
network. Only safetensors and `.npz` without pickle are read (nothing is unpickled).

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


def load(source, tc_id=None, device=None, revision: str | None = None, local_only: bool = False,
         lazy: bool = True) -> TranscoderSet:
    """A `TranscoderSet` from a directory, a named release or a hub repository.

    Args:
        source: a directory in mechnb's, SAELens 6's or circuit-tracer's layout (or one
            transcoder's folder in a published format below); a release
            (`"gemma-scope-2b-pt-transcoders"`, `mechnb.sae.releases("transcoder")`); or a
            hub repository id.
        tc_id: for a release or repository, which transcoders: one folder, a list of
            folders, or `{layer: folder}`. Each folder holds one layer's transcoder in
            Gemma Scope's (`params.npz`), Gemma Scope 2's (`params.safetensors`, with its
            affine skip) or sparsify's (`cfg.json` with `transcode`, `sae.safetensors`)
            format, or a whole set in one of the layouts above.
        revision: a hub branch, tag or commit.
        local_only: read the Hugging Face cache only, never the network.
        lazy: for a cross-layer transcoder (circuit-tracer's CLT layout, `mechnb.transcoders.clt`),
            read decoder rows from their files as they are needed (False: all into memory).

    Example: `mechnb.transcoders.load("gemma-scope-2-1b-pt-transcoders",
    ["transcoder/layer_5_width_16k_l0_big_affine"])`. Hub files go through the Hugging Face
    cache (`mechnb.core.hub`) and are reused offline.
    """
    import os

    if not isinstance(source, (str, os.PathLike)):
        raise TranscoderError(f"load takes a directory, a release name or a hub repo id, got {type(source).__name__}")
    path = Path(source).expanduser()
    if path.is_dir() and tc_id is None:
        tcs = _load_directory(path, lazy)
    elif path.is_dir():
        tcs = _one_per_layer([(folder, path / folder, {}) for folder in _ids(tc_id)], str(path))
    else:
        tcs = _from_hub(str(source), tc_id, revision, local_only, lazy)
    return tcs.to(device=device) if device is not None else tcs


def _ids(tc_id) -> list:
    if isinstance(tc_id, str):
        return [tc_id]
    if isinstance(tc_id, dict):
        return list(tc_id.values())
    if isinstance(tc_id, (list, tuple)) and tc_id and all(isinstance(i, str) for i in tc_id):
        return list(tc_id)
    raise TranscoderError(f"tc_id is a folder, a list of folders or {{layer: folder}}, got {tc_id!r}")


def _from_hub(source: str, tc_id, revision, local_only: bool, lazy: bool = True) -> TranscoderSet:
    from ..sae.releases import download, locate

    if tc_id is None and "/" not in source:
        locate(source, None, TranscoderError, what="transcoder")  # names the release's ids
    folders = _ids(tc_id) if tc_id is not None else [""]
    made = []
    for folder in folders:
        repo, folder, hint = locate(source, folder, TranscoderError, what="transcoder")
        if len(folders) == 1:
            clt = _clt_from_hub(repo, folder, revision, local_only, lazy)
            if clt is not None:
                return clt
        made.append((folder, download(repo, folder, TranscoderError, revision, local_only), hint))
    if len(made) == 1 and _is_set(made[0][1]):
        return _load_directory(made[0][1])
    return _one_per_layer(made, source)


def _clt_from_hub(repo: str, folder: str, revision, local_only: bool, lazy: bool):
    """A CLT in circuit-tracer's layout from a hub repository (its folder `folder`), or None when
    the folder's config.yaml is not a CLT's: config.yaml, then W_enc_L and W_dec_L for L = 0, 1, ...
    until there is no W_enc_L."""
    import yaml

    from ..core import hub

    def name(file):
        return f"{folder.strip('/')}/{file}" if folder.strip("/") else file

    found = hub.find(repo, [name("config.yaml")], TranscoderError, revision, local_only)
    if not found:
        return None
    config_file = found[name("config.yaml")]
    config = yaml.safe_load(config_file.read_text()) or {}
    if config.get("model_kind") != "cross_layer_transcoder":
        return None
    layer = 0
    while hub.find(repo, [name(f"W_enc_{layer}.safetensors")], TranscoderError, revision, local_only):
        hub.fetch(repo, name(f"W_dec_{layer}.safetensors"), TranscoderError, revision, local_only)
        layer += 1
    config["scan"] = f"{repo}//{folder}" if folder else repo  # as circuit-tracer names a hub set
    return _load_clt(config_file.parent, config, lazy=lazy)


def _is_set(path: Path) -> bool:
    return (path / "transcoders.json").is_file() or (path / "config.yaml").is_file() or (
        (path / "cfg.json").is_file() and (path / "sae_weights.safetensors").is_file())


def _load_directory(path: Path, lazy: bool = True) -> TranscoderSet:
    if not path.is_dir():
        raise TranscoderError(f"{str(path)!r} is not a directory: transcoders load from a directory in "
                              "mechnb's, SAELens 6's or circuit-tracer's layout")
    if (path / "transcoders.json").is_file():
        return _load_mechnb(path)
    if (path / "config.yaml").is_file():
        return _load_circuit_tracer(path, lazy)
    if _is_clt(path, None):
        return _load_clt(path, None, lazy=lazy)
    if (path / "cfg.json").is_file() and (path / "sae.safetensors").is_file() or (path / "params.npz").is_file() \
            or (path / "params.safetensors").is_file():
        return _one_per_layer([(path.name, path, {})], str(path))
    if (path / "cfg.json").is_file() or any((p / "cfg.json").is_file() for p in path.iterdir() if p.is_dir()):
        return _load_saelens(path)
    raise TranscoderError(f"{str(path)!r} holds no transcoders.json (mechnb), config.yaml "
                          "(circuit-tracer), cfg.json (SAELens 6, sparsify), params.npz (Gemma Scope) or "
                          "params.safetensors (Gemma Scope 2)")


def _one_per_layer(folders, source: str) -> TranscoderSet:
    """A set from folders each holding one layer's transcoder in a published format."""
    made, reads, model, formats = {}, set(), None, set()
    for folder, path, hint in folders:
        if not path.is_dir():
            raise TranscoderError(f"{path} is not a directory")
        layer, tc, read, made_for, fmt = _published(path, folder)
        if layer in made:
            raise TranscoderError(f"two transcoders for layer {layer} in {source}")
        made[layer], model = tc, model or made_for or hint.get("model")
        reads.add(read)
        formats.add(fmt)
    if len(reads) > 1:
        raise TranscoderError(f"the transcoders of {source} read different sites ({sorted(reads)}): a set reads one")
    return TranscoderSet(made, reads=reads.pop(), model={"name": model} if model else None, name="tc",
                         meta={"format": ", ".join(sorted(formats)), "source": source, "notes": []})


def _published(path: Path, folder: str):
    """`(layer, Transcoder, reads, model, format)` of one folder in Gemma Scope's, Gemma Scope 2's
    or sparsify's format."""
    from ..sae.files import layer_folder, read_npz

    layer_in = re.search(r"layer_(\d+)", folder or path.name)
    if (path / "params.npz").is_file():  # Gemma Scope: reads the MLP's input, JumpReLU, no b_dec on input
        tensors = {k: v.float() for k, v in read_npz(path / "params.npz").items()}
        _need(tensors, ("W_enc", "W_dec", "b_enc", "b_dec", "threshold"), path / "params.npz")
        if layer_in is None:
            raise TranscoderError(f"{path}: the folder does not say its layer (layer_L/...)")
        tensors["threshold"] = tensors["threshold"].clamp(min=0)  # ReLU, then the threshold
        return int(layer_in[1]), _made(tensors, "jumprelu", None), "mlp_in", None, "gemma-scope"
    if (path / "params.safetensors").is_file():  # Gemma Scope 2
        tensors = _tensors(path / "params.safetensors")
        tensors = {({"w_enc": "W_enc", "w_dec": "W_dec"}).get(k, k): v for k, v in tensors.items()}
        _need(tensors, ("W_enc", "W_dec", "b_enc", "b_dec", "threshold"), path / "params.safetensors")
        config = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
        hook_in = config.get("hf_hook_point_in", "pre_feedforward_layernorm.output")
        hook_out = config.get("hf_hook_point_out", "post_feedforward_layernorm.output")
        if not hook_in.endswith("pre_feedforward_layernorm.output") or not hook_out.endswith(
                "post_feedforward_layernorm.output"):
            raise TranscoderError(f"{path}: reads {hook_in} and writes {hook_out}; mechnb's transcoders read the "
                                  "MLP's input and write its output (Gemma Scope 2's transcoder/ folders)")
        if layer_in is None:
            raise TranscoderError(f"{path}: the folder does not say its layer (layer_L_...)")
        if "affine_skip_connection" in tensors:  # x @ affine: mechnb's W_skip is its transpose
            tensors["W_skip"] = tensors.pop("affine_skip_connection").T
        tensors["threshold"] = tensors["threshold"].clamp(min=0)
        return (int(layer_in[1]), _made(tensors, "jumprelu", None), "mlp_in", config.get("model_name"),
                "gemma-scope-2")
    if (path / "cfg.json").is_file() and (path / "sae.safetensors").is_file():  # sparsify
        cfg = json.loads((path / "cfg.json").read_text())
        if not cfg.get("transcode"):
            raise TranscoderError(f"{path} holds a sparsify SAE, not a transcoder: load it with mechnb.sae.load")
        layer, what = layer_folder(path.name)
        if layer is None or what != "mlp":
            raise TranscoderError(f"{path}: a sparsify transcoder's folder names its MLP (layers.L.mlp)")
        tensors = _tensors(path / "sae.safetensors")
        _need(tensors, ("encoder.weight", "encoder.bias", "W_dec", "b_dec"), path / "sae.safetensors")
        made = {"W_enc": tensors["encoder.weight"].T, "b_enc": tensors["encoder.bias"], "W_dec": tensors["W_dec"],
                "b_dec": tensors["b_dec"]}
        if "W_skip" in tensors:
            made["W_skip"] = tensors["W_skip"]
        model = None
        if (path.parent / "config.json").is_file():
            model = json.loads((path.parent / "config.json").read_text()).get("model")
        return layer, _made(made, "topk", int(cfg["k"])), "mlp_in", model, "sparsify"
    raise TranscoderError(f"{path} holds no transcoder mechnb reads (params.npz, params.safetensors, or cfg.json "
                          "with sae.safetensors)")


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


def _load_circuit_tracer(path: Path, lazy: bool = True) -> TranscoderSet:
    import yaml

    config = yaml.safe_load((path / "config.yaml").read_text()) or {}
    if _is_clt(path, config):
        return _load_clt(path, config, lazy=lazy)
    if config.get("model_kind", "transcoder_set") != "transcoder_set":
        raise TranscoderError(f"{path / 'config.yaml'}: model_kind {config.get('model_kind')!r}: mechnb reads "
                              "transcoder_set and cross_layer_transcoder")
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


def _is_clt(path: Path, config: dict | None) -> bool:
    """Whether a directory holds a CLT in circuit-tracer's layout."""
    if config is not None:
        return config.get("model_kind") == "cross_layer_transcoder"
    return (path / "W_enc_0.safetensors").is_file()


def _load_clt(path: Path, config: dict | None = None, lazy: bool = True):
    """A CLT from a directory in circuit-tracer's layout (`config` from its config.yaml, if any).
    Encoders are read whole; decoders lazily (`lazy=False`: read into memory)."""
    from safetensors import safe_open

    from .clt import CrossLayerTranscoder, _Decoder

    config = config or {}
    where = path / "config.yaml"
    reads = _reads(str(config.get("feature_input_hook", "hook_resid_mid")), where)
    _writes(str(config.get("feature_output_hook", "hook_mlp_out")), where)
    found = {}
    for file in path.iterdir():
        match = re.fullmatch(r"W_(enc|dec)_(\d+)\.safetensors", file.name)
        if match:
            found.setdefault(match[1], set()).add(int(match[2]))
    every = found.get("enc", set()) | found.get("dec", set())
    if not every:
        raise TranscoderError(f"{path} holds no W_enc_L.safetensors: a cross-layer transcoder has an encoder "
                              "and a decoder file per layer")
    n = max(every) + 1
    for kind in ("enc", "dec"):
        missing = sorted(set(range(n)) - found.get(kind, set()))
        if missing:
            raise TranscoderError(f"{path}: W_{kind}_{missing[0]}.safetensors is missing (layers 0-{n - 1} have "
                                  "files): a cross-layer transcoder has W_enc_L and W_dec_L for every layer")
    facts = config.get("mechnb") or {}
    encoders, decoders = {}, {}
    for layer in range(n):
        file = path / f"W_enc_{layer}.safetensors"
        tensors = _tensors(file)
        for key in (f"W_enc_{layer}", f"b_enc_{layer}", f"b_dec_{layer}"):
            if key not in tensors:
                raise TranscoderError(f"{file} has no {key}: its keys are {sorted(tensors)}")
        W_enc = tensors[f"W_enc_{layer}"]
        width, d = W_enc.shape
        kind = facts.get("kind") or ("jumprelu" if f"threshold_{layer}" in tensors else "relu")
        skip = f"W_skip_{layer}" in tensors
        tc = Transcoder(d, width, kind=kind, k=facts.get("k") if kind == "topk" else None, skip=skip,
                        dtype=W_enc.dtype, decoder=False)
        with torch.no_grad():
            tc.W_enc.copy_(W_enc.T)
            tc.b_enc.copy_(tensors[f"b_enc_{layer}"])
            tc.b_dec.copy_(tensors[f"b_dec_{layer}"])
            if kind == "jumprelu":
                tc.threshold.copy_(tensors[f"threshold_{layer}"])
            if skip:
                tc.W_skip.copy_(tensors[f"W_skip_{layer}"])
        tc.requires_grad_(False)
        encoders[layer] = tc
        file = path / f"W_dec_{layer}.safetensors"
        key = f"W_dec_{layer}"
        try:
            with safe_open(str(file), framework="pt") as handle:
                if key not in handle.keys():
                    raise TranscoderError(f"{file} has no {key}: its keys are {sorted(handle.keys())}")
                shape = tuple(handle.get_slice(key).get_shape())
        except TranscoderError:
            raise
        except Exception as error:
            raise TranscoderError(f"cannot read {file}: {type(error).__name__}: {error}") from None
        if len(shape) != 3:
            raise TranscoderError(f"{file}: {key} is {shape}; a CLT decoder is (features, layers written, d_model)")
        decoder = _Decoder(file=file, key=key, shape=shape)
        decoders[layer] = decoder if lazy else _Decoder(decoder.whole(shape[1], "cpu"))
    model = facts.get("model") or ({"name": config["model_name"]} if config.get("model_name") else None)
    meta = dict(facts.get("meta") or {})
    meta.update(format="circuit-tracer clt" if not facts else "mechnb clt", source=str(path),
                scan=config.get("scan", path.name))
    return CrossLayerTranscoder(encoders, decoders, reads=reads, model=model, name=facts.get("name", "tc"),
                                meta=meta, window=facts.get("window"))
