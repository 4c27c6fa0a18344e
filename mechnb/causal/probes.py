"""Linear probes beside interventions: where a variable can be read, against where it is used.

A probe is a classifier trained to read a variable from a site's values. High probe accuracy
says the variable is decodable there, not that the model uses it: interventions say that.
`probe` gives held-out probe accuracy for the same sites an interchange sweeps, so the two
can be drawn together; where the probe stays high and IIA falls, the information is present
but not what the model acts on.

    >>> iia = model.interchange(data, "resid_post.*@'{name}'", variable="gender")
    >>> probes = mechnb.causal.probe(data, "resid_post.*@'{name}'", "gender", iia=iia)
    >>> probes.plot()           # probe accuracy (solid) and IIA (dashed) per layer

The probe is scikit-learn's logistic regression on standardised values, trained on the
bases of one part of the distinct inputs and scored on the rest (split by input, so that
no input is both trained on and scored). Labels are the variable's value in each base's
run of the causal model.
"""

from __future__ import annotations

import math
import random

import torch

from ..core.errors import CausalError
from .data import Counterfactuals, key


def probe(data, sites, variable, model=None, test: float = 0.3, seed: int = 0, iia=None, batch_size=None):
    """Held-out linear-probe accuracy of `variable` at each site.

    Args:
        data: a `mechnb.causal.Counterfactuals`; its bases are the probe's examples.
        sites: a site pattern or a list of them, as `model.interchange` takes.
        variable: any variable of the causal model (its value in each base's run is the label).
        model: the model (default: the one `data.filter(model)` kept the data for).
        test: the share of distinct bases held out to score the probe.
        seed: the seed of the split.
        iia: an `InterchangeResult` of the same sites, drawn beside the probes.
        batch_size: inputs per forward when collecting values.

    Returns:
        A `ProbeResult`: `.values` accuracy `layer position`; `.df` with `probe` (and `iia`,
        when given) per site; `.meta["chance"]` the majority class's share of the held-out
        bases; `.plot()`. Example: `mechnb.causal.probe(data, "resid_post.*@-1", "gender", iia=iia)`.
    """
    import pandas as pd
    from sklearn.linear_model import LogisticRegression

    from .data import _tokens
    from .data import resolve
    from .engine import cells, site_values
    from .results import ProbeResult, axes_of, grid

    if not isinstance(data, Counterfactuals):
        raise CausalError(f"probe takes a counterfactual dataset (mechnb.causal.Counterfactuals), got {type(data).__name__}")
    model = model if model is not None else data.model
    if model is None:
        raise CausalError("probe needs the model: pass model=..., or filter the data with it first (data.filter(model))")
    cm = data.causal_model
    if variable not in cm.values:
        raise CausalError(f"{variable!r} is not a variable of the causal model: its variables are {', '.join(cm.values)}")
    alignment = cells(model, sites, data.variables[0], data, None, None)
    rendered = data.rendered(model)
    tokens = _tokens(model, rendered)
    distinct = list(dict.fromkeys(rendered.of(e.base) for e in data.examples))
    by_index = {rendered.of(e.base): e.base for e in data.examples}
    labels = [cm.run(by_index[i])[variable] for i in distinct]
    if len(set(labels)) < 2:
        raise CausalError(f"every base has {variable} = {labels[0]!r}: a probe needs at least two values to tell apart")
    order = list(range(len(distinct)))
    random.Random(seed).shuffle(order)
    count = max(1, min(len(order) - 1, round(test * len(order))))
    held, kept = sorted(order[:count]), sorted(order[count:])
    wanted = {}
    for cell in alignment:
        _, site, _ = cell.parts[0]
        wanted[site] = dict(zip(distinct, resolve(site, tokens, rendered.fields, distinct)))
    values = site_values(model, rendered.inputs, wanted, batch_size)
    rows, columns = grid(alignment)
    accuracy = torch.full((len(rows), len(columns)), math.nan)
    records = []
    y = [labels[i] for i in range(len(distinct))]
    for cell in alignment:
        _, site, _ = cell.parts[0]
        x = torch.stack([values[site][i].reshape(-1).float().cpu() for i in distinct]).numpy()
        mean, std = x[kept].mean(0), x[kept].std(0) + 1e-6
        x = (x - mean) / std
        classifier = LogisticRegression(max_iter=2000)
        classifier.fit(x[kept], [y[i] for i in kept])
        score = float(classifier.score(x[held], [y[i] for i in held]))
        accuracy[rows.index(cell.row), columns.index(cell.column)] = score
        records.append({"site": cell.row, "position": cell.column, "probe": score})
    df = pd.DataFrame(records)
    if iia is not None:
        known = {(r.site, str(r.position)): r.iia for r in iia.df.itertuples()}
        df["iia"] = [known.get((r.site, str(r.position)), math.nan) for r in df.itertuples()]
    axes, tick_labels = axes_of(rows, columns)
    if axes[0] == "layer":
        df.insert(0, "layer", [int(tick_labels["layer"][rows.index(s)]) for s in df.site])
    held_labels = [y[i] for i in held]
    chance = max(held_labels.count(v) for v in set(held_labels)) / len(held_labels)
    meta = {"title": f"linear probes for {variable} ({len(kept)} bases trained, {len(held)} held out)"
                     + (" beside IIA" if iia is not None else ""),
            "axes": axes, "labels": tick_labels, "scale": "probability", "variable": variable,
            "chance": chance, "train": len(kept), "test": len(held), "model": model.name}
    return ProbeResult(accuracy, df, meta)
