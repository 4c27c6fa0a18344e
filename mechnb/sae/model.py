"""The sparse autoencoder: encode a site's activation into many sparse features, decode it back.

    features = act((x - b_dec) @ W_enc + b_enc)        # batch d_sae
    x_hat    = features @ W_dec + b_dec                 # batch d_in

Kinds (the activation `act`):

    relu       ReLU; trained with an L1 penalty on activation x decoder-row norm
    topk       keep the k largest pre-activations per token (ReLU'd)
    batchtopk  keep the k x batch largest over a training batch; at inference a
               learned global threshold replaces the batch (BatchTopK, Bussmann 2024)
    jumprelu   pre-activation where it exceeds a learned per-feature threshold

Weights load and save in the SAELens layout: `cfg.json` and
`sae_weights.safetensors` with `W_enc` (d_in d_sae), `W_dec` (d_sae d_in), `b_enc`,
`b_dec`, and `threshold` for jumprelu (and batchtopk). Loading reads safetensors
only: nothing is unpickled.

    >>> sae = SAE(576, 4608, kind="topk", k=32)
    >>> sae(x).shape == x.shape
    True
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..core.errors import SAEError
from ..core.hookpoints import HookPoint
from . import dashboard as dashboards
from . import evaluate as evaluation
from . import label as labelling

KINDS = ("topk", "batchtopk", "relu", "jumprelu")
_ARCHITECTURE = {"relu": "standard", "topk": "topk", "batchtopk": "batchtopk", "jumprelu": "jumprelu"}


class SAE(torch.nn.Module):
    """A sparse autoencoder of `d_in`-wide activations into `d_sae` features (see module doc).

    Args:
        d_in, d_sae: widths of the activation and of the feature space.
        kind: one of `KINDS`.
        k: active features per token for topk / batchtopk.
        site: the site it reads (`resid_post.12`), for attaching and naming.
        name: a label (default `sae`).

    Attributes: `history` (training DataFrame or None), `meta` (training facts).
    """

    def __init__(self, d_in: int, d_sae: int, kind: str = "topk", k: int | None = None,
                 site: str | None = None, name: str = "sae", dtype=torch.float32, device=None):
        super().__init__()
        if kind not in KINDS:
            raise SAEError(f"unknown SAE kind {kind!r}: use one of {', '.join(KINDS)}")
        if kind in ("topk", "batchtopk") and (not isinstance(k, int) or not 0 < k <= d_sae):
            raise SAEError(f"a {kind} SAE needs k, the number of active features per token "
                           f"(1..{d_sae}), got {k!r}")
        self.d_in, self.d_sae, self.kind, self.k, self.site, self.name = d_in, d_sae, kind, k, site, name
        factory = dict(dtype=dtype, device=device)
        self.W_enc = torch.nn.Parameter(torch.zeros(d_in, d_sae, **factory))
        self.W_dec = torch.nn.Parameter(torch.zeros(d_sae, d_in, **factory))
        self.b_enc = torch.nn.Parameter(torch.zeros(d_sae, **factory))
        self.b_dec = torch.nn.Parameter(torch.zeros(d_in, **factory))
        self.threshold = torch.nn.Parameter(torch.zeros(d_sae, **factory),
                                            requires_grad=kind == "jumprelu")
        self.hook_features = HookPoint()
        self.history = None
        self.meta: dict = {}
        self.contexts: dict = {}  # feature -> top and quiet contexts (record_contexts)

    # -- the autoencoder ------------------------------------------------------

    def pre(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-activations `... d_sae`."""
        return (x - self.b_dec) @ self.W_enc + self.b_enc

    def activate(self, pre: torch.Tensor, training: bool = False) -> torch.Tensor:
        """Features from pre-activations, by kind (batchtopk uses the batch when training)."""
        if self.kind == "relu":
            return torch.relu(pre)
        if self.kind == "topk" or (self.kind == "batchtopk" and training):
            if self.kind == "batchtopk":
                flat = torch.relu(pre).flatten()
                top = flat.topk(min(self.k * pre.shape[0], flat.numel()))
                return torch.zeros_like(flat).scatter(0, top.indices, top.values).reshape(pre.shape)
            top = pre.topk(self.k, dim=-1)
            return torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
        return pre * (pre > self.threshold)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Features `... d_sae` of activations `... d_in`."""
        self._check(x)
        return self.activate(self.pre(x))

    def decode(self, features: torch.Tensor) -> torch.Tensor:
        """Reconstruction `... d_in` of features."""
        return features @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The reconstruction of `x`; features pass through `hook_features` on the way."""
        return self.decode(self.hook_features(self.encode(x)))

    def splice(self, x: torch.Tensor) -> torch.Tensor:
        """`x` rebuilt from (possibly edited) features plus the SAE's error on `x`.

        With no edit this returns `x` itself (up to rounding), so an attached SAE changes
        nothing until its features are read or written.
        """
        features = self.encode(x)
        error = x - self.decode(features)
        return self.decode(self.hook_features(features)) + error

    def _check(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.d_in:
            raise SAEError(f"{self.name} reads {self.d_in}-wide activations, got width {x.shape[-1]}"
                           f"{' at ' + self.site if self.site else ''}")

    # -- configuration and files -----------------------------------------------

    @property
    def cfg(self) -> dict:
        """The configuration, in SAELens' vocabulary (plus mechnb's `kind` and `site`)."""
        layer = None
        if self.site and self.site.split(".")[-1].isdigit():
            layer = int(self.site.split(".")[-1])
        return {"d_in": self.d_in, "d_sae": self.d_sae, "architecture": _ARCHITECTURE[self.kind],
                "kind": self.kind, "k": self.k, "hook_name": self.site, "hook_layer": layer,
                "site": self.site, "name": self.name, "dtype": str(self.W_enc.dtype).removeprefix("torch."),
                "apply_b_dec_to_input": True, "normalize_activations": "none"}

    def save(self, directory) -> Path:
        """Write `cfg.json` and `sae_weights.safetensors` (SAELens layout); returns the directory."""
        from safetensors.torch import save_file

        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {"W_enc": self.W_enc, "W_dec": self.W_dec, "b_enc": self.b_enc, "b_dec": self.b_dec}
        if self.kind in ("jumprelu", "batchtopk"):
            tensors["threshold"] = self.threshold
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                  str(path / "sae_weights.safetensors"))
        (path / "cfg.json").write_text(json.dumps(self.cfg, indent=1))
        if self.history is not None:
            self.history.to_csv(path / "history.csv", index=False)
        return path

    def __repr__(self) -> str:
        k = f", k={self.k}" if self.k else ""
        return f"<mechnb SAE {self.name}: {self.kind}{k}, {self.d_in} -> {self.d_sae}, site {self.site}>"

    # -- analysis: each a function of the SAE, written once in its own module ----------

    evaluate = evaluation.evaluate
    record_contexts = labelling.record_contexts
    label = labelling.label
    dashboard = dashboards.dashboard


def load(source, device=None) -> SAE:
    """An SAE from a directory in the SAELens layout (`cfg.json`, `sae_weights.safetensors`).

    A hub id is not fetched: download the SAE's directory yourself (this function never
    touches the network) and pass its path.
    """
    import os

    from safetensors.torch import load_file

    if not isinstance(source, (str, os.PathLike)):
        raise SAEError(f"load takes the path of an SAE directory, got {type(source).__name__} {source!r:.40}")
    path = Path(source).expanduser()
    if not (path / "cfg.json").is_file() or not (path / "sae_weights.safetensors").is_file():
        raise SAEError(f"{str(source)!r} is not an SAE directory: it needs cfg.json and "
                       "sae_weights.safetensors (the SAELens layout). mechnb does not download "
                       "SAEs; fetch the directory first and pass its path")
    try:
        cfg = json.loads((path / "cfg.json").read_text())
        tensors = load_file(str(path / "sae_weights.safetensors"))
    except Exception as error:  # a truncated or hand-edited file: JSON's and safetensors' errors
        raise SAEError(f"cannot read the SAE in {str(source)!r}: {type(error).__name__}: {error}") from None
    if not isinstance(cfg, dict):
        raise SAEError(f"{path / 'cfg.json'} holds {type(cfg).__name__}, not the SAE's settings "
                       "(a JSON object)")
    for key in ("W_enc", "W_dec", "b_enc", "b_dec"):
        if key not in tensors:
            raise SAEError(f"{path / 'sae_weights.safetensors'} has no {key}: keys are {sorted(tensors)}")
    kind = cfg.get("kind") or {v: k for k, v in _ARCHITECTURE.items()}.get(cfg.get("architecture", "standard"))
    if kind is None:
        raise SAEError(f"unknown SAE architecture {cfg.get('architecture')!r}: mechnb reads "
                       f"{', '.join(_ARCHITECTURE.values())}")
    d_in, d_sae = tensors["W_enc"].shape
    k = cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k")
    site = cfg.get("site") or _site_of_hook(cfg.get("hook_name"))
    sae = SAE(d_in, d_sae, kind=kind, k=k, site=site, name=cfg.get("name", "sae"),
              dtype=tensors["W_enc"].dtype, device=device)
    with torch.no_grad():
        for key in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold"):
            if key in tensors:
                getattr(sae, key).copy_(tensors[key])
    if (path / "history.csv").is_file():
        import pandas as pd

        sae.history = pd.read_csv(path / "history.csv")
    return sae


def _site_of_hook(hook_name: str | None) -> str | None:
    """mechnb's site for a TransformerLens hook name (`blocks.12.hook_resid_post`)."""
    if not hook_name:
        return None
    if not hook_name.startswith("blocks."):
        return hook_name
    parts = hook_name.split(".")
    kind = {"hook_resid_pre": "resid_pre", "hook_resid_mid": "resid_mid", "hook_resid_post": "resid_post",
            "hook_attn_out": "attn_out", "hook_mlp_out": "mlp_out"}.get(parts[-1])
    return f"{kind}.{parts[1]}" if kind else hook_name
