"""SAEs from disk or the hub, in the formats published SAEs come in.

    >>> sae = mechnb.sae.load("gemma-scope-2b-pt-res", "layer_20/width_16k/average_l0_71")
    >>> sae = mechnb.sae.load("google/gemma-scope-2b-pt-res", "layer_20/width_16k/average_l0_71")
    >>> sae = mechnb.sae.load("path/to/directory")
    >>> sae.site, sae.model
    ('resid_post.20', 'google/gemma-2-2b')

`source` is a directory, a release named in `mechnb.sae.releases` (no repo path needed), or
a hub repository `org/name` with `sae_id` the folder inside it. Hub files are downloaded
by `huggingface_hub` into the user's Hugging Face cache once and reused offline
(`mechnb.core.hub`); nothing touches the network for a directory.

Formats (a directory is recognised by its files):

| format | files | notes |
|---|---|---|
| SAELens (and mechnb) | `cfg.json`, `sae_weights.safetensors` | old top-level `hook_name` or 6.x `metadata.hook_name` |
| Gemma Scope | `params.npz` (`W_enc`, `W_dec`, `b_enc`, `b_dec`, `threshold`) | site and model from the release |
| Gemma Scope 2 | `params.safetensors` (`w_enc`, ...), `config.json` | site from `hf_hook_point_in` (or the folder) |
| EleutherAI sparsify | `cfg.json` (`k`, `expansion_factor`), `sae.safetensors` | site from the folder (`layers.10`) |
| Llama Scope | `hyperparams.json`, `checkpoints/final.safetensors` | input norm folded into the weights |

Every format is turned into mechnb's `SAE` exactly: encoders that do not subtract `b_dec`,
input and output scales and SAELens' "relu, then threshold" are folded into the weights
(`_build`), so `sae.encode(x)` equals the original's features. Only safetensors and `.npz`
without pickle are read.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..core.errors import SAEError
from .model import SAE

# SAELens' architecture -> mechnb's kind.
_ARCHITECTURES = {"standard": "relu", "relu": "relu", "topk": "topk", "jumprelu": "jumprelu",
                  "batchtopk": "batchtopk"}
# Hugging Face module paths (Gemma Scope 2's `hf_hook_point_in`) -> mechnb's site kind.
_HF_HOOKS = {"output": "resid_post", "input": "resid_pre", "post_feedforward_layernorm.output": "mlp_out",
             "post_attention_layernorm.output": "attn_out", "self_attn.o_proj.input": "head",
             "mlp.output": "mlp_out", "self_attn.output": "attn_out"}
# Gemma Scope 2 folders -> mechnb's site kind.
_FOLDERS = {"resid_post": "resid_post", "resid_post_all": "resid_post", "mlp_out": "mlp_out",
            "mlp_out_all": "mlp_out", "attn_out": "head", "attn_out_all": "head"}


@dataclass
class Raw:
    """An SAE as a file describes it, before it is made into mechnb's form (`_build`).

    The original computes `pre = (scale_in * x - [b_dec if apply_b_dec]) @ W_enc + b_enc`,
    features by `kind`, and `x_hat = (features @ W_dec + b_dec) / scale_out`; `relu_first`
    means its JumpReLU zeroes negative pre-activations before comparing with the threshold.
    """

    tensors: dict
    kind: str
    k: int | None = None
    site: str | None = None
    model: str | None = None
    apply_b_dec: bool = True
    scale_in: float = 1.0
    scale_out: float = 1.0
    relu_first: bool = True
    center: bool = False  # the original reads x minus its mean over d_in (TransformerLens' GPT-2)
    name: str = "sae"
    meta: dict = field(default_factory=dict)


def load(source, sae_id: str | None = None, device=None, revision: str | None = None,
         local_only: bool = False) -> SAE:
    """An SAE from a directory, a named release, or a hub repository (see the module doc).

    Args:
        source: a directory; a release (`"gemma-scope-2b-pt-res"`, see
            `mechnb.sae.releases()`); or a hub repository id (`"google/gemma-scope-2b-pt-res"`).
        sae_id: which SAE of a release or repository (its folder); for a directory, an
            optional subfolder.
        device: where to put it (default CPU; `attach` moves it to its layer's device).
        revision: a hub branch, tag or commit.
        local_only: read the Hugging Face cache only, never the network (an `SAEError`
            saying so if the files are not there).

    Returns:
        The `SAE`, knowing its `site` and the `model` it was trained on where the files or
        the release say. Example: `mechnb.sae.load("gpt2-small-res-jb", "blocks.8.hook_resid_pre")`.
    """
    import os

    if not isinstance(source, (str, os.PathLike)):
        raise SAEError(f"load takes a directory, a release name or a hub repo id, got "
                       f"{type(source).__name__} {source!r:.40}")
    if sae_id is not None and not isinstance(sae_id, str):
        raise SAEError(f"sae_id is the SAE's folder (a string such as 'layer_20/width_16k/average_l0_71'), "
                       f"got {type(sae_id).__name__}")
    path = Path(source).expanduser()
    looks_like_a_path = isinstance(source, os.PathLike) or str(source).startswith(("/", ".", "~")) \
        or str(source).count("/") > 1
    if not path.is_dir() and looks_like_a_path:
        raise SAEError(f"{str(source)!r} is not an SAE directory (no such directory): name a directory, a release "
                       "(mechnb.sae.releases() lists them) or a hub repo id (org/name)")
    if path.is_dir():
        raw = read_directory(path / sae_id if sae_id else path)
    else:
        from .releases import download, locate

        repo, folder, hint = locate(str(source), sae_id, SAEError)
        raw = read_directory(download(repo, folder, SAEError, revision, local_only), hint)
    sae = build(raw, device)
    history = Path(raw.meta["source"]) / "history.csv"
    if raw.meta.get("format") == "mechnb" and history.is_file():  # the training curve mechnb saves beside
        import pandas as pd

        sae.history = pd.read_csv(history)
    return sae


def read_directory(path: Path, hint: dict | None = None) -> Raw:
    """The `Raw` SAE in a local directory, recognised by its files; `hint` (site, model, format)
    fills in what the files do not say (a release knows it)."""
    hint = hint or {}
    if not path.is_dir():
        raise SAEError(f"{str(path)!r} is not a directory")
    files = {p.name for p in path.iterdir()}
    if "cfg.json" in files and "sae_weights.safetensors" in files:
        raw = _saelens(path)
    elif "cfg.json" in files and "sae.safetensors" in files:
        raw = _sparsify(path)
    elif "params.npz" in files:
        raw = _gemma_scope(path)
    elif "params.safetensors" in files:
        raw = _gemma_scope_2(path)
    elif "hyperparams.json" in files:
        raw = _llama_scope(path)
    else:
        raise SAEError(f"{str(path)!r} holds no SAE mechnb reads: it needs cfg.json with sae_weights.safetensors "
                       "(SAELens, mechnb) or sae.safetensors (sparsify), params.npz (Gemma Scope), "
                       "params.safetensors (Gemma Scope 2) or hyperparams.json (Llama Scope)")
    raw.site = raw.site or hint.get("site")
    raw.center = raw.center or bool(hint.get("center"))
    raw.model = raw.model or hint.get("model")
    raw.meta.setdefault("source", str(path))
    raw.meta.update({k: v for k, v in hint.items() if k in ("release", "repo", "sae_id")})
    return raw


# -- the formats -----------------------------------------------------------------------


def _json(file: Path) -> dict:
    try:
        value = json.loads(file.read_text())
    except (OSError, ValueError) as error:
        raise SAEError(f"cannot read {file}: {type(error).__name__}: {error}") from None
    if not isinstance(value, dict):
        raise SAEError(f"{file} holds {type(value).__name__}, not the SAE's settings (a JSON object)")
    return value


def _safetensors(file: Path) -> dict:
    from safetensors.torch import load_file

    try:
        return load_file(str(file))
    except Exception as error:  # truncated or not safetensors
        raise SAEError(f"cannot read {file}: {type(error).__name__}: {error}") from None


def read_npz(file: Path) -> dict:
    import numpy as np

    try:
        with np.load(file, allow_pickle=False) as data:
            return {key: torch.from_numpy(data[key].copy()) for key in data.files}
    except Exception as error:  # not an npz, or one holding objects (pickled)
        raise SAEError(f"cannot read {file}: {type(error).__name__}: {error}") from None


def _need(tensors: dict, keys, file: Path) -> None:
    missing = [key for key in keys if key not in tensors]
    if missing:
        raise SAEError(f"{file} has no {', '.join(missing)}: its tensors are {sorted(tensors)}")


def site_of_hook(hook: str | None) -> str | None:
    """mechnb's site for a hook name: a TransformerLens name (`blocks.12.hook_resid_post`), a
    Hugging Face module path (`model.layers.12.output`) or a site; None if it names none."""
    from ..core.sites import parse

    if not hook:
        return None
    match = re.fullmatch(r"(?:model\.)?(?:model\.)?layers\.(\d+)\.(.+)", hook)
    if match and match[2] in _HF_HOOKS:
        return f"{_HF_HOOKS[match[2]]}.{match[1]}"
    try:
        return str(parse(hook))
    except Exception:  # a hook point mechnb has no site for (ln2.hook_normalized, hook_q)
        return None


def _saelens(path: Path) -> Raw:
    cfg = _json(path / "cfg.json")
    merged = {**cfg, **(cfg.get("metadata") or {})}  # SAELens 6 keeps hook_name under metadata
    merged.setdefault("hook_name", merged.get("hook_point"))  # before SAELens 3
    kind = merged.get("kind") or _ARCHITECTURES.get(merged.get("architecture", "standard"))
    if kind is None:
        raise SAEError(f"{path / 'cfg.json'}: SAE architecture {merged.get('architecture')!r} is not one mechnb "
                       f"reads ({', '.join(sorted(_ARCHITECTURES))})")
    if merged.get("hook_head_index") is not None:
        raise SAEError(f"{path / 'cfg.json'}: the SAE reads one head ({merged['hook_head_index']}) of "
                       f"{merged.get('hook_name')}; mechnb attaches SAEs to whole sites")
    norm = merged.get("normalize_activations")
    if norm not in (None, False, "none"):
        raise SAEError(f"{path / 'cfg.json'}: normalize_activations {norm!r} rescales inputs by a factor the "
                       "file does not hold; fold it into W_enc, W_dec and b_dec first")
    tensors = _safetensors(path / "sae_weights.safetensors")
    _need(tensors, ("W_enc", "W_dec", "b_enc", "b_dec") + (("threshold",) if kind == "jumprelu" else ()),
          path / "sae_weights.safetensors")
    if "finetuning_scaling_factor" in tensors:  # features scaled before decoding
        tensors["W_dec"] = tensors["W_dec"] * tensors.pop("finetuning_scaling_factor")[:, None]
    k = merged.get("k") or (merged.get("activation_fn_kwargs") or {}).get("k")
    return Raw(tensors, kind, k=k, site=merged.get("site") or site_of_hook(merged.get("hook_name")),
               model=merged.get("model_name") or merged.get("model"),
               apply_b_dec=merged.get("apply_b_dec_to_input", True) is not False,
               relu_first="kind" not in merged, name=merged.get("name", "sae"),
               meta={"format": "mechnb" if "kind" in merged else "saelens", "hook_name": merged.get("hook_name")})


def layer_folder(name: str) -> tuple[int | None, str | None]:
    """`(layer, what)` of a sparsify folder: `layers.10` (the layer's output), `layers.10.mlp`."""
    match = re.fullmatch(r"(?:.*\.)?(?:layers|h)\.(\d+)(?:\.(mlp|self_attn|attn))?", name)
    if not match:
        return None, None
    return int(match[1]), match[2]


def _sparsify(path: Path) -> Raw:
    cfg = _json(path / "cfg.json")
    if cfg.get("transcode"):
        raise SAEError(f"{path} holds a sparsify transcoder (transcode: true): load it with mechnb.transcoders.load")
    if cfg.get("signed"):
        raise SAEError(f"{path / 'cfg.json'}: signed sparsify SAEs are not supported")
    tensors = _safetensors(path / "sae.safetensors")
    _need(tensors, ("encoder.weight", "encoder.bias", "W_dec", "b_dec"), path / "sae.safetensors")
    W_enc = tensors["encoder.weight"].T
    W_dec = tensors["W_dec"]
    if W_dec.shape != W_enc.T.shape:
        W_dec = W_dec.T
    layer, what = layer_folder(path.name)
    kind = {None: "resid_post", "mlp": "mlp_out"}.get(what, "attn_out")
    site = None if layer is None else f"{kind}.{layer}"
    model = None
    if (path.parent / "config.json").is_file():
        model = _json(path.parent / "config.json").get("model")
    if not isinstance(cfg.get("k"), int):
        raise SAEError(f"{path / 'cfg.json'} has no k (the active latents per token)")
    return Raw({"W_enc": W_enc, "W_dec": W_dec, "b_enc": tensors["encoder.bias"], "b_dec": tensors["b_dec"]},
               "topk", k=cfg["k"], site=site, model=model,
               meta={"format": "sparsify", "hook_name": path.name})


def _gemma_scope(path: Path) -> Raw:
    tensors = read_npz(path / "params.npz")
    _need(tensors, ("W_enc", "W_dec", "b_enc", "b_dec", "threshold"), path / "params.npz")
    if "scaling_factor" in tensors:
        if not torch.allclose(tensors["scaling_factor"], torch.ones_like(tensors["scaling_factor"])):
            tensors["W_dec"] = tensors["W_dec"] * tensors["scaling_factor"][:, None]
        del tensors["scaling_factor"]
    return Raw(tensors, "jumprelu", apply_b_dec=False, meta={"format": "gemma-scope"})


def _gemma_scope_2(path: Path) -> Raw:
    tensors = _safetensors(path / "params.safetensors")
    tensors = {({"w_enc": "W_enc", "w_dec": "W_dec"}).get(key, key): value for key, value in tensors.items()}
    _need(tensors, ("W_enc", "W_dec", "b_enc", "b_dec", "threshold"), path / "params.safetensors")
    if "affine_skip_connection" in tensors or path.name.endswith("_affine"):
        raise SAEError(f"{path} is a Gemma Scope 2 transcoder: load it with mechnb.transcoders.load")
    config = _json(path / "config.json") if (path / "config.json").is_file() else {}
    if config.get("architecture", "jump_relu") not in ("jump_relu", "jumprelu"):
        raise SAEError(f"{path / 'config.json'}: architecture {config['architecture']!r} is not JumpReLU")
    if config.get("hf_hook_point_out") and config.get("hf_hook_point_out") != config.get("hf_hook_point_in"):
        raise SAEError(f"{path} reads {config.get('hf_hook_point_in')} and writes {config['hf_hook_point_out']}: "
                       "a transcoder; load it with mechnb.transcoders.load")
    site = site_of_hook(config.get("hf_hook_point_in"))
    if site is None:  # no config.json: the folder says (resid_post/layer_10_width_16k_l0_small)
        layer = re.search(r"layer_(\d+)", path.name)
        kind = _FOLDERS.get(path.parent.name)
        site = f"{kind}.{layer[1]}" if layer and kind else None
    return Raw(tensors, "jumprelu", site=site, model=config.get("model_name"), apply_b_dec=False,
               meta={"format": "gemma-scope-2", "hook_name": config.get("hf_hook_point_in")})


def _llama_scope(path: Path) -> Raw:
    cfg = _json(path / "hyperparams.json")
    weights = path / "checkpoints" / "final.safetensors"
    if not weights.is_file():
        raise SAEError(f"{path} has hyperparams.json but no checkpoints/final.safetensors")
    tensors = _safetensors(weights)
    _need(tensors, ("encoder.weight", "encoder.bias", "decoder.weight", "decoder.bias"), weights)
    if cfg.get("hook_point_out", cfg.get("hook_point_in")) != cfg.get("hook_point_in"):
        raise SAEError(f"{path}: reads {cfg.get('hook_point_in')} and writes {cfg.get('hook_point_out')}: a "
                       "transcoder, which mechnb does not read in Llama Scope's format")
    d_model = tensors["encoder.weight"].shape[1]
    norms = cfg.get("dataset_average_activation_norm") or {}
    scale_in = d_model ** 0.5 / norms["in"] if norms.get("in") else 1.0
    scale_out = d_model ** 0.5 / norms["out"] if norms.get("out") else scale_in
    act = cfg.get("act_fn", "jumprelu")
    if act not in ("jumprelu", "relu", "topk"):
        raise SAEError(f"{path / 'hyperparams.json'}: act_fn {act!r} is not one mechnb reads")
    made = {"W_enc": tensors["encoder.weight"].T, "W_dec": tensors["decoder.weight"].T,
            "b_enc": tensors["encoder.bias"], "b_dec": tensors["decoder.bias"]}
    if act == "jumprelu":  # one threshold for every feature, scaled as SAELens does
        made["threshold"] = torch.full_like(made["b_enc"], float(cfg["jump_relu_threshold"]) * scale_in)
    return Raw(made, act, k=cfg.get("top_k") if act == "topk" else None, site=site_of_hook(cfg.get("hook_point_in")),
               model="meta-llama/Llama-3.1-8B", apply_b_dec=False, scale_in=scale_in, scale_out=scale_out,
               meta={"format": "llama-scope", "hook_name": cfg.get("hook_point_in")})


# -- into mechnb's form -------------------------------------------------------------------


def build(raw: Raw, device=None) -> SAE:
    """mechnb's `SAE` computing exactly what `raw` describes.

    mechnb computes `pre = (x - b_dec) @ W_enc + b_enc` and `x_hat = f @ W_dec + b_dec`. With
    `s_in`, `s_out` the input and output scales and `a` whether the original subtracts
    `b_dec`: `W_enc' = s_in W_enc`, `W_dec' = W_dec / s_out`, `b_dec' = b_dec / s_out`,
    `b_enc' = b_enc - a b_dec @ W_enc + b_dec' @ W_enc'` (with `W_enc'` centred over its rows
    where the original centres its input). Thresholds are raised to at least 0
    where the original applies ReLU first (the same features either way).
    """
    t = raw.tensors
    W_enc, W_dec = t["W_enc"], t["W_dec"]
    if W_enc.dim() != 2 or W_dec.shape != W_enc.T.shape or t["b_enc"].shape != (W_enc.shape[1],) \
            or t["b_dec"].shape != (W_enc.shape[0],):
        raise SAEError(f"inconsistent SAE shapes in {raw.meta.get('source', 'the files')}: W_enc "
                       f"{tuple(W_enc.shape)}, W_dec {tuple(W_dec.shape)}, b_enc {tuple(t['b_enc'].shape)}, "
                       f"b_dec {tuple(t['b_dec'].shape)}")
    for key, value in t.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise SAEError(f"{raw.meta.get('source', 'the SAE')} holds NaN or infinite values in {key}: the "
                           "file is damaged")
    dtype = W_enc.dtype if W_enc.is_floating_point() else torch.float32
    f = {key: value.to(torch.float64) for key, value in t.items()}
    enc = f["W_enc"] * raw.scale_in
    if raw.center:  # (x - mean(x)) @ W = x @ (W - its mean over rows)
        enc = enc - enc.mean(0, keepdim=True)
    b_dec = f["b_dec"] / raw.scale_out
    b_enc = f["b_enc"] - (f["b_dec"] @ f["W_enc"] if raw.apply_b_dec else 0) + b_dec @ enc
    d_in, d_sae = W_enc.shape
    sae = SAE(d_in, d_sae, kind=raw.kind, k=raw.k, site=raw.site, name=raw.name, model=raw.model,
              dtype=dtype, device=device)
    with torch.no_grad():
        sae.W_enc.copy_(enc)
        sae.W_dec.copy_(f["W_dec"] / raw.scale_out)
        sae.b_enc.copy_(b_enc)
        sae.b_dec.copy_(b_dec)
        if "threshold" in f:
            threshold = f["threshold"].clamp(min=0) if raw.relu_first and raw.kind == "jumprelu" else f["threshold"]
            sae.threshold.copy_(threshold.expand(d_sae))
    sae.meta.update(raw.meta)
    return sae
