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

- `method="exact"` runs every patched forward, batched by `mechnb.runner` (layers
  below the patch and positions before it are reused from the recorded run).
- `method="attribution"` approximates every patch at once from one backward pass:
  metric(patched) ~ metric(target) + (source - target) . d metric / d value.
- `path_patch` measures a sender's effect through chosen receivers only (Wang et
  al. 2022): the sender is patched with every other head frozen to the target run,
  the receivers' values are recorded, and a second run patches just those in.

Pairs of prompts must tokenize to the same length (positions are compared one to
one); several pairs average the metric. Values are the metric of each patched run,
or with `normalize=True`, `(patched - corrupt) / (clean - corrupt)`: 1 means the
patch restores the clean behaviour, 0 that it does nothing.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch

from . import metrics as metrics_module
from .checks import as_list
from .errors import MechnbError
from .memory import Chunks, frozen_weights
from .results import Result
from .runner import Edit, Row, TargetRun, run_rows
from .sites import Site, parse
from .trace import read_part

DIRECTIONS = ("denoising", "noising")
METHODS = ("exact", "attribution")
FREEZE = ("heads", "all", "none")


class PatchError(MechnbError, ValueError):
    """Prompts, sites or options that a patching experiment cannot use."""


def patch(model, clean, corrupt, sites, answer=None, wrong=None, metric="logit_diff",
          per_position: bool = True, method: str = "exact", normalize: bool = False,
          batch_size: int | None = None, direction: str = "denoising", progress: bool = True) -> Result:
    """Patch each site from one run into the other; see `Model.patch` for the arguments."""
    start_time = time.perf_counter()
    if method not in METHODS:
        raise PatchError(f"unknown method {method!r}: use one of {', '.join(METHODS)}")
    if direction not in DIRECTIONS:
        raise PatchError(f"unknown direction {direction!r}: use one of {', '.join(DIRECTIONS)}")
    pairs = _pairs(model, clean, corrupt, per_position)
    grid = Grid(model, sites, per_position, pairs[0])
    tally = _Tally(grid.size, direction)
    chunks = Chunks(batch_size, "exact patching", "rows", advice="patch fewer sites or positions")
    bar = _progress(progress, grid.size * len(pairs), f"{method} patching")
    try:
        for source, target, ans, wro in _runs(pairs, answer, wrong, direction):
            source_cache = model.cache(source, grid.base_names + ["logits"])
            source_logits = source_cache["logits@-1"].float()
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
                # of every position needs to write only from there on.
                start = first_difference(model.tokens(source), model.tokens(target))
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
    meta.update(method=method, sites=grid.patterns)
    return grid.result(values.reshape(grid.shape), meta)


@contextmanager
def capturing(model, names):
    """Within the block, forwards keep the values of the base sites `names`, with their
    autograd history: a dict filled as the model runs. Gradients start at the embeddings,
    so they reach these values without accumulating in the weights' `.grad`."""
    from .arch import hook_value, locate, submodule

    captured: dict[str, torch.Tensor] = {}
    handles = []

    def keep(name):
        def store(value):
            captured[name] = value

        return store

    def leaf(module, args, output):
        return output if output.requires_grad else output.detach().requires_grad_()

    try:
        handles.append(submodule(model.hf, model.arch.embed).register_forward_hook(leaf))
        for name in names:
            path, io, _ = locate(model, parse(name))
            handles.append(hook_value(submodule(model.hf, path), io, keep(name)))
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def _attribution(model, grid: "Grid", source_cache, target: str):
    """Run the target once with gradients kept; returns its last logits and `effects(metric)`.

    `effects(metric)` backpropagates the metric and gives `(metric value, per-cell
    effect)`, the effect being `(source - target) . d metric / d value` summed over
    the cell.
    """
    from .batch import Batch
    from .interventions import Context

    batch = Batch.of(model.tokenizer, target)
    model._context = Context(batch.tokens)
    try:
        with capturing(model, grid.base_names) as captured, torch.enable_grad(), frozen_weights(model.hf):
            logits = model.hf(**batch.inputs(model.device), use_cache=False).logits[:, -1]
    finally:
        model._context = None

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


def path_patch(model, clean, corrupt, senders, receivers, answer=None, wrong=None,
               metric="logit_diff", normalize: bool = False, freeze: str = "heads",
               batch_size: int | None = None, direction: str = "denoising",
               progress: bool = True) -> Result:
    """The effect of each sender on the metric through the receivers only; see `Model.path_patch`."""
    start_time = time.perf_counter()
    if freeze not in FREEZE:
        raise PatchError(f"unknown freeze {freeze!r}: use one of {', '.join(FREEZE)}")
    if direction not in DIRECTIONS:
        raise PatchError(f"unknown direction {direction!r}: use one of {', '.join(DIRECTIONS)}")
    pairs = _pairs(model, clean, corrupt, per_position=False)
    grid = Grid(model, senders, False, pairs[0])
    receiver_sites = _concrete(model, receivers, "receivers")
    for site in receiver_sites:
        if site.kind in ("embed", "logits"):
            raise PatchError(f"{site} cannot be a receiver: name heads, patterns, attn_out, "
                             "mlp_out, neuron or resid sites")
    tally = _Tally(grid.size, direction)
    chunks = Chunks(batch_size, "path patching", "rows", advice="patch fewer senders or receivers")
    bar = _progress(progress, 2 * grid.size * len(pairs), "path patching")
    try:
        for source, target, ans, wro in _runs(pairs, answer, wrong, direction):
            frozen_names = _frozen_names(model, freeze)
            needed = sorted(set(grid.base_names) | set(frozen_names), key=lambda n: parse(n).order)
            source_cache = model.cache(source, needed + ["logits"])
            target_cache = model.cache(target, needed) if frozen_names else None
            target_run = TargetRun(model, target)
            source_logits = source_cache["logits@-1"].float()
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
    meta.update(method="path", senders=grid.patterns, receivers=receiver_names, freeze=freeze)
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
            "clean": [p[0] for p in pairs], "corrupt": [p[1] for p in pairs],
            "clean_metric": clean, "corrupt_metric": corrupt, "n_pairs": self.count,
            "model": model.name, "seconds": round(time.perf_counter() - start_time, 3),
            "notes": self.notes,
        }
        return values, meta


def _runs(pairs, answer, wrong, direction):
    """`(source, target, answer, wrong)` per pair, source and target set by the direction."""
    answers = _per_pair(answer, len(pairs), "answer")
    wrongs = _per_pair(wrong, len(pairs), "wrong")
    for (clean, corrupt, *_), ans, wro in zip(pairs, answers, wrongs):
        source, target = (clean, corrupt) if direction == "denoising" else (corrupt, clean)
        yield source, target, ans, wro


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


class Grid:
    """The cells of a sweep (concrete site x position) and how to label their values."""

    def __init__(self, model, sites, per_position: bool, pair):
        self.model = model
        patterns = list(sites) if isinstance(sites, (list, tuple)) else [sites]
        if not patterns:
            raise PatchError("patching needs at least one site pattern, e.g. 'resid_pre.*'")
        self.patterns = [str(p) for p in patterns]
        parsed = [parse(p) for p in patterns]
        for site in parsed:
            if site.kind == "logits":
                raise PatchError("patching the logits replaces the answer itself: patch components")
        grids = [self._axes(site) for site in parsed]
        shapes = {tuple(len(v) for _, v in g) for g in grids}
        if len(shapes) > 1:
            raise PatchError(f"the site patterns {self.patterns} give grids of different shapes "
                             f"{sorted(shapes)}: patch them in separate calls")
        clean_tokens, corrupt_tokens = pair[2], pair[3]
        self.tokens = [c if c == d else f"{c}/{d}" for c, d in zip(clean_tokens, corrupt_tokens)]
        self.sweep_positions = per_position and all(site.positions is None for site in parsed)
        self.axes = ([("site", self.patterns)] if len(parsed) > 1 else []) + grids[0]
        if self.sweep_positions:
            self.axes.append(("pos", list(range(len(self.tokens)))))
        self.cells = []
        for site in parsed:
            for concrete in site.expand(model):
                if self.sweep_positions:
                    self.cells += [(concrete, [p]) for p in range(len(self.tokens))]
                else:
                    positions = None
                    if concrete.positions is not None:
                        positions = concrete.positions.resolve([clean_tokens])[0].tolist()
                    self.cells.append((concrete, positions))
        self.base_names = sorted({Site(c.kind, c.layer).name for c, _ in self.cells},
                                 key=lambda n: parse(n).order)

    def _axes(self, site: Site) -> list[tuple[str, list]]:
        """The grid axes of one site pattern: layer, then head or neuron if indexed."""
        axes = []
        if site.layer is not None:
            axes.append(("layer", sorted({s.layer for s in Site(site.kind, site.layer).expand(self.model)})))
        if site.index is not None:
            name = "head" if site.kind in ("head", "pattern") else "neuron"
            axes.append((name, sorted({s.index for s in site.expand(self.model)})))
        return axes

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(len(values) for _, values in self.axes)

    @property
    def size(self) -> int:
        return len(self.cells)

    def edit(self, cell, source_cache, start: int = 0) -> Edit | None:
        """The edit that puts the source run's value into one cell, at positions from `start`
        on (where the source run can differ from the target); None if it has none there."""
        site, positions = cell
        site = Site(site.kind, site.layer, site.index)
        full = source_cache[site.base.name]
        if start:
            n = full.shape[2] if site.kind == "pattern" else full.shape[1]
            positions = [p for p in (range(n) if positions is None else positions) if p >= start]
            if not positions:
                return None
        index = None if positions is None else torch.tensor([positions])
        return Edit(site, positions, read_part(full, site, index))

    def attribution(self, cell, effects) -> torch.Tensor:
        """The summed attribution effect of one cell."""
        site, positions = cell
        site = Site(site.kind, site.layer, site.index)
        index = None if positions is None else torch.tensor([positions])
        return read_part(effects[site.base.name], site, index).sum()

    def result(self, values: torch.Tensor, meta: dict) -> Result:
        import itertools

        import pandas as pd

        names = [name for name, _ in self.axes]
        rows = []
        for index, value in zip(itertools.product(*(range(len(v)) for _, v in self.axes)),
                                values.flatten().tolist()):
            row = {name: self.axes[i][1][j] for i, (name, j) in enumerate(zip(names, index))}
            if "pos" in row:
                row["token"] = self.tokens[row["pos"]]
            row["value"] = value
            rows.append(row)
        columns = names + (["token"] if "pos" in names else []) + ["value"]
        labels = {name: [str(v) for v in vals] for name, vals in self.axes}
        if "pos" in labels:
            labels["pos"] = [f"{t!r}" for t in self.tokens]
        meta = {**meta, "axes": names, "labels": labels}
        return Result(values, pd.DataFrame(rows, columns=columns), meta)


def first_difference(tokens: list[str], others: list[str]) -> int:
    """The first position at which two prompts' tokens differ (their length if none does)."""
    return next((i for i, (a, b) in enumerate(zip(tokens, others)) if a != b), min(len(tokens), len(others)))


def _concrete(model, sites, what: str) -> list[Site]:
    patterns = list(sites) if isinstance(sites, (list, tuple)) else [sites]
    if not patterns:
        raise PatchError(f"path patching needs at least one of the {what}")
    return [Site(s.kind, s.layer, s.index) for p in patterns for s in parse(p).expand(model)]


def _pairs(model, clean, corrupt, per_position: bool) -> list[tuple]:
    """`(clean, corrupt, clean tokens, corrupt tokens)` per pair, checked for equal lengths."""
    cleans, corrupts = _prompt_list(clean, "clean"), _prompt_list(corrupt, "corrupt")
    if not cleans or not corrupts:
        raise PatchError("patching needs a clean and a corrupt prompt (or two lists of them)")
    if len(cleans) != len(corrupts):
        raise PatchError(f"{len(cleans)} clean prompts but {len(corrupts)} corrupt ones: give pairs")
    pairs = []
    for clean_prompt, corrupt_prompt in zip(cleans, corrupts):
        if not isinstance(clean_prompt, str) or not isinstance(corrupt_prompt, str) or not clean_prompt or not corrupt_prompt:
            raise PatchError(f"prompts must be non-empty strings, got the pair {clean_prompt!r:.40} and "
                             f"{corrupt_prompt!r:.40}")
        clean_tokens, corrupt_tokens = model.tokens(clean_prompt), model.tokens(corrupt_prompt)
        if len(clean_tokens) != len(corrupt_tokens):
            raise PatchError(
                f"the clean and corrupt prompts tokenize to different lengths ({len(clean_tokens)} "
                f"and {len(corrupt_tokens)}), so positions do not line up: clean {clean_tokens}, "
                f"corrupt {corrupt_tokens}. Reword one so that both have the same number of tokens")
        pairs.append((clean_prompt, corrupt_prompt, clean_tokens, corrupt_tokens))
    if per_position and len({len(p[2]) for p in pairs}) > 1:
        raise PatchError(f"per-position patching over several pairs needs one length, got lengths "
                         f"{[len(p[2]) for p in pairs]}: use per_position=False or pairs of one length")
    return pairs


def _prompt_list(value, role: str) -> list:
    """The clean or corrupt prompts as a list (a string is one prompt)."""
    if value is None:
        return []
    listed = as_list(value)  # any sequence of prompts (a list, a tuple, a pandas Series)
    if listed is not None:
        return listed
    raise PatchError(f"the {role} prompts must be a string or a list of strings, got "
                     f"{type(value).__name__} {value!r:.40}")


def _per_pair(value, n: int, what: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise PatchError(f"{len(value)} {what}s for {n} prompt pairs: give one per pair or one for all")
        return list(value)
    return [value] * n


def _normalized(values: torch.Tensor, clean: float, corrupt: float) -> torch.Tensor:
    if abs(clean - corrupt) < 1e-9:
        raise PatchError(f"cannot normalize: the clean and corrupt metrics are equal ({clean:.4g}); "
                         "choose prompts or answers the model tells apart, or normalize=False")
    return (values - corrupt) / (clean - corrupt)


def _progress(enabled: bool, total: int, what: str):
    """A tqdm bar that shows itself only for sweeps that take more than a couple of seconds."""
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=what, unit="run", delay=2, leave=False)
