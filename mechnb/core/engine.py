"""The one entry for running the model: `run(model, tokens, ...)`, always clean after.

Every forward mechnb makes outside an nnsight trace (a patching row, a gradient pass, a
generation step, a collection batch, ROME's optimisation) and every trace itself runs
inside `run`. It sets what the running forward is about and undoes everything when
the block ends, however it ends (an exception, a KeyboardInterrupt, a chunk that ran out
of memory and is about to be retried):

- the context of persistent interventions: the prompts' tokens, so that positions such
  as `@'John'` resolve; the first position the forward computes (`offset`, for a
  forward that restarts at a position, one per row for a generation step with a
  key/value cache); which rows interventions change (`active`);
- the temporary hooks and attributes the method registers through the yielded `Run`
  (`run.hook(path, "output", fn)`, `run.torch_hook(...)`, `run.attach(attn, name, value)`);
- gradients: off (`grad=False`, the default), or on for activations only (`grad=True`:
  the weights are frozen for the block, so autograd records nothing it will not use);
- values kept with their autograd history (`run.capture(names)`).

    >>> with run(model, batch.tokens) as r:
    ...     r.hook("model.layers.3.mlp", "output", lambda value: value * 0)
    ...     logits = last_logits(model, batch)

Engines. mechnb computes with two, and both enter here:
- nnsight traces (`mechnb.core.trace`): read and write sites of one run (`model.trace`,
  `cache`, `top`, `%%trace`, NDIF);
- the layer-by-layer runner (`mechnb.core.runner`): many edited runs of one recorded
  prompt, batched and restarted at the layer and position where their edits start
  (patching, path patching, causal tracing, exact node scores).
Other methods make plain forwards of the Hugging Face model inside `run` (gradients,
generation, collection, SAE evaluation, circuits' three forwards).

Gotchas: runs nest (an outer context is restored when an inner run ends), but nnsight
traces do not. A hook registered here lives only for the block: to change every later
forward, add a persistent intervention (`Model.add`).
"""

from __future__ import annotations

import torch

from .arch import hook_value, locate, submodule
from .interventions import Context
from .memory import frozen_weights


class Run:
    """One block of running the model (see the module docstring); `run(...)` makes one.

    Used as a context manager, it sets the interventions' context and the gradient mode
    on entry and undoes them, with every hook and attribute registered through it, on
    exit. Without `with` (a method such as `gim` that changes the model for a block of
    its own) it is only the registry: `close()` removes what was registered.
    """

    def __init__(self, model, tokens: list[list[str]] | None = None, offset=0, active=None,
                 grad: bool | None = False):
        self.model = model
        self._context = Context(tokens, offset, active)
        self._grad = grad
        self._handles: list = []
        self._attributes: list = []
        self._previous = None
        self._modes: list = []

    def __enter__(self) -> "Run":
        self._previous = self.model.context
        self.model._context = self._context
        if self._grad is True:
            # Autograd for activations only: frozen weights record nothing they will not use.
            self._modes = [torch.enable_grad(), frozen_weights(self.model.hf)]
        elif self._grad is False:
            self._modes = [torch.no_grad()]
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.close()
            for mode in reversed(self._modes):
                mode.__exit__(None, None, None)
        finally:
            self._modes = []
            self.model._context = self._previous

    def hook(self, where, io: str, fn, attr: str | None = None):
        """Call `fn(value)` on the input or output value of a module (a path below the
        model root, or a module); a tensor returned replaces the value (see `arch.hook_value`)."""
        module = submodule(self.model.hf, where) if isinstance(where, str) else where
        self._handles.append(hook_value(module, io, fn, attr))

    def hook_site(self, site, fn) -> None:
        """Call `fn(whole value)` on a concrete site's whole value in this run."""
        path, io, attr = locate(self.model, site)
        self.hook(path, io, fn, attr)

    def torch_hook(self, module, hook, pre: bool = False, **options) -> None:
        """A plain PyTorch forward (or pre-) hook, removed with the rest."""
        register = module.register_forward_pre_hook if pre else module.register_forward_hook
        self._handles.append(register(hook, **options))

    def attach(self, module, name: str, value):
        """Set `module.<name> = value` for the block (the attention function reads such
        attributes: `mechnb_record`, `mechnb_prefix`, `mechnb_capture`, `mechnb_split`);
        returns `value`."""
        setattr(module, name, value)
        self._attributes.append((module, name))
        return value

    def capture(self, names) -> dict:
        """The whole values of the base sites `names`, kept with their autograd history as
        the forward computes them (a dict filled during the run). Gradients start at the
        embeddings, so they reach these values without passing through the weights."""
        from .sites import parse

        captured: dict[str, torch.Tensor] = {}

        def leaf(module, args, output):
            return output if output.requires_grad else output.detach().requires_grad_()

        self.torch_hook(submodule(self.model.hf, self.model.arch.embed), leaf)
        for name in names:
            def keep(value, name=name):
                captured[name] = value

            self.hook_site(parse(name), keep)
        return captured

    def close(self) -> None:
        """Remove every hook and attribute registered here (what the end of a block does)."""
        for handle in self._handles:
            handle.remove()
        for module, name in self._attributes:
            module.__dict__.pop(name, None)
        self._handles, self._attributes = [], []


def run(model, tokens: list[list[str]] | None = None, offset=0, active=None,
        grad: bool | None = False) -> Run:
    """A block in which the model's forwards run on these prompts: `with run(...) as r:`.

    Args:
        model: the `Model`.
        tokens: each batch row's token strings (`batch.tokens`), for positions that
            name tokens; None when the forward runs on token windows without them.
        offset: the position of the forward's first column (a runner row restarting
            there), or one per batch row (a generation step with a key/value cache).
        active: one bool per batch row, whether persistent interventions change it
            (None: every row).
        grad: False (no autograd), True (autograd for activations; weights frozen for
            the block) or None (left as the caller set it: nnsight traces decide theirs).

    Returns a `Run`: register hooks, attributes and captures on it inside the block.
    Example: `with run(model, batch.tokens, grad=True) as r: captured = r.capture(["head.3"])`.
    """
    return Run(model, tokens, offset, active, grad)


def last_logits(model, batch, **inputs) -> torch.Tensor:
    """Logits at each prompt's last position, `batch vocab`: the model's layers on `batch`
    (or on the given keyword `inputs`), then only those rows through the unembedding."""
    base = submodule(model.hf, model.arch.layers.rsplit(".", 1)[0])
    if not inputs:
        inputs = batch.inputs(model.device)
    out = base(**inputs, use_cache=False)
    hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
    return unembed_normed(model, hidden[torch.arange(len(batch)), batch.last.to(hidden.device)])


def unembed(model, hidden: torch.Tensor) -> torch.Tensor:
    """Final norm, unembedding and (Gemma) logit soft-capping, as the model's head does."""
    return unembed_normed(model, submodule(model.hf, model.arch.final_norm)(hidden))


def unembed_normed(model, normed: torch.Tensor) -> torch.Tensor:
    """Unembedding and (Gemma) logit soft-capping of the final norm's output."""
    logits = submodule(model.hf, model.arch.unembed)(normed)
    cap = getattr(model.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits
