"""Cross-layer transcoders (CLTs): features that read one layer's MLP input and write to the MLP
outputs of that layer and of every later one.

    f_L     = act(x_L @ W_enc_L + b_enc_L)                    # x_L: what layer L's MLP reads
    y_hat_M = sum over L <= M of f_L @ W_dec_L[:, M - L] + b_dec_M (+ x_M @ W_skip_M.T)

A path that per-layer transcoders relay through a feature at every layer is one CLT feature,
so attribution graphs over a CLT are shorter and their replacement model closer to the real
one (Anthropic's circuit-tracing papers; circuit-tracer loads them). With a decoder `window`
W a feature writes to its own layer and the next W - 1 only.

A `CrossLayerTranscoder` is a `TranscoderSet` covering every layer: indexing by layer gives
that layer's encoder (a `Transcoder` without a decoder: its features, thresholds, skip and
`b_dec`), and `targets(L)`, `rows(L, ids)` and `decoder(L)` give what layer L's features write.
Decoders are held in memory (trained) or read lazily from safetensors files (loaded): `rows`
reads the asked features' rows only, so a set of millions of features opens on a laptop.

Files: circuit-tracer's CLT layout, read and written: `config.yaml` (`model_kind:
cross_layer_transcoder`, `feature_input_hook`, `feature_output_hook`, and mechnb's own facts
under `mechnb:`), `W_enc_L.safetensors` (`W_enc_L` stored `width d_model`, `b_enc_L`,
`b_dec_L`, `threshold_L` for jumprelu, `W_skip_L` where present) and `W_dec_L.safetensors`
(`W_dec_L`, `width n_layers-L d_model`; zero beyond a window).

Memory of a width w on a model of n layers and width d: encoders n w d, decoders
w d n (n + 1) / 2 without a window (n w d W with one), in float32 four bytes each; training
holds three more copies (the gradient and Adam's two moments). On SmolLM2-135M (n 30,
d 576) that is 30 encoders and 465 decoder blocks, 1.14 MB per feature of a layer: width 512
holds 584 MB (2.3 GB training), width 2304 2.6 GB (10.5 GB training); a window of 4 layers
cuts it to 0.33 MB per feature. `memory(n_layers, d_model, width, window)` computes it.

    >>> clt = mechnb.transcoders.train(model, texts, width=512, k=16, cross_layer=True)
    >>> clt.decoder_norms()      # layer x targets: how far each layer's features write
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..core.errors import TranscoderError
from .model import TranscoderSet, layer_ranges

FORMAT = "mechnb-clt"
_HOOKS_IN = {"mlp_in": "mlp.hook_in", "resid_mid": "hook_resid_mid"}


def check_window(window) -> None:
    from ..core.checks import is_int

    if window is not None and (not is_int(window) or window < 1):
        raise TranscoderError(f"window is how many layers a feature writes to, its own included: 1 or more "
                              f"(None: every later layer), got {window!r}")


def memory(n_layers: int, d_model: int, width: int, window: int | None = None, training: bool = False) -> int:
    """Bytes of a float32 CLT's weights (`training`: with gradients and Adam's moments)."""
    blocks = sum(min(n_layers - layer, window or n_layers) for layer in range(n_layers))
    weights = 4 * width * d_model * (n_layers + blocks)
    return weights * (4 if training else 1)


class _Decoder:
    """One layer's decoders, `width targets d`: a tensor, or a safetensors file read lazily."""

    def __init__(self, weight: torch.Tensor | None = None, file: Path | None = None, key: str | None = None,
                 shape: tuple | None = None):
        self.weight, self.file, self.key = weight, file, key
        self.shape = tuple(weight.shape) if weight is not None else tuple(shape)
        self._handle = None

    @property
    def lazy(self) -> bool:
        return self.weight is None

    def _slice(self):
        from safetensors import safe_open

        if self._handle is None:
            self._handle = safe_open(str(self.file), framework="pt")
        return self._handle.get_slice(self.key)

    def rows(self, ids: torch.Tensor, count: int, device) -> torch.Tensor:
        """Rows `ids` (any order, repeats allowed), their first `count` targets, float32 on `device`."""
        ids = ids.long().cpu()
        if not self.lazy:
            return self.weight.detach()[ids.to(self.weight.device), :count].to(device, torch.float32)
        if not len(ids):
            return torch.zeros(0, count, self.shape[2], device=device)
        unique, inverse = ids.unique(return_inverse=True)
        part = self._slice()[unique.tolist()][:, :count].float()
        if not torch.isfinite(part).all():
            bad = unique[(~torch.isfinite(part)).flatten(1).any(1)].tolist()
            raise TranscoderError(f"{self.file} holds NaN or infinite values in {self.key} (features "
                                  f"{bad[:5]}{'...' if len(bad) > 5 else ''}): the file is damaged")
        return part[inverse].to(device)

    def whole(self, count: int, device) -> torch.Tensor:
        return self.rows(torch.arange(self.shape[0]), count, device)

    def to(self, device=None, dtype=None) -> None:
        if self.weight is not None:
            self.weight = self.weight.to(device=device, dtype=dtype)


class CrossLayerTranscoder(TranscoderSet):
    """A cross-layer transcoder (see the module docstring).

    Args:
        encoders: `{layer: Transcoder}` for every layer 0..n-1, made with `decoder=False`.
        decoders: `{layer: tensor}` (`width targets d`, targets as `targets(layer)`) or
            `_Decoder`s read lazily.
        window: each feature writes to at most this many layers, its own first (None: all later).
        reads, model, name, meta: as for `TranscoderSet`.
    """

    cross_layer = True

    def __init__(self, encoders: dict, decoders: dict, reads: str = "mlp_in", model: dict | None = None,
                 name: str = "tc", meta: dict | None = None, window: int | None = None):
        check_window(window)
        if sorted(encoders) != list(range(len(encoders))):
            raise TranscoderError(f"a cross-layer transcoder covers every layer 0..n-1, got layers "
                                  f"{layer_ranges(encoders)}")
        super().__init__(encoders, reads=reads, model=model, name=name, meta=meta)
        self.window = window if window is None or window < len(encoders) else None
        self.decoders = {}
        for layer in self.layers:
            decoder = decoders.get(layer)
            if decoder is None:
                raise TranscoderError(f"the cross-layer transcoder has no decoder for layer {layer}")
            decoder = decoder if isinstance(decoder, _Decoder) else _Decoder(decoder)
            width, count, d = decoder.shape
            if width != self.width or d != self[layer].d_out or count < len(self.targets(layer)):
                raise TranscoderError(f"layer {layer}'s decoder is {tuple(decoder.shape)}: it should be "
                                      f"({self.width}, {len(self.targets(layer))}, {self[layer].d_out}) "
                                      "(features, the layers they write to, d_model)")
            self.decoders[layer] = decoder
        self.device = self[0].W_enc.device

    @property
    def n_layers(self) -> int:
        return len(self.transcoders)

    @property
    def lazy(self) -> bool:
        """Whether the decoders are read from their files as needed."""
        return any(d.lazy for d in self.decoders.values())

    def targets(self, layer: int) -> list[int]:
        end = self.n_layers if self.window is None else min(self.n_layers, layer + self.window)
        return list(range(layer, end))

    def rows(self, layer: int, ids: torch.Tensor) -> torch.Tensor:
        return self.decoders[layer].rows(ids, len(self.targets(layer)), self.device)

    def decoder(self, layer: int) -> torch.Tensor:
        """Layer `layer`'s whole decoder, `width targets d`, float32 (read from disk when lazy)."""
        self[layer]  # names the layers when out of range
        return self.decoders[layer].whole(len(self.targets(layer)), self.device)

    def to(self, device=None, dtype=None) -> "CrossLayerTranscoder":
        super().to(device=device, dtype=dtype)
        for decoder in self.decoders.values():
            decoder.to(device=device, dtype=dtype)
        self.device = self[0].W_enc.device
        return self

    def check_model(self, model) -> None:
        super().check_model(model)
        if self.n_layers != model.n_layers:
            raise TranscoderError(f"this cross-layer transcoder has {self.n_layers} layers but {model.name} has "
                                  f"{model.n_layers}: it was made for {self.model.get('name', 'another model')}")

    def decode_layer(self, layer: int, features: dict, x: torch.Tensor | None = None,
                     cache: dict | None = None) -> torch.Tensor:
        """What the CLT writes at `layer`'s MLP output (`... d`), from the features of that layer and
        the earlier ones (`{layer: ... width}`, dense) and `x`, what `layer`'s MLP reads (for the
        skip). `cache` (a dict kept over the layers of one forward) keeps each source layer's
        decoder rows, read once."""
        tc = self[layer]
        any_features = next(iter(features.values()))
        out = tc.b_dec.float().expand(*any_features.shape[:-1], tc.d_out).clone()
        if tc.W_skip is not None:
            if x is None:
                raise TranscoderError("this cross-layer transcoder has skip connections: decode_layer needs x")
            out = out + x.float() @ tc.W_skip.float().T
        cache = {} if cache is None else cache
        for source, values in features.items():
            if source > layer or layer not in self.targets(source):
                continue
            flat = values.reshape(-1, self.width)
            if source not in cache:
                ids = (flat != 0).any(0).nonzero().squeeze(-1)
                cache[source] = (ids, self.rows(source, ids))
            ids, rows = cache[source]
            out = out + (flat[:, ids].float() @ rows[:, layer - source]).view_as(out)
        return out

    def norms(self, layer: int) -> torch.Tensor:
        """`width targets`: the norm of each of `layer`'s features' decoders at each layer it writes to."""
        return self.decoder(layer).norm(dim=-1)

    def decoder_norms(self):
        """How far each layer's features write: a DataFrame (source layer x target layer) of the
        mean decoder norm over the source's features (NaN where they do not write)."""
        import pandas as pd

        table = torch.full((self.n_layers, self.n_layers), float("nan"))
        for layer in self.layers:
            norms = self.norms(layer).mean(0).cpu()
            table[layer, self.targets(layer)] = norms
        return pd.DataFrame(table.numpy(), index=pd.Index(self.layers, name="source"),
                            columns=pd.Index(self.layers, name="target"))

    def save(self, directory):
        """Write the CLT in circuit-tracer's layout (see the module docstring); returns the directory."""
        import yaml
        from safetensors.torch import save_file

        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        first = self[0]
        for layer, tc in self.transcoders.items():
            tensors = {f"W_enc_{layer}": tc.W_enc.detach().T, f"b_enc_{layer}": tc.b_enc.detach(),
                       f"b_dec_{layer}": tc.b_dec.detach()}
            if tc.kind == "jumprelu":
                tensors[f"threshold_{layer}"] = tc.threshold.detach()
            if tc.skip:
                tensors[f"W_skip_{layer}"] = tc.W_skip.detach()
            save_file({k: v.cpu().float().contiguous() for k, v in tensors.items()},
                      str(path / f"W_enc_{layer}.safetensors"))
            # Every later layer, as circuit-tracer reads it: zero beyond the window.
            full = torch.zeros(self.width, self.n_layers - layer, tc.d_out)
            full[:, :len(self.targets(layer))] = self.decoder(layer).cpu()
            save_file({f"W_dec_{layer}": full}, str(path / f"W_dec_{layer}.safetensors"))
            del full
        config = {"model_kind": "cross_layer_transcoder", "feature_input_hook": _HOOKS_IN[self.reads],
                  "feature_output_hook": "mlp.hook_out", "scan": self.meta.get("scan", self.name),
                  "model_name": self.model.get("name"),
                  "mechnb": {"format": FORMAT, "version": 1, "name": self.name, "kind": first.kind, "k": first.k,
                             "width": self.width, "window": self.window, "model": self.model,
                             "meta": json.loads(json.dumps(self.meta, default=str))}}
        (path / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        if self.history is not None:
            self.history.to_csv(path / "history.csv", index=False)
        return path

    def __repr__(self) -> str:
        tc = self[0]
        k = f", k={tc.k}" if tc.k else ""
        window = f", window {self.window}" if self.window else ""
        return (f"<mechnb CrossLayerTranscoder {self.name}: {self.n_layers} layers, {tc.kind}{k}, width "
                f"{self.width}{window}, reads {self.reads}{', lazy decoders' if self.lazy else ''}>")
