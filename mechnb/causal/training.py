"""Training featurizers by interchange: DAS, Boundless DAS and DBM.

The full-vector sweep says where a variable lives; distributed alignment search (DAS, Geiger
et al. 2024) asks in which directions. It trains an orthonormal basis of k columns at one
site so that interchanging the base's and the source's coordinates in it makes the network
give the causal model's counterfactual output: the loss is cross-entropy of the base's
last-position logits against that output's answer, and only the basis learns.

    >>> das = model.das(data, "resid_post.4@'{name}'", variable="gender", k=1)
    >>> das.meta["iia"]                  # held-out IIA (20 % of the examples, seeded)
    >>> das.plot()                       # loss per step, held-out IIA per epoch

Kinds (`kind=`):
- `"das"`: a rank-k rotation (`mechnb.causal.Rotation`);
- `"boundless"`: a full rotation and a learned boundary; the first `boundary * width`
  rotated coordinates swap through a sigmoid whose temperature anneals from 50 to 0.1
  (Boundless DAS, Wu et al. 2023), the boundary's width in the loss (`penalty=1.0`);
- `"dbm"`: a differentiable binary mask over the site's units (`over="units"`) or an SAE's
  features (`over=sae`), annealed from temperature 1 to 0.01, its size in the loss
  (`penalty`, default 0: MIB's baselines train without it).

Why it is fast: the frozen model runs once over the training bases, without gradients, and
keeps every layer's input from the site's layer on (`mechnb.core.runner.TargetRun` with
`start=`); each step then runs only the layers above the site, from the first edited
position, with gradients to the featurizer alone (the weights are frozen for the block).
The sources' values at the site are computed once. An image classifier or a plain torch
module runs its rows whole.

Gotchas: the returned featurizer is in evaluation mode, where a boundary or mask is hard;
its `history` holds the loss of every step and the held-out IIA after each epoch.
"""

from __future__ import annotations

import math
import random
import time

import torch

from ..core.checks import is_int
from ..core.errors import CausalError
from ..core.sites import parse
from .data import Counterfactuals
from .featurizers import Boundless, Featurizer, Identity, Mask, Rotation, SAEFeatures

KINDS = ("das", "boundless", "dbm")
# Temperature schedules, first step to last: Boundless DAS's tutorial, and MIB's DBM.
SCHEDULES = {"boundless": (50.0, 0.1), "dbm": (1.0, 0.01)}


def das(model, data, site, variable=None, k: int = 1, kind: str = "das", epochs: int = 3, batch_size: int = 16,
        lr: float | None = None, test=0.2, seed: int = 0, over="units", penalty: float | None = None,
        compare: str = "values", progress: bool = True) -> Featurizer:
    """Train a featurizer at `site` by interchange interventions, and measure its held-out IIA.

    Args:
        data: a `mechnb.causal.Counterfactuals` (filtered: `data.filter(model)`).
        site: one site with its positions (`"resid_post.4@'{name}'"`, `"head.5.2@-1"`, a plain
            module's `"fc1.output"`).
        variable: the intervened variable to align (default: the data's one).
        k: the subspace's rank (`kind="das"`); at most the site's width.
        kind: `"das"`, `"boundless"` or `"dbm"` (see the module docstring).
        epochs, batch_size, lr: training (Adam; lr defaults to 0.01 for DAS and DBM, 0.001
            for the boundless rotation with 0.01 for its boundary).
        test: the held-out share (0-1) or count, or a `Counterfactuals` of its own.
        seed: the seed of the split, the initial basis and the batches' order.
        over: what `kind="dbm"` masks: `"units"` (the site's own coordinates) or an SAE
            reading the site (its features; the error term stays the base's).
        penalty: the weight of the boundary's width (boundless, default 1.0) or the mask's
            size (dbm, default 0) in the loss.
        compare: how held-out IIA reads the output (`"values"` or `"top1"`).
        progress: a progress bar over the steps.

    Returns:
        The trained featurizer, in evaluation mode: `.site`, `.variable`, `.meta["iia"]` (held
        out), `.history` (step, epoch, loss, iia), `.plot()`, `.save(dir)`; usable as
        `model.interchange(other_data, das)`. Example: `model.das(data, "resid_post.4@-1", k=1)`.
    """
    from ..core.memory import return_to_system
    from ..core.progress import progress as progress_bar
    from .answers import Answers, check_compare
    from .engine import check_site

    started = time.perf_counter()
    check_compare(compare)
    if kind not in KINDS:
        raise CausalError(f"unknown kind {kind!r}: use one of {', '.join(KINDS)}")
    if not isinstance(data, Counterfactuals):
        raise CausalError(f"das takes a counterfactual dataset (mechnb.causal.Counterfactuals), got {type(data).__name__}")
    names = data.variable(variable)
    if len(names) != 1:
        raise CausalError(f"these counterfactuals interchange {', '.join(names)}: name the one to align, variable=...")
    name = names[0]
    for value, what in ((epochs, "epochs"), (batch_size, "batch_size")):
        if not is_int(value) or value < 1:
            raise CausalError(f"{what} must be a positive int, got {value!r}")
    if isinstance(test, Counterfactuals):
        train, held = data, test
    else:
        if len(data) < 2:
            raise CausalError(f"das needs at least 2 examples to hold some out, got {len(data)}")
        train, held = data.split(test, seed)
    parsed = parse(site)
    expanded = parsed.expand(model)
    if len(expanded) != 1:
        raise CausalError(f"das trains at one site; {site} names {len(expanded)}: give one layer (and head)")
    concrete = check_site(model, expanded[0])
    answers = Answers(model, data.causal_model)
    prepared = _Prepared(model, train, name, concrete, answers)
    prepared_seconds = time.perf_counter() - started
    width = prepared.width
    featurizer = _make(kind, width, k, seed, over, concrete).to(model.device)
    if lr is None:
        lr = 1e-3 if kind == "boundless" else 1e-2
    groups = [{"params": [featurizer.weight], "lr": lr}] if kind != "dbm" else [{"params": [featurizer.logits],
                                                                                  "lr": lr}]
    if kind == "boundless":
        groups.append({"params": [featurizer.boundary], "lr": 1e-2})
    optimizer = torch.optim.Adam(groups)
    weight = (1.0 if kind == "boundless" else 0.0) if penalty is None else float(penalty)
    steps_per_epoch = math.ceil(len(train) / batch_size)
    total = steps_per_epoch * epochs
    schedule = SCHEDULES.get(kind)
    order = list(range(len(train)))
    shuffler = random.Random(seed)
    history = []
    bar = progress_bar(progress, total, f"training {kind}")
    step, training_seconds = 0, 0.0
    featurizer.train()
    try:
        for epoch in range(epochs):
            shuffler.shuffle(order)
            for begin in range(0, len(order), batch_size):
                chosen = order[begin:begin + batch_size]
                step_started = time.perf_counter()
                if schedule is not None:
                    featurizer.temperature = schedule[0] + (schedule[1] - schedule[0]) * step / max(total - 1, 1)
                logits = prepared.forward(featurizer, chosen)
                loss = torch.nn.functional.cross_entropy(logits, prepared.targets[chosen].to(logits.device))
                loss = loss + weight * featurizer.penalty().to(loss)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                training_seconds += time.perf_counter() - step_started
                history.append({"step": step, "epoch": epoch, "loss": float(loss.detach()), "iia": math.nan})
                step += 1
                if bar is not None:
                    bar.update(1)
            featurizer.eval()
            iia = _held_out(model, held, featurizer, concrete, parsed, name, compare)
            featurizer.train()
            history[-1]["iia"] = iia
    finally:
        if bar is not None:
            bar.close()
        featurizer.eval()
        del prepared
        return_to_system()
    import pandas as pd

    featurizer.site = str(replace_site(concrete, parsed))
    featurizer.variable = name
    featurizer.model_name = model.name
    featurizer.history = pd.DataFrame(history)
    featurizer.meta = {"iia": history[-1]["iia"], "kind": kind, "k": featurizer.n_features, "epochs": epochs,
                       "steps": step, "batch_size": batch_size, "lr": lr, "train": len(train), "test": len(held),
                       "seed": seed, "seconds": round(time.perf_counter() - started, 3),
                       "seconds_preparing": round(prepared_seconds, 3), "seconds_training": round(training_seconds, 3),
                       "seconds_per_step": round(training_seconds / max(step, 1), 5), "compare": compare}
    return featurizer


def replace_site(concrete, parsed):
    """The concrete site with the positions it was asked at."""
    from dataclasses import replace

    return replace(concrete, positions=parsed.positions, alias=None)


def _make(kind: str, width: int, k, seed: int, over, site) -> Featurizer:
    if kind == "das":
        if not is_int(k) or k < 1:
            raise CausalError(f"k, the rank of the subspace, must be a positive int, got {k!r}")
        if k > width:
            raise CausalError(f"k={k} is larger than {site.name}'s width, {width}: a subspace has at most {width} "
                              "dimensions")
        return Rotation(width, k, seed)
    if kind == "boundless":
        return Boundless(width, seed)
    if over == "units":
        return Mask(Identity(width))
    if hasattr(over, "encode") and hasattr(over, "d_sae"):
        if over.d_in != width:
            raise CausalError(f"the SAE reads width {over.d_in}, and {site} is {width} wide: use an SAE of this site")
        return Mask(SAEFeatures(over))
    raise CausalError(f"over must be 'units' or an SAE reading the site, got {over!r:.60}")


def _held_out(model, held, featurizer, concrete, parsed, name, compare) -> float:
    """IIA of `featurizer` at the site on the held-out examples."""
    from .engine import Cell, measure

    cell = Cell([(name, concrete, featurizer)], concrete.name, parsed.positions.text if parsed.positions else "all")
    measured = measure(model, held, [cell], compare, progress=False)
    return float((measured["predicted"] == measured["expected"]).float().mean())


class _Prepared:
    """The training examples made ready once: the bases' record from the site's layer on, the
    base and source values at the site, the positions and the answers."""

    def __init__(self, model, train, name, site, answers):
        from ..core.runner import Edit, TargetRun
        from .answers import batch_of
        from .data import _tokens, resolve
        from .engine import _at

        self.model, self.site = model, site
        rendered = train.rendered(model)
        tokens = _tokens(model, rendered)
        bases = [rendered.of(e.base) for e in train.examples]
        sources = [rendered.of(e.sources[name]) for e in train.examples]
        self.base_positions = resolve(site, tokens, rendered.fields, bases)
        source_positions = resolve(site, tokens, rendered.fields, sources)
        # One forward of the distinct inputs, without gradients: the record the steps start
        # from (from the site's layer on) and the site's values in bases and sources.
        recorded = list(dict.fromkeys(bases))
        distinct = list(dict.fromkeys(recorded + sources))
        where = {index: row for row, index in enumerate(distinct)}
        whole = model.is_plain or model.reads_images
        self.start = 0 if whole else Edit(site, None, None).start
        self.target = TargetRun(model, batch_of(model, [rendered.inputs[i] for i in distinct]), start=self.start,
                                sites=[site], recorded=len(recorded))
        full = self.target.values[site]
        self.base_values = [_at(full, site, where[b], p) for b, p in zip(bases, self.base_positions)]
        self.source_values = [_at(full, site, where[s], p) for s, p in zip(sources, source_positions)]
        for number, (b, s) in enumerate(zip(self.base_values, self.source_values)):
            if b.shape != s.shape:
                raise CausalError(f"{site} selects {b.shape[0]} positions in example {number}'s base and {s.shape[0]} "
                                  "in its source: positions must pair one to one")
        self.width = self.base_values[0].shape[-1]
        self.record_rows = [where[b] for b in bases]
        expected = [answers.index(v) for v in train.expected([name])]
        if model.is_plain:
            self.targets = torch.tensor(expected)
        else:
            self.targets = torch.tensor([answers.ids[i] for i in expected])

    def forward(self, featurizer, chosen: list[int]) -> torch.Tensor:
        """Logits `rows vocab` of the chosen examples, interchanged through `featurizer`, with
        gradients to it."""
        from ..core.runner import Edit, Row, _run_chunk, _run_whole

        device = self.model.device
        same = len({tuple(self.base_values[i].shape) for i in chosen}) == 1
        if same:
            new = featurizer.interchange(torch.stack([self.base_values[i] for i in chosen]).to(device),
                                         torch.stack([self.source_values[i] for i in chosen]).to(device))
        else:
            new = [featurizer.interchange(self.base_values[i].to(device), self.source_values[i].to(device))
                   for i in chosen]
        rows = [Row([Edit(self.site, self.base_positions[i], new[n][None])], base=self.record_rows[i])
                for n, i in enumerate(chosen)]
        if self.target.whole:
            return _run_whole(self.model, self.target, rows, 0, grad=True)
        # One forward for the batch: splitting it by edited position and prompt length computes
        # fewer positions but ran 1.7x slower (small matrices use the cores worse).
        return _run_chunk(self.model, self.target, rows, min(row.offset for row in rows), grad=True)
