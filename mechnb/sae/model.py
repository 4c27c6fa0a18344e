"""The sparse autoencoder: encode a site's activation into many sparse features, decode it back.

    features = act((x - b_dec) @ W_enc + b_enc)        # batch d_sae
    x_hat    = features @ W_dec + b_dec                 # batch d_in

Kinds (the activation `act`):

    relu       ReLU; trained with an L1 penalty on activation x decoder-row norm
    topk       keep the k largest pre-activations per token (ReLU'd)
    batchtopk  keep the k x batch largest over a training batch; at inference a
               learned global threshold replaces the batch (BatchTopK, Bussmann 2024)
    jumprelu   pre-activation where it exceeds a learned per-feature threshold

Weights save in SAELens 6's layout: `cfg.json` (SAELens' keys, `metadata.hook_name` the
TransformerLens name of the site, plus mechnb's `kind` and `site`) and
`sae_weights.safetensors` with `W_enc` (d_in d_sae), `W_dec` (d_sae d_in), `b_enc`,
`b_dec`, and `threshold` for jumprelu and batchtopk. SAELens 6 loads every kind
(`SAE.load_from_disk`): batchtopk is written as SAELens writes it, as `jumprelu` with its
threshold. `mechnb.sae.load` (`mechnb.sae.files`) reads these and the published formats.

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
        model: the model it was trained on; `Model.attach` refuses another (set
            `sae.model = None` to attach it anyway).

    Attributes: `history` (training DataFrame or None), `meta` (training facts).
    """

    def __init__(self, d_in: int, d_sae: int, kind: str = "topk", k: int | None = None,
                 site: str | None = None, name: str = "sae", model: str | None = None,
                 dtype=torch.float32, device=None):
        super().__init__()
        if kind not in KINDS:
            raise SAEError(f"unknown SAE kind {kind!r}: use one of {', '.join(KINDS)}")
        if kind in ("topk", "batchtopk") and (not isinstance(k, int) or not 0 < k <= d_sae):
            raise SAEError(f"a {kind} SAE needs k, the number of active features per token "
                           f"(1..{d_sae}), got {k!r}")
        self.d_in, self.d_sae, self.kind, self.k, self.site, self.name = d_in, d_sae, kind, k, site, name
        self.model = model  # the model it was trained on (a hub id or name), if known
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

    def splice(self, x: torch.Tensor, edit=None) -> torch.Tensor:
        """`x` rebuilt from (possibly edited) features plus the SAE's error on `x`.

        The features pass through `edit` (default `hook_features`, where an attached SAE's
        feature sites are read and written). With no edit this returns `x` itself (up to
        rounding), so an attached SAE changes nothing until its features are read or written.
        """
        features = self.encode(x)
        error = x - self.decode(features)
        return self.decode((edit or self.hook_features)(features)) + error

    def _check(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.d_in:
            raise SAEError(f"{self.name} reads {self.d_in}-wide activations, got width {x.shape[-1]}"
                           f"{' at ' + self.site if self.site else ''}")

    # -- configuration and files -----------------------------------------------

    @property
    def cfg(self) -> dict:
        """The configuration in SAELens 6's layout, plus mechnb's `kind`, `site` and `name`."""
        from ..core.sites import parse

        hook = parse(self.site).tl_name if self.site else None
        cfg = {"architecture": "jumprelu" if self.kind == "batchtopk" else _ARCHITECTURE[self.kind],
               "d_in": self.d_in, "d_sae": self.d_sae,
               "dtype": str(self.W_enc.dtype).removeprefix("torch."), "device": "cpu",
               "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
               "metadata": {"sae_lens_version": "6.0.0", "model_name": self.model, "hook_name": hook or self.site,
                            "hook_head_index": None, "prepend_bos": True},
               "kind": self.kind, "site": self.site, "name": self.name}
        if self.kind in ("topk", "batchtopk"):
            cfg["k"] = self.k
        if self.site and hook and parse(self.site).kind == "head":
            cfg["reshape_activations"] = "hook_z"  # SAELens flattens heads as mechnb does
        return cfg

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
        model = f", trained on {self.model}" if self.model else ""
        return f"<mechnb SAE {self.name}: {self.kind}{k}, {self.d_in} -> {self.d_sae}, site {self.site}{model}>"

    # -- analysis: each a function of the SAE, written once in its own module ----------

    evaluate = evaluation.evaluate
    record_contexts = labelling.record_contexts
    label = labelling.label
    dashboard = dashboards.dashboard
