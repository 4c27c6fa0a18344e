"""Activation patching, attribution patching and path patching.

The question: which components carry the information that makes the model answer
differently on a clean and a corrupt prompt? Patching answers it causally: run the
corrupt prompt, put back the clean value of one component (denoising; the reverse
with `direction="noising"`), and see how much of the clean metric returns.

    >>> result = model.patch(
    ...     clean="When Mary and John went to the store, John gave a drink to",
    ...     corrupt="When Mary and John went to the store, Mary gave a drink to",
    ...     sites="resid_pre.*", answer=" Mary", wrong=" John")
    >>> result.values.shape                  # layer pos
    torch.Size([30, 14])

- `method="exact"` runs every patched forward, batched by `mechnb.core.runner` (layers
  below the patch and positions before it are reused from the recorded run).
- `method="attribution"` approximates every patch at once from one backward pass:
  metric(patched) ~ metric(target) + (source - target) . d metric / d value.
- `path_patch` measures a sender's effect through chosen receivers only (Wang et
  al. 2022): the sender is patched with every other head frozen to the target run,
  the receivers' values are recorded, and a second run patches just those in.

On an image classifier (`mechnb.vision.tiny_vit`), clean and corrupt are images (a
tensor `batch channel height width`, or PIL images) of one shape, the answers class
names or indices, and the metric reads the classifier's logits; every patched run is a
whole image (attention is bidirectional, so nothing before a patch stays as it was),
and the positions are `[CLS]` and the patches:

    >>> model.patch(sevens, ones, "resid_post.*", answer="7", wrong="1", normalize=True)

Pairs of prompts must tokenize to the same length (positions are compared one to
one); several pairs average the metric. Values are the metric of each patched run,
or with `normalize=True`, `(patched - corrupt) / (clean - corrupt)`: 1 means the
patch restores the clean behaviour, 0 that it does nothing.
"""

from __future__ import annotations

import time

import torch

from ..core import metrics as metrics_module
from ..core.batch import Batch, per_pair, prompt_pairs
from ..core.engine import run
from ..core.errors import PatchError
from ..core.memory import Chunks
from ..core.progress import progress as progress_bar
from ..core.model import language_only
from ..core.remote import local_only
from ..core.runner import Edit, Row, TargetRun, run_rows
from ..core.sites import Site, parse
from ..display.results import Result
from .grid import Grid, sweeps_positions

DIRECTIONS = ("denoising", "noising")
METHODS = ("exact", "attribution")
FREEZE = ("heads", "all", "none")


@local_only
def patch(model, clean, corrupt, sites, answer=None, wrong=None, metric="logit_diff",
          per_position: bool | None = None, method: str = "exact", normalize: bool = False,
          batch_size: int | None = None, direction: str = "denoising", progress: bool = True) -> Result:
    """Activation (or attribution) patching of every site in `sites`.

    Args:
        clean, corrupt: a prompt each, or equal-length lists of prompt pairs (the
            metric averages over pairs). A pair must tokenize to one length. On an
            image model: images (`batch channel height width`, or PIL), paired in order.
        sites: a site pattern or a list of patterns of one grid shape
            (`resid_pre.*`, `head.*.*`, `attn_out.*`, `mlp_out.10:20`, ...). A
            pattern with positions (`head.*.*@-1`) patches just those.
        answer, wrong: answer tokens (strings; the first token is used) or ids; an image
            classifier's class names (`"7"`) or indices.
        metric: `logit_diff`, `prob`, `logprob`, `kl`, or f(logits batch vocab) -> batch.
        per_position: True sweeps every position separately (adds a `pos` axis), False
            patches all positions at once; None (the default) sweeps positions for the
            residual stream (`resid_*`, `attn_out`, `mlp_out`, `embed`) and patches
            components (`head`, `neuron`, `pattern`, `sae`) at every position at once.
        method: `exact` (batched patched forwards) or `attribution` (one backward).
        normalize: report `(patched - corrupt) / (clean - corrupt)`.
        batch_size: rows per batched forward (default from a 256 MiB budget); a
            chunk that runs out of memory is halved and run again, and the values
            move to CPU chunk by chunk (see `mechnb.core.memory`).
        direction: `denoising` (clean into corrupt) or `noising` (corrupt into clean).
        progress: a progress bar for sweeps longer than two seconds.

    Returns:
        A `Result`; `.values` is `layer pos` for `resid_pre.*`, `layer head` for
        `head.*.*` (`layer head pos` with `per_position=True`); `.df` has `layer`, `head`
        where relevant, `pos`, `token`, `value`; `.meta` the clean and corrupt
        metrics. Example: `model.patch(clean, corrupt, "resid_pre.*", answer=" Mary", wrong=" John")`.
    """
    start_time = time.perf_counter()
    if model.reads_images and model.n_classes is None:
        raise PatchError(f"patching measures a classifier's logits, and {model.name} is a vision backbone with "
                         "none: load its ...ForImageClassification model, or cache and compare a site yourself")
    if method not in METHODS:
        raise PatchError(f"unknown method {method!r}: use one of {', '.join(METHODS)}")
    if direction not in DIRECTIONS:
        raise PatchError(f"unknown direction {direction!r}: use one of {', '.join(DIRECTIONS)}")
    pairs = prompt_pairs(model, clean, corrupt, sweeps_positions(sites, per_position), error=PatchError)
    grid = Grid(model, sites, per_position, pairs[0])
    tally = _Tally(grid.size, direction)
    chunks = Chunks(batch_size, "exact patching", "rows", advice="patch fewer sites or positions")
    bar = progress_bar(progress, grid.size * len(pairs), f"{method} patching")
    try:
        for pair, source, target, ans, wro in _runs(pairs, answer, wrong, direction):
            source_cache = model.cache(source, grid.base_names + ["logits"])
            source_logits = final_logits(model, source_cache)
            if method == "exact":
                target_run = TargetRun(model, target)
                target_logits = target_run.logits
            else:
                # One forward and backward of the target gives its logits and every gradient.
                target_logits, effects = _attribution(model, grid, source_cache, target)
            metric_fn = tally.metric(model, metric, ans, wro, source_logits, target_logits)
            source_metric = metric_fn(source_logits)[0].item()
            if method == "exact":
                target_metric = metric_fn(target_logits)[0].item()
                values = torch.full((grid.size,), target_metric)
                # Before the first token where the two prompts differ, both runs computed the
                # same values (attention is causal): a patch there changes nothing, and a patch
                # of every position needs to write only from there on. Images start at 0.
                start = pair.first_difference
                edits = [grid.edit(cell, source_cache, start) for cell in grid.cells]
                needed = [i for i, edit in enumerate(edits) if edit is not None]
                if needed:
                    values[needed] = run_rows(model, target_run, [Row([edits[i]]) for i in needed],
                                              chunks, bar, metric=metric_fn)
                if bar is not None:
                    bar.update(grid.size - len(needed))
            else:
                target_metric, values = effects(metric_fn)
                values = target_metric + values
                if bar is not None:
                    bar.update(grid.size)
            tally.add(values, source_metric, target_metric)
    finally:
        if bar is not None:
            bar.close()
    values, meta = tally.finish(model, pairs, metric, answer, wrong, normalize, start_time)
    meta["title"] = (f"{method} patching, {direction}: {', '.join(grid.patterns)} ({meta['metric']}"
                     f"{', normalized' if normalize else ''})")
    meta.update(method=method, sites=grid.patterns, scale=_scale(metric, normalize))
    return grid.result(values.reshape(grid.shape), meta)


def final_logits(model, cache) -> torch.Tensor:
    """A cached run's logits at the last position, `batch vocab` (a classifier's `batch class`)."""
    return (cache["logits"] if model.reads_images else cache["logits@-1"]).float()


def _attribution(model, grid: Grid, source_cache, target: str):
    """Run the target once with gradients kept; returns its last logits and `effects(metric)`.

    `effects(metric)` backpropagates the metric and gives `(metric value, per-cell
    effect)`, the effect being `(source - target) . d metric / d value` summed over
    the cell.
    """
    batch = Batch.of(model.tokenizer, target)
    with run(model, batch.tokens, grad=True) as forward:
        captured = forward.capture(grid.base_names)
        if model.reads_images:
            logits = model.hf(**batch.inputs(model.device)).logits  # batch class: no positions
        else:
            logits = model.hf(**batch.inputs(model.device), use_cache=False).logits[:, -1]

    def effects(metric_fn):
        names = list(grid.base_names)
        with torch.enable_grad():
            value = metric_fn(logits)
            grads = torch.autograd.grad(value.sum(), [captured[n] for n in names], allow_unused=True)
        per_site = {}
        for name, grad in zip(names, grads):
            difference = source_cache[name].to(captured[name].device) - captured[name].detach()
            effect = difference * (grad if grad is not None else torch.zeros_like(difference))
            per_site[name] = effect.to(model.device)  # gathered: a device_map spreads the layers
        cells = torch.stack([grid.attribution(cell, per_site) for cell in grid.cells]).cpu()
        return value[0].item(), cells

    return logits.detach().float(), effects


@local_only
@language_only
def path_patch(model, clean, corrupt, senders, receivers, answer=None, wrong=None,
               metric="logit_diff", normalize: bool = False, freeze: str = "heads",
               batch_size: int | None = None, direction: str = "denoising",
               progress: bool = True) -> Result:
    """Path patching: each sender's effect on the metric through `receivers` only.

    Each sender (a pattern such as `head.*.*`) is patched from the source run with
    every other head (`freeze="heads"`; `"all"` adds MLP outputs, `"none"`
    freezes nothing) held at its target-run value; the receivers' values in that
    run (`head.L.H`: through its queries, keys and values; `pattern.L.H`: through
    queries and keys; `resid_post.L`: through the residual stream) are then
    patched alone into the target run, and the metric measured. Other arguments
    as in `patch`. Returns a `Result` over the senders' grid.
    """
    start_time = time.perf_counter()
    if freeze not in FREEZE:
        raise PatchError(f"unknown freeze {freeze!r}: use one of {', '.join(FREEZE)}")
    if direction not in DIRECTIONS:
        raise PatchError(f"unknown direction {direction!r}: use one of {', '.join(DIRECTIONS)}")
    pairs = prompt_pairs(model, clean, corrupt, error=PatchError)
    grid = Grid(model, senders, False, pairs[0])
    receiver_sites = _concrete(model, receivers, "receivers")
    for site in receiver_sites:
        if site.kind in ("embed", "logits"):
            raise PatchError(f"{site} cannot be a receiver: name heads, patterns, attn_out, "
                             "mlp_out, neuron or resid sites")
    tally = _Tally(grid.size, direction)
    chunks = Chunks(batch_size, "path patching", "rows", advice="patch fewer senders or receivers")
    bar = progress_bar(progress, 2 * grid.size * len(pairs), "path patching")
    try:
        for pair, source, target, ans, wro in _runs(pairs, answer, wrong, direction):
            frozen_names = _frozen_names(model, freeze)
            needed = sorted(set(grid.base_names) | set(frozen_names), key=lambda n: parse(n).order)
            source_cache = model.cache(source, needed + ["logits"])
            target_cache = model.cache(target, needed) if frozen_names else None
            target_run = TargetRun(model, target)
            source_logits = final_logits(model, source_cache)
            metric_fn = tally.metric(model, metric, ans, wro, source_logits, target_run.logits)
            # Step 1: each sender patched, everything else that could carry it frozen.
            rows = []
            for cell in grid.cells:
                sender = grid.edit(cell, source_cache)
                rows.append(Row([sender] + _freeze_edits(model, target_cache, frozen_names,
                                                         sender, receiver_sites)))
            run_rows(model, target_run, rows, chunks, bar, record=receiver_sites)
            # Step 2: only the receivers' values from step 1, into the target run. A row computed
            # positions from its first patched one on, and that is what it recorded; a receiver
            # below the row's first layer was not recorded, as it keeps its target value, and a
            # row with no receiver recorded scores the target run itself.
            target_metric = metric_fn(target_run.logits)[0].item()
            values = torch.full((len(rows),), target_metric)
            second, where = [], []
            for index, row in enumerate(rows):
                recorded = row.__dict__.get("recorded", {})
                positions = list(range(row.offset, target_run.n)) if row.offset else None
                edits = [Edit(site, positions, recorded[site.name]) for site in receiver_sites
                         if site.name in recorded]
                if edits:
                    second.append(Row(edits))
                    where.append(index)
            if second:
                values[where] = run_rows(model, target_run, second, chunks, bar, metric=metric_fn)
            if bar is not None:
                bar.update(len(rows) - len(second))
            tally.add(values, metric_fn(source_logits)[0].item(), target_metric)
    finally:
        if bar is not None:
            bar.close()
    values, meta = tally.finish(model, pairs, metric, answer, wrong, normalize, start_time)
    receiver_names = [str(r) for r in receiver_sites]
    meta["title"] = (f"path patching {', '.join(grid.patterns)} -> {', '.join(receiver_names[:4])}"
                     f"{' ...' if len(receiver_names) > 4 else ''} ({meta['metric']})")
    meta.update(method="path", senders=grid.patterns, receivers=receiver_names, freeze=freeze,
                scale=_scale(metric, normalize))
    return grid.result(values.reshape(grid.shape), meta)


class _Tally:
    """A sweep's values and baselines summed over prompt pairs, then averaged."""

    def __init__(self, size: int, direction: str):
        self.values = torch.zeros(size)
        self.direction = direction
        self.clean = self.corrupt = 0.0
        self.count = 0
        self.notes: list[str] = []

    def metric(self, model, metric, answer, wrong, source_logits, target_logits):
        """The pair's metric (kl needs the clean logits, which depend on the direction)."""
        clean_logits = source_logits if self.direction == "denoising" else target_logits
        made = metrics_module.make(model, metric, answer, wrong, clean_logits)
        self.notes += [note for note in made.notes if note not in self.notes]
        return made

    def add(self, values: torch.Tensor, source_metric: float, target_metric: float) -> None:
        if self.direction == "noising":
            source_metric, target_metric = target_metric, source_metric
        self.values += values
        self.clean += source_metric
        self.corrupt += target_metric
        self.count += 1

    def finish(self, model, pairs, metric, answer, wrong, normalize, start_time):
        """The averaged values (normalized if asked) and the meta every sweep shares."""
        values = self.values / self.count
        clean, corrupt = self.clean / self.count, self.corrupt / self.count
        if normalize:
            values = _normalized(values, clean, corrupt)
        meta = {
            "direction": self.direction,
            "metric": metric if isinstance(metric, str) else getattr(metric, "__name__", "custom"),
            "answer": answer, "wrong": wrong, "normalize": normalize,
            "clean": [p.names[0] for p in pairs], "corrupt": [p.names[1] for p in pairs],
            "clean_metric": clean, "corrupt_metric": corrupt, "n_pairs": self.count,
            "model": model.name, "seconds": round(time.perf_counter() - start_time, 3),
            "notes": self.notes,
        }
        return values, meta


def _runs(pairs, answer, wrong, direction):
    """`(pair, source, target, answer, wrong)` per pair, source and target set by the direction."""
    answers = per_pair(answer, len(pairs), "answer", error=PatchError)
    wrongs = per_pair(wrong, len(pairs), "wrong", error=PatchError)
    for pair, ans, wro in zip(pairs, answers, wrongs):
        source, target = (pair.clean, pair.corrupt) if direction == "denoising" else (pair.corrupt, pair.clean)
        yield pair, source, target, ans, wro


def _frozen_names(model, freeze: str) -> list[str]:
    names = []
    if freeze in ("heads", "all"):
        names += [f"head.{layer}" for layer in range(model.n_layers)]
    if freeze == "all":
        names += [f"mlp_out.{layer}" for layer in range(model.n_layers)]
    return names


def _freeze_edits(model, target_cache, frozen_names, sender: Edit, receivers) -> list[Edit]:
    """Edits holding every frozen component at its target value, except sender and receivers."""
    keep = [sender.site] + list(receivers)
    edits = []
    for name in frozen_names:
        site = parse(name)
        if site.layer < sender.site.layer:
            continue  # below the sender everything already equals the target run
        spared = [s for s in keep if s.kind == site.kind and s.layer == site.layer]
        if any(s.index is None for s in spared):
            continue
        if not spared:
            edits.append(Edit(site, None, target_cache[name]))
            continue
        for index in range(model.n_heads):
            if all(s.index != index for s in spared):
                one = Site(site.kind, site.layer, index)
                edits.append(Edit(one, None, target_cache[str(one)]))
    return edits


def _concrete(model, sites, what: str) -> list[Site]:
    patterns = list(sites) if isinstance(sites, (list, tuple)) else [sites]
    if not patterns:
        raise PatchError(f"path patching needs at least one of the {what}")
    return [Site(s.kind, s.layer, s.index) for p in patterns for s in parse(p).expand(model)]


def _scale(metric, normalize: bool) -> str:
    """How the values read: a probability or a divergence cannot be negative; the rest can."""
    return "positive" if metric in ("prob", "kl") and not normalize else "signed"


def _normalized(values: torch.Tensor, clean: float, corrupt: float) -> torch.Tensor:
    if abs(clean - corrupt) < 1e-9:
        raise PatchError(f"cannot normalize: the clean and corrupt metrics are equal ({clean:.4g}); "
                         "choose prompts or answers the model tells apart, or normalize=False")
    return (values - corrupt) / (clean - corrupt)
