"""The local replacement model of one prompt: the model made linear, and its two directions.

Replace every MLP by its transcoder plus an error term (the MLP's true output minus the
transcoder's reconstruction), and hold fixed, at their values on this prompt, every
attention pattern and every norm's scale (the `1/rms` or `1/std` of each position). What
remains is linear: the residual stream at every point is a sum of terms, one per source
(a token's embedding, an active feature's activation times its decoder row, an error
vector) plus constants (biases). So a target's value, a feature's pre-activation or a
logit (minus the mean logit), splits exactly into one term per source: the edges.

`record` runs the model once and keeps what is frozen. Then:

- `Replacement.backward` computes edges into a batch of targets at once: each target's
  vector (a feature's encoder column at the MLP input, a logit's unembedding row minus
  the mean row) is pulled back through the frozen layers, written out here as the
  transposes of each linear map (attention's value and output projections mixed by the
  transposed pattern, the norms' fixed scales, the skip connections). Attention's query
  and key paths carry nothing (the pattern is fixed) and MLPs carry nothing but their
  skips (features are sources). Each batch starts at its deepest target's layer and
  stops at its last target's position, the only part of the model it can reach.
- `Replacement.forward` runs the frozen model itself, through the Hugging Face modules
  with hooks, with sources changed by given deltas or all set to zero: what edges are
  checked against by intervention (`AttributionGraph.verify`), and the bias terms (the
  targets' values with every source zero).

Gotcha: Gemma's final logit soft-capping is not linear; logits here are the unembedding's
output before it (their order is the same).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..core.arch import output_weights, submodule
from ..core.devices import parameter
from ..core.errors import GraphError


@dataclass
class NormMap:
    """A norm with its scale fixed: `y = (x - mean x if centred) * inv * gain + bias`."""

    inv: torch.Tensor          # pos: 1 / scale at each position
    gain: torch.Tensor         # d_model
    bias: torch.Tensor | None
    centred: bool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen norm of `x` (`... pos d`)."""
        n = x.shape[-2]
        if self.centred:
            x = x - x.mean(-1, keepdim=True)
        y = x * self.inv[:n, None] * self.gain
        return y + self.bias if self.bias is not None else y

    def backward(self, g: torch.Tensor) -> torch.Tensor:
        """The transpose of the frozen norm's linear part, applied to `g` (`... pos d`)."""
        n = g.shape[-2]
        c = g * self.gain * self.inv[:n, None]
        return c - c.mean(-1, keepdim=True) if self.centred else c


def norm_map(module: torch.nn.Module, x: torch.Tensor) -> NormMap:
    """The `NormMap` of a norm module on inputs `x` (`pos d`), checked against the module."""
    name = type(module).__name__
    x = x.float()
    weight = parameter(module, "weight", x.device)
    bias = None
    if isinstance(module, torch.nn.LayerNorm):
        centred, eps = True, module.eps
        bias = parameter(module, "bias", x.device)
        bias = None if bias is None else bias.float()
    elif "RMSNorm" in name:
        centred = False
        eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
        if eps is None:
            raise GraphError(f"{name} has no variance_epsilon or eps: attribution graphs do not know this norm")
    else:
        raise GraphError(f"attribution graphs freeze LayerNorm and RMSNorm scales; this model uses {name}")
    gain = torch.ones(x.shape[-1], device=x.device) if weight is None else weight.float()
    if name.startswith("Gemma"):
        gain = 1.0 + gain  # Gemma's norms scale by (1 + weight)
    centre = x - x.mean(-1, keepdim=True) if centred else x
    inv = torch.rsqrt(centre.pow(2).mean(-1) + eps)
    made = NormMap(inv, gain, bias, centred)
    with torch.no_grad():
        real = module(x.to(weight.dtype if weight is not None else x.dtype)).float()
    if not torch.allclose(made.forward(x), real, rtol=1e-3, atol=1e-3 * float(real.abs().max().clamp_min(1))):
        raise GraphError(f"cannot reproduce {name} with a fixed scale: attribution graphs do not support this norm")
    return made


@dataclass
class Recording:
    """What one clean forward of the prompt leaves for the replacement model."""

    input_ids: torch.Tensor                 # 1 pos
    patterns: list                          # per layer: head pos_q pos_k
    attn_norms: list                        # per layer: NormMap
    attn_post_norms: list                   # per layer: NormMap or None (Gemma)
    mlp_norms: list                         # per layer: NormMap
    final_norm: NormMap
    reads: torch.Tensor                     # layer pos d: what transcoders read (mlp_in or resid_mid)
    mlp_out: torch.Tensor                   # layer pos d
    resid0: torch.Tensor                    # pos d: the residual stream entering layer 0
    logits: torch.Tensor                    # vocab: the last position's logits (before any soft-cap)
    probabilities: torch.Tensor             # vocab: the model's next-token probabilities
    extra: dict = field(default_factory=dict)


def _layers(model):
    return list(submodule(model.hf, model.arch.layers))


def _post_attention_norm(model, layer_module):
    """Gemma's norm of attention's output (None where attention's output is added as is)."""
    arch = model.arch
    return None if arch.attn_out == arch.attn else submodule(layer_module, arch.attn_out)


def record(model, input_ids: torch.Tensor, reads: str) -> Recording:
    """One forward of `input_ids` (`1 pos`), keeping patterns, norm inputs, MLP inputs and outputs."""
    from ..core.engine import run

    arch = model.arch
    layers = _layers(model)
    kept: dict = {}

    def keep(name):
        def store(value):
            kept[name] = value.detach()[0].float()
        return store

    def keep_input(name):
        def pre_hook(module, args, kwargs):
            value = args[0] if args else next(iter(kwargs.values()))
            kept[name] = value.detach()[0].float()
        return pre_hook

    with run(model, None) as r:
        r.hook(layers[0], "input", keep("resid0"))
        for l, layer in enumerate(layers):
            r.hook(submodule(layer, f"{arch.attn}.hook_pattern"), "output", keep(("pattern", l)))
            r.torch_hook(submodule(layer, arch.attn_norm), keep_input(("attn_norm", l)), pre=True, with_kwargs=True)
            post = _post_attention_norm(model, layer)
            if post is not None:
                r.torch_hook(post, keep_input(("attn_post", l)), pre=True, with_kwargs=True)
            r.torch_hook(submodule(layer, arch.mlp_norm), keep_input(("mlp_norm", l)), pre=True, with_kwargs=True)
            r.hook(submodule(layer, arch.mlp), "input", keep(("mlp_in", l)))
            r.hook(submodule(layer, arch.mlp_out), "output", keep(("mlp_out", l)))
        r.torch_hook(submodule(model.hf, arch.final_norm), keep_input("final"), pre=True, with_kwargs=True)
        r.hook(submodule(model.hf, arch.unembed), "output", keep("logits"))
        out = model.hf(input_ids=input_ids.to(model.device), use_cache=False)
    n = len(layers)
    norms = lambda key, modules: [norm_map(m, kept[(key, l)]) for l, m in enumerate(modules)]
    attn_post = [None] * n
    if _post_attention_norm(model, layers[0]) is not None:
        attn_post = norms("attn_post", [_post_attention_norm(model, layer) for layer in layers])
    read_key = "mlp_in" if reads == "mlp_in" else "mlp_norm"
    final_logits = out.logits[0, -1].float()
    return Recording(
        input_ids=input_ids.cpu(),
        patterns=[kept[("pattern", l)] for l in range(n)],
        attn_norms=norms("attn_norm", [submodule(layer, arch.attn_norm) for layer in layers]),
        attn_post_norms=attn_post,
        mlp_norms=norms("mlp_norm", [submodule(layer, arch.mlp_norm) for layer in layers]),
        final_norm=norm_map(submodule(model.hf, arch.final_norm), kept["final"]),
        reads=torch.stack([kept[(read_key, l)] for l in range(n)]),
        mlp_out=torch.stack([kept[("mlp_out", l)] for l in range(n)]),
        resid0=kept["resid0"],
        logits=kept["logits"][-1],
        probabilities=torch.softmax(final_logits, -1),
    )


def reconstruction(tcs, features: dict, reads: torch.Tensor) -> torch.Tensor:
    """`layer pos d`: what the transcoders write at every layer's MLP output (zero where no layer
    of the set writes) from sparse features (`{layer: (positions, ids, activations)}`) and what
    each MLP reads (`reads`, for the skips): a cross-layer transcoder's features write to every
    layer of their `targets`."""
    out = torch.zeros_like(reads)
    for layer, (pos, ids, acts) in features.items():
        if not len(pos):
            continue
        rows = tcs.rows(layer, ids).to(out.device)              # active targets d
        for j, target in enumerate(tcs.targets(layer)):
            out[target].index_add_(0, pos.to(out.device), acts[:, None].to(out.device) * rows[:, j])
    for layer in tcs.layers:
        tc = tcs[layer]
        out[layer] += tc.b_dec.float() + tc.skip_of(reads[layer].to(tc.W_enc)).float()
    return out


def value_rows(model, layer_module) -> torch.Tensor:
    """The value projection of each key/value head, `(kv_head d_head) d_model`."""
    from ..methods.weights import projection_rows

    group = model.n_heads // model.n_kv_heads
    return torch.cat([projection_rows(model, layer_module, "v", kv * group) for kv in range(model.n_kv_heads)])


class Replacement:
    """The linear, frozen model of one prompt (see the module docstring).

    Args:
        model: the `Model`.
        recording: from `record`.
        tcs: the `TranscoderSet` or `CrossLayerTranscoder` (layers a set lacks have only an
            error node per position).
        sink: position 0 holds a special token (the attention sink): no features there, its
            errors zero, its MLP outputs constants of the frozen model (as circuit-tracer).
    """

    def __init__(self, model, recording: Recording, tcs, sink: bool = False):
        self.model, self.rec, self.tcs, self.sink = model, recording, tcs, sink
        self.parallel = model.parallel_attn_mlp
        self.n_layers, self.n_pos = len(recording.patterns), recording.input_ids.shape[1]
        device = recording.reads.device
        self.device = device
        layers = _layers(model)
        with torch.no_grad():
            self.W_V = [value_rows(model, layer).to(device) for layer in layers]    # (kv e) d
            self.W_O = [output_weights(model, submodule(layer, model.arch.o_proj), device).flatten(0, 1)
                        for layer in layers]                                          # (head e) d
            unembed = parameter(submodule(model.hf, model.arch.unembed), "weight", device).float()
        self.unembed = unembed  # vocab d_model
        # Each covered layer's features on this prompt (none at position 0 with `sink`), and the
        # error of the reconstruction at every layer (zero at position 0 with `sink`: the sink's
        # MLP outputs are constants of the frozen model, like the biases).
        self.features = {}                # layer -> (positions, feature ids, activations)
        with torch.no_grad():
            for layer in tcs.layers:
                tc = tcs[layer]
                acts = tc.encode(recording.reads[layer].to(tc.W_enc)).float()
                if sink:
                    acts[0] = 0
                pos, feat = acts.nonzero(as_tuple=True)
                self.features[layer] = (pos, feat, acts[pos, feat])
            self.errors = recording.mlp_out - reconstruction(tcs, self.features, recording.reads)
            if sink:
                self.errors[:, 0] = 0

    # -- pulling target vectors back ---------------------------------------------------

    def _read_back(self, layer: int, g: torch.Tensor) -> torch.Tensor:
        """The gradient at what layer `layer`'s transcoder reads, given `g` there, mapped to
        the residual stream it came from (through the MLP's norm when reading mlp_in)."""
        if self.tcs.reads == "resid_mid":
            return g
        return self.rec.mlp_norms[layer].backward(g)

    def _attention_back(self, layer: int, g: torch.Tensor, live: torch.Tensor | None) -> torch.Tensor:
        """The transpose of layer `layer`'s frozen attention (norm, values, pattern, output).

        `live` (`batch pos` bools, or None for all) marks the rows that can be non-zero: a
        target's gradient never reaches positions after its own, so the two projections,
        the bulk of the work, run on those rows only."""
        n = g.shape[-2]
        post = self.rec.attn_post_norms[layer]
        if post is not None:
            g = post.backward(g)
        b, d = g.shape[0], g.shape[-1]
        heads, kv = self.model.n_heads, self.model.n_kv_heads
        pattern = self.rec.patterns[layer][:, :n, :n]
        W_O, W_V = self.W_O[layer], self.W_V[layer]
        if live is None:
            gz = (g.reshape(b * n, d) @ W_O.T).view(b, n, heads, -1)              # b q head e
        else:
            gz = g.new_zeros(b, n, W_O.shape[0])
            gz[live] = g[live] @ W_O.T
            gz = gz.view(b, n, heads, -1)
        gv = torch.einsum("hqk,bqhe->bkhe", pattern, gz)                            # b k head e
        if kv < heads:  # query heads sharing a key/value head add their gradients
            gv = gv.reshape(b, n, kv, heads // kv, -1).sum(3)
        gv = gv.reshape(b, n, -1)
        if live is None:
            gx = (gv.reshape(b * n, -1) @ W_V).view(b, n, d)
        else:
            gx = g.new_zeros(b, n, d)
            gx[live] = gv[live] @ W_V
        return self.rec.attn_norms[layer].backward(gx)

    def backward(self, layers: torch.Tensor, positions: torch.Tensor, vectors: torch.Tensor, sink) -> None:
        """Pull a batch of target vectors back through the frozen model.

        Args:
            layers: `batch`, the transcoder layer whose input each target's vector reads,
                or `n_layers` for the final norm's output (a logit).
            positions: `batch`, each target's position; vectors: `batch d_model`.
            sink: called as `sink(kind, layer, g)` with `g` (`batch pos d_model`, positions
                up to the batch's last) the gradient at what each source writes:
                `("mlp_out", l, g)` for layer l's features and error, `("embed", None, g)`.
        """
        b, n = len(layers), int(positions.max()) + 1
        top = int(layers.max())
        rows = torch.arange(b)
        vectors = vectors.to(self.device, torch.float32)

        def injected(layer):
            chosen = layers == layer
            if not chosen.any():
                return None
            out = torch.zeros(b, n, self.model.d_model, device=self.device)
            out[rows[chosen], positions[chosen]] = vectors[chosen]
            return out

        g = torch.zeros(b, n, self.model.d_model, device=self.device)
        live = torch.arange(n, device=self.device)[None] <= positions.to(self.device)[:, None]
        if live.float().mean() > 0.8:
            live = None  # packing rows costs more than the few zero rows it skips
        if top == self.n_layers:
            g = self.rec.final_norm.backward(injected(self.n_layers))
        for layer in range(min(top, self.n_layers - 1), -1, -1):
            through_mlp = None
            if layer < top:
                sink("mlp_out", layer, g)
                if layer in self.tcs and self.tcs[layer].skip:
                    through_mlp = g @ self.tcs[layer].W_skip.float()
            here = injected(layer)
            if here is not None:
                through_mlp = here if through_mlp is None else through_mlp + here
            if self.parallel:
                back = g + self._attention_back(layer, g, live)
                if through_mlp is not None:
                    back = back + self._read_back(layer, through_mlp)
                g = back
            else:
                if through_mlp is not None:
                    g = g + self._read_back(layer, through_mlp)
                g = g + self._attention_back(layer, g, live)
        sink("embed", None, g)

    # -- running the frozen model forward ----------------------------------------------

    def forward(self, embed_delta=None, mlp_delta=None, zero_sources: bool = False):
        """The frozen model run forward: `(reads, logits)`, what each transcoder reads
        (`layer pos d`) and the last position's logits before any soft-cap (`vocab`).

        Args:
            embed_delta: `pos d_model` added to the residual stream entering layer 0.
            mlp_delta: `layer pos d_model` added to the MLP outputs (a feature's change
                is its activation's change times its decoder row).
            zero_sources: every source set to zero (embeddings, features, errors): the
                targets' values are then their bias terms.
        """
        from ..core.engine import run

        arch, rec, tcs = self.model.arch, self.rec, self.tcs
        layers = _layers(self.model)
        read: dict = {}
        out: dict = {}

        def frozen(norm):
            def hook(module, args, kwargs, output):
                x = args[0] if args else next(iter(kwargs.values()))
                return norm.forward(x.float()[0])[None].to(output.dtype)
            return hook

        def start(value):
            new = torch.zeros_like(value) if zero_sources else value
            if embed_delta is not None:
                new = new + embed_delta.to(value)[None]
            return new

        def pattern(layer):
            return lambda value: rec.patterns[layer][None].to(value)

        def keep_read(layer):
            def store(value):
                read[layer] = value[0].float()
            return store

        def mlp_out(layer):
            def replace(value):
                x = read[layer]
                if layer in tcs:
                    tc = tcs[layer]
                    live = tc.skip_of(x.to(tc.W_enc)).float()
                    recorded = rec.mlp_out[layer] - tc.skip_of(rec.reads[layer].to(tc.W_enc)).float()
                    constant = tc.b_dec.float().expand_as(live).clone() if zero_sources else recorded
                    if zero_sources and self.sink:  # the sink's output is a constant, not a source
                        constant[0] = recorded[0]
                    new = constant + live
                else:
                    new = torch.zeros_like(rec.mlp_out[layer]) if zero_sources else rec.mlp_out[layer]
                    if zero_sources and self.sink:
                        new[0] = rec.mlp_out[layer][0]
                if mlp_delta is not None:
                    new = new + mlp_delta[layer].to(new)
                return new[None].to(value.dtype)
            return replace

        with run(self.model, None) as r:
            r.hook(layers[0], "input", start)
            for l, layer in enumerate(layers):
                r.hook(submodule(layer, f"{arch.attn}.hook_pattern"), "output", pattern(l))
                r.torch_hook(submodule(layer, arch.attn_norm), frozen(rec.attn_norms[l]), with_kwargs=True)
                post = _post_attention_norm(self.model, layer)
                if post is not None:
                    r.torch_hook(post, frozen(rec.attn_post_norms[l]), with_kwargs=True)
                r.torch_hook(submodule(layer, arch.mlp_norm), frozen(rec.mlp_norms[l]), with_kwargs=True)
                if tcs.reads == "mlp_in":
                    r.hook(submodule(layer, arch.mlp), "input", keep_read(l))
                else:
                    r.hook(submodule(layer, arch.mlp_norm), "input", keep_read(l))
                r.hook(submodule(layer, arch.mlp_out), "output", mlp_out(l))
            r.torch_hook(submodule(self.model.hf, arch.final_norm), frozen(rec.final_norm), with_kwargs=True)
            r.hook(submodule(self.model.hf, arch.unembed), "output", lambda value: out.update(logits=value[0, -1].float()))
            self.model.hf(input_ids=rec.input_ids.to(self.model.device), use_cache=False)
        return torch.stack([read[l] for l in range(self.n_layers)]), out["logits"]

