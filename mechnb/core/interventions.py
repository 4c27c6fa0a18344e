"""Interventions: data that describes a change at a site, kept active on the model until removed.

An intervention is a small object, not a closure: `Ablate(site, mode="mean")`,
`Hook(site, fn)`, `Steer(site, vector, scale)`. It can be listed (`model.interventions`), printed as a table,
compared and removed. While active it is applied by a PyTorch hook on the module
that holds its site (a pre-hook for values that are a module's input, such as
`resid_pre` or `neuron`, a forward hook for outputs), so it acts on every forward
of the model: a `%%trace` cell, `model.top`, `model.cache`, a patching sweep,
generation, even a plain `model.hf(...)` call.

    >>> model.ablate("head.9.6", mode="zero")          # persistent
    >>> model.top(prompt)                              # computed with head 9.6 ablated
    >>> with model.ablated(["mlp_out.3"], mode="mean", ref=ref_prompts):
    ...     model.top(prompt)                          # both ablations, then only the first
    >>> model.clear()

Modes: `zero` sets the value to 0; `mean` to its mean over every real token of the
reference prompts (one vector per site, so it applies to prompts of any length);
`resample` to values drawn, per token, from the reference prompts' tokens with a
fixed seed (the same draws on every forward, so results are reproducible).

Gotchas: positions are resolved against the prompts of the running mechnb call
(`@'John'` needs them); a plain `model.hf(...)` forward knows only lengths. Inside a
trace, reading an ablated site returns the ablated value; a trace's own write to a
site that an intervention also edits is overridden by the intervention, which runs
after it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

from .checks import is_int
from .errors import InterventionError, SiteError
from .sites import Site, assign_part, parse, parse_positions, read_part

MODES = ("zero", "mean", "resample")
# `Intervention.kind` of each class (`sae`: mechnb.sae.attach; `transcoder`: mechnb.transcoders.splice)
KINDS = ("ablate", "hook", "steer", "sae", "transcoder")


@dataclass(eq=False)
class Intervention:
    """A change at a concrete site (index and positions allowed); subclasses say which."""

    site: Site

    kind = "intervention"

    def replacement(self, part):
        """The new value of the part of the site this intervention names."""
        raise TypeError(f"{type(self).__name__} does not define a replacement")

    def detail(self) -> str:
        return ""

    def reads(self, model) -> list:
        """Other values this intervention needs from the same forward, as `(path, io, fn)`:
        `fn(value)` is called on each before the intervention applies (none by default)."""
        return []

    def replay(self, full, model):
        """`full` with this intervention applied outside the forward: a read inside a trace gets
        the module's value before the intervention's hook runs, and shows what the rest of the
        model sees by replaying it (`mechnb.core.trace`). By default `apply`."""
        return apply(self, full, model.context)

    def describe(self) -> dict:
        """One row of the interventions table."""
        return {"kind": self.kind, "site": self.site.shown, "detail": self.detail()}

    def __repr__(self) -> str:
        detail = self.detail()
        return f"{type(self).__name__}({self.site.shown!r}{', ' + detail if detail else ''})"


@dataclass(eq=False, repr=False)
class Ablate(Intervention):
    """Replace a site's value by zero, its reference mean, or resampled reference values.

    `pool` holds the reference values per token, `tokens *rest`, for mean and resample.
    """

    mode: str = "zero"
    pool: object = None
    seed: int = 0
    n_ref: int = 0

    kind = "ablate"

    def replacement(self, part):
        import torch

        if self.mode == "zero":
            return torch.zeros_like(part)
        if self.mode == "mean":
            return self.pool.mean(0).to(part)
        rest = self.pool.shape[1:]
        shape = part.shape[: part.dim() - len(rest)]
        generator = torch.Generator().manual_seed(self.seed)
        draws = torch.randint(len(self.pool), tuple(shape), generator=generator)
        return self.pool[draws].to(part)

    def detail(self) -> str:
        if self.mode == "zero":
            return "zero"
        extra = f", seed {self.seed}" if self.mode == "resample" else ""
        return f"{self.mode} of {self.pool.shape[0]} tokens from {self.n_ref} prompts{extra}"


@dataclass(eq=False, repr=False)
class Hook(Intervention):
    """Run a user function `fn(value) -> value` on the part of a site it names."""

    fn: Callable = field(default=None)

    kind = "hook"

    def replacement(self, part):
        import torch

        try:
            new = self.fn(part)
        except Exception as error:
            from .memory import is_out_of_memory

            if is_out_of_memory(error):
                raise  # a sweep halves its chunk and tries again (mechnb.core.memory)
            # Every later forward would fail the same way: say whose function it is.
            raise InterventionError(
                f"the hook at {self.site} ({self.detail()}) raised {type(error).__name__}: {error}; "
                "fix the function, or remove the hook (model.remove(...), %interventions --remove N)"
            ) from error
        if new is None:
            return part  # a function that edited in place and returned nothing
        if not torch.is_tensor(new):
            raise InterventionError(f"the hook at {self.site} returned {type(new).__name__}; a hook "
                            "function takes the site's tensor and returns a tensor")
        return new

    def detail(self) -> str:
        return getattr(self.fn, "__qualname__", repr(self.fn))


@dataclass(eq=False, repr=False)
class Steer(Intervention):
    """Add `scale * vector` to a site's value (activation addition, Turner et al. 2023).

    `vector` is shaped like the last axis of the site's part (`d_model` for the
    residual stream); `source` says where it came from (an SAE feature, a contrast).
    """

    vector: object = None
    scale: float = 1.0
    source: str = ""

    kind = "steer"

    def replacement(self, part):
        return part + self.scale * self.vector.to(part)

    def detail(self) -> str:
        norm = float(self.vector.float().norm())
        return f"{self.scale:g} x {self.source or 'vector'} (norm {norm:.3g})"


class Context:
    """The prompts a forward runs on, for resolving positions inside hooks.

    `tokens` has one list per batch row; `offset` is the position of the forward's first
    column, one for every row or one per row (a patching sweep re-runs only positions from
    `offset` on; a generation step with a key/value cache computes only each row's newest
    token, and left padding puts a row's first real token at column `-offset`); `active`
    (one bool per row, or None for all) says which rows interventions change, so one batch
    can hold runs with and without them. Positions resolve against the whole sequence in
    `tokens`, then act only where this forward computes them.
    """

    def __init__(self, tokens: list[list[str]] | None = None, offset=0, active=None):
        self.tokens, self.offset, self.active = tokens, offset, active

    def resolve(self, positions, rows: int, length: int):
        """Position indices `batch n` within this forward, or None if none fall in it."""
        import torch

        tokens = self.tokens
        if tokens is None:
            if positions.token is not None:
                raise SiteError(f"@{positions.text} needs the prompt's tokens: run the model "
                                "through mechnb (model.trace, model.top, ...) to use it")
            tokens = [[""] * length] * rows
        elif len(tokens) != rows:
            # One prompt for every row; or a batch that grows row by row as rows join it at
            # their first layer (`mechnb.core.runner`), which holds its first rows.
            tokens = tokens[:rows] if len(tokens) > rows else [tokens[0]] * rows
        found = positions.resolve(tokens)
        if isinstance(self.offset, int):
            if not self.offset:
                return found
            found = found - self.offset
        else:
            found = found - torch.as_tensor(self.offset, dtype=torch.long)[:, None]
        keep = (found >= 0) & (found < length)
        if keep.all():
            return found
        counts = keep.sum(1)
        if not counts.any():
            return None
        if (counts != counts[0]).any():
            # Every row's part must have one shape: a replacement is computed for all rows at once.
            raise SiteError(f"positions @{positions.text} fall {counts.tolist()} times in this forward's rows: "
                            "each row must compute the same number of them; use @-1, or rows of one length")
        return found[keep].reshape(rows, -1)


def apply(intervention: Intervention, full, context: Context):
    """`full` with the intervention applied to the part its site names (a new tensor)."""
    site = intervention.site
    updated = full.clone()
    positions = None
    if site.positions is not None:
        positions = context.resolve(site.positions, full.shape[0], _length(full, site))
        if positions is None:
            return full
    part = read_part(full, site, positions)
    new = intervention.replacement(part)
    try:
        assign_part(updated, site, new, positions)
    except RuntimeError:
        raise InterventionError(
            f"{intervention!r} gave a value of shape {tuple(new.shape)} for {site}, whose value here has "
            f"shape {tuple(part.shape)}: return a tensor shaped like the one it receives") from None
    if context.active is not None:
        import torch

        rows = torch.tensor(context.active, device=full.device).reshape(-1, *[1] * (full.dim() - 1))
        updated = torch.where(rows, updated, full)
    return updated


def _length(full, site: Site) -> int:
    """The number of positions in a site's whole value."""
    return full.shape[2] if site.kind == "pattern" else full.shape[1]


def install(model, intervention: Intervention):
    """Register the PyTorch hooks that apply `intervention` (and read what it needs); returns
    one handle that removes them all."""
    from .arch import hook_value, locate, submodule
    from .residual import reporting

    handles = [hook_value(submodule(model.hf, path), io, fn) for path, io, fn in intervention.reads(model)]
    path, io, attr = locate(model, intervention.site)
    handles.append(hook_value(submodule(model.hf, path), io, reporting(
        model, intervention.site, lambda value: apply(intervention, value, model.context or Context())), attr))
    return Handles(handles)


class Handles:
    """Several hook handles removed as one."""

    def __init__(self, handles: list):
        self.handles = handles

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def reference_pool(model, site: Site, ref) -> object:
    """The site's values at every real token of the reference prompts, `tokens *rest`."""
    import torch

    base = site.base
    cache = model.cache(ref, base.name)
    full = cache[base.name]
    part = read_part(full, Site(site.kind, site.layer, site.index), None)
    mask = cache.attention_mask.bool().to(part.device)
    pool = part[mask].detach()
    if not torch.isfinite(pool).all():
        raise InterventionError(f"the reference values of {site} hold NaN or infinite entries (an active "
                                "hook or steering?): remove it, or choose other reference prompts")
    return pool


def ablations(model, sites, mode: str, ref, positions, seed: int) -> list[Ablate]:
    """The `Ablate` interventions for `Model.ablate` (validated, pools computed)."""
    if mode not in MODES:
        raise InterventionError(f"unknown ablation mode {mode!r}: use one of {', '.join(MODES)}")
    if mode != "zero" and (ref is None or (isinstance(ref, (str, list, tuple)) and not ref)):
        raise InterventionError(f"{mode} ablation needs reference prompts: pass ref=[...] "
                        "(prompts whose activations stand in for the ablated ones)")
    if not is_int(seed):
        raise InterventionError(f"seed must be an int (resample's draws), got {seed!r}")
    names = list(sites) if isinstance(sites, (list, tuple)) else [sites]
    if not names:
        raise SiteError("ablate needs at least one site, e.g. model.ablate('head.9.6')")
    made = []
    for name in names:
        for concrete in with_positions(name, positions).expand(model):
            if concrete.kind == "pattern" and mode != "zero":
                raise SiteError(f"{mode} ablation of {concrete} is undefined (a pattern's shape "
                                "depends on the prompt's length): ablate head outputs instead")
            if concrete.kind == "logits":
                raise SiteError("ablating the logits leaves nothing to measure: ablate a "
                                "component instead")
            pool = reference_pool(model, concrete, ref) if mode != "zero" else None
            n_ref = 0 if ref is None else (1 if isinstance(ref, str) else len(ref))
            made.append(Ablate(concrete, mode=mode, pool=pool, seed=seed, n_ref=n_ref))
    return made


def with_positions(site, positions) -> Site:
    """`site` parsed, its positions replaced by `positions` (`-1`, `"3:7"`, a slice,
    `"'John'"`) when given."""
    parsed = parse(site)
    if positions is None:
        return parsed
    if isinstance(positions, slice):
        positions = f"{'' if positions.start is None else positions.start}:" \
                    f"{'' if positions.stop is None else positions.stop}"
    return replace(parsed, positions=parse_positions(str(positions), str(site)))


class Scoped:
    """Removes the interventions it was given from the model when its `with` block ends,
    however it ends: what `model.ablated(...)`, `model.hooked(...)`, `model.steered(...)` return."""

    def __init__(self, model, interventions: list):
        self.model, self.interventions = model, interventions

    def __enter__(self) -> list:
        return self.interventions

    def __exit__(self, *exc) -> None:
        self.model.remove(self.interventions)
