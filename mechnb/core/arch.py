"""The architecture map: one table from each model family's module names to mechnb's sites.

Everything above this module is architecture-blind. A site such as `mlp_out.5` means
"what the MLP of layer 5 adds to the residual stream"; which module holds that value
differs by family (Llama's `mlp`, Gemma 2's `post_feedforward_layernorm`), and this
table says which. A new family is one new `Arch` entry plus a tiny-model test.

Each path is relative to the HF model root (`model.layers`) or, for the per-layer
fields, to one decoder layer (`self_attn.o_proj`). Conventions:

- `attn_out` / `mlp_out` are the values added to the residual stream (where a
  module returns a tuple, such as attention's `(output, weights)`, element 0).
- `resid_mid` is the input of the module that reads the residual after attention;
  `None` where attention and MLP run in parallel (GPT-NeoX with
  `use_parallel_residual`), where no such point exists. A write there reaches the skip
  connection past the MLP too (`mechnb.core.residual`).
- `neuron` values are the input of the MLP's output projection (after the activation
  and any gating), so `neuron.L.N` is what TransformerLens calls `hook_post`.
- `attn_norm` / `mlp_norm` are the norms whose outputs attention and the MLP read
  (their inputs are the residual stream each reads, also where they run in parallel).
- `o_proj_conv1d` marks GPT-2's `Conv1D`, whose weight is stored `(in, out)`.
- Vision transformers (ViT, DeiT: `vision=True`) read images: `embed` is the patch and
  position embeddings' output, `prefix_tokens` the learned tokens before the patches
  (`[CLS]`, DeiT's `[DIST]`), `unembed` the classifier reading the final norm at
  `[CLS]`. Paths start at the classification model (`vit.layers`); a bare `ViTModel`
  is the same table without the prefix (`Arch.rooted`), and has no `logits`.
- Any other `torch.nn.Module` (`plain_arch`) has no entry: its sites are its module
  paths with `.input` / `.output` (`mechnb.core.modules`), located here as they are named.

Example:
    >>> arch_for(hf_model.config).layers
    'model.layers'
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import ModelError

if TYPE_CHECKING:  # torch loads on first use, so that `import mechnb` stays fast
    import torch


@dataclass(frozen=True)
class Arch:
    """Where each site lives in one model family (paths are dotted module names)."""

    name: str
    model_types: tuple[str, ...]
    layers: str
    embed: str
    final_norm: str
    unembed: str
    attn: str
    o_proj: str
    mlp: str
    mlp_down: str
    attn_out: str
    mlp_out: str
    resid_mid: str | None
    attn_norm: str
    mlp_norm: str
    o_proj_conv1d: bool = False
    # The gated MLP's two input branches (SwiGLU / GeGLU), where the family has them.
    mlp_gate: str | None = None
    mlp_up: str | None = None
    # Separate query, key and value projections, where the family has them (not fused).
    qkv: tuple[str, str, str] | None = None
    # An image model: positions are its prefix tokens, then the patches in row-major order.
    vision: bool = False
    prefix_tokens: tuple[str, ...] = ()
    # Any other torch module (`plain_arch`): no table, its sites are its module paths.
    plain: bool = False

    def resid_mid_for(self, config) -> str | None:
        """The resid_mid module of this config (None when attention and MLP are parallel)."""
        if self.name == "gpt_neox" and getattr(config, "use_parallel_residual", True):
            return None
        return self.resid_mid

    def rooted(self, hf_model) -> "Arch":
        """This table for `hf_model`: a vision family's paths without the classification
        model's prefix when `hf_model` is the bare backbone (`ViTModel`), else unchanged."""
        prefix = self.layers.split(".", 1)[0] + "."
        if not self.vision or hasattr(hf_model, prefix[:-1]):
            return self
        from dataclasses import fields, replace

        paths = {f.name: getattr(self, f.name).removeprefix(prefix) for f in fields(self)
                 if isinstance(getattr(self, f.name), str) and getattr(self, f.name).startswith(prefix)}
        return replace(self, **paths, unembed="")


_LLAMA_LIKE = dict(
    layers="model.layers",
    embed="model.embed_tokens",
    final_norm="model.norm",
    unembed="lm_head",
    attn="self_attn",
    o_proj="self_attn.o_proj",
    mlp="mlp",
    mlp_down="mlp.down_proj",
    attn_out="self_attn",
    mlp_out="mlp",
    resid_mid="post_attention_layernorm",
    attn_norm="input_layernorm",
    mlp_norm="post_attention_layernorm",
    mlp_gate="mlp.gate_proj",
    mlp_up="mlp.up_proj",
    qkv=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
)


def _vision(prefix: str) -> dict:
    """The layout ViT and DeiT share (pre-norm layers, separate q/k/v, a CLS classifier)."""
    return dict(
        layers=f"{prefix}.layers",
        embed=f"{prefix}.embeddings",
        final_norm=f"{prefix}.layernorm",
        unembed="classifier",
        attn="attention",
        o_proj="attention.o_proj",
        mlp="mlp",
        mlp_down="mlp.fc2",
        attn_out="attention",
        mlp_out="mlp",
        resid_mid="layernorm_after",
        attn_norm="layernorm_before",
        mlp_norm="layernorm_after",
        qkv=("attention.q_proj", "attention.k_proj", "attention.v_proj"),
        vision=True,
    )


ARCHS: tuple[Arch, ...] = (
    Arch(
        name="gpt2",
        model_types=("gpt2",),
        layers="transformer.h",
        embed="transformer.wte",
        final_norm="transformer.ln_f",
        unembed="lm_head",
        attn="attn",
        o_proj="attn.c_proj",
        mlp="mlp",
        mlp_down="mlp.c_proj",
        attn_out="attn",
        mlp_out="mlp",
        resid_mid="ln_2",
        attn_norm="ln_1",
        mlp_norm="ln_2",
        o_proj_conv1d=True,
    ),
    Arch(name="llama", model_types=("llama",), **_LLAMA_LIKE),
    Arch(name="mistral", model_types=("mistral",), **_LLAMA_LIKE),
    Arch(name="qwen2", model_types=("qwen2", "qwen3"), **_LLAMA_LIKE),
    Arch(
        name="gpt_neox",
        model_types=("gpt_neox",),
        layers="gpt_neox.layers",
        embed="gpt_neox.embed_in",
        final_norm="gpt_neox.final_layer_norm",
        unembed="lm_head",
        attn="attention",
        o_proj="attention.dense",
        mlp="mlp",
        mlp_down="mlp.dense_4h_to_h",
        attn_out="attention",
        mlp_out="mlp",
        resid_mid="post_attention_layernorm",
        attn_norm="input_layernorm",
        mlp_norm="post_attention_layernorm",
    ),
    Arch(
        name="gemma2",
        model_types=("gemma2", "gemma3_text"),
        # Gemma normalises each branch before adding it: the normed value is what the
        # residual stream receives.
        **{**_LLAMA_LIKE, "attn_out": "post_attention_layernorm",
           "mlp_out": "post_feedforward_layernorm", "resid_mid": "pre_feedforward_layernorm",
           "mlp_norm": "pre_feedforward_layernorm"},
    ),
    Arch(name="vit", model_types=("vit",), prefix_tokens=("[CLS]",), **_vision("vit")),
    # DeiT's second learned token, distillation, sits between [CLS] and the patches.
    Arch(name="deit", model_types=("deit",), prefix_tokens=("[CLS]", "[DIST]"), **_vision("deit")),
)

SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(t for a in ARCHS for t in a.model_types)


def arch_for(config) -> Arch:
    """The `Arch` of a transformers config; `ModelError` listing the supported ones if none."""
    model_type = getattr(config, "model_type", None)
    for arch in ARCHS:
        if model_type in arch.model_types:
            return arch
    raise ModelError(
        f"unsupported architecture {model_type!r}: mechnb supports "
        f"{', '.join(SUPPORTED_MODEL_TYPES)}. Load one of those, or add an entry to "
        "mechnb.core.arch.ARCHS."
    )


def plain_arch(module) -> Arch:
    """The `Arch` of a torch module outside the table: named after its class, no paths."""
    paths = dict.fromkeys(("layers", "embed", "final_norm", "unembed", "attn", "o_proj", "mlp", "mlp_down",
                           "attn_out", "mlp_out", "attn_norm", "mlp_norm"), "")
    return Arch(name=type(module).__name__, model_types=(), resid_mid=None, plain=True, **paths)


def locate(model, site) -> tuple[str, str, str | None]:
    """Where a concrete site's whole value lives: `(module path, "input"|"output", attr)`.

    The path is relative to the model root and works on the HF model and on its nnsight
    envoy alike; `attr` names a field of the output (`logits`). A module returning a
    tuple holds the value in element 0. A module site (`fc1.output`) names its own.
    """
    if site.path is not None:
        return site.path, site.kind, None
    arch = model.arch
    if site.kind == "embed":
        return arch.embed, "output", None
    if site.kind == "logits":
        return "", "output", "logits"
    layer = f"{arch.layers}.{site.layer}"
    if site.kind == "sae":
        return f"{layer}.{model.sae_at(site).module_name}.hook_features", "output", None
    if site.kind == "tc":
        return f"{layer}.{model.transcoders_at(site).module_name}.hook_features", "output", None
    return {
        "resid_pre": (layer, "input", None),
        "resid_post": (layer, "output", None),
        "resid_mid": (f"{layer}.{model.resid_mid_path}", "input", None),
        "attn_out": (f"{layer}.{arch.attn_out}", "output", None),
        "mlp_out": (f"{layer}.{arch.mlp_out}", "output", None),
        "head": (f"{layer}.{arch.attn}.hook_z", "output", None),
        "pattern": (f"{layer}.{arch.attn}.hook_pattern", "output", None),
        "neuron": (f"{layer}.{arch.mlp_down}", "input", None),
    }[site.kind]


def hook_value(module, io: str, fn, attr: str | None = None):
    """Register a PyTorch hook calling `fn(value)` on a module's input or output value.

    The value is the first argument (positional or keyword) for `io="input"`; for
    `"output"`, element 0 of a tuple output or the field `attr`. A tensor returned by
    `fn` replaces the value; None leaves it. Returns the hook's removable handle.
    """
    if io == "input":
        def pre_hook(module, args, kwargs):
            if args:
                new = fn(args[0])
                return None if new is None else ((new, *args[1:]), kwargs)
            key = next(iter(kwargs))
            new = fn(kwargs[key])
            return None if new is None else (args, {**kwargs, key: new})

        return module.register_forward_pre_hook(pre_hook, with_kwargs=True)

    def hook(module, args, output):
        if attr is not None:
            new = fn(output[attr])
            if new is not None:
                output[attr] = new
            return output
        if isinstance(output, tuple):
            new = fn(output[0])
            return None if new is None else (new, *output[1:])
        return fn(output)

    return module.register_forward_hook(hook)


def submodule(root, path: str):
    """The module (or nnsight envoy) at a dotted path below `root` (`""` is the root)."""
    for part in filter(None, path.split(".")):
        root = root[int(part)] if part.isdigit() else getattr(root, part)
    return root


def output_weights(model, o_proj, device=None) -> torch.Tensor:
    """The output projection split by head, `head d_head d_model` (float32), on `device`
    (default: the projection's own)."""
    from einops import rearrange

    from .devices import parameter

    weight = parameter(o_proj, "weight", device).float()
    # Conv1D (GPT-2) stores (in, out); Linear stores (out, in).
    w = weight if model.arch.o_proj_conv1d else weight.T
    return rearrange(w, "(head d_head) d_model -> head d_head d_model", head=model.n_heads)
