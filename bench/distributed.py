"""Training over ranks against one process, in the same run: tokens/s, bytes handed to
collectives per step (measured, and by formula), and the share of a step spent in them.

The work: a TopK SAE of the embedded model's width (d 576, 4,608 features, k 32) on random
activations, batches of 2,048 tokens, 30 timed steps after 5 of warm-up; one process on one
thread, one process on two, and two gloo ranks of one thread each in both strategies (`ddp`:
each rank half of every batch, gradients summed; `features`: each rank half of the features,
top-k thresholds gathered, reconstructions summed).

Formulas (per rank and step, tensor bytes handed to collectives, 4-byte floats):
- ddp: every gradient once (W_enc, W_dec, b_enc, b_dec: 2 d F + F + d) plus a few scalars;
- features: the top-k values gathered (W B k: the gathered tensor, W ranks), the reconstruction
  summed (B d) and the decoder bias's gradient from the encoders (d), plus scalars; in a step
  with dead features the auxiliary loss adds its own top-k gather (W B 2k) and sum (B d).
(A ring all-reduce puts 2 (W - 1) / W times the tensor on the wire; gloo's algorithms vary.)

On this 2-core machine two ranks share the cores one process would use: they are not faster.
What matters is that the extra time is the collectives' and not copies: the printed share of
the step in communication, and tokens/s of the ranks against one process on one thread each.

Run: `.venv/bin/python bench/distributed.py`.
"""

import os
import socket
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

D, F, K, BATCH, STEPS, WARMUP = 576, 4608, 32, 2048, 30, 5


def data():
    return torch.randn((STEPS + WARMUP) * BATCH, D, generator=torch.Generator().manual_seed(0))


def timed(world_strategy=None):
    """Seconds per step of training, and the traffic of this rank."""
    import mechnb
    from mechnb.core.distributed import current

    world = current()
    acts = data()
    mechnb.sae.train(acts[:WARMUP * BATCH], kind="topk", d_sae=F, k=K, batch_size=BATCH, steps=WARMUP,
                     strategy=world_strategy, progress=False, log_every=10_000)
    world.traffic.reset()
    started = time.perf_counter()
    mechnb.sae.train(acts, kind="topk", d_sae=F, k=K, batch_size=BATCH, steps=STEPS, strategy=world_strategy,
                     progress=False, log_every=10_000)
    seconds = time.perf_counter() - started
    return {"step": seconds / STEPS, "bytes": world.traffic.bytes / STEPS, "comm": world.traffic.seconds / STEPS,
            "calls": world.traffic.calls / STEPS, "by_kind": {k: v / STEPS for k, v in world.traffic.by_kind.items()}}


def _rank(rank, size, port, folder, strategy):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(size),
                      OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from mechnb.core import distributed

    distributed.init("gloo")
    figures = timed(strategy)
    torch.save(figures, Path(folder) / f"{rank}.pt")
    distributed.current().barrier()
    os._exit(0)


def ranks(strategy):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as folder:
        mp.start_processes(_rank, args=(2, port, folder, strategy), nprocs=2, join=True, start_method="spawn")
        return [torch.load(Path(folder) / f"{rank}.pt", weights_only=True) for rank in range(2)]


def formula(strategy, auxiliary: bool = False) -> float:
    if strategy == "ddp":
        return (2 * D * F + F + D) * 4
    return (2 * BATCH * K + BATCH * D + D + (2 * BATCH * 2 * K + BATCH * D if auxiliary else 0)) * 4


def main():
    torch.set_num_threads(1)
    one = timed()
    torch.set_num_threads(2)
    two_threads = timed()
    print(f"TopK SAE {D} -> {F}, k {K}, {BATCH} tokens a step, {STEPS} steps:")
    print(f"  one process, one thread : {one['step'] * 1e3:7.1f} ms a step, {BATCH / one['step']:8.0f} tokens/s")
    print(f"  one process, two threads: {two_threads['step'] * 1e3:7.1f} ms a step, "
          f"{BATCH / two_threads['step']:8.0f} tokens/s")
    for strategy in ("ddp", "features"):
        figures = ranks(strategy)
        step = max(f["step"] for f in figures)
        measured = sum(f["bytes"] for f in figures) / 2
        comm = sum(f["comm"] for f in figures) / 2
        print(f"  two ranks, {strategy:<8}      : {step * 1e3:7.1f} ms a step, {BATCH / step:8.0f} tokens/s in all, "
              f"{BATCH / 2 / step:8.0f} a rank ({BATCH / step / (BATCH / one['step']):.2f}x one process on one thread)")
        expected = f"{formula(strategy) / 1e6:.2f} MB" if strategy == "ddp" else \
            f"{formula(strategy) / 1e6:.2f}-{formula(strategy, True) / 1e6:.2f} MB (without and with the auxiliary loss)"
        print(f"      bytes to collectives per rank and step: {measured / 1e6:.2f} MB measured, "
              f"{expected} by formula ({figures[0]['calls']:.0f} calls; "
              + ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in figures[0]["by_kind"].items()) + ")")
        print(f"      time in collectives: {comm * 1e3:.1f} ms of {step * 1e3:.1f} ms a step ({comm / step:.0%}); "
              f"the rest against one thread's whole step: {(step - comm) / one['step']:.2f}x")


if __name__ == "__main__":
    main()
