"""What causal abstraction returns: IIA grids with their examples, and probe accuracies.

`InterchangeResult` is a `Result` (`.values`, `.df`, `.meta`, `.plot()`, `.save()`) whose
values are interchange intervention accuracies, one row per site and one column per
position pattern, drawn as a heatmap with the variable in its title; it also keeps every
example's outcome, so that `iia.examples("resid_post.4@'{name}'")` shows the base, the
source, what the causal model expected and what the intervened model said.

    >>> iia = model.interchange(data, "resid_post.*@-1", variable="gender")
    >>> iia.best                   # ('resid_post.3', '-1', 1.0): the first site with the highest IIA
    >>> iia.examples("resid_post.3@-1").query("not correct")

`ProbeResult` holds linear-probe accuracy per site (`mechnb.causal.probe`) and, given the
IIA of the same sites, draws both: where a probe decodes a variable that interventions show
the model does not use, the two lines part.
"""

from __future__ import annotations

import math

import torch

from ..core.errors import CausalError
from ..display.results import Result


def grid(alignment) -> tuple[list[str], list[str]]:
    """The distinct rows (sites) and columns (position patterns) of cells, in order."""
    rows = list(dict.fromkeys(cell.row for cell in alignment))
    columns = list(dict.fromkeys(cell.column for cell in alignment))
    return rows, columns


def axes_of(rows: list[str], columns: list[str]) -> tuple[list[str], dict]:
    """Axis names and tick labels: `layer` when the rows are one kind of site over layers."""
    from ..core.sites import parse

    parsed = []
    for row in rows:
        try:
            parsed.append(parse(row))
        except Exception:
            parsed = None
            break
    by_layer = parsed and len({p.kind for p in parsed}) == 1 and all(
        isinstance(p.layer, int) and p.path is None for p in parsed) and \
        len({(p.layer, p.index) for p in parsed}) == len(parsed) and len({p.index for p in parsed}) == 1
    first = "layer" if by_layer else "site"
    labels = {first: [str(p.layer) for p in parsed] if by_layer else rows,
              "position": [column if column == "all" else f"@{column}" for column in columns]}
    return [first, "position"], labels


class InterchangeResult(Result):
    """IIA per site and position, and each example's outcome (see the module docstring)."""

    def __init__(self, values, df, meta, table):
        super().__init__(values, df, meta)
        self.table = table

    @classmethod
    def of(cls, model, data, alignment, measured: dict, compare: str, unchanged: list, seconds: float):
        import pandas as pd

        rows, columns = grid(alignment)
        values = torch.full((len(rows), len(columns)), math.nan)
        predicted, expected = measured["predicted"], measured["expected"]
        correct = (predicted == expected).float()
        records = []
        for number, cell in enumerate(alignment):
            iia = float(correct[number].mean())
            values[rows.index(cell.row), columns.index(cell.column)] = iia
            featurizer = measured["featurizers"][number][0]
            records.append({"site": cell.row, "position": cell.column, "iia": iia, "n": correct.shape[1],
                            "featurizer": featurizer.describe()})
        df = pd.DataFrame(records)
        axes, labels = axes_of(rows, columns)
        if axes[0] == "layer":
            df.insert(0, "layer", [int(labels["layer"][rows.index(r)]) for r in df.site])
        variables = sorted({name for cell in alignment for name, _, _ in cell.parts})
        kinds = sorted({f.describe().split(" (")[0] for per in measured["featurizers"] for f in per})
        meta = {"title": f"IIA of {', '.join(variables)} ({', '.join(kinds)}; {len(data)} examples)",
                "axes": axes, "labels": labels, "scale": "probability", "variable": variables,
                "output": data.causal_model.output, "compare": compare, "n_examples": len(data),
                "unchanged": len(unchanged), "seconds": round(seconds, 3),
                "seconds_recording": measured["seconds"]["recording"], "seconds_rows": measured["seconds"]["rows"],
                "model": model.name}
        if values.numel() <= 400:
            meta["annotations"] = [[("" if math.isnan(v) else f"{v:.2f}") for v in row] for row in values.tolist()]
        table = _table(data, alignment, predicted, expected)
        return cls(values, df, meta, table)

    @property
    def best(self) -> tuple:
        """`(site, position, iia)` of the first alignment with the highest IIA."""
        row = self.df.iloc[int(self.df.iia.values.argmax())]
        return row.site, row.position, float(row.iia)

    def examples(self, site=None, position=None):
        """Each example's outcome (`example`, `site`, `position`, `base`, `source`, `expected`,
        `got`, `correct`), for one alignment (`"resid_post.4@-1"`, or site and position apart)
        or all of them."""
        table = self.table
        if site is not None:
            text = str(site)
            if position is None and "@" in text:
                text, position = text.split("@", 1)
            table = table[table.site == text]
            if table.empty:
                raise CausalError(f"no alignment at {site}: this result has {', '.join(dict.fromkeys(self.table.site))}")
        if position is not None:
            table = table[table.position == str(position)]
        return table.reset_index(drop=True)


def _table(data, alignment, predicted, expected):
    """Every (alignment, example) outcome as a DataFrame."""
    import pandas as pd

    cm = data.causal_model
    values = cm.values[cm.output]
    shown = [{name: _text(example.sources[name]) for name in data.variables} for example in data.examples]
    bases = [_text(example.base) for example in data.examples]
    records = []
    for number, cell in enumerate(alignment):
        names = [name for name, _, _ in cell.parts]
        for example in range(len(data.examples)):
            got = int(predicted[number, example])
            records.append({"example": example, "site": cell.row, "position": cell.column, "base": bases[example],
                            "source": "; ".join(shown[example][name] for name in names),
                            "expected": values[int(expected[number, example])],
                            "got": values[got] if got >= 0 else None,
                            "correct": got == int(expected[number, example])})
    return pd.DataFrame(records)


def _text(setting: dict) -> str:
    return ", ".join(f"{name}={value!r}" for name, value in setting.items())


class ProbeResult(Result):
    """Linear-probe accuracy per site and position, beside the IIA of the same sites if given."""

    def plot(self, ax=None):
        """Probe accuracy per site (solid) and, where known, IIA (dashed), one colour per position."""
        from .views import probe_figure

        return probe_figure(self, ax=ax)
