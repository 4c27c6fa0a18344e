"""References made without mechnb: plain PyTorch hooks on a fresh transformers copy of a model.

Tests compare mechnb's patching, ablation, steering and attention views with these. Nothing
here imports mechnb: the module paths below are transformers' own names, written out again
rather than read from `mechnb.core.arch`, and the copy runs transformers' own attention
(mechnb registers its own attention function on the models it loads).

A site here is mechnb's spelling (`head.1.2@3`, `neuron.1.0`, `resid_mid.2`): `Reference.point`
finds the module and hook point holding its whole value, `Reference.part` the index of its part.

Example:
    >>> ref = Reference(model.hf, "llama")
    >>> ref.logits(prompt, edits={"head.1.2": lambda v: v * 0})
"""

from __future__ import annotations

import copy

import torch

# Per family: the decoder layers, then per layer what each kind of site is (the module, and
# whether its input or output holds the value; a tuple output holds it in element 0).
# `resid_mid` is read at the input of the MLP's norm; it is written as TransformerLens'
# `hook_resid_mid` is, as the residual stream itself: here by changing what attention adds
# (the residual entering the layer plus attention's output is resid_mid), so that the MLP
# and the skip connection past it both see the new value.
_LLAMA = dict(layers="model.layers", attn_out=("self_attn", "output"), mlp_out=("mlp", "output"),
              head=("self_attn.o_proj", "input"), neuron=("mlp.down_proj", "input"),
              resid_mid=("post_attention_layernorm", "input"), v=("self_attn.v_proj", "output"))
MODULES = {
    "llama": _LLAMA,
    "qwen2": _LLAMA,
    "mistral": _LLAMA,
    "gemma2": dict(_LLAMA, attn_out=("post_attention_layernorm", "output"),
                   mlp_out=("post_feedforward_layernorm", "output"),
                   resid_mid=("pre_feedforward_layernorm", "input")),
    "gpt2": dict(layers="transformer.h", attn_out=("attn", "output"),
                 mlp_out=("mlp", "output"), head=("attn.c_proj", "input"),
                 neuron=("mlp.c_proj", "input"), resid_mid=("ln_2", "input")),
    "gpt_neox": dict(layers="gpt_neox.layers", attn_out=("attention", "output"), mlp_out=("mlp", "output"),
                     head=("attention.dense", "input"), neuron=("mlp.dense_4h_to_h", "input"),
                     resid_mid=None),
}
MODULES["gpt_neox_sequential"] = dict(MODULES["gpt_neox"], resid_mid=("post_attention_layernorm", "input"))


def _parse(site: str):
    """`kind.L.U@pos` -> (kind, layer or None, unit or None, pos (an int or slice) or None)."""
    name, _, pos = site.partition("@")
    parts = name.split(".")
    numbers = [int(p) for p in parts[1:]]
    if ":" in pos:
        pos = slice(*(int(end) if end else None for end in pos.split(":")))
    elif pos:
        pos = int(pos)
    return (parts[0], *(numbers + [None, None])[:2], pos if pos != "" else None)


def _hook(module, io: str, fn):
    """`fn(value)` on the module's first input or (element 0 of its) output; a tensor it returns
    replaces the value."""
    if io == "input":
        def pre(module, args, kwargs):
            key = None if args else next(iter(kwargs))
            new = fn(args[0] if args else kwargs[key])
            if new is None:
                return None
            return ((new, *args[1:]), kwargs) if args else (args, {**kwargs, key: new})

        return module.register_forward_pre_hook(pre, with_kwargs=True)

    def post(module, args, output):
        new = fn(output[0] if isinstance(output, tuple) else output)
        if new is None:
            return None
        return (new, *output[1:]) if isinstance(output, tuple) else new

    return module.register_forward_hook(post)


def _edit(value, index, fn):
    value = value.clone()
    value[index] = fn(value[index])
    return value


class Reference:
    """A fresh transformers copy of `hf` (same weights, transformers' eager attention, whose
    weights `output_attentions` returns), read and edited with torch hooks."""

    def __init__(self, hf, family: str, tokenizer=None):
        from transformers.initialization import no_init_weights

        config = copy.deepcopy(hf.config)
        config._attn_implementation = "eager"
        with no_init_weights():  # the weights are copied in next: no random draw first
            self.hf = type(hf)(config).eval()
        self.hf.load_state_dict({k: v for k, v in hf.state_dict().items()}, strict=False)
        missing = set(self.hf.state_dict()) - set(hf.state_dict())
        assert not missing, missing
        self.family, self.paths = family, MODULES[family]
        self.tokenizer = tokenizer
        self.always = []  # (site, fn) edits every run applies first, as persistent interventions
        config = self.hf.config
        self.n_heads = config.num_attention_heads if hasattr(config, "num_attention_heads") else config.n_head
        hidden = getattr(config, "hidden_size", None) or config.n_embd
        self.d_head = getattr(config, "head_dim", None) or hidden // self.n_heads

    def layer(self, index: int):
        return self.hf.get_submodule(self.paths["layers"])[index]

    def point(self, kind: str, layer: int | None):
        """(module, "input" | "output") holding the whole value of sites of `kind` at `layer`."""
        if kind == "embed":
            return self.layer(0), "input"  # what the first layer reads
        if kind == "resid_pre":
            return self.layer(layer), "input"
        if kind == "resid_post":
            return self.layer(layer), "output"
        path, io = self.paths[kind]
        return self.layer(layer).get_submodule(path), io

    def part(self, site: str):
        """(kind, layer, a function from the whole value to the indexing tuple of the site)."""
        kind, layer, unit, pos = _parse(site)
        p = slice(None) if pos is None else pos
        if kind == "head":
            columns = slice(None) if unit is None else slice(unit * self.d_head, (unit + 1) * self.d_head)
            return kind, layer, (slice(None), p, columns)
        if kind == "neuron":
            return kind, layer, (slice(None), p, slice(None) if unit is None else unit)
        return kind, layer, (slice(None), p)

    def inputs(self, prompt):
        return self.tokenizer(prompt, return_tensors="pt", padding=True)

    def run(self, prompt, edits=None, reads=(), **kwargs):
        """The model's outputs on `prompt` with `always` and `edits` ({site: fn(part) -> new
        part}) applied and `reads` (sites) recorded: (outputs, {site: value})."""
        handles, seen = [], {}
        try:
            handles += self._edits([*self.always, *(edits or {}).items()])
            for site in reads:
                kind, layer, index = self.part(site)
                handles.append(_hook(*self.point(kind, layer),
                                     lambda value, site=site, index=index: seen.__setitem__(site, value[index].clone())))
            with torch.no_grad():
                out = self.hf(**self.inputs(prompt), **kwargs)
        finally:
            for handle in handles:
                handle.remove()
        return out, seen

    def _edits(self, edits) -> list:
        """Hooks applying (site, fn) edits; their handles."""
        handles = []
        for site, fn in edits:
            kind, layer, index = self.part(site)
            if kind == "resid_mid":
                handles += self._resid_mid(layer, index, fn)
            else:
                handles.append(_hook(*self.point(kind, layer),
                                     lambda value, fn=fn, index=index: _edit(value, index, fn)))
        return handles

    def _resid_mid(self, layer: int, index, fn) -> list:
        """Hooks writing resid_mid at `layer`: attention's output becomes what takes the
        residual entering the layer to the edited value (unchanged where the edit is not)."""
        entering = {}

        def keep(value):
            entering["value"] = value

        def write(out):
            mid = entering["value"] + out
            return out + (_edit(mid, index, fn) - mid)

        return [_hook(self.layer(layer), "input", keep), _hook(*self.point("attn_out", layer), write)]

    def logits(self, prompt, edits=None):
        return self.run(prompt, edits)[0].logits

    def read(self, prompt, site: str) -> torch.Tensor:
        return self.run(prompt, reads=[site])[1][site]

    def patched(self, source, target, site: str) -> torch.Tensor:
        """Logits of `target` with `site` set to its value in the `source` run."""
        if site.startswith("pattern"):
            return self._pattern_patched(source, target, site)
        value = self.read(source, site)
        return self.logits(target, {site: lambda part: value})

    def attentions(self, prompt):
        """transformers' attention weights, `layer batch head q k`."""
        return torch.stack(self.run(prompt, output_attentions=True)[0].attentions)

    def _pattern_patched(self, source, target, site: str):
        """The pattern of head(s) at a layer from `source`: the head's output in the `target` run
        is `pattern @ values`, with the values of the target run (a head shares its key-value
        head with `n_heads / n_kv_heads` others)."""
        kind, layer, unit, pos = _parse(site)
        assert pos is None, "patterns are patched whole here"
        pattern = self.attentions(source)[layer]
        heads = range(self.n_heads) if unit is None else [unit]
        group = self.n_heads // self.hf.config.num_key_value_heads
        kept = {}
        module, io = self.point("v", layer)
        handles = [_hook(module, io, lambda value: kept.__setitem__("v", value))]

        def write(z):
            z = z.clone()
            b, n, _ = z.shape
            v = kept["v"].view(b, n, -1, self.d_head)
            for h in heads:
                z[..., h * self.d_head:(h + 1) * self.d_head] = pattern[:, h] @ v[:, :, h // group]
            return z

        handles.append(_hook(*self.point("head", layer), write))
        handles += self._edits(self.always)
        try:
            with torch.no_grad():
                return self.hf(**self.inputs(target)).logits
        finally:
            for handle in handles:
                handle.remove()
