"""Transcoders: a sparse, wide stand-in for one MLP, reading its input and writing its output.

    features = act(x @ W_enc + b_enc)                      # x: what the MLP reads
    y_hat    = features @ W_dec + b_dec (+ x @ W_skip.T)   # y: what the MLP adds

A transcoder is trained to predict the MLP's output from its input, so each feature is
a piece of the MLP's computation, and replacing every MLP by its transcoder makes the
model linear in the active features once attention patterns and norm scales are held
fixed: that is what an attribution graph (`mechnb.graphs`) is built on.

Kinds (the activation `act`): `topk` (the k largest pre-activations per token, ReLU'd),
`relu`, `jumprelu` (the pre-activation where it exceeds a per-feature threshold). An
optional skip connection `W_skip` adds a linear map of the input.

Where it reads: `mlp_in`, the MLP's own input (after the norm before it; TransformerLens'
`ln2.hook_normalized`, circuit-tracer's `mlp.hook_in`), or `resid_mid`, the residual
stream before that norm. It writes `mlp_out`, what the MLP adds to the residual stream.

A `TranscoderSet` holds one transcoder per layer (some layers may be missing), with the
model it was made for. Files: `mechnb.transcoders.files`.

    >>> tc = Transcoder(576, 2304, kind="topk", k=32, layer=3)
    >>> tc(x).shape == x.shape
    True
"""

from __future__ import annotations

import torch

from ..core.errors import TranscoderError
from ..core.hookpoints import HookPoint

KINDS = ("topk", "relu", "jumprelu")
FORMAT = "mechnb-transcoders"  # transcoders.json's "format" (mechnb.transcoders.files)
READS = ("mlp_in", "resid_mid")


class Transcoder(torch.nn.Module):
    """One layer's transcoder (see the module docstring).

    Args:
        d_in, width: widths of the MLP's input and of the feature space.
        d_out: width of the MLP's output (default `d_in`).
        kind: one of `KINDS`; `k` the active features per token for topk.
        skip: add a linear skip connection `W_skip` (`d_out d_in`).
        layer: the layer whose MLP it replaces.
        decoder: False for a cross-layer transcoder's layer, whose decoders the
            `CrossLayerTranscoder` holds (`W_dec` is then None).
    """

    def __init__(self, d_in: int, width: int, d_out: int | None = None, kind: str = "topk",
                 k: int | None = None, skip: bool = False, layer: int | None = None,
                 dtype=torch.float32, device=None, decoder: bool = True):
        super().__init__()
        if kind not in KINDS:
            raise TranscoderError(f"unknown transcoder kind {kind!r}: use one of {', '.join(KINDS)}")
        if kind == "topk" and (not isinstance(k, int) or isinstance(k, bool) or not 0 < k <= width):
            raise TranscoderError(f"a topk transcoder needs k, the active features per token (1..{width}), "
                                  f"got {k!r}")
        d_out = d_out or d_in
        self.d_in, self.width, self.d_out, self.kind, self.k, self.layer = d_in, width, d_out, kind, k, layer
        factory = dict(dtype=dtype, device=device)
        self.W_enc = torch.nn.Parameter(torch.zeros(d_in, width, **factory))
        self.b_enc = torch.nn.Parameter(torch.zeros(width, **factory))
        self.W_dec = torch.nn.Parameter(torch.zeros(width, d_out, **factory)) if decoder else None
        self.b_dec = torch.nn.Parameter(torch.zeros(d_out, **factory))
        self.threshold = torch.nn.Parameter(torch.zeros(width, **factory), requires_grad=kind == "jumprelu")
        self.W_skip = torch.nn.Parameter(torch.zeros(d_out, d_in, **factory)) if skip else None
        self.hook_features = HookPoint()

    @property
    def skip(self) -> bool:
        return self.W_skip is not None

    def pre(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-activations `... width` of MLP inputs `... d_in`."""
        return x @ self.W_enc + self.b_enc

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        if self.kind == "relu":
            return torch.relu(pre)
        if self.kind == "topk":
            top = pre.topk(self.k, dim=-1)
            return torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
        return pre * (pre > self.threshold)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Features `... width` of MLP inputs `... d_in`."""
        if x.shape[-1] != self.d_in:
            raise TranscoderError(f"the transcoder of layer {self.layer} reads {self.d_in}-wide inputs, "
                                  f"got width {x.shape[-1]}")
        return self.activate(self.pre(x))

    def decode(self, features: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """The predicted MLP output; the skip connection needs the input `x`."""
        if self.W_dec is None:
            raise TranscoderError(f"layer {self.layer}'s features decode into several layers: decode them with "
                                  "their CrossLayerTranscoder (decode_layer)")
        out = features @ self.W_dec + self.b_dec
        if self.W_skip is not None:
            if x is None:
                raise TranscoderError("this transcoder has a skip connection: decode(features, x) needs x")
            out = out + x @ self.W_skip.T
        return out

    def skip_of(self, x: torch.Tensor) -> torch.Tensor:
        """`x @ W_skip.T`, or zeros without a skip connection."""
        if self.W_skip is None:
            return torch.zeros(*x.shape[:-1], self.d_out, dtype=x.dtype, device=x.device)
        return x @ self.W_skip.T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.hook_features(self.encode(x)), x)

    def splice(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """`y` (the MLP's true output for input `x`) rebuilt from (possibly edited) features
        plus the transcoder's error: with no edit, `y` itself up to rounding."""
        features = self.encode(x)
        error = y - self.decode(features, x)
        return self.decode(self.hook_features(features), x) + error

    def __repr__(self) -> str:
        k = f", k={self.k}" if self.k else ""
        return (f"<mechnb Transcoder layer {self.layer}: {self.kind}{k}, {self.d_in} -> {self.width} -> "
                f"{self.d_out}{', skip' if self.skip else ''}>")


class TranscoderSet:
    """Transcoders for some or all layers of one model, read and written as a unit.

    Args:
        transcoders: `{layer: Transcoder}`.
        reads: `mlp_in` (the MLP's input, after its norm) or `resid_mid`.
        model: facts of the model it was made for: `name`, `n_layers`, `d_model`.
        name: names its feature sites (`tc.NAME.L.F`).

    Indexing by layer gives that layer's `Transcoder`; `layers` lists the covered layers.
    A cross-layer transcoder (`mechnb.transcoders.clt`) is a set whose features write to
    several layers: `targets(layer)` and `rows(layer, ids)` say where and what each layer's
    features write, for both kinds.
    """

    cross_layer = False

    def __init__(self, transcoders: dict, reads: str = "mlp_in", model: dict | None = None,
                 name: str = "tc", meta: dict | None = None):
        if not transcoders:
            raise TranscoderError("a transcoder set needs at least one transcoder")
        if reads not in READS:
            raise TranscoderError(f"transcoders read {' or '.join(READS)}, not {reads!r}")
        widths = {tc.width for tc in transcoders.values()}
        if len(widths) > 1:
            raise TranscoderError(f"the transcoders of a set share one width; these have {sorted(widths)}")
        for layer, tc in transcoders.items():
            tc.layer = layer
        self.transcoders = dict(sorted(transcoders.items()))
        self.reads, self.model, self.name = reads, dict(model or {}), name
        self.meta: dict = dict(meta or {})
        self.history = None
        self.module_name = f"mechnb_tc_{name}"  # each transcoder's name in its layer, when attached

    @property
    def layers(self) -> list[int]:
        return list(self.transcoders)

    @property
    def layer_text(self) -> str:
        """The covered layers as ranges (`0-13, 15`)."""
        return layer_ranges(self.layers)

    @property
    def width(self) -> int:
        return next(iter(self.transcoders.values())).width

    @property
    def d_model(self) -> int:
        return next(iter(self.transcoders.values())).d_in

    @property
    def kind(self) -> str:
        return next(iter(self.transcoders.values())).kind

    def __getitem__(self, layer: int) -> Transcoder:
        if layer not in self.transcoders:
            raise TranscoderError(f"no transcoder for layer {layer!r}: this set covers layers "
                                  f"{layer_ranges(self.layers)}")
        return self.transcoders[layer]

    def __contains__(self, layer) -> bool:
        return layer in self.transcoders

    def __iter__(self):
        return iter(self.transcoders.values())

    def __len__(self) -> int:
        return len(self.transcoders)

    def targets(self, layer: int) -> list[int]:
        """The layers whose MLP outputs the features of `layer` write to (here its own)."""
        return [layer]

    def rows(self, layer: int, ids: torch.Tensor) -> torch.Tensor:
        """The decoder rows of features `ids` of `layer`, `len(ids) targets d_out` float32, one
        per layer of `targets(layer)`."""
        tc = self[layer]
        return tc.W_dec.detach()[ids.to(tc.W_dec.device)].float()[:, None]

    def decode_layer(self, layer: int, features: dict, x: torch.Tensor | None = None,
                     cache: dict | None = None) -> torch.Tensor:
        """What the set writes at `layer`'s MLP output from the features (`{layer: ... width}`) and
        `x`, what that MLP reads; a cross-layer transcoder sums its earlier layers' features too."""
        return self[layer].decode(features[layer], x)

    def to(self, device=None, dtype=None) -> "TranscoderSet":
        for tc in self:
            tc.to(device=device, dtype=dtype)
        return self

    def check_model(self, model) -> None:
        """`TranscoderError` unless this set fits `model` (width, layers, and the model's name
        when the set records one: the same last path component, case aside)."""
        n_layers = self.model.get("n_layers")
        made_for = self.model.get("name")
        from ..core.hub import same_model

        if not same_model(made_for, model.name):
            raise TranscoderError(f"these transcoders were made for {made_for}, not {model.name}; if they fit "
                                  f"it anyway (a local copy under another name), set tcs.model['name'] = "
                                  f"{model.name!r}")
        if self.d_model != model.d_model or any(tc.d_out != model.d_model for tc in self):
            raise TranscoderError(f"these transcoders read {self.d_model}-wide activations but {model.name} "
                                  f"has d_model {model.d_model}: they were made for "
                                  f"{self.model.get('name', 'another model')}")
        if max(self.layers) >= model.n_layers or (n_layers is not None and n_layers != model.n_layers):
            raise TranscoderError(f"these transcoders cover layers {layer_ranges(self.layers)} of a "
                                  f"{n_layers or '?'}-layer model, but {model.name} has {model.n_layers} layers")
        if self.reads == "resid_mid" and model.parallel_attn_mlp:
            raise TranscoderError(f"these transcoders read resid_mid, which {model.name} does not have "
                                  "(attention and MLP run in parallel)")

    def evaluate(self, model, texts, n_tokens: int = 10_000, context: int = 128, batch_size: int = 4):
        """Per-layer FVU, L0 and dead features, and the loss and top-1 agreement of the model with
        every covered MLP replaced (`mechnb.transcoders.evaluate`). Example: `tcs.evaluate(model, texts)`."""
        from .evaluate import evaluate

        return evaluate(self, model, texts, n_tokens=n_tokens, context=context, batch_size=batch_size)

    def save(self, directory):
        """Write the set in mechnb's layout (see `mechnb.transcoders.files`); returns the directory."""
        import json
        from pathlib import Path

        from safetensors.torch import save_file

        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        first = next(iter(self))
        for layer, tc in self.transcoders.items():
            tensors = {"W_enc": tc.W_enc, "W_dec": tc.W_dec, "b_enc": tc.b_enc, "b_dec": tc.b_dec}
            if tc.kind == "jumprelu":
                tensors["threshold"] = tc.threshold
            if tc.skip:
                tensors["W_skip"] = tc.W_skip
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                      str(path / f"layer_{layer}.safetensors"))
        config = {"format": FORMAT, "version": 1, "name": self.name, "reads": self.reads, "writes": "mlp_out",
                  "model": self.model, "kind": first.kind, "k": first.k, "width": self.width, "skip": first.skip,
                  "layers": self.layers, "meta": self.meta}
        (path / "transcoders.json").write_text(json.dumps(config, indent=1, default=str))
        if self.history is not None:
            self.history.to_csv(path / "history.csv", index=False)
        return path

    def __repr__(self) -> str:
        tc = next(iter(self))
        k = f", k={tc.k}" if tc.k else ""
        return (f"<mechnb TranscoderSet {self.name}: layers {layer_ranges(self.layers)}, {tc.kind}{k}, width "
                f"{self.width}, reads {self.reads}{', skip' if tc.skip else ''}>")


def layer_ranges(layers) -> str:
    """`[0, 1, 2, 5]` -> `0-2, 5`."""
    layers = sorted(layers)
    parts, start = [], None
    for i, layer in enumerate(layers):
        if start is None:
            start = layer
        if i + 1 == len(layers) or layers[i + 1] != layer + 1:
            parts.append(f"{start}" if start == layer else f"{start}-{layer}")
            start = None
    return ", ".join(parts)
