"""Any torch module: its module paths as sites, tensors as its prompts.

The problem: mechnb's site grammar (`resid_post.5`, `head.9.6`) speaks of transformer
layers through the architecture table, but a model you built (an MLP, a CNN, a model of
a family the table lacks) has no such layers. The mechanism: a plain module's sites are
its module paths as `named_modules` spells them, with `.input` (the first argument the
module's forward receives) or `.output` (what it returns; element 0 of a tuple); the
whole model's output is `output`. Its "prompts" are tensors: one tensor is the forward's
one argument, a tuple its arguments, a dict its keyword arguments (`ModuleReader` makes
the `ModuleBatch` every verb runs on, the part a tokenizer plays for a language model).
nnsight's plain `NNsight` wraps the module, so traces, caches and interventions work as
on a transformer, by module path instead of by layer.

    >>> model = mechnb.load(torch.nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)),
    ...                     example=torch.zeros(1, 4))
    >>> model.cache(x, ["0.output", "2.input"])["0.output"].shape        # batch 8
    >>> with model.trace(x):
    ...     model["0.output"] = 0
    ...     out = model["output"].save()

Gotchas: sites are read in the order the module computes them. With `example=` that order
is recorded from one forward; without it, it is guessed from the order modules are
registered (a parent's input first, its children, its output last), which a forward that
calls its children in another order contradicts: then read them in the order it calls
them. A module called several times in one forward (a shared layer) shows its first
call. Positions (`@-1`) index axis 1; a read checks the value has at least three axes
(`batch pos ...`), an intervention without `example=` cannot, and acts on axis 1.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field, replace

import torch

from .batch import Batch
from .errors import PromptError, SiteError


@dataclass
class ModuleBatch(Batch):
    """Inputs of a plain module: `args` and `kwargs` of its forward, `batch` rows along axis 0
    of every tensor. A plain module has no tokens: `tokens` is None, `input_ids` and
    `attention_mask` are one entry per row (`attention_mask` all ones, every row real)."""

    args: tuple = ()
    kwargs: dict = field(default_factory=dict)

    def select(self, rows) -> "ModuleBatch":
        """The rows at `rows` (a range or a list of indices) of every tensor input."""
        rows = list(rows)
        index = torch.tensor(rows, dtype=torch.long)

        def pick(value):
            return value[index.to(value.device)] if torch.is_tensor(value) else value

        return ModuleBatch([self.prompts[r] for r in rows], self.input_ids[rows], self.attention_mask[rows], None,
                           tuple(map(pick, self.args)), {key: pick(v) for key, v in self.kwargs.items()})

    @property
    def lengths(self) -> list[int]:
        """No tokens: one (the row itself) per row."""
        return [1] * len(self)

    def inputs(self, device) -> dict:
        """The forward's keyword inputs on `device` (its positional ones are `arguments`)."""
        return {key: _to(value, device) for key, value in self.kwargs.items()}

    def arguments(self, device) -> tuple:
        """The forward's positional inputs on `device`."""
        return tuple(_to(value, device) for value in self.args)


def _to(value, device):
    return value.to(device) if torch.is_tensor(value) else value


class ModuleReader:
    """A plain module's reader of inputs (its tokenizer's stand-in): `batch(inputs)`."""

    def __getattr__(self, name: str):
        # A method written for tokens reaches for the tokenizer: one clear line, not an AttributeError.
        from .errors import ModelError

        if name.startswith("_"):  # copy, pickle and displays probe these; they are absent, as usual
            raise AttributeError(name)
        raise ModelError(f"this method reads tokens (its tokenizer's {name}), and a plain torch module has none: "
                         "on a plain module use trace, cache, ablate, hook and steer on its module paths")

    def batch(self, inputs) -> ModuleBatch:
        """The `ModuleBatch` of a tensor, a tuple of tensors (the forward's arguments) or a
        dict of them (its keyword arguments); `PromptError` for anything else."""
        if isinstance(inputs, ModuleBatch):
            return inputs
        if torch.is_tensor(inputs):
            args, kwargs = (inputs,), {}
        elif isinstance(inputs, tuple):
            args, kwargs = inputs, {}
        elif isinstance(inputs, dict) and all(isinstance(key, str) for key in inputs):
            args, kwargs = (), dict(inputs)
        else:
            raise PromptError(f"a plain torch module reads tensors, not {type(inputs).__name__} {inputs!r:.40}: give "
                              "a tensor (batch first), a tuple of them (the forward's arguments) or a dict (its "
                              "keyword arguments)")
        tensors = [value for value in (*args, *kwargs.values()) if torch.is_tensor(value)]
        if not tensors or tensors[0].dim() == 0 or len(tensors[0]) == 0:
            raise PromptError("a plain module's inputs need a tensor with a batch axis first (shape batch x ...), "
                              f"got {[tuple(t.shape) for t in tensors] or 'no tensor'}: for one input use x[None]")
        rows = len(tensors[0])
        if any(t.dim() == 0 or len(t) != rows for t in tensors):
            raise PromptError(f"the input tensors have batch sizes {[t.shape[0] if t.dim() else None for t in tensors]}"
                              ": every tensor input needs the same first axis, the batch")
        return ModuleBatch([f"input {i}" for i in range(rows)], torch.zeros(rows, dtype=torch.long),
                           torch.ones(rows, dtype=torch.long), None, args, kwargs)


def paths(module) -> dict[str, torch.nn.Module]:
    """Every module below (and including, as `""`) `module`, by dotted path."""
    return dict(module.named_modules())


def expand_module_site(site, model) -> list:
    """`[site]` checked against a plain module, its execution rank in `stage`; `SiteError` for a
    module that does not exist (naming the nearest), or a transformer site on a plain module."""
    if not model.arch.plain:
        raise SiteError(f"{site}: module paths are the sites of a plain torch module; this {model.arch.name} "
                        "model speaks the site grammar (resid_post.5, mlp_out.3, head.9.6)")
    if site.path is None:
        raise SiteError(f"{site} needs a transformer from the architecture table; {model.name} is a plain torch "
                        f"module ({model.arch.name}), whose sites are its module paths with .input or .output "
                        f"({_examples(model)}; model.info() lists them)")
    found = paths(model.hf)
    if site.path not in found:
        raise SiteError(f"no module {site.path!r} in this {model.arch.name}: {_nearest(site.path, found)}")
    shape = model.shapes.get(site.name)
    if site.positions is not None and shape is not None and len(shape) < 3:
        raise SiteError(f"{site}: {site.name} is {' x '.join(map(str, shape))} here, with no position axis "
                        f"(positions index axis 1 of a batch x pos x ... value): drop @{site.positions.text}")
    return [replace(site, stage=rank(model, site))]


def _nearest(path: str, found: dict) -> str:
    """The module paths nearest `path`, in words."""
    names = [name for name in found if name]
    close = sorted(difflib.get_close_matches(path, names, n=5, cutoff=0.5), key=names.index)  # model order
    if close:
        return f"the nearest are {', '.join(close)}"
    return f"its modules are {', '.join(names[:12])}{', ...' if len(names) > 12 else ''} (model.info() lists them)"


def _examples(model) -> str:
    names = [name for name in paths(model.hf) if name][:2]
    return ", ".join(f"{name}.output" for name in names) or "output"


def rank(model, site) -> float:
    """The position of a module site in the forward's execution order: recorded from the
    example forward when there was one, else guessed from the registration order."""
    recorded = model.execution_order
    if recorded:
        return float(recorded.get(site.name, len(recorded)))
    names = list(paths(model.hf))
    index = names.index(site.path)
    if site.kind == "input":
        return float(index)
    # A module's output follows its descendants' (pre-order lists them right after it);
    # of outputs after the same last descendant, the deeper comes first.
    prefix = f"{site.path}." if site.path else ""
    last = max(i for i, name in enumerate(names) if i == index or name.startswith(prefix))
    depth = site.path.count(".") + 1 if site.path else 0
    return last + 0.5 - depth / 1000


def record(model, example) -> tuple[dict[str, tuple], dict[str, int]]:
    """One forward of `example`: each module site's shape (`{"fc1.output": (2, 16)}`) and its
    rank in execution order (`{"fc1.input": 1, ...}`), first calls only."""
    batch = ModuleReader().batch(example)
    shapes, order = {}, {}

    def note(name, value):
        if isinstance(value, tuple) and value:
            value = value[0]
        order.setdefault(name, len(order))
        if torch.is_tensor(value):
            shapes.setdefault(name, tuple(value.shape))

    handles = []
    # Plain hooks, removed however the forward ends (this runs before the model has any
    # intervention, so `mechnb.core.engine.run`'s context has nothing to set).
    try:
        for path, module in paths(model.hf).items():
            prefix = f"{path}." if path else ""

            def before(module, args, kwargs, name=f"{prefix}input"):
                note(name, args[0] if args else next(iter(kwargs.values()), None))

            def after(module, args, output, name=f"{prefix}output"):
                note(name, output)

            handles.append(module.register_forward_pre_hook(before, with_kwargs=True))
            handles.append(module.register_forward_hook(after))
        with torch.no_grad():
            model.hf(*batch.arguments(model.device), **batch.inputs(model.device))
    except Exception as error:
        from .errors import ModelError

        raise ModelError(f"the example forward of {model.arch.name} failed ({type(error).__name__}: "
                         f"{str(error).strip().splitlines()[0] if str(error).strip() else ''}): give example= an "
                         "input the forward takes (a tensor, a tuple of its arguments, a dict of keywords)") from None
    finally:
        for handle in handles:
            handle.remove()
    return shapes, order


def table(model):
    """The module paths of a plain module as a DataFrame: `path`, `kind` (its class),
    `output` (its output's shape in the example forward, blank without one)."""
    import pandas as pd

    rows = []
    for path, module in paths(model.hf).items():
        shape = model.shapes.get(f"{path}.output" if path else "output")
        rows.append({"path": path or "(the model)", "kind": type(module).__name__,
                     "output": " x ".join(map(str, shape)) if shape else ""})
    return pd.DataFrame(rows, columns=["path", "kind", "output"])


def read_positions(site, full: torch.Tensor) -> torch.Tensor:
    """Position indices `batch n` of a plain module's value along axis 1, or a `SiteError`."""
    if full.dim() < 3:
        raise SiteError(f"{site}: {site.name} is {' x '.join(map(str, full.shape))}, with no position axis "
                        f"(positions index axis 1 of a batch x pos x ... value): drop @{site.positions.text}")
    if site.positions.token is not None:
        raise SiteError(f"{site}: a plain module's inputs have no tokens to find {site.positions.text} among: "
                        "use an index such as @-1 or a range @2:5")
    return site.positions.resolve([[""] * full.shape[1]] * full.shape[0])
