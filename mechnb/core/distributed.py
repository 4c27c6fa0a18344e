"""Processes that work as one: the process group, and what every rank agrees on.

Training on hundreds of millions of tokens, or sweeping a large grid, runs on several GPUs
or machines under `torchrun`, every process (rank) running the same code. This module is
the one place that knows: trainers, collection and sweeps ask the `World` who they are and
what to share, and never call `torch.distributed` themselves. Without a process group the
world is one rank, every collective is the identity, and the code path is the same.

    >>> world = current()                  # torchrun's process group, or a world of one
    >>> world.rank, world.size
    (0, 1)
    >>> rows = world.slice(len(batch))     # this rank's contiguous part of a global batch
    >>> world.mean_(gradient)              # the average over ranks, in place
    >>> with world.main_writes() as main:  # rank 0 writes, the others wait at a barrier
    ...     if main: save(...)

What is agreed, and how:
- sums and means of tensors (`sum_`, `mean_`, `max_`, `min_`): `all_reduce`;
- rows from every rank (`gather`): `all_gather_single` into one flat tensor, ranks in order
  (gloo takes only that flat form; every rank gives the same shape);
- one rank's value everywhere (`broadcast`), and barriers;
- a sum whose backward is the identity (`sum_keep_gradient`): each rank computes part of a
  replicated value (the features of one shard) and the loss is replicated, so the gradient
  each rank needs is the gradient of the loss itself. `torch.distributed.nn`'s all_reduce
  sums gradients in the backward too, which multiplies them by the world's size.

`Traffic` counts the bytes and seconds spent in collectives (`world.traffic`), for
`bench/distributed.py`.

Gotchas: every rank must call every collective, in the same order, with the same shapes;
a rank that skips one leaves the others waiting until the group's timeout (`init` sets
it: 120 s unless `MECHNB_DISTRIBUTED_TIMEOUT` says otherwise), after which they fail
with a `DistributedError` naming the step.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field

import torch

from .errors import DistributedError

TIMEOUT = 120  # seconds a collective waits for a rank before the job fails


@dataclass
class Traffic:
    """Bytes and seconds of the collectives one rank took part in."""

    bytes: int = 0
    seconds: float = 0.0
    calls: int = 0
    by_kind: dict = field(default_factory=dict)

    def add(self, kind: str, size: int, seconds: float) -> None:
        self.bytes += size
        self.seconds += seconds
        self.calls += 1
        self.by_kind[kind] = self.by_kind.get(kind, 0) + size

    def reset(self) -> None:
        self.bytes, self.seconds, self.calls, self.by_kind = 0, 0.0, 0, {}


class World:
    """This process's place among the ranks of a job (see the module docstring).

    Attributes: `rank`, `size`, `main` (rank 0), `traffic`.
    """

    def __init__(self, rank: int = 0, size: int = 1, group=None):
        self.rank, self.size, self.group = rank, size, group
        self.traffic = Traffic()

    def __repr__(self) -> str:
        return f"<mechnb World: rank {self.rank} of {self.size}>"

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def several(self) -> bool:
        return self.size > 1

    # -- what each rank takes -----------------------------------------------------------

    def slice(self, n: int) -> slice:
        """This rank's contiguous share of `n` items (the first ranks take one more when `n`
        does not divide): concatenated in rank order, the shares are the `n` items in order."""
        base, extra = divmod(n, self.size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (1 if self.rank < extra else 0))

    def counts(self, n: int) -> list[int]:
        """Every rank's share of `n` items, in rank order."""
        base, extra = divmod(n, self.size)
        return [base + (1 if rank < extra else 0) for rank in range(self.size)]

    def owns(self, index: int) -> bool:
        """True when item `index` of a round-robin split is this rank's."""
        return index % self.size == self.rank

    # -- collectives ----------------------------------------------------------------------

    def _run(self, kind: str, tensor: torch.Tensor, call):
        if not self.several:
            return None
        import torch.distributed as dist

        started = time.perf_counter()
        try:
            result = call()
        except RuntimeError as error:
            text = str(error).strip().splitlines()[0][:160] if str(error).strip() else type(error).__name__
            if not isinstance(error, dist.DistError) and not any(
                    word in text.lower() for word in ("connection", "gloo", "timed out", "timeout", "peer", "socket",
                                                      "nccl", "closed")):
                raise  # a mistake in this rank's own tensors, not the group's
            raise DistributedError(f"rank {self.rank} of {self.size}: a {kind} failed, another rank stopped or "
                                   f"died ({text})") from None
        self.traffic.add(kind, tensor.numel() * tensor.element_size(), time.perf_counter() - started)
        return result

    def _reduce_(self, tensor: torch.Tensor, op) -> torch.Tensor:
        import torch.distributed as dist

        self._run("all_reduce", tensor, lambda: dist.all_reduce(tensor, op=op, group=self.group))
        return tensor

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum over ranks, in place (and returned)."""
        import torch.distributed as dist

        return self._reduce_(tensor, dist.ReduceOp.SUM)

    def mean_(self, tensor: torch.Tensor) -> torch.Tensor:
        """The mean over ranks, in place."""
        return self.sum_(tensor).div_(self.size) if self.several else tensor

    def max_(self, tensor: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        return self._reduce_(tensor, dist.ReduceOp.MAX)

    def min_(self, tensor: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        return self._reduce_(tensor, dist.ReduceOp.MIN)

    def total(self, value: float) -> float:
        """A number summed over ranks."""
        if not self.several:
            return value
        return float(self.sum_(torch.tensor([float(value)], dtype=torch.float64))[0])

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's `tensor` (one shape on every rank) concatenated along axis 0, rank 0's first."""
        import torch.distributed as dist

        if not self.several:
            return tensor
        tensor = tensor.contiguous()
        out = tensor.new_empty((self.size * tensor.shape[0], *tensor.shape[1:]))
        self._run("all_gather", out, lambda: dist.all_gather_single(out, tensor, group=self.group))
        return out

    def gather_uneven(self, tensor: torch.Tensor) -> torch.Tensor:
        """`gather` for tensors whose first axis differs by rank (padded to the longest, then cut)."""
        if not self.several:
            return tensor
        counts = self.gather(torch.tensor([tensor.shape[0]], dtype=torch.long)).tolist()
        longest = max(counts)
        padded = tensor.new_zeros((longest, *tensor.shape[1:]))
        padded[:tensor.shape[0]] = tensor
        every = self.gather(padded)
        return torch.cat([every[rank * longest:rank * longest + count] for rank, count in enumerate(counts)])

    def assemble(self, tensor: torch.Tensor) -> torch.Tensor:
        """`gather_uneven` into CPU memory, one rank's part at a time: the device never holds more
        than one part (the whole of a set too wide for one device is assembled on the host)."""
        if not self.several:
            return tensor.detach().cpu()
        counts = self.gather(torch.tensor([tensor.shape[0]], dtype=torch.long, device=tensor.device)).tolist()
        parts = []
        for rank, count in enumerate(counts):
            part = tensor.detach().contiguous() if rank == self.rank else \
                tensor.new_empty((count, *tensor.shape[1:]))
            parts.append(self.broadcast_(part, rank).cpu())
        return torch.cat(parts)

    def broadcast_(self, tensor: torch.Tensor, source: int = 0) -> torch.Tensor:
        """Rank `source`'s tensor on every rank, in place."""
        import torch.distributed as dist

        self._run("broadcast", tensor, lambda: dist.broadcast(tensor, src=source, group=self.group))
        return tensor

    def broadcast_object(self, value, source: int = 0):
        """Rank `source`'s JSON-friendly value on every rank."""
        import json

        if not self.several:
            return value
        data = torch.tensor(list(json.dumps(value).encode()) if self.rank == source else [], dtype=torch.uint8)
        size = self.broadcast_(torch.tensor([len(data)], dtype=torch.long), source)
        buffer = data if self.rank == source else torch.empty(int(size[0]), dtype=torch.uint8)
        self.broadcast_(buffer, source)
        return json.loads(bytes(buffer.tolist()).decode())

    def kth_largest(self, local: torch.Tensor, k: int) -> torch.Tensor:
        """Each row's k-th largest value over the columns every rank holds part of (`rows m` on
        each rank -> `rows`): every rank's own top k, gathered, then the top k of those. The
        threshold of a top-k whose features are sharded over ranks."""
        local = local.detach()
        if not self.several:
            return local.topk(k, dim=-1).values[:, -1]
        top = local.topk(min(k, local.shape[-1]), dim=-1).values
        if top.shape[-1] < k:
            top = torch.cat([top, top.new_full((top.shape[0], k - top.shape[-1]), -float("inf"))], -1)
        every = self.gather(top.T.contiguous()).T  # rows (ranks x k)
        return every.topk(k, dim=-1).values[:, -1]

    def barrier(self) -> None:
        import torch.distributed as dist

        if self.several:
            self._run("barrier", torch.empty(0), lambda: dist.barrier(group=self.group))

    @contextlib.contextmanager
    def main_writes(self):
        """`with world.main_writes() as main:` rank 0 writes inside the block (`main` is True
        there only); every rank waits at a barrier after it, so no rank reads a half-written file."""
        try:
            yield self.main
        finally:
            self.barrier()

    def sum_keep_gradient(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum over ranks of `tensor`, whose backward passes the gradient through unchanged
        (see the module docstring: each rank holds one part of a replicated value)."""
        return _SumKeepGradient.apply(tensor, self) if self.several else tensor

    def reduce_gradient(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` unchanged, its gradient summed over ranks in the backward: for a replicated
        parameter that each rank uses in a part of the computation only (its shard)."""
        return _ReduceGradient.apply(tensor, self) if self.several else tensor


class _SumKeepGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, world):
        out = tensor.clone()
        world.sum_(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ReduceGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, world):
        ctx.world = world
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad):
        return ctx.world.sum_(grad.clone()), None


_ONE = World()


def current() -> World:
    """The world of this process: `torch.distributed`'s default group when one is initialised
    (under torchrun, or `init`), else a world of one rank."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return _default_world(dist.get_rank(), dist.get_world_size())
    return _ONE


_WORLDS: dict = {}


def _default_world(rank: int, size: int) -> World:
    """One `World` per process group, so that its traffic adds up across calls."""
    key = (rank, size)
    if key not in _WORLDS:
        _WORLDS[key] = World(rank, size)
    return _WORLDS[key]


def init(backend: str | None = None, timeout: float | None = None) -> World:
    """Join the process group torchrun describes (`RANK`, `WORLD_SIZE`, `MASTER_ADDR`, ...), with a
    timeout on every collective; `gloo` on CPU, `nccl` with CUDA (each rank on its own GPU,
    `LOCAL_RANK`). Without torchrun's variables, the world of one. Returns the `World`."""
    import datetime

    import torch.distributed as dist

    if dist.is_initialized():
        return current()
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) <= 1:
        return _ONE
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    seconds = timeout or float(os.environ.get("MECHNB_DISTRIBUTED_TIMEOUT", TIMEOUT))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=seconds))
    return current()


def report(world: World, **figures) -> None:
    """This rank's progress for `mechnb.launch`'s live view: one JSON line appended to
    `$MECHNB_JOB/progress-{rank}.jsonl` (nothing outside a launched job). Trainers call it when
    they log (`step`, `steps`, `tokens`, `loss`, `fvu`, `dead`, ...)."""
    folder = os.environ.get("MECHNB_JOB")
    if not folder:
        return
    import json
    from pathlib import Path

    line = json.dumps({"rank": world.rank, "time": time.time(), **figures})
    with open(Path(folder) / f"progress-{world.rank}.jsonl", "a") as stream:
        stream.write(line + "\n")


def device() -> torch.device:
    """The device this rank computes on: its own GPU under torchrun with CUDA, else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")
