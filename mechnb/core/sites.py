"""Sites: one small grammar for *where* in a model, parsed once into `Site` objects.

A site string names a value the model computes. The same strings work in
`Model.cache`, inside `%%trace` (`model[site]`), and in every magic:

    embed                   token embeddings                 batch pos d_model
    resid_pre.5             residual stream entering layer 5 batch pos d_model
    resid_mid.5             after attention, before the MLP  batch pos d_model
                            (a write reaches the MLP and the skip connection)
    resid_post.5            leaving layer 5                  batch pos d_model
    attn_out.5, mlp_out.5   what attention / the MLP adds    batch pos d_model
    head.9                  every head's output z            batch pos head d_head
    head.9.6                one head's output z              batch pos d_head
    neuron.5                MLP activations (after gating)   batch pos d_mlp
    neuron.5.123            one neuron                       batch pos
    sae.12.1234             feature 1234 of the SAE attached batch pos
                            at layer 12 (`sae.NAME.F` names one of several)
    tc.14.1203              feature 1203 of the attached     batch pos
                            transcoder of layer 14's MLP (`tc.NAME.14.1203`
                            names one of several sets)
    pattern.3               attention probabilities          batch head pos_q pos_k
    pattern.3.1             one head's pattern               batch pos_q pos_k
    logits                  the model's output logits        batch pos vocab
                            (an image classifier's: batch class, no positions)

Any other torch module (`mechnb.load(module)`) has no such table: its sites are its module
paths with `.input` (the first argument its forward receives) or `.output` (what it returns;
element 0 of a tuple), as `named_modules` spells them: `fc1.output`, `net.0.input`,
`encoder.layer.3.output`. The whole model's output is `output` (its input `input`).
Positions `@-1`, `@3:7` index axis 1 of such a value, read as positions when it has at
least three axes (`batch pos ...`); a plain module's inputs have no tokens, so `@'John'`
does not apply, and module paths take no ranges.

TransformerLens hook names are aliases (`TL_HOOKS`): `hook_embed`,
`blocks.L.hook_resid_pre|mid|post`, `blocks.L.hook_attn_out`, `blocks.L.hook_mlp_out`,
`blocks.L.attn.hook_pattern`, `blocks.L.attn.hook_z` (`head.L`) and
`blocks.L.mlp.hook_post` (`neuron.L`), with the same layer ranges and positions. The
parsed `Site` is mechnb's (`str(site)` is canonical) and keeps what was typed in
`site.alias`; `site.shown` is both.

Layers and indices take an int, a range `0:5` (end excluded) or `*`; a site with a
range names several sites (`resid_pre.*` is one per layer) and reading it stacks
them on a new leading axis. Positions follow `@`: `@-1` (one position; the axis is
dropped), `@3:7` (a range), `@'John'` (every position whose token, stripped of
surrounding spaces, is `John`), `@'{name}'` (the last token of template field `name`, in
the examples of a counterfactual dataset, `mechnb.causal`, resolved per example). On a vision transformer positions are `[CLS]` (`@0`),
then the patches row by row; `@'patch 3,4'` names the patch in row 3, column 4 of the
grid. Positions count real tokens of each prompt, so
`@-1` is each prompt's own last token whatever the padding; on a pattern they
select query positions.

Example:
    >>> site = parse("head.9.6@-1")
    >>> site.kind, site.layer, site.index, site.positions.text
    ('head', 9, 6, '-1')

Gotchas: sites are read and written in the order the model computes them (nnsight
runs a trace in execution order); `Site.order` sorts them that way.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from .errors import SiteError

if TYPE_CHECKING:  # torch loads on first use, so that `import mechnb` stays fast
    import torch

# Kind -> (takes a layer, takes an index, the name of its index, stage within a layer).
KINDS: dict[str, tuple[bool, bool, str | None, int]] = {
    "embed": (False, False, None, 0),
    "resid_pre": (True, False, None, 0),
    "pattern": (True, True, "head", 1),
    "head": (True, True, "head", 2),
    "attn_out": (True, False, None, 3),
    "resid_mid": (True, False, None, 4),
    "neuron": (True, True, "neuron", 5),
    "mlp_out": (True, False, None, 6),
    "resid_post": (True, False, None, 7),
    "logits": (False, False, None, 0),
    "sae": (True, True, "feature", 8),
    "tc": (True, True, "feature", 6.5),  # computed by a hook on the MLP's output (mechnb.transcoders.splice)
}

# What a module site names of its module: the first input of its forward, or its output.
MODULE_IO = ("input", "output")

_SITE = re.compile(r"^(?P<name>[^@]+?)(?:@(?P<pos>.+))?$")

# TransformerLens hook names -> mechnb's sites (`blocks.L.` + the hook; `hook_embed` alone).
TL_HOOKS: dict[str, str] = {
    "hook_resid_pre": "resid_pre", "hook_resid_mid": "resid_mid", "hook_resid_post": "resid_post",
    "hook_attn_out": "attn_out", "hook_mlp_out": "mlp_out", "attn.hook_pattern": "pattern",
    "attn.hook_z": "head", "mlp.hook_post": "neuron",
}
_TL_BLOCK = re.compile(r"^blocks\.(?P<layer>[^.]+)\.(?P<hook>.+)$")
_RANGE = re.compile(r"^(-?\d*):(-?\d*)$")
_PATCH = re.compile(r"^patch\s*(\d+)\s*,\s*(\d+)$")
_FIELD = re.compile(r"^\{(\w+)\}$")


@dataclass(frozen=True)
class Positions:
    """Which token positions of each prompt a site selects (parsed from after `@`)."""

    text: str
    index: int | None = None
    start: int | None = None
    stop: int | None = None
    token: str | None = None

    @property
    def squeeze(self) -> bool:
        """True when one position is named, so the position axis is dropped: an index, or a
        template field (its last token)."""
        return self.index is not None or self.field is not None

    @property
    def field(self) -> str | None:
        """The template field `@'{name}'` names (`name`), or None."""
        found = _FIELD.match(self.token) if self.token is not None else None
        return found[1] if found else None

    def resolve(self, tokens: list[list[str]], fields: list[dict] | None = None) -> "torch.Tensor":
        """Position indices per prompt, `batch n`, for prompts given as token strings.

        `fields` gives, per prompt, each template field's token positions (`{"name": [1, 2]}`,
        as `mechnb.causal` renders its examples): `@'{name}'` is the field's last token.
        """
        import torch

        if self.field is not None:
            return self._resolve_field(tokens, fields)
        rows = []
        for row, toks in enumerate(tokens):
            n = len(toks)
            if self.index is not None:
                p = self.index + n if self.index < 0 else self.index
                if not 0 <= p < n:
                    raise SiteError(
                        f"position {self.index} out of range: prompt {row} has {n} tokens "
                        f"(positions 0..{n - 1} or -{n}..-1)"
                    )
                rows.append([p])
            elif self.token is not None:
                want = self.token.strip()
                patch = _PATCH.match(want)
                if patch:
                    want = f"patch {int(patch[1])},{int(patch[2])}"
                found = [i for i, t in enumerate(toks) if t.strip() == want]
                if not found and patch:
                    last = toks[-1].removeprefix("patch ") if toks[-1].startswith("patch ") else None
                    grid = "this input has no patches" if last is None else \
                        f"its patch grid has rows 0-{last.split(',')[0]} and columns 0-{last.split(',')[1]}"
                    raise SiteError(f"{want} is outside the image in prompt {row}: {grid}")
                if not found:
                    raise SiteError(
                        f"token {self.token!r} is not in prompt {row}: its tokens are "
                        f"{[t for t in toks]}"
                    )
                rows.append(found)
            else:
                found = list(range(n))[slice(self.start, self.stop)]
                if not found:
                    raise SiteError(
                        f"positions {self.text} select nothing in prompt {row}, which has "
                        f"{n} tokens"
                    )
                rows.append(found)
        if len({len(r) for r in rows}) > 1:
            raise SiteError(
                f"positions @{self.text} select {[len(r) for r in rows]} tokens in the "
                "prompts: each prompt must give the same number; use @-1, a range both "
                "prompts cover, or one prompt at a time"
            )
        return torch.tensor(rows, dtype=torch.long)

    def _resolve_field(self, tokens, fields) -> "torch.Tensor":
        """The last token of template field `self.field` in each prompt."""
        import torch

        if fields is None:
            raise SiteError(f"@{self.text} names a template field, which only the examples of a counterfactual "
                            "dataset have (mechnb.causal): use it in model.interchange or model.das, or name a "
                            "token (@'John') or an index (@-1)")
        rows = []
        for row, spans in enumerate(fields):
            found = (spans or {}).get(self.field)
            if not found:
                known = ", ".join(f"{{{name}}}" for name, where in (spans or {}).items() if where) or "none"
                raise SiteError(f"template field {{{self.field}}} is not in example {row} (its fields: {known}): "
                                "name a field of the template, or a position such as @-1")
            rows.append([found[-1]])
        return torch.tensor(rows, dtype=torch.long)


@dataclass(frozen=True)
class Site:
    """A parsed site: kind, layer, index and positions (see the module docstring)."""

    kind: str
    layer: int | slice | str | None = None
    index: int | slice | None = None
    positions: Positions | None = None
    # Where an attached SAE runs relative to its host site (set by `expand`).
    stage: float | None = None
    # The name of the transcoder set a `tc` site names (`tc.NAME.L.F`), if given.
    owner: str | None = None
    # A plain module's site (`kind` is "input" or "output"): the module's dotted path, "" for the root.
    path: str | None = None
    # The TransformerLens hook name it was written as (`blocks.5.attn.hook_z`), if it was.
    alias: str | None = field(default=None, compare=False)

    @property
    def name(self) -> str:
        """The canonical string without positions, e.g. `head.9.6`."""
        if self.path is not None:
            return f"{self.path}.{self.kind}" if self.path else self.kind
        parts = [self.kind] + ([self.owner] if self.owner else [])
        for part in (self.layer, self.index):
            if part is not None:
                parts.append(_format_part(part))
        return ".".join(parts)

    def __str__(self) -> str:
        return self.name + (f"@{self.positions.text}" if self.positions else "")

    @property
    def shown(self) -> str:
        """The canonical string, and the TransformerLens name it was written as, if any:
        `head.5 (blocks.5.attn.hook_z)`."""
        return str(self) + (f" ({self.alias})" if self.alias else "")

    @property
    def tl_name(self) -> str | None:
        """The TransformerLens hook name of the whole value (`resid_post.5` ->
        `blocks.5.hook_resid_post`), or None where TransformerLens has none."""
        if self.kind == "embed":
            return "hook_embed"
        hook = {kind: hook for hook, kind in TL_HOOKS.items()}.get(self.kind)
        return f"blocks.{_format_part(self.layer)}.{hook}" if hook and self.layer is not None else None

    @property
    def base(self) -> "Site":
        """The whole value this site is part of: no index, no positions (`head.9.6` -> `head.9`)."""
        return replace(self, index=None, positions=None)

    @property
    def is_concrete(self) -> bool:
        """True when the site names one value (no layer or index ranges)."""
        return not isinstance(self.layer, slice) and not isinstance(self.index, slice)

    @property
    def order(self) -> tuple[float, int]:
        """Sort key in execution order: embed, layers in order (stage by kind), logits; a
        module site by the rank `expand` gives it (`mechnb.core.modules.rank`)."""
        if self.path is not None:
            return (0, self.stage or 0)
        if self.kind == "embed":
            return (-1, 0)
        if self.kind == "logits":
            return (float("inf"), 0)
        return (self.layer, self.stage if self.stage is not None else KINDS[self.kind][3])

    def expand(self, model) -> list["Site"]:
        """The concrete sites this site names, validated against `model`'s dimensions."""
        if self.path is not None or model.arch.plain:
            from .modules import expand_module_site

            return expand_module_site(self, model)
        if self.kind == "sae":
            return _expand_sae(self, model)
        if self.kind == "tc":
            return _expand_tc(self, model)
        layers = [self.layer]
        if KINDS[self.kind][0]:
            layers = _expand_part(self.layer, model.n_layers, "layer", self)
        indices = [self.index]
        if self.index is not None:
            size = model.n_heads if KINDS[self.kind][2] == "head" else model.d_mlp
            indices = _expand_part(self.index, size, KINDS[self.kind][2], self)
        if self.kind == "logits" and model.arch.vision:
            if not model.arch.unembed:
                raise SiteError(f"{self}: this {model.arch.name} backbone has no classifier, so no logits; "
                                "read resid_post of the last layer, or load the ...ForImageClassification model")
            if self.positions is not None:
                raise SiteError(f"{self}: an image classifier's logits are batch x class, with no position "
                                "axis; write 'logits', or read a position of resid_post")
        if self.kind == "resid_mid" and model.parallel_attn_mlp:
            raise SiteError(
                f"{self}: this {model.arch.name} model runs attention and MLP in parallel, "
                "so there is no residual stream between them; use resid_pre or resid_post"
            )
        return [replace(self, layer=l, index=i) for l in layers for i in indices]


def _expand_sae(site: Site, model) -> list[Site]:
    """Feature sites of attached SAEs: `sae.L.F` (the SAE at layer L) or `sae.NAME.F`."""
    attached = model.saes
    if not attached:
        raise SiteError(f"{site} names an SAE feature, but no SAE is attached: model.attach(sae) first")
    if isinstance(site.layer, str):
        chosen = [s for s in attached if s.name == site.layer]
    elif isinstance(site.layer, slice):
        chosen = [s for s in attached if _host_layer(s) in list(range(model.n_layers))[site.layer]]
    else:
        chosen = [s for s in attached if _host_layer(s) == site.layer]
        if len(chosen) > 1:
            raise SiteError(f"layer {site.layer} holds several SAEs ({', '.join(s.name for s in chosen)}): "
                            f"name one, as sae.{chosen[0].name}.F")
    if not chosen:
        where = ", ".join(f"{s.name} at {s.site}" for s in attached)
        raise SiteError(f"no attached SAE matches {site}: attached are {where}")
    made = []
    for sae in chosen:
        host = parse(sae.site)
        input_side = host.kind in ("resid_pre", "resid_mid", "neuron")
        stage = KINDS[host.kind][3] + (-0.5 if input_side else 0.5)
        indices = [site.index] if site.index is None else _expand_part(site.index, sae.d_sae, "feature", site)
        made += [replace(site, layer=host.layer, index=i, stage=stage) for i in indices]
    return made


def _expand_tc(site: Site, model) -> list[Site]:
    """Feature sites of attached transcoder sets: `tc.L.F` (the set covering layer L) or `tc.NAME.L.F`."""
    attached = model.transcoder_sets
    if not attached:
        raise SiteError(f"{site} names a transcoder feature, but no transcoder set is attached: "
                        "model.attach(tcs) first")
    chosen = [t for t in attached if site.owner is None or t.name == site.owner]
    if not chosen:
        raise SiteError(f"no attached transcoder set is named {site.owner!r}: attached are "
                        f"{', '.join(t.name for t in attached)}")
    layers = _expand_part(site.layer, model.n_layers, "layer", site)
    made = []
    for layer in layers:
        covering = [t for t in chosen if layer in t]
        if len(covering) > 1:
            raise SiteError(f"layer {layer} has transcoders in several attached sets ({', '.join(t.name for t in covering)}): "
                            f"name one, as tc.{covering[0].name}.{layer}.F")
        if not covering:
            if isinstance(site.layer, slice):
                continue
            raise SiteError(f"no attached transcoder covers layer {layer} ({site}): attached are "
                            + ", ".join(f"{t.name} (layers {t.layer_text})" for t in chosen))
        width = covering[0].width
        indices = [site.index] if site.index is None else _expand_part(site.index, width, "feature", site)
        made += [replace(site, layer=layer, index=i, stage=KINDS["tc"][3]) for i in indices]
    if not made:
        raise SiteError(f"no attached transcoder covers the layers of {site}")
    return made


def _host_layer(sae) -> int:
    return parse(sae.site).layer


def parse(text: str | Site) -> Site:
    """Parse a site string into a `Site` (no model needed); `SiteError` if malformed."""
    if isinstance(text, Site):
        return text
    if not isinstance(text, str):
        raise SiteError(f"a site is a string such as 'resid_post.5', not {type(text).__name__}")
    match = _SITE.match(text.strip())
    if not match:
        raise SiteError(f"empty site {text!r}: write a site such as 'resid_post.5'")
    parts = match["name"].split(".")
    if parts[-1] in MODULE_IO:
        return _parse_module(parts, match, text)
    if match["name"] == "hook_embed" or match["name"].startswith("blocks."):
        return _parse_tl(match, text)
    kind = parts[0]
    if kind not in KINDS:
        raise SiteError(
            f"unknown site kind {kind!r} in {text!r}: valid kinds are {', '.join(KINDS)}; a plain "
            "module's sites are its module paths with .input or .output (fc1.output)"
        )
    owner = None
    if kind == "tc" and len(parts) == 4 and parts[1].isidentifier():
        owner, parts = parts[1], [parts[0], *parts[2:]]  # tc.NAME.L.F: a transcoder set's name
    takes_layer, takes_index, index_name, _ = KINDS[kind]
    most = 1 + takes_layer + takes_index
    if len(parts) > most or (takes_layer and len(parts) < 2):
        shape = kind + (".L" if takes_layer else "") + (f"[.{index_name}]" if takes_index else "")
        raise SiteError(f"{text!r} does not fit the form {shape}, e.g. {_example(kind)!r}")
    if kind == "sae" and len(parts) > 1 and parts[1].isidentifier():
        layer = parts[1]  # an SAE's name
    else:
        layer = _parse_part(parts[1], "layer", text) if takes_layer else None
    index = _parse_part(parts[2], index_name, text) if len(parts) > 2 else None
    positions = parse_positions(match["pos"], text) if match["pos"] else None
    return Site(kind, layer, index, positions, owner=owner)


def _parse_module(parts: list[str], match, text: str) -> Site:
    """A plain module's site: a dotted module path, then `input` or `output` (`net.0.output`)."""
    path = parts[:-1]
    if not all(re.fullmatch(r"[\w-]+", part) for part in path):
        raise SiteError(f"bad module path {'.'.join(path)!r} in {text!r}: write a module's dotted path as "
                        "named_modules spells it, then .input or .output, e.g. 'net.0.output' (no ranges)")
    positions = parse_positions(match["pos"], text) if match["pos"] else None
    return Site(parts[-1], positions=positions, path=".".join(path))


def _parse_tl(match, text: str) -> Site:
    """A site written as a TransformerLens hook name (`blocks.5.hook_resid_pre@-1`)."""
    name = match["name"]
    positions = parse_positions(match["pos"], text) if match["pos"] else None
    if name == "hook_embed":
        return Site("embed", positions=positions, alias=name)
    block = _TL_BLOCK.match(name)
    if not block or block["hook"] not in TL_HOOKS:
        known = ", ".join(["hook_embed"] + [f"blocks.L.{hook}" for hook in TL_HOOKS])
        raise SiteError(f"unknown TransformerLens hook name {name!r}: mechnb answers to {known}")
    layer = _parse_part(block["layer"], "layer", text)
    return Site(TL_HOOKS[block["hook"]], layer, None, positions, alias=name)


def _example(kind: str) -> str:
    return {"head": "head.9.6", "neuron": "neuron.5.123", "pattern": "pattern.3", "sae": "sae.12.1234",
            "tc": "tc.14.1203"}.get(
        kind, kind + ".5" if KINDS[kind][0] else kind
    )


def _parse_part(text: str, what: str, site: str) -> int | slice:
    if text == "*":
        return slice(None)
    if re.fullmatch(r"-?\d+", text):
        return int(text)
    match = _RANGE.match(text)
    if match:
        start, stop = (int(x) if x else None for x in match.groups())
        return slice(start, stop)
    raise SiteError(f"bad {what} {text!r} in {site!r}: write an int, a range such as 0:5, or *")


def _format_part(part: int | slice | str) -> str:
    if isinstance(part, (int, str)):
        return str(part)
    if part.start is None and part.stop is None:
        return "*"
    return f"{'' if part.start is None else part.start}:{'' if part.stop is None else part.stop}"


def _expand_part(part, size: int, what: str, site: Site) -> list[int]:
    if isinstance(part, slice):
        found = list(range(size))[part]
        if not found:
            raise SiteError(f"{what}s {_format_part(part)} in {site} select nothing: "
                            f"this model has {what}s 0-{size - 1}")
        return found
    if not 0 <= part < size:
        raise SiteError(f"{what} {part} out of range in {site}: this model has {what}s 0-{size - 1}")
    return [part]


def parse_positions(text: str, site: str = "") -> Positions:
    """`Positions` from the text after `@` (`-1`, `3:7`, `'John'`); `site` names it in errors."""
    text = str(text).strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return Positions(text, token=text[1:-1])
    if re.fullmatch(r"-?\d+", text):
        return Positions(text, index=int(text))
    match = _RANGE.match(text)
    if match:
        start, stop = (int(x) if x else None for x in match.groups())
        return Positions(text, start=start, stop=stop)
    raise SiteError(
        f"bad positions @{text} in {site!r}: write @-1, a range @3:7, or a token @'John'"
    )


def select_positions(value: "torch.Tensor", axis: int, positions: "torch.Tensor", squeeze: bool):
    """The positions (`batch n`, per row) of `value` along `axis`; drop the axis if `squeeze`."""
    import torch

    moved = value.movedim(axis, 1)
    rows = torch.arange(moved.shape[0], device=moved.device)[:, None]
    picked = moved[rows, positions.to(moved.device)].movedim(1, axis)
    return picked.squeeze(axis) if squeeze else picked


def assign_positions(value: "torch.Tensor", axis: int, positions: "torch.Tensor", new, squeeze: bool):
    """Write `new` (shaped as `select_positions` returns) into `value`, in place."""
    import torch

    new = torch.as_tensor(new, dtype=value.dtype, device=value.device)
    if squeeze and new.dim() == value.dim() - 1:
        new = new.unsqueeze(axis)
    if new.dim() == value.dim():
        new = new.movedim(axis, 1)
    moved = value.movedim(axis, 1)
    rows = torch.arange(moved.shape[0], device=moved.device)[:, None]
    moved[rows, positions.to(moved.device)] = new


def indices(text: str, size: int, what: str) -> list[int]:
    """The indices a part such as `"20:26"`, `"*"` or `"5"` names among `size` (`what`: layer,
    head), checked: `indices("20:26", 30, "layer")` is `[20, ..., 25]`."""
    return _expand_part(_parse_part(text, what, text), size, what, text)


def _index_axis(site: Site) -> int | None:
    """The axis of the site's whole value that `site.index` selects along."""
    if site.index is None:
        return None
    return {"head": 2, "pattern": 1, "neuron": 2, "sae": 2, "tc": 2}[site.kind]


def position_axis(site: Site) -> int:
    """The axis of positions in the part a site names (its index, if any, selected)."""
    if site.kind == "pattern":
        return 1 if site.index is not None else 2
    return 1


def read_part(full: "torch.Tensor", site: Site, positions: "torch.Tensor | None") -> "torch.Tensor":
    """The part of a site's whole value that its index and (resolved) positions name."""
    axis = _index_axis(site)
    value = full.select(axis, site.index) if axis is not None else full
    if positions is not None:
        squeeze = site.positions is not None and site.positions.squeeze
        value = select_positions(value, position_axis(site), positions, squeeze)
    return value


def assign_part(full: "torch.Tensor", site: Site, new, positions: "torch.Tensor | None") -> None:
    """Write `new` (shaped as `read_part` returns, or broadcastable) into `full`, in place."""
    import torch

    axis = _index_axis(site)
    target = full.select(axis, site.index) if axis is not None else full
    if positions is not None:
        squeeze = site.positions is not None and site.positions.squeeze
        assign_positions(target, position_axis(site), positions, new, squeeze)
    else:
        target[...] = torch.as_tensor(new, dtype=full.dtype, device=full.device)
