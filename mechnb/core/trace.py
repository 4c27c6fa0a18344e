"""The trace: one run of the model with reads and writes at sites, entered and left here.

nnsight is the engine: `with model.trace(prompts):` opens an nnsight trace, and
inside it `model["resid_post.5"]` reads a site and `model["head.9.6"] = 0` writes
one. This module is the only place a trace is entered and left, so the rules hold
everywhere:

- Gradients are off unless asked for (`grad=True`); nnsight leaves them on.
- Sites are translated to module values here (`read`, `write`), through the
  architecture map, so nothing else knows a module name.
- Clean after failure: nnsight removes its hooks on exit, and the model's active
  trace is cleared in a `finally`, whatever the block raised (KeyboardInterrupt
  included). Writes replace module values inside the trace only; the weights are
  never touched, so the next forward equals a clean one.
- nnsight's own errors become mechnb errors that say what to do.
- On a remote model (`mechnb.load(name, remote=True)`) the same block runs on NDIF:
  nnsight's `remote=True` is passed here, the host is checked first, and connection
  failures become one-line `RemoteError`s (see `mechnb.core.remote`).
- On a model spread over devices (`device_map`), inputs go to the embedding's
  device; a range of sites read at once is gathered on the first one's device.

Example:
    >>> with model.trace("When Mary and John went to the store, John gave a drink to"):
    ...     h = model["resid_post.5"].save()
    ...     model["head.9.6"] = 0
    ...     logits = model["logits"].save()

Gotchas: nnsight runs the block's body itself, reading its source (so the body must
start on its own line, and code built at runtime must be in `linecache`), and in
execution order: read `resid_post.3` before `resid_post.5`, a head before its
layer's `attn_out`. Values first bound inside the block survive it only when
`.save()`d.
"""

from __future__ import annotations

import contextlib

import torch

from .arch import locate, submodule
from .batch import Batch, check_ids, check_length
from .errors import RemoteError, SiteError, TraceError
from .remote import LOCAL_HELP, check_site
from .residual import carried, written
from .sites import Site, assign_part, parse, read_part

ORDER_HINT = (
    "sites must be touched in the order the model computes them: embed, then for each "
    "layer resid_pre, pattern, head, attn_out, resid_mid, neuron, mlp_out, resid_post, "
    "and logits last"
)


class Trace:
    """A context manager around one nnsight trace of `model` on `prompts` (see module doc).

    Args:
        model: the `mechnb.Model`.
        prompts: a string, a list of strings, or a `Batch`.
        grad: keep autograd on inside the trace (for gradient methods).

    Attributes:
        batch: the tokenized `Batch` the trace runs on.
    """

    def __init__(self, model, prompts, grad: bool = False):
        self.model = model
        self.batch = batch_of(model, prompts)
        if not model.is_plain:
            check_ids(model, self.batch)
            check_length(model, self.batch.input_ids.shape[1], "the longest prompt")
        self.grad = grad
        self._tracer = None
        # Whole values already met in this run, by site name: a module's value can be
        # fetched from nnsight once, so a second read (or a read after a write) of the
        # same site is served from here.
        self.values: dict[str, torch.Tensor] = {}

    def __enter__(self) -> "Trace":
        from nnsight.tracing.tracer import skip_context, skippable

        from .engine import run

        self.model._enter_trace(self)
        # Interventions resolve positions against this batch while nnsight runs the model
        # (in `__exit__`); nnsight decides autograd itself, so grad is left alone here.
        self._run = run(self.model, self.batch.tokens, grad=None)  # a plain module's: None
        self._run.__enter__()
        try:
            options = {}
            if self.model.remote:
                from .remote import check_reachable

                check_reachable()
                options["remote"] = True
            inputs = self.batch.inputs(self.model.device)
            # A vision model is wrapped by nnsight's plain `NNsight`, which passes keywords on;
            # a plain module also takes its positional inputs.
            if self.model.is_plain:
                self._tracer = self.model.nn.trace(*self.batch.arguments(self.model.device), **inputs)
            elif self.model.arch.vision:
                self._tracer = self.model.nn.trace(**inputs, **options)
            else:
                self._tracer = self.model.nn.trace(inputs, **options)
            # Both calls look two frames up for the user's `with` statement, so they
            # must be made from here, directly, and nowhere deeper.
            self._tracer.capture()
            if skippable(self._tracer.node):
                skip_context(self._tracer)
        except BaseException as error:
            self._leave()
            raise self._translate(error) from None
        return self

    def __exit__(self, exc_type, exc_value, traceback) -> bool:
        try:
            with torch.set_grad_enabled(self.grad), self._connection():
                return self._tracer.__exit__(exc_type, exc_value, traceback)
        except BaseException as error:
            translated = self._translate(error)
            if translated is error:
                raise
            raise translated from None
        finally:
            self._tracer = None
            self._leave()

    def _leave(self) -> None:
        self._run.__exit__(None, None, None)
        self.model._leave_trace(self)

    def read(self, site: str | Site) -> torch.Tensor:
        """`model[site]` inside this trace (see `read`)."""
        return read(self.model, site, self)

    def write(self, site: str | Site, value) -> None:
        """`model[site] = value` inside this trace (see `write`)."""
        write(self.model, site, value, self)

    def stop(self) -> None:
        """End the model's run here: sites read so far are kept, later ones never computed."""
        self._tracer.stop()

    def _connection(self):
        """What surrounds the run: for a remote model, bounded websocket waits."""
        if not self.model.remote:
            return contextlib.nullcontext()
        from .remote import Connection

        return Connection()

    def _translate(self, error: BaseException) -> BaseException:
        """The mechnb error for an error of this trace (remote failures in one line)."""
        if self.model.remote:
            from .remote import translate as translate_remote

            error = translate_remote(error, self.model)
        return translate(error)


def translate(error: BaseException) -> BaseException:
    """The mechnb error for an nnsight error; other errors unchanged."""
    from nnsight.intervention.interleaver import OutOfOrderError
    from nnsight.tracing.tracer import WithBlockNotFoundError

    if isinstance(error, OutOfOrderError):
        return SiteError(f"{error}: {ORDER_HINT}")
    if isinstance(error, WithBlockNotFoundError):
        return TraceError(
            "model.trace(...) must be used as a `with` block written in a file or a "
            "notebook cell (nnsight reads the block's source); in a notebook, %%trace "
            "does this for you"
        )
    return error


class _Slot:
    """Where one concrete site's full value lives: a module's input or output.

    A module that returns a tuple (attention's `(output, weights)`) holds its value
    in element 0; `attr` names a field of a model output (`logits`).
    """

    def __init__(self, envoy, io: str, attr: str | None = None):
        self.envoy, self.io, self.attr = envoy, io, attr

    def get(self) -> torch.Tensor:
        value = getattr(self.envoy, self.io)
        if self.attr is not None:
            return value[self.attr]
        return value[0] if isinstance(value, tuple) else value

    def set(self, tensor: torch.Tensor) -> None:
        value = getattr(self.envoy, self.io)
        if self.attr is not None:
            value[self.attr] = tensor
        elif isinstance(value, tuple):
            setattr(self.envoy, self.io, (tensor, *value[1:]))
        else:
            setattr(self.envoy, self.io, tensor)


def _slot(model, site: Site) -> _Slot:
    """The `_Slot` of a concrete site in `model`'s nnsight envoy tree."""
    path, io, attr = locate(model, site)
    return _Slot(submodule(model.nn, path), io, attr)


def batch_of(model, prompts) -> Batch:
    """The `Batch` a trace of `model` runs on: prompts or images (`Batch.of`), or a plain
    module's tensors (`mechnb.core.modules.ModuleReader`)."""
    if model.is_plain:
        return model.tokenizer.batch(prompts)
    return Batch.of(model.tokenizer, prompts)


def _positions(full: torch.Tensor, site: Site, batch: Batch):
    """The site's positions resolved in `batch` (a plain module's along axis 1 of `full`), or None."""
    if site.positions is None:
        return None
    if site.path is not None:
        from .modules import read_positions

        return read_positions(site, full)
    return site.positions.resolve(batch.tokens)


def read_value(full: torch.Tensor, site: Site, batch: Batch) -> torch.Tensor:
    """The part of a concrete site's whole value that the site names, in `batch`'s prompts."""
    return read_part(full, site, _positions(full, site, batch))


def read(model, site: str | Site, trace: Trace) -> torch.Tensor:
    """Read a site inside the active trace; a range of sites stacks on a new leading axis
    (on the device of the first, when layers live on several)."""
    sites = sorted(parse(site).expand(model), key=lambda s: s.order)
    values = [read_value(_full(model, s, trace), s, trace.batch) for s in sites]
    if len(values) == 1:
        return values[0]
    return torch.stack([value.to(values[0].device) for value in values])


def _full(model, site: Site, trace: Trace) -> torch.Tensor:
    """The whole value of a concrete site in the active trace, with errors in site terms."""
    from nnsight.intervention.interleaver import OutOfOrderError

    key = site.base.name
    if key not in trace.values:
        if model.remote:
            check_site(site)
        try:
            value = _slot(model, site).get()
        except OutOfOrderError:
            raise SiteError(f"{site.name} was requested after the model had computed it: "
                            f"{ORDER_HINT}") from None
        # An active intervention on a module's output runs after nnsight hands the value
        # over; replay it here too (`Intervention.replay`), so a read shows what the rest of
        # the model sees. An SAE's splice replays without calling its features' module. A
        # transcoder's splice is left out: it runs its features through a module of their
        # own, which nnsight sees once per forward (the splice without feature edits
        # returns the value it is given, to rounding).
        if locate(model, site)[1] == "output":
            for intervention in model.interventions:
                if intervention.kind != "transcoder" and Site(intervention.site.kind, intervention.site.layer,
                                                              path=intervention.site.path).name == key:
                    value = intervention.replay(value, model)
        # A write of resid_mid in this forward reaches the layer's output after nnsight hands
        # it over: add it here too, as the model will.
        value = carried(model, site, value)
        if model.remote:
            value = value.detach()  # NDIF may run with autograd on; a remote trace has no use for it
        trace.values[key] = value
    return trace.values[key]


def write(model, site: str | Site, value, trace: Trace) -> None:
    """Write `value` (broadcast to what `read` returns) into a site inside the active trace."""
    sites = sorted(parse(site).expand(model), key=lambda s: s.order)
    if len(sites) > 1 and torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == len(sites):
        values = list(value)
    else:
        values = [value] * len(sites)
    for concrete, new in zip(sites, values):
        key = concrete.base.name
        full = _full(model, concrete, trace)
        # Every write hands the module a new copy: values read earlier in the cell stay
        # as they were, and autograd's record of the original stays intact.
        updated = full.clone()
        _assign(updated, concrete, new, trace.batch)
        if model.remote and concrete.kind == "resid_mid":
            raise RemoteError(f"{concrete} cannot be written with remote=True: NDIF's model would change "
                              "only what the MLP reads, not the residual stream past it; write attn_out or "
                              f"resid_pre instead, or {LOCAL_HELP}")
        _slot(model, concrete).set(updated)
        trace.values[key] = updated
        written(model, concrete, updated)


def _assign(full: torch.Tensor, site: Site, new, batch: Batch) -> None:
    """Write `new` into the part of `full` that `site` names, in place, or a `SiteError`."""
    positions = _positions(full, site, batch)
    try:
        assign_part(full, site, new, positions)
    except (RuntimeError, TypeError, ValueError):
        shape = tuple(read_part(full, site, positions).shape)
        given = (f"a value of shape {tuple(new.shape)}" if torch.is_tensor(new)
                 else f"{type(new).__name__} {new!r:.40}")
        raise SiteError(
            f"cannot write {given} into {site}, whose value has shape {shape}: give a number "
            f"or a tensor that broadcasts to {shape}"
        ) from None
