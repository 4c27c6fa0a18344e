"""The grid of a sweep: which cells (a concrete site, at some positions) a method measures,
and how its values become a labelled `Result`.

Patching, path patching and component attribution all answer one question per cell:
"what does this site, at these positions, do to the metric?". `Grid` expands the site
patterns (`head.*.*`, `resid_pre.*`, a list of patterns of one shape) into cells, names
the axes (`layer`, `head` or `neuron`, `pos`, or `site` when several patterns are
given), builds each cell's patch from a source run, and turns a tensor of values in
cell order into a `Result` with a tidy DataFrame and tick labels.

    >>> grid = Grid(model, "resid_pre.*", per_position=True, pair=pairs[0])
    >>> grid.shape                     # (30, 14): layer x position
    >>> grid.result(values.reshape(grid.shape), meta)

Positions: `per_position=True` sweeps every position separately (a `pos` axis), False
patches every position at once; None (the default of the methods) sweeps positions
for the residual stream (`embed`, `resid_*`, `attn_out`, `mlp_out`) and patches
components (`head`, `neuron`, `pattern`, `sae`) at every position at once, as
TransformerLens's `get_act_patch_resid_pre` and `get_act_patch_attn_head_out_all_pos`
do. A pattern with positions (`head.*.*@-1`) patches just those.
"""

from __future__ import annotations

import torch

from ..core.errors import PatchError
from ..core.runner import Edit
from ..core.sites import Site, parse, read_part
from ..display.results import Result

RESIDUAL = ("embed", "resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")


def patterns_of(sites) -> list:
    """Site patterns as a list (one pattern, or a list of them), each parsed as given."""
    patterns = list(sites) if isinstance(sites, (list, tuple)) else [sites]
    if not patterns:
        raise PatchError("patching needs at least one site pattern, e.g. 'resid_pre.*'")
    return patterns


def sweeps_positions(sites, per_position: bool | None) -> bool:
    """Whether a sweep of `sites` has a position axis (see the module docstring)."""
    parsed = [parse(p) for p in patterns_of(sites)]
    if any(site.positions is not None for site in parsed):
        return False
    if per_position is None:
        return all(site.kind in RESIDUAL for site in parsed)
    return bool(per_position)


class Grid:
    """The cells of a sweep (concrete site x positions) and how to label their values.

    Args:
        model: the `Model`.
        sites: a site pattern or a list of patterns of one grid shape.
        per_position: sweep positions (True), patch all at once (False), or decide by
            the sites' kind (None; see the module docstring).
        pair: the `mechnb.core.batch.Pair` whose tokens label the positions.
    """

    def __init__(self, model, sites, per_position: bool | None, pair):
        self.model = model
        parsed = [parse(p) for p in patterns_of(sites)]
        self.patterns = [str(p) for p in patterns_of(sites)]
        for site in parsed:
            if site.kind == "logits":
                raise PatchError("patching the logits replaces the answer itself: patch components")
        grids = [self._axes(site) for site in parsed]
        shapes = {tuple(len(v) for _, v in g) for g in grids}
        if len(shapes) > 1:
            raise PatchError(f"the site patterns {self.patterns} give grids of different shapes "
                             f"{sorted(shapes)}: patch them in separate calls")
        self.tokens = [c if c == d else f"{c}/{d}" for c, d in zip(pair.clean_tokens, pair.corrupt_tokens)]
        self.sweep_positions = sweeps_positions(sites, per_position)
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
                        positions = concrete.positions.resolve([pair.clean_tokens])[0].tolist()
                    self.cells.append((concrete, positions))
        self.base_names = sorted({Site(c.kind, c.layer).name for c, _ in self.cells},
                                 key=lambda n: parse(n).order)

    def _axes(self, site: Site) -> list[tuple[str, list]]:
        """The grid axes of one site pattern: layer, then head or neuron if indexed."""
        axes = []
        if site.layer is not None:
            axes.append(("layer", sorted({s.layer for s in Site(site.kind, site.layer).expand(self.model)})))
        if site.index is not None:
            name = {"head": "head", "pattern": "head", "sae": "feature", "tc": "feature"}.get(site.kind, "neuron")
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
        """A `Result` of values in cell order, shaped `self.shape`, with the axes labelled."""
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
