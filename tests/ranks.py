"""Processes spawned as the ranks of a job, with the gloo backend on CPU: the distributed code
paths proven without a GPU.

    >>> results = spawn(work, 2, "arg")     # work(world, "arg") in 2 processes; each returns a dict
    >>> results[1]["loss"]

`work` must be a module-level function (the processes import it by name); it receives the
rank's `mechnb.core.distributed.World` and returns a dict of tensors, numbers and strings,
which comes back through a file written with `torch.save` and read with
`torch.load(weights_only=True)`. One job per test, each in new processes: gloo can abort at
teardown when several jobs share a process.

The ranks are forked from a multiprocessing fork server that has imported torch, transformers,
nnsight and mechnb once (`PRELOAD`): each rank is a new process with its own gloo group, as a
spawned one is, without importing the same modules again (2-5 s of a core for every rank of
every test otherwise). The server itself is single-threaded, so forking it is safe.
"""

from __future__ import annotations

import os
import socket
import tempfile
import traceback
from pathlib import Path

import torch
import torch.multiprocessing as mp


PRELOAD = ["torch", "transformers", "nnsight", "mechnb.model", "mechnb.core.distributed", "mechnb.sae.train",
           "mechnb.transcoders", "ranks"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank(rank: int, size: int, port: int, folder: str, work, args, timeout: float) -> None:
    import sys

    tests = str(Path(__file__).parent)
    if tests not in sys.path:
        sys.path.insert(0, tests)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(size),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1", MECHNB_DISTRIBUTED_TIMEOUT=str(timeout))
    torch.set_num_threads(1)
    from mechnb.core import distributed

    world = distributed.init("gloo", timeout=timeout)
    try:
        result = work(world, *args)
        torch.save(result if result is not None else {}, Path(folder) / f"rank-{rank}.pt")
    except BaseException as error:
        (Path(folder) / f"rank-{rank}.error").write_text(f"{type(error).__name__}: {error}\n{traceback.format_exc()}")
        os._exit(1)
    # Every rank has its result on disk: wait for the others, then leave without gloo's teardown,
    # which can abort a process whose peer has already gone ("terminate called without an
    # active exception").
    try:
        world.barrier()
    finally:
        os._exit(0)


def spawn(work, size: int = 2, *args, timeout: float = 60, expect_failure: bool = False) -> dict:
    """Run `work(world, *args)` in `size` spawned ranks; `{rank: its returned dict}` (ranks that
    failed give `{"error": text}` when `expect_failure`, else the first failure is raised)."""
    import time

    import multiprocessing

    multiprocessing.set_forkserver_preload(PRELOAD)  # read when the server starts: the first job
    with tempfile.TemporaryDirectory() as folder:
        port = free_port()
        context = mp.start_processes(_rank, args=(size, port, folder, work, args, timeout), nprocs=size,
                                     join=False, start_method="forkserver")
        # Wait for every rank, however the others end: a rank that dies must not take the
        # survivors with it before they have reported how they stopped.
        deadline = time.monotonic() + 3 * timeout + 60
        for process in context.processes:
            process.join(max(1.0, deadline - time.monotonic()))
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join()
        failed = [rank for rank, process in enumerate(context.processes) if process.exitcode != 0]
        if failed and not expect_failure:
            error = Path(folder) / f"rank-{failed[0]}.error"
            raise RuntimeError(f"rank {failed[0]} failed: " + (error.read_text() if error.exists() else
                                                                f"exit code {context.processes[failed[0]].exitcode}"))
        results = {}
        for rank in range(size):
            path = Path(folder) / f"rank-{rank}.pt"
            error = Path(folder) / f"rank-{rank}.error"
            if path.exists():
                results[rank] = torch.load(path, weights_only=True)
            elif error.exists():
                results[rank] = {"error": error.read_text()}
            else:
                results[rank] = {"error": "exited without a result"}
        return results
