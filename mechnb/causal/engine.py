"""The interchange engine: interchange interventions on every example and site, batched.

An interchange intervention runs the network on a base input with the value of one site
(through a featurizer: all of it, a subspace, some SAE features) taken from its run on a
source input, and asks whether the output is what the causal model says it should be. The
share of examples where it is, is the interchange intervention accuracy (IIA) of that
alignment: 1 says the site carries the variable, in that featurizer's coordinates.

    >>> iia = model.interchange(data, ["resid_post.*@'{name}'", "resid_post.*@-1"], variable="gender")
    >>> iia.values.shape          # layer position: IIA per layer, at the name and at the last token
    >>> iia.examples("resid_post.4@'{name}'")   # base, source, expected, got, per example

How it runs, and why it is fast:
- every distinct input (a base or a source; names repeat) runs once, and its values at every
  site and position any alignment needs are kept (`site_values`): nothing runs a source
  through the whole model again for each site;
- the bases are recorded once (`mechnb.core.runner.TargetRun` of a batch), and every
  (site, example) is a row of the patching engine: it starts at the site's layer from the
  base's record, and computes only the positions from the edited one on (earlier keys and
  values come from the record);
- the featurizer's interchange is computed for all examples of a site at once, before the
  run, so each row is a plain edit of the base's value.

Positions resolve per example, for the base and the source separately (`resolve`): a
two-token name moves the source's `@'{name}'` and `@-1` on by one. Predictions read each
row's last-position logits at the output values' answer tokens (`compare="values"`) or the
whole vocabulary (`"top1"`; see `mechnb.causal.data`). Image classifiers and plain torch
modules run their rows whole (no positions to skip), batched.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, replace

import torch

from ..core.errors import CausalError, CounterfactualWarning, SiteError
from ..core.sites import Site, parse, read_part
from .answers import Answers, batch_of, check_compare, forward_pass
from .data import Counterfactuals, resolve
from .featurizers import Featurizer, Identity, PCA, SAEFeatures

# Examples per record of bases: the record holds every layer's residual for each distinct base.
RECORD_EXAMPLES = 256


# -- sites, positions and their values ---------------------------------------------------------

def check_site(model, site: Site) -> Site:
    """`site`, checked as a place an interchange can act on (a vector at each position)."""
    if site.kind in ("pattern", "logits"):
        raise CausalError(f"{site}: an interchange swaps a vector the model computes at a position; use resid_*, "
                          "attn_out, mlp_out, head.L.H, neuron.L or a module path")
    if site.kind == "head" and site.index is None:
        raise CausalError(f"{site} is every head at once; name one head, head.{site.layer}.H (or use attn_out.{site.layer})")
    if site.kind in ("neuron", "sae", "tc") and site.index is not None:
        raise CausalError(f"{site} is one number at each position; interchange neuron.{site.layer} with "
                          "featurizer=Identity(width, features=[...]) to swap some units")
    if site.kind in ("sae", "tc"):
        raise CausalError(f"{site}: swap SAE features at the SAE's own site with featurizer=sae (SAEFeatures)")
    return site


def site_values(model, inputs: list, wanted: dict, batch_size=None) -> dict:
    """The values of each site at its positions in each input it needs: `wanted` maps a concrete
    site to `{input index: positions (or None)}`; returns the same keys, each input's value
    `n_pos width` (a plain module's whole value: `1 width`), on the model's device."""
    from ..core.engine import run
    from ..core.memory import Chunks

    needed = sorted({index for per_site in wanted.values() for index in per_site})
    found = {site: {} for site in wanted}
    chunks = Chunks(batch_size, "interchange values", "inputs")
    plain = [replace(site, positions=None) for site in wanted]

    def collect(rows):
        indices = [needed[r] for r in rows]
        batch = batch_of(model, [inputs[i] for i in indices])
        kept = {}
        with run(model, batch.tokens) as forward:
            for site, bare in zip(wanted, plain):
                def keep(full, site=site, bare=bare):
                    part = read_part(full, bare, None)
                    for row, index in enumerate(indices):
                        if index not in wanted[site]:
                            continue
                        positions = wanted[site][index]
                        value = part[row] if positions is None else part[row, positions]
                        kept[(site, index)] = (value[None] if positions is None else value).detach()
                forward.hook_site(bare, keep)
            forward_pass(model, batch, False)
        return kept

    for _, kept in chunks.run(collect, range(len(needed)), default=128):
        for (site, index), value in kept.items():
            found[site][index] = value
    return found


# -- alignments -------------------------------------------------------------------------------

@dataclass
class Cell:
    """One alignment: the sites an interchange edits at once (variable, site, featurizer) and
    where its IIA goes in the result (`row`, `column`)."""

    parts: list
    row: str
    column: str


def cells(model, sites, variable, data: Counterfactuals, featurizer, k) -> list[Cell]:
    """The alignments `sites` names (patterns, a trained featurizer, or {variable: site})."""
    if isinstance(sites, Featurizer):
        return [_trained_cell(model, sites, variable, data)]
    if isinstance(sites, dict):
        parts = []
        for name, where in sites.items():
            data.variable(name)
            if isinstance(where, Featurizer):
                parts += _trained_cell(model, where, name, data).parts
                continue
            own = featurizer
            if isinstance(where, tuple) and len(where) == 2:
                where, own = where
            expanded = parse(where).expand(model)
            if len(expanded) != 1:
                raise CausalError(f"{where} names {len(expanded)} sites: a multi-variable alignment names one "
                                  "site per variable")
            parts.append((name, check_site(model, expanded[0]), _featurizer(own, k, model, expanded[0])))
        return [Cell(parts, " + ".join(str(site) for _, site, _ in parts), "all")]
    patterns = [sites] if isinstance(sites, (str, Site)) else list(sites or [])
    if not patterns:
        raise CausalError("interchange needs sites, e.g. 'resid_post.*@-1', a list of them, a trained featurizer, "
                          "or {variable: site}")
    names = data.variable(variable)
    if len(names) != 1:
        raise CausalError(f"these counterfactuals interchange {', '.join(names)}: say which variable the sites "
                          "align with, variable=..., or give {variable: site} for a joint interchange")
    made = []
    for pattern in patterns:
        parsed = parse(pattern)
        column = parsed.positions.text if parsed.positions else "all"
        for site in parsed.expand(model):
            made.append(Cell([(names[0], check_site(model, site), _featurizer(featurizer, k, model, site))],
                             site.name, column))
    return made


def _trained_cell(model, trained: Featurizer, variable, data) -> Cell:
    """The cell of a trained or loaded featurizer, which knows its site and variable."""
    if not trained.site:
        raise CausalError("this featurizer has no site: give the sites, model.interchange(data, 'resid_post.4@-1', "
                          "featurizer=f)")
    check_model(model, trained)
    name = variable or trained.variable or data.variable(None)[0]
    data.variable(name)
    site = parse(trained.site)
    expanded = site.expand(model)
    if len(expanded) != 1:
        raise CausalError(f"the featurizer's site {trained.site} names {len(expanded)} sites: it acts at one")
    column = site.positions.text if site.positions else "all"
    return Cell([(name, check_site(model, expanded[0]), trained)], expanded[0].name, column)


def check_model(model, trained: Featurizer) -> None:
    """A `CausalError` when a saved featurizer was made for another model."""
    from ..core.hub import same_model

    if trained.model_name and not same_model(trained.model_name, model.name):
        raise CausalError(f"this featurizer was trained on {trained.model_name}, not {model.name}: train one on "
                          "this model (model.das), or set featurizer.model_name = None to use it anyway")


def _featurizer(featurizer, k, model=None, site=None):
    """A per-cell featurizer maker from the `featurizer` argument (fitted once values are known)."""
    if featurizer is None or featurizer == "full":
        return "full"
    if featurizer == "sae":
        attached = [sae for sae in model.saes if sae.site and parse(sae.site).name == site.name]
        if not attached:
            where = ", ".join(f"{sae.name} at {sae.site}" for sae in model.saes) or "none"
            raise CausalError(f"featurizer='sae' swaps the features of the SAE attached at {site.name}, and none is "
                              f"(attached: {where}): model.attach(sae) first, or pass featurizer=sae")
        return SAEFeatures(attached[0])
    if featurizer == "pca":
        from ..core.checks import is_int

        if not is_int(k) or k < 1:
            raise CausalError(f"featurizer='pca' needs k, the number of components, a positive int; got {k!r}")
        return ("pca", k)
    if isinstance(featurizer, Featurizer):
        return featurizer
    if hasattr(featurizer, "encode") and hasattr(featurizer, "decode") and hasattr(featurizer, "d_sae"):
        return SAEFeatures(featurizer)
    raise CausalError(f"unknown featurizer {featurizer!r:.60}: use 'full', 'pca' (with k=), 'sae' (the attached one), "
                      "an SAE, or a featurizer (mechnb.causal.Identity, Subspace, SAEFeatures, a trained one)")


def realise(spec, site: Site, base_values: torch.Tensor, device) -> Featurizer:
    """The featurizer of a cell given its spec and the bases' values there (`n width`)."""
    width = base_values.shape[-1]
    if spec == "full":
        made = Identity(width)
    elif isinstance(spec, tuple):
        if spec[1] > width:
            raise CausalError(f"k={spec[1]} is larger than {site.name}'s width, {width}: give k of at most {width}")
        made = PCA.fit(base_values, spec[1])
    else:
        made = spec
        if made.site and parse(made.site).name != site.name:
            raise CausalError(f"this featurizer was trained at {made.site}, not {site.name}: use it at its own site "
                              "(model.interchange(data, featurizer)), or set featurizer.site = None to try it here")
        if made.width != width:
            raise CausalError(f"the featurizer reads values of width {made.width}, and {site.name} is {width} wide here: "
                              "use one made for this site")
    return made.to(device)


# -- the sweep --------------------------------------------------------------------------------

def measure(model, data: Counterfactuals, alignment: list[Cell], compare: str = "values", batch_size=None,
            progress: bool = True) -> dict:
    """Predictions of every alignment on every example: `{"predicted": cells x examples` output
    value indices (-1: none of them), `"expected"`: the same shape, `"featurizers"`: each cell's,
    `"seconds"`: recording the inputs and running the rows}`."""
    from ..core.memory import Chunks, return_to_system
    from ..core.progress import progress as progress_bar
    from ..core.runner import Edit, Row, TargetRun, run_rows
    from .data import _tokens

    check_compare(compare)
    answers = Answers(model, data.causal_model)
    rendered = data.rendered(model)
    tokens = _tokens(model, rendered)
    examples = data.examples
    bases = [rendered.of(e.base) for e in examples]
    sources = {name: [rendered.of(e.sources[name]) for e in examples] for name in data.variables}
    # Where each site is read in each input that needs it: bases, and the sources of its variables.
    sites = list(dict.fromkeys(site for cell in alignment for _, site, _ in cell.parts))
    positions = {}
    for site in sites:
        needed = list(dict.fromkeys(bases + [i for cell in alignment for name, part, _ in cell.parts
                                             if part == site for i in sources[name]]))
        positions[site] = dict(zip(needed, resolve(site, tokens, rendered.fields, needed)))
    fitted = _fit_pca(model, alignment, rendered, positions, bases, batch_size)
    featurizers = [[None] * len(cell.parts) for cell in alignment]
    expected = torch.stack([torch.tensor([answers.index(v) for v in data.expected([n for n, _, _ in cell.parts])])
                            for cell in alignment])
    predicted = torch.full((len(alignment), len(examples)), -1, dtype=torch.long)
    # 256 rows a forward by default: as fast as 512 on two cores, with 0.1 GiB less at the peak.
    chunks = Chunks(batch_size or 256, "interchange", "rows", advice="interchange fewer sites or examples")
    bar = progress_bar(progress, len(alignment) * len(examples), "interchange")
    whole = model.is_plain or model.reads_images
    start = 0 if whole else min(Edit(site, None, None).start for site in sites)
    device = model.device
    seconds = {"recording": 0.0, "rows": 0.0}  # where a sweep's time goes
    try:
        for begin in range(0, len(examples), RECORD_EXAMPLES):
            chunk = list(range(begin, min(len(examples), begin + RECORD_EXAMPLES)))
            # One forward of the chunk's distinct inputs records the bases for the rows and keeps
            # every site's value: no source runs twice, none runs past what it is needed for.
            recorded = list(dict.fromkeys(bases[i] for i in chunk))
            distinct = list(dict.fromkeys(recorded + [s[i] for s in sources.values() for i in chunk]))
            where = {index: row for row, index in enumerate(distinct)}
            # Each site's values are cut to the positions read as the forward makes them: the
            # whole values of every site for every input would be most of a sweep's memory. The
            # sources run in the same forward, but only the bases (first) are recorded.
            clock = time.perf_counter()
            target = TargetRun(model, batch_of(model, [rendered.inputs[i] for i in distinct]), start=start,
                               sites={site: _positions_of(site, distinct, positions[site]) for site in sites},
                               recorded=len(recorded))
            seconds["recording"] += time.perf_counter() - clock

            def value(site, index):
                return target.values[site][where[index]]

            rows, slots = [], []
            for number, cell in enumerate(alignment):
                edits = {}  # site -> values per example, each interchange acting on what the one before left
                for part, (name, site, spec) in enumerate(cell.parts):
                    current = edits.get(site) or [value(site, bases[i]) for i in chunk]
                    others = [value(site, sources[name][i]) for i in chunk]
                    _check_pairs(site, current, others, chunk)
                    if featurizers[number][part] is None:
                        featurizers[number][part] = fitted.get((number, part)) or realise(spec, site, current[0], device)
                    edits[site] = _interchange(featurizers[number][part], current, others, device)
                for offset, example in enumerate(chunk):
                    made = [Edit(site, positions[site][bases[example]], new[offset][None])
                            for site, new in edits.items()]
                    rows.append(Row(made, base=where[bases[example]]))
                    slots.append((number, example))
            clock = time.perf_counter()
            if compare == "values" and not whole:  # only the answers' logits are computed
                got = run_rows(model, target, rows, chunks, bar, ids=answers.ids,
                               metric=lambda logits: logits.argmax(-1))
            else:
                got = run_rows(model, target, rows, chunks, bar, metric=lambda logits: answers.predict(logits, compare))
            seconds["rows"] += time.perf_counter() - clock
            for (number, example), found in zip(slots, got.tolist()):
                predicted[number, example] = found
            del target, rows
    finally:
        if bar is not None:
            bar.close()
        return_to_system()  # the record and the rows' values are free: the process keeps none of it
    return {"predicted": predicted, "expected": expected, "featurizers": featurizers,
            "seconds": {key: round(value, 3) for key, value in seconds.items()}}


def _positions_of(site: Site, inputs: list, positions: dict):
    """A function of a site's whole value over `inputs` (rows in that order) giving each
    input's value at its positions (`_at`), where it has any."""
    def take(full):
        return [_at(full, site, row, positions[index]).clone() if index in positions else None
                for row, index in enumerate(inputs)]
    return take


def _at(full: torch.Tensor, site: Site, row: int, positions) -> torch.Tensor:
    """One input's value of a site at its positions (`n_pos width`; a plain module's `1 width`)."""
    part = read_part(full[row:row + 1], replace(site, positions=None), None)[0]
    return part[None] if positions is None else part[positions]


def _check_pairs(site, bases: list, sources: list, examples: list) -> None:
    for number, b, s in zip(examples, bases, sources):
        if b.shape != s.shape:
            raise CausalError(f"{site} selects {b.shape[0]} positions in example {number}'s base and "
                              f"{s.shape[0]} in its source: positions must pair one to one")


def _interchange(featurizer, bases: list, sources: list, device) -> list:
    """The featurizer's interchange of each base value with its source's, as a list."""
    with torch.no_grad():
        if len({tuple(v.shape) for v in bases}) == 1:
            return list(featurizer.interchange(torch.stack(bases).to(device), torch.stack(sources).to(device)))
        return [featurizer.interchange(b.to(device), s.to(device)) for b, s in zip(bases, sources)]


def _fit_pca(model, alignment, rendered, positions, bases, batch_size) -> dict:
    """PCA featurizers fitted on every base's values at their sites (a pass of its own)."""
    wanted = {}
    for cell in alignment:
        for name, site, spec in cell.parts:
            if isinstance(spec, tuple):
                wanted[site] = {index: positions[site][index] for index in dict.fromkeys(bases)}
    if not wanted:
        return {}
    values = site_values(model, rendered.inputs, wanted, batch_size)
    fitted = {}
    for number, cell in enumerate(alignment):
        for part, (name, site, spec) in enumerate(cell.parts):
            if isinstance(spec, tuple):
                fitted[number, part] = realise(spec, site, torch.cat([values[site][b] for b in bases]), model.device)
    return fitted


def interchange(model, data, sites, variable=None, featurizer=None, k: int | None = None, compare: str = "values",
                batch_size: int | None = None, progress: bool = True):
    """Interchange intervention accuracy (IIA) of aligning `variable` with each site.

    Args:
        data: a `mechnb.causal.Counterfactuals` (filter it first: `data.filter(model)`).
        sites: a site pattern or a list of them (`"resid_post.*@'{name}'"`: every layer at the
            last token of template field `name`; `@-1`; `head.5.2@-1`; a plain module's
            `fc1.output`); a trained or loaded featurizer (it knows its site); or
            `{variable: site}` to interchange several variables at once, each from its own source.
        variable: the intervened variable the sites align with (default: the data's one).
        featurizer: what is swapped at each site: `"full"` (the default: the whole vector),
            `"pca"` (the top `k` principal components of the bases' values there), `"sae"`
            (the features of the SAE attached at the site) or an SAE (the error term stays
            the base's), or a featurizer (`mechnb.causal.Identity(width, features=[...])`,
            `Subspace(basis)`, a trained one; one trained at another site is refused).
        k: components for `featurizer="pca"`.
        compare: `"values"` (the largest logit among the output's answers) or `"top1"`.
        batch_size: rows per batched forward (default 256); a chunk that runs out of memory is
            halved and run again.
        progress: a progress bar for sweeps longer than two seconds.

    Returns:
        An `InterchangeResult`: `.values` IIA `layer position` (one row per site, one column per
        position pattern), `.df`, `.examples(site)` (base, source, expected, got per example),
        `.plot()` the heatmap. Example: `model.interchange(data, "resid_post.*@-1", variable="gender")`.
    """
    from .results import InterchangeResult

    started = time.perf_counter()
    if not isinstance(data, Counterfactuals):
        raise CausalError(f"interchange takes a counterfactual dataset (mechnb.causal.Counterfactuals, from "
                          f"cm.counterfactuals(...)), got {type(data).__name__}")
    if not len(data):
        raise CausalError("the counterfactual dataset is empty: make more examples, or filter less")
    alignment = cells(model, sites, variable, data, featurizer, k)
    variables = sorted({name for cell in alignment for name, _, _ in cell.parts})
    unchanged = data.unchanged(variables)
    if unchanged:
        warnings.warn(f"{len(unchanged)} of {len(data)} examples change nothing under the interchange of "
                      f"{', '.join(variables)} (their expected output is the base's own): IIA counts them; "
                      "make data with changes=True to leave them out", CounterfactualWarning, stacklevel=3)
    measured = measure(model, data, alignment, compare, batch_size, progress)
    return InterchangeResult.of(model, data, alignment, measured, compare, unchanged,
                                time.perf_counter() - started)
