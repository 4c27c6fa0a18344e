"""Sharded activation stores: collection over ranks, and one reader of their union.

`Model.collect` is `collect` here: in one process it is `mechnb.sae.store.collect`; under
torchrun, `Model.collect(site, texts, n_tokens, store=dir)` gives each rank every
world-th token window (the same windows, packed the same way, as one process would cut) and
each rank runs the model on its own only, writing what it keeps to
`dir/shard-{rank}-chunk-{i}.safetensors` (`acts`, at most `CHUNK_ROWS` rows a file); rank 0
then writes `dir/manifest.json`: the site, the width, the ranks, and how many rows each
window gave. `ShardedStore` reads the union in one process, in the order one process would
have collected it (window by window): the same rows, the same bytes, whatever the number of
ranks. `mechnb.sae.train` reads it as any store.

    >>> store = model.collect("resid_post.12", texts, 10_000_000, store="acts/")   # under torchrun
    >>> store = mechnb.sae.open_store("acts/")              # anywhere, afterwards
    >>> mechnb.sae.train(store, kind="topk", k=64)

Gotchas: a sharded collection needs `store=` (each rank writes its part to disk); the files
are read through safetensors' memory map, a window's rows at a time.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

import functools

from ..core.errors import StoreError
from . import store as stores
from .store import ActivationStore

CHUNK_ROWS = 16_384
FORMAT = "mechnb sharded activation store"


@functools.wraps(stores.collect)
def collect(model, site, texts, n_tokens: int, batch_size: int | None = None, context: int = 128, store=None,
            progress: bool = True) -> ActivationStore:
    from ..core import distributed

    world = distributed.current()
    if not world.several:
        return stores.collect(model, site, texts, n_tokens, batch_size, context, store, progress)
    if model.reads_images:
        raise StoreError(f"collect over {world.size} ranks reads text; collect images in one process")
    (concrete,) = stores.one_site(model, site)
    if not isinstance(n_tokens, int) or isinstance(n_tokens, bool) or n_tokens < 1:
        raise StoreError(f"n_tokens must be a positive integer, got {n_tokens!r}")
    return collect_shards(model, concrete, texts, n_tokens, batch_size or 16, context, store, progress,
                          stores._width(model, concrete), world)


def open_store(path) -> ActivationStore:
    """A store on disk: the union of one collected over ranks (a `manifest.json`), or one
    collected in one process (`mechnb.sae.store.open_store`)."""
    if (Path(path) / "manifest.json").is_file():
        return ShardedStore(path)
    return stores.open_store(path)


def windows_of(model, texts, context: int):
    """Token windows as `collect` cuts them (`store.packed_windows`, the stream's rest last)."""
    return stores.packed_windows(model, texts, context, remainder=True)


def collect_shards(model, site, texts, n_tokens: int, batch_size: int, context: int, store, progress: bool,
                   width: int, world) -> "ShardedStore":
    """`collect` over the ranks of `world` (see the module docstring); the union, on every rank."""
    from ..core.memory import Chunks

    _forward = stores._forward
    if store is None:
        raise StoreError(f"under torchrun ({world.size} ranks) collect writes each rank's part to disk: give "
                         "store='a directory every rank can reach'")
    folder = Path(store)
    folder.mkdir(parents=True, exist_ok=True)
    chunks = Chunks(batch_size, f"collecting {site}", "windows", advice="use a smaller context (tokens per window)")
    counts, mine, total = [], [], 0
    for number, window in enumerate(windows_of(model, texts, context)):
        if total >= n_tokens:
            break
        take = min(len(window) - 1, n_tokens - total)  # each window's first position is left out
        counts.append(take)
        total += take
        if world.owns(number):
            mine.append((window, take))
    bar = None
    if progress and world.main:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(take for _, take in mine), desc=f"collecting {site} (rank 0)", unit="tok", delay=2)
    buffer, files, written = [], 0, 0
    try:
        for begin in range(0, len(mine), batch_size):
            batch = mine[begin:begin + batch_size]
            rows = [window for window, _ in batch]
            values = torch.cat([part for _, part in chunks.run(lambda chunk: _forward(model, chunk, site), rows)])
            # Every window gave len - 1 rows; the last of all may be cut short.
            kept = sum(take for _, take in batch)
            buffer.append(values[:kept])
            written += kept
            while sum(len(part) for part in buffer) >= CHUNK_ROWS:
                files = _flush(folder, world.rank, files, buffer, CHUNK_ROWS)
            if bar is not None:
                bar.update(kept)
        if buffer and sum(len(part) for part in buffer):
            files = _flush(folder, world.rank, files, buffer, None)
    finally:
        if bar is not None:
            bar.close()
    with world.main_writes() as main:
        if main:
            manifest = {"format": FORMAT, "site": str(site), "width": width, "tokens": total, "ranks": world.size,
                        "chunk_rows": CHUNK_ROWS, "windows": counts, "context": context, "model": model.name,
                        "n_tokens": n_tokens}
            (folder / "manifest.json").write_text(json.dumps(manifest))
    store = ShardedStore(folder)
    if total < n_tokens:
        import warnings

        warnings.warn(f"the texts gave {total} tokens, fewer than n_tokens={n_tokens}: the store holds {total} "
                      "(pass more text, or the same text again)", stacklevel=3)
    return store


def _flush(folder: Path, rank: int, files: int, buffer: list, rows: int | None) -> int:
    """Write `rows` rows (None: all) of `buffer` to this rank's next chunk file; keep the rest."""
    from safetensors.torch import save_file

    values = torch.cat(buffer)
    rows = len(values) if rows is None else rows
    save_file({"acts": values[:rows].contiguous()}, str(folder / f"shard-{rank}-chunk-{files}.safetensors"))
    buffer[:] = [values[rows:]] if rows < len(values) else []
    return files + 1


class ShardedStore(ActivationStore):
    """The union of a sharded collection, read in the order one process would have collected it."""

    def __init__(self, folder):
        folder = Path(folder)
        path = folder / "manifest.json"
        if not path.is_file():
            raise StoreError(f"{folder} holds no sharded store (no manifest.json)")
        manifest = json.loads(path.read_text())
        if manifest.get("format") != FORMAT:
            raise StoreError(f"{path} is not a mechnb sharded store")
        self.folder, self.manifest = folder, manifest
        ranks = manifest["ranks"]
        counts = np.asarray(manifest["windows"], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(counts)])  # each window's first row in the union
        # Each window's first row in its rank's own stream (the rank's windows in order).
        self.offsets = np.zeros(len(counts), dtype=np.int64)
        for rank in range(ranks):
            owned = np.arange(rank, len(counts), ranks)
            self.offsets[owned] = np.concatenate([[0], np.cumsum(counts[owned])[:-1]]) if len(owned) else []
        self._handles: dict = {}
        super().__init__(None, int(self.starts[-1]), site=manifest["site"], meta=manifest)

    @property
    def d(self) -> int:
        return int(self.manifest["width"])

    def __repr__(self) -> str:
        return (f"<mechnb ShardedStore {self.n} x {self.d} of {self.site} ({self.manifest['ranks']} ranks' shards "
                f"in {self.folder})>")

    def _stream(self, rank: int, start: int, stop: int) -> np.ndarray:
        """Rows `start..stop` of one rank's stream (its chunk files in order)."""
        from safetensors import safe_open

        size = self.manifest["chunk_rows"]
        parts = []
        while start < stop:
            number, within = divmod(start, size)
            key = (rank, number)
            if key not in self._handles:
                self._handles[key] = safe_open(str(self.folder / f"shard-{rank}-chunk-{number}.safetensors"),
                                               framework="numpy")
            take = min(stop - start, size - within)
            parts.append(self._handles[key].get_slice("acts")[within:within + take])
            start += take
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def rows(self, start: int, stop: int) -> torch.Tensor:
        stop = min(stop, self.n)
        if start >= stop:
            return torch.empty(0, self.d)
        ranks = self.manifest["ranks"]
        first = int(np.searchsorted(self.starts, start, side="right")) - 1
        last = int(np.searchsorted(self.starts, stop, side="left"))
        parts = []
        for window in range(first, last):
            lo, hi = max(start, self.starts[window]), min(stop, self.starts[window + 1])
            if hi <= lo:
                continue
            begin = self.offsets[window] + (lo - self.starts[window])
            parts.append(self._stream(window % ranks, int(begin), int(begin + hi - lo)))
        return torch.from_numpy(np.concatenate(parts).astype(np.float32, copy=False))

    def sample(self, count: int, seed: int = 0) -> torch.Tensor:
        generator = np.random.default_rng(seed)
        picks = np.sort(generator.choice(self.n, size=min(count, self.n), replace=False))
        return torch.cat([self.rows(int(p), int(p) + 1) for p in picks])
