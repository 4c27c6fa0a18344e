"""Functions the launch tests run as jobs (the ranks import them: `env={"PYTHONPATH": tests}`)."""

import time


def fail_on_rank(rank: int):
    """Rank `rank` raises at once; the others wait at a barrier for it."""
    from mechnb.core.distributed import current

    world = current()
    if world.rank == rank:
        raise ValueError("a broken batch in this rank's shard")
    world.barrier()
    return {"rank": world.rank}


def wait_forever():
    """Every rank sleeps until it is stopped, reporting as it goes."""
    from mechnb.core.distributed import current, report

    world = current()
    for step in range(100_000):
        report(world, step=step, steps=100_000, tokens=step)
        time.sleep(0.2)


def ranks_and_sum():
    """Each rank's number, and the sum over ranks: JSON back to the notebook."""
    import torch

    from mechnb.core.distributed import current

    world = current()
    return {"size": world.size, "sum": float(world.sum_(torch.tensor([world.rank + 1.0]))[0])}
