"""Memory: sweeps that run in chunks, and keep running when a chunk does not fit.

Every method that runs the model over many items (patched rows, prompt pairs,
prompts, token windows) runs them in chunks of `batch_size`, and every such loop
goes through `Chunks.run`. When a chunk runs out of memory (`torch.OutOfMemoryError`,
or a `RuntimeError` or `MemoryError` saying the allocator could not get memory, as
CPU allocators do), the sweep frees what it can (`torch.cuda.empty_cache()`), halves
the chunk, and tries the same items again; the smaller size holds for the rest of the
sweep, and the user is told once, by an `OutOfMemoryWarning`. A chunk of one item
that still does not fit ends the sweep with a `MemoryBudgetError` that says what to
do. Any other error passes through untouched.

The sweeps that use it: the patching engine (`runner.run_rows`, behind `patch`,
`path_patch`, `causal_trace` and exact node scores), circuit edge scores, the task's
clean and corrupt runs and faithfulness (`Task.chunks`), `Model.cache`, `collect`,
SAE evaluation, head detection, coactivation and ROME's key statistics.

    >>> chunks = Chunks(64, "exact patching", unit="rows")
    >>> for rows, values in chunks.run(lambda rows: forward(rows).cpu(), range(1000)):
    ...     out[rows] = values          # consumed here, outside the retried function
    >>> chunks.limit                    # 16 after two halvings, None if all fitted

Gotchas: `run` retries its function, so the function must have no effect that a
failed try leaves behind: compute a chunk's values and return them, and accumulate
them where they are yielded. Each try runs its own trace or forward, whose hooks are
removed however it ends (see `mechnb.core.trace`), so the model is clean for the retry and
after the final error. Methods that call a lower-level loop several times (one per
prompt pair, say) pass one `Chunks` as its `batch_size`, so a size halved for one
call stays halved for the next.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import gc
import time
import warnings
from typing import Any, Callable, Iterator, Sequence

import torch

from .checks import is_int
from .errors import ArgumentError, MechnbError, MemoryBudgetError, OutOfMemoryWarning, TimeBudgetError

# What allocators say when they cannot get memory: CUDA, the CPU allocator, Windows, MPS.
_MARKERS = ("out of memory", "can't allocate memory", "not enough memory")


def is_out_of_memory(error: BaseException) -> bool:
    """True when `error` says memory ran out, and a smaller chunk may fit."""
    if isinstance(error, MechnbError):
        return False  # a sweep inside a sweep already gave up at one item
    if isinstance(error, (MemoryError, torch.OutOfMemoryError)):
        return True
    return isinstance(error, RuntimeError) and any(m in str(error).lower() for m in _MARKERS)


def free_memory() -> None:
    """Release the memory a failed chunk held: unreachable tensors, then the allocators' caches."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if torch.backends.mps.is_available():
        torch.mps.empty_cache()
    return_to_system()


def return_to_system() -> None:
    """Give the CPU memory that freed tensors leave behind back to the operating system.

    glibc's malloc keeps freed blocks for reuse, and after the first large tensor is freed
    it serves blocks of up to 32 MB (one layer's activations) from heaps it rarely
    shrinks: without this, a process's resident memory only grows with each differently
    shaped run. `malloc_trim` hands the free pages back (a few ms); elsewhere, a no-op.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None  # not glibc (macOS, Windows, musl)


class frozen_weights:
    """Within the block, `module`'s parameters do not require gradients; restored on exit.

    A gradient method asks for gradients with respect to activations, never weights. With
    weights that require gradients, autograd records every layer of a forward, including
    the layers below the first value that needs one, and keeps their activations for a
    backward that never uses them.
    """

    def __init__(self, module: torch.nn.Module):
        self.module, self.changed = module, []

    def __enter__(self) -> torch.nn.Module:
        self.changed = [p for p in self.module.parameters() if p.requires_grad]
        for parameter in self.changed:
            parameter.requires_grad_(False)
        return self.module

    def __exit__(self, *exc) -> None:
        for parameter in self.changed:
            parameter.requires_grad_(True)
        self.changed = []


# (deadline, what) of the innermost `time_budget`, or None: read by every sweep between chunks.
_DEADLINE: contextvars.ContextVar = contextvars.ContextVar("mechnb_deadline", default=None)


@contextlib.contextmanager
def time_budget(seconds: float, what: str = "this call"):
    """`with time_budget(60, "the patch tool's call"):` sweeps (`Chunks.run`) started inside stop
    with a `TimeBudgetError` at the first chunk that begins after `seconds`. A chunk is never
    cut short: the model is left as a finished chunk leaves it (MCP tool calls are bounded so)."""
    token = _DEADLINE.set((time.monotonic() + seconds, seconds, what))
    try:
        yield
    finally:
        _DEADLINE.reset(token)


def check_time_budget() -> None:
    """Raise `TimeBudgetError` if the innermost `time_budget` has run out."""
    budget = _DEADLINE.get()
    if budget is not None and time.monotonic() > budget[0]:
        raise TimeBudgetError(f"{budget[2]} ran past its {budget[1]:.0f} s: ask for fewer sites, prompts or "
                              "steps, or give it more time")


class Chunks:
    """How many items a sweep runs at once, halved whenever a chunk runs out of memory.

    Args:
        size: items per chunk; None takes the `default` each `run` is given (all items
            when it has none).
        what: the sweep, as the warning and the error name it (`"exact patching"`).
        unit: what one item is (`"rows"`, `"prompts"`, `"prompt pairs"`, `"windows"`).
        advice: what else lowers the memory this sweep needs, for the final error
            (`"patch fewer sites"`).

    Attributes:
        limit: the largest chunk known to fit since an out-of-memory error (None
            before one); every later chunk of this sweep is at most this large.

    Example: `Chunks(8, "circuit scores", unit="prompt pairs")`, then `chunks.run(fn, range(32))`.
    """

    def __init__(self, size: int | None = None, what: str = "this sweep", unit: str = "items",
                 advice: str | None = None):
        if size is not None and (not is_int(size) or size < 1):
            raise ArgumentError(f"batch_size of {what} must be a positive integer ({unit} at once), or None "
                              f"for the default, got {size!r}")
        self.size, self.what, self.unit, self.advice = size, what, unit, advice
        self.limit: int | None = None
        self._failed: int | None = None  # the first chunk size that ran out of memory
        self._warned = False

    def __repr__(self) -> str:
        return f"<mechnb.core.memory.Chunks {self.what}: size {self.size}, limit {self.limit}>"

    def run(self, fn: Callable[[Sequence], Any], items: Sequence,
            default: int | None = None) -> Iterator[tuple[Sequence, Any]]:
        """Yield `(chunk, fn(chunk))` for consecutive chunks (slices) of `items`.

        Args:
            fn: computes one chunk's values (a slice of `items`: a list, or a range
                for a range); retried on a smaller slice when it runs out of memory.
            items: a sequence that slices (a list, a range).
            default: the chunk size when this sweep's `size` is None.

        Returns:
            An iterator of `(chunk, value)` in the order of `items`. Raises a
            `MemoryBudgetError` when a chunk of one item runs out of memory; any
            other error of `fn` passes through.
        """
        size = self.size or default or max(len(items), 1)
        begin = 0
        while begin < len(items):
            check_time_budget()
            if self.limit is not None:
                size = min(size, self.limit)
            chunk = items[begin:begin + size]
            failure = None
            try:
                value = fn(chunk)
            except Exception as error:
                if not is_out_of_memory(error):
                    raise
                text = str(error).strip()
                failure = text.splitlines()[0] if text else type(error).__name__
            if failure is not None:
                # Outside the `except`, so the error's frames, and the tensors they hold, can go.
                free_memory()
                if len(chunk) <= 1:
                    raise MemoryBudgetError(self._message(failure))
                self._failed = self._failed or len(chunk)
                size = self.limit = len(chunk) // 2
                continue
            if self.limit is not None and not self._warned:
                self._warned = True
                warnings.warn(f"{self.what} ran out of memory with {self._failed} {self.unit} at once; "
                              f"halved the batch size to {self.limit} and continued "
                              f"(batch_size={self.limit} avoids the failed tries)",
                              OutOfMemoryWarning, stacklevel=2)
            yield chunk, value
            value = None  # the next chunk runs without this one's values held here
            return_to_system()
            begin += len(chunk)

    def _message(self, failure: str) -> str:
        advice = f"{self.advice}, " if self.advice else ""
        return (f"{self.what} ran out of memory even with one of its {self.unit} at a time ({failure}): "
                f"{advice}use shorter prompts, free memory held elsewhere (del unused models and "
                "results, then torch.cuda.empty_cache()), load the model in a smaller dtype "
                "(dtype='bfloat16'), or offload layers to CPU (mechnb.load(..., device_map='auto'))")
