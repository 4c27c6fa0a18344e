"""Activation stores: a site's activations over a corpus, in memory or memory-mapped on disk.

`Model.collect(site, texts, n_tokens)` packs documents into one token stream (EOS
between them), cuts it into windows of `context` tokens, runs the model over them,
keeps the site's value at every token and stops each forward right after the site's
layer. Padding is dropped, and so is the first
position of every window (a BOS where the tokenizer adds one): it is the model's
attention sink, whose activations are orders of magnitude larger than the rest and
would dominate any SAE trained on them.
With `store=path` the activations go to a memory-mapped file, `path/acts.f32`, so
a store can exceed RAM (under torchrun, each rank writes its windows' to shard files and
every rank reads the union: `mechnb.sae.shards`); `path/progress.json` records how far collection got (rows,
documents read, and the tokens read but not yet run), and collecting again into the
same path with the same texts resumes exactly there. Windows run `batch_size` at a
time and each batch's values go to CPU (or the file) as it finishes; a batch that
runs out of memory is halved and run again (`mechnb.core.memory`).

On a vision model, `collect(site, images, n_tokens)` runs the images (a tensor `batch
channel height width`, or PIL images) `batch_size` at a time and keeps the site's value at
every position of each, `[CLS]` and the patches alike (no position of an image is a sink
of the kind a text window's first is), image after image, until `n_tokens` rows:

    >>> store = vit.collect("resid_post.2", mechnb.datasets.digits("train").images, n_tokens=20_000)

`ActivationStore.batches(batch_size, seed)` yields shuffled batches: blocks of
`buffer` rows are read in a random order and shuffled within, so a memory-mapped
store is read in large sequential pieces.

    >>> store = model.collect("resid_post.12", python_docs(), n_tokens=100_000)
    >>> len(store), store.d
    (100000, 576)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from ..core.checks import is_int
from ..core.engine import run
from ..core.errors import StoreError
from ..core.remote import local_only
from ..core.sites import read_part


class ActivationStore:
    """`n` activations of width `d` (a float32 tensor, or a memory-mapped array)."""

    def __init__(self, data, n: int, site: str | None = None, meta: dict | None = None):
        self.data, self.n, self.site, self.meta = data, n, site, meta or {}

    @property
    def d(self) -> int:
        return int(self.data.shape[1])

    def __len__(self) -> int:
        return self.n

    def __repr__(self) -> str:
        where = "on disk" if isinstance(self.data, np.memmap) else "in memory"
        return f"<mechnb ActivationStore {self.n} x {self.d} of {self.site} ({where})>"

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows `start..stop` (at most up to the store's length) as a float32 tensor."""
        block = self.data[start:min(stop, self.n)]
        return torch.from_numpy(np.array(block)) if isinstance(block, np.ndarray) else block

    def sample(self, count: int, seed: int = 0) -> torch.Tensor:
        """`count` rows chosen at random (sorted reads, for a memory map)."""
        generator = np.random.default_rng(seed)
        picks = np.sort(generator.choice(self.n, size=min(count, self.n), replace=False))
        return torch.from_numpy(np.array(self.data[picks])) if isinstance(self.data, np.memmap) \
            else self.data[torch.as_tensor(picks)]

    def batches(self, batch_size: int, seed: int = 0, buffer: int = 262_144) -> Iterator[torch.Tensor]:
        """One pass over the store in shuffled batches of `batch_size` rows (the last may be short)."""
        generator = np.random.default_rng(seed)
        starts = np.arange(0, self.n, buffer)
        generator.shuffle(starts)
        for start in starts:
            block = self.rows(int(start), int(min(start + buffer, self.n)))
            order = torch.as_tensor(generator.permutation(len(block)))
            block = block[order]
            for begin in range(0, len(block), batch_size):
                yield block[begin:begin + batch_size]

    def check(self) -> None:
        """A `StoreError` if the store holds NaN or infinite values."""
        for begin in range(0, self.n, 262_144):
            if not torch.isfinite(self.rows(begin, min(begin + 262_144, self.n))).all():
                raise StoreError(f"the store of {self.site} holds NaN or infinite activations "
                                 f"(rows {begin}..{min(begin + 262_144, self.n)}): collect again, in "
                                 "float32, or drop those documents")


class _Stop(Exception):
    """Raised by a hook to end a forward once the collected site has been computed."""


@local_only
def collect(model, site, texts: Iterable, n_tokens: int, batch_size: int | None = None,
            context: int = 128, store=None, progress: bool = True) -> ActivationStore:
    """Activations of `site` over `texts`, for training SAEs (see the module docstring).

    Runs the model only up to the site's layer, drops padding and each window's first
    position, and returns `n_tokens` rows, in memory or, with `store=path`,
    memory-mapped on disk and resumable.

    Args:
        site: one per-token site (`resid_post.12`, `mlp_out.3`, `neuron.5`, `head.9.6`).
        texts: strings, lists of token ids (one window each), or a Dataset with `text`;
            for a vision model, images (`batch channel height width`, or PIL images),
            every position of each kept, `batch_size` images per forward.
        n_tokens: rows to keep.
        batch_size: windows per forward (default 16); each batch's values move to
            CPU (or to the file) as it finishes, and a batch that runs out of
            memory is halved and run again.
        context: tokens per window.
        store: a directory for a memory-mapped store (`acts.f32`), written batch
            by batch and resumable; None keeps the rows in memory. Under torchrun it is
            required: each rank writes its share of the windows to shard files there, and
            every rank gets the union (`mechnb.sae.shards`, whose `collect` the model binds).
        progress: a progress bar when it takes more than two seconds.

    Returns:
        An `ActivationStore` of `n_tokens width` float32 rows. Example:
        `model.collect("resid_post.12", texts, 100_000, store="acts/")`.
    """
    from ..core.memory import Chunks

    (concrete,) = one_site(model, site)
    if not is_int(n_tokens) or n_tokens < 1:
        raise StoreError(f"n_tokens must be a positive integer, got {n_tokens!r}")
    # Each window drops its first position (the attention sink): one token needs two.
    if not is_int(context) or context < 2:
        raise StoreError(f"context, the tokens per window, must be an integer >= 2, got {context!r}")
    width = _width(model, concrete)
    batch_size = batch_size or 16
    if model.reads_images:
        return _collect_images(model, concrete, texts, n_tokens, batch_size, store, progress, width)
    chunks = Chunks(batch_size, f"collecting {concrete}", "windows",
                    advice="use a smaller context (tokens per window)")
    data, written, documents_done, stream, progress_file = _open(store, n_tokens, width, str(concrete))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_tokens, initial=written, desc=f"collecting {concrete}", unit="tok", delay=2)
    bos = model.tokenizer.bos_token_id
    adds_bos = bool(model.tokenizer("a")["input_ids"][:1] == [bos]) if bos is not None else False
    prefix = [bos] if adds_bos else []
    separator = [] if model.tokenizer.eos_token_id is None else [model.tokenizer.eos_token_id]
    window = context - len(prefix)
    documents = documents_of(texts)
    pending: list[list[int]] = []
    seen = 0
    try:
        for document in documents:
            seen += 1
            if seen <= documents_done:
                continue  # resumed: this document is already in the store (or in `stream`)
            if isinstance(document, list):
                pending.append(document)  # a window of token ids, taken as it is
            else:
                # Documents are packed into one stream, separated by EOS, and cut into full
                # windows: no padding to compute, and every window has `context` tokens.
                stream += model.tokenizer(document, add_special_tokens=False)["input_ids"] + separator
                while len(stream) >= window:
                    pending.append(prefix + stream[:window])
                    stream = stream[window:]
            if len(pending) < batch_size:
                continue
            written = _run(model, pending, concrete, data, written, n_tokens, chunks)
            pending = []
            _save_progress(progress_file, written, seen, stream, str(concrete), width, n_tokens)
            if bar is not None:
                bar.n = written
                bar.refresh()
            if written >= n_tokens:
                break
        if stream and written < n_tokens:
            pending.append(prefix + stream)
            stream = []
        if pending and written < n_tokens:
            written = _run(model, pending, concrete, data, written, n_tokens, chunks)
            _save_progress(progress_file, written, seen, stream, str(concrete), width, n_tokens)
    finally:
        _close(bar, data)
    meta = {"site": str(concrete), "tokens": written, "documents": seen, "context": context, "model": model.name}
    return _finished(data, written, n_tokens, meta, f"the texts gave {written} tokens, fewer than n_tokens="
                     f"{n_tokens}: the store holds {written} (pass more text, or the same text again)")


def _close(bar, data) -> None:
    """End a collection's progress bar and write a memory-mapped store's pages."""
    if bar is not None:
        bar.close()
    if isinstance(data, np.memmap):
        data.flush()


def _finished(data, written: int, n_tokens: int, meta: dict, shortfall: str) -> ActivationStore:
    """The store of a collection (`shortfall` warned when it holds fewer rows than asked)."""
    if written < n_tokens:
        import warnings

        warnings.warn(shortfall, stacklevel=3)
    if not isinstance(data, np.memmap):
        data = data[:written]
    return ActivationStore(data, written, site=meta["site"], meta=meta)


def _collect_images(model, site, images, n_tokens: int, batch_size: int, store, progress: bool,
                    width: int) -> ActivationStore:
    """`collect` on a vision model: every position of each image, image after image."""
    from ..core.errors import PromptError
    from ..core.memory import Chunks

    if not is_int(batch_size) or batch_size < 1:
        raise StoreError(f"batch_size, the images per forward, must be a positive integer, got {batch_size!r}")
    try:
        pixels = model.tokenizer.pixels(images)
    except PromptError as problem:
        raise StoreError(f"collect on {model.name} reads images: {problem}") from None
    positions = len(model.tokenizer.labels)
    chunks = Chunks(batch_size, f"collecting {site}", "images", advice="pass a smaller batch_size")
    data, written, done, _, progress_file = _open(store, n_tokens, width, str(site))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_tokens, initial=written, desc=f"collecting {site}", unit="tok", delay=2)
    needed = min(len(pixels), done + -(-(n_tokens - written) // positions))
    try:
        for start in range(done, needed, batch_size):
            stop = min(start + batch_size, needed)
            run_images = lambda chunk: _forward_images(model, pixels[chunk], site)  # noqa: E731
            for chunk, values in chunks.run(run_images, list(range(start, stop))):
                take = min(len(values), n_tokens - written)
                data[written:written + take] = values[:take].numpy() if isinstance(data, np.memmap) \
                    else values[:take]
                written += take
            _save_progress(progress_file, written, stop, [], str(site), width, n_tokens)
            if bar is not None:
                bar.n = written
                bar.refresh()
    finally:
        _close(bar, data)
    meta = {"site": str(site), "tokens": written, "images": needed, "positions": positions, "model": model.name}
    return _finished(data, written, n_tokens, meta, f"the {len(pixels)} images gave {written} positions, fewer than "
                     f"n_tokens={n_tokens}: the store holds {written} (pass more images)")


def _forward_images(model, pixels: torch.Tensor, site) -> torch.Tensor:
    """Images up to the site: every position's value, `images*positions width` on CPU."""
    captured = {}

    def grab(value):
        captured["value"] = value
        raise _Stop

    with run(model, [list(model.tokenizer.labels)] * len(pixels)) as forward:
        forward.hook_site(site.base, grab)
        try:
            model.hf(pixel_values=pixels.to(model.device))
        except _Stop:
            pass
    value = read_part(captured.pop("value"), site, None).float()
    return value.reshape(-1, value.shape[-1] if value.dim() == 3 else 1).cpu()


def _run(model, rows, site, data, written, n_tokens, chunks) -> int:
    """Token windows in chunks of `chunks`, up to the site; append their real tokens' values."""
    for _, tokens in chunks.run(lambda chunk: _forward(model, chunk, site), rows):
        take = min(len(tokens), n_tokens - written)
        if isinstance(data, np.memmap):
            data[written:written + take] = tokens[:take].numpy()
        else:
            data[written:written + take] = tokens[:take]
        written += take
        if written >= n_tokens:
            break
    return written


def padded(model, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token windows as one batch: `(ids, attention mask)`, padded on the right."""
    length = max(len(r) for r in rows)
    pad = model.tokenizer.pad_token_id or 0
    ids = torch.tensor([r + [pad] * (length - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r in rows])
    return ids, mask


def kept_rows(value: torch.Tensor, site, mask: torch.Tensor) -> torch.Tensor:
    """A site's whole value over a padded batch -> its rows at the real tokens after each
    window's first, `tokens width` float32 on CPU: what collection keeps."""
    value = read_part(value, site, None).float()
    keep = mask.bool()
    # Position 0 of every window is the model's attention sink (BOS or not): its residual
    # norm is ~100x the others' (about 23,000 against 150 in SmolLM2's resid_post.12).
    keep[:, 0] = False
    return value[keep.to(value.device)].reshape(int(keep.sum()), -1).cpu()


def _forward(model, rows, site) -> torch.Tensor:
    """One padded batch of token windows up to the site: its real tokens' values, on CPU."""
    ids, mask = padded(model, rows)
    captured = {}

    def grab(value):
        captured["value"] = value
        raise _Stop  # nothing after the site is needed: the forward ends here

    # Every row as long as the batch: position ranges select the same columns in each.
    with run(model, [[""] * ids.shape[1]] * len(rows)) as forward:
        forward.hook_site(site.base, grab)
        try:
            model.hf(input_ids=ids.to(model.device), attention_mask=mask.to(model.device), use_cache=False)
        except _Stop:
            pass
    return kept_rows(captured.pop("value"), site, mask)


def one_site(model, site):
    from ..core.sites import parse

    parsed = parse(site)
    if parsed.positions is not None:
        raise StoreError(f"collect keeps every token: give {parsed.name} without positions")
    concrete = parsed.expand(model)
    if len(concrete) != 1:
        raise StoreError(f"collect reads one site, and {parsed} names {len(concrete)}")
    if concrete[0].kind in ("pattern", "logits"):
        raise StoreError(f"collect reads per-token vectors (resid_*, attn_out, mlp_out, neuron.L, "
                         f"head.L.H), not {concrete[0].kind}")
    if concrete[0].kind == "head" and concrete[0].index is None:
        raise StoreError("collect one head at a time (head.L.H)")
    return concrete


def _width(model, site) -> int:
    if site.kind == "neuron":
        return 1 if site.index is not None else model.d_mlp
    if site.kind == "head":
        return model.d_head
    if site.kind == "sae":
        return 1 if site.index is not None else model.sae_at(site).d_sae
    if site.kind == "tc":
        return 1 if site.index is not None else model.transcoders_at(site).width
    return model.d_model


def documents_of(texts) -> Iterator[str]:
    """Strings (or token-id windows) from an iterable of them or a datasets Dataset with a `text`
    column, checked as they come."""
    if hasattr(texts, "column_names"):
        if "text" not in texts.column_names:
            raise StoreError(f"the dataset has no 'text' column: its columns are {texts.column_names}")
        texts = (row["text"] for row in texts)
    if isinstance(texts, str):
        texts = [texts]
    if not hasattr(texts, "__iter__") or isinstance(texts, (dict, bytes)):
        raise StoreError(f"collect reads texts: a list of strings or a datasets Dataset with a 'text' "
                         f"column, got {type(texts).__name__}")
    for text in texts:
        if isinstance(text, list) and all(isinstance(t, int) for t in text):
            yield text  # token ids of one window
            continue
        if not isinstance(text, str):
            raise StoreError(f"collect reads strings; got {type(text).__name__}")
        if text:
            yield text


def take_documents(documents, n_tokens: int, model):
    """Documents until they hold about `n_tokens` tokens (with some to spare)."""
    total = 0
    for document in documents:
        yield document
        total += len(model.tokenizer(document, add_special_tokens=False)["input_ids"])
        if total >= 1.2 * n_tokens + 1000:
            return


def windows(model, documents, context: int, n_tokens: int) -> list[list[int]]:
    """Token windows of `context` tokens cut from each document, until they hold `n_tokens`
    positions that collection keeps (all but each window's first), or the documents end:
    what evaluation, contexts and dashboards run on, one window per row, unpacked."""
    windows, total = [], 0
    for document in documents:
        ids = model.tokenizer(document, add_special_tokens=False)["input_ids"]
        for i in range(0, len(ids), context):
            if len(ids[i:i + context]) > 1:
                windows.append(ids[i:i + context])
                total += len(windows[-1]) - 1
            if total >= n_tokens:  # a long document is cut where the count is reached
                return windows
    return windows


def _open(store, n_tokens: int, width: int, site: str):
    """`(array, rows written, documents done, leftover token stream, progress file)`."""
    if store is None:
        return torch.empty(n_tokens, width), 0, 0, [], None
    path = Path(store)
    path.mkdir(parents=True, exist_ok=True)
    progress_file = path / "progress.json"
    written = documents = 0
    stream: list[int] = []
    mode = "w+"
    if progress_file.is_file():
        state = json.loads(progress_file.read_text())
        if state["site"] != site or state["width"] != width or state["n_tokens"] != n_tokens:
            raise StoreError(f"{path} holds a store of {state['site']} (width {state['width']}, "
                             f"{state['n_tokens']} tokens), not of {site} (width {width}, {n_tokens}): "
                             "use another path")
        written, documents, mode = state["written"], state["documents"], "r+"
        stream = state.get("stream", [])
    data = np.memmap(path / "acts.f32", dtype=np.float32, mode=mode, shape=(n_tokens, width))
    return data, written, documents, stream, progress_file


def _save_progress(progress_file, written, documents, stream, site, width, n_tokens) -> None:
    """Record how far collection got: rows, documents read, and their tokens not yet run."""
    if progress_file is not None:
        progress_file.write_text(json.dumps({"written": written, "documents": documents, "stream": stream,
                                             "site": site, "width": width, "n_tokens": n_tokens}))


def open_store(path) -> ActivationStore:
    """A store written by `collect(..., store=path)` (as far as it got); `mechnb.sae.shards.open_store`
    opens one collected over ranks too."""
    path = Path(path)
    progress_file = path / "progress.json"
    if not progress_file.is_file():
        raise StoreError(f"{path} holds no activation store (no progress.json)")
    state = json.loads(progress_file.read_text())
    data = np.memmap(path / "acts.f32", dtype=np.float32, mode="r", shape=(state["n_tokens"], state["width"]))
    return ActivationStore(data, state["written"], site=state["site"], meta=state)


def packed_windows(model, texts, context: int, remainder: bool = False):
    """Windows of `context` token ids cut from `texts` packed into one stream with EOS between
    documents (BOS first where the tokenizer adds one); a document given as token ids is a window
    of its own. `remainder`: the stream's last, shorter window too (else full windows only)."""
    tokenizer = model.tokenizer
    bos = tokenizer.bos_token_id
    adds_bos = bos is not None and tokenizer("a")["input_ids"][:1] == [bos]
    prefix = [bos] if adds_bos else []
    separator = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    window = context - len(prefix)
    stream: list[int] = []
    for document in documents_of(texts):
        if isinstance(document, list):
            yield document
            continue
        stream += tokenizer(document, add_special_tokens=False)["input_ids"] + separator
        while len(stream) >= window:
            yield prefix + stream[:window]
            stream = stream[window:]
    if remainder and stream:
        yield prefix + stream
