"""Results: what every method returns. Values, a tidy DataFrame, meta, and a picture.

    >>> result = model.patch(clean, corrupt, "resid_pre.*", answer=" Mary", wrong=" John")
    >>> result.values.shape          # layer pos
    >>> result.df.head()             # layer, pos, token, value (one row per number)
    >>> result.meta["clean_metric"]
    >>> result                       # in a notebook: a labelled heatmap
    >>> result.save("ioi_resid")     # a directory: values.safetensors, meta.json, df.csv

`.values` is a tensor whose axes are named in `meta["axes"]`; `.df` has one row per
value with a column per axis; `.plot()` draws it (a matplotlib figure) and the
notebook display shows that figure and a one-line summary.
"""

from __future__ import annotations

import json
from pathlib import Path


class Result:
    """Values, a tidy DataFrame and meta of one method call (see the module docstring).

    Args:
        values: a tensor.
        df: a pandas DataFrame, one row per value.
        meta: a JSON-friendly dict; `axes` names the axes of `values`, `labels`
            maps an axis name to its tick labels, `title` titles the plot.
    """

    def __init__(self, values, df, meta: dict, html=None, rerun=None):
        self.values, self.df, self.meta = values, df, meta
        # A function of the result giving its HTML view (circuitsvis); None: a heatmap.
        self._html = html
        # A function of keyword changes (prompt=..., steps=...) giving the same method's
        # result with them: what `stability` compares against.
        self.rerun = rerun

    def __repr__(self) -> str:
        shape = "x".join(str(n) for n in self.values.shape)
        axes = ", ".join(self.meta.get("axes", []))
        return f"<mechnb.Result {self.meta.get('title', '')}: {shape} ({axes})>"

    def summary(self) -> str:
        """One line: what was measured and where its largest value is."""
        values = self.values.float()
        # NaN marks entries that do not apply (a head composing into an earlier one): not values.
        known = values[~values.isnan()]
        if not known.numel():
            return f"{self.meta.get('title', 'result')}: no values"
        text = f"{self.meta.get('title', 'result')}: min {known.min():.3g}, max {known.max():.3g}"
        axes = self.meta.get("axes", [])
        if len(axes) == values.dim():
            flat = int(values.abs().nan_to_num(nan=-1.0).flatten().argmax())
            where = []
            for axis, size in zip(reversed(axes), reversed(values.shape)):
                flat, index = divmod(flat, size)
                labels = self.meta.get("labels", {}).get(axis)
                where.append(f"{axis}={labels[index] if labels else index}")
            text += f"; largest |value| at {', '.join(reversed(where))}"
        return text

    def plot(self, ax=None):
        """A labelled heatmap (or bar chart for one axis); returns the figure."""
        from .viz import heatmap

        return heatmap(self.values, self.meta, ax=ax)

    def html(self) -> str:
        """The result's HTML view: its circuitsvis view, or the heatmap as an inline PNG."""
        if self._html is not None:
            return self._html(self)
        import base64

        return f'<img src="data:image/png;base64,{base64.b64encode(self.png()).decode()}"/>'

    def png(self) -> bytes:
        """The heatmap as PNG bytes."""
        from .viz import png

        return png(self.plot())

    def _repr_mimebundle_(self, include=None, exclude=None) -> dict:
        """Notebook display: the view or heatmap; a terminal gets the text summary."""
        text = "\n".join([self.summary(), *(f"note: {n}" for n in self.meta.get("notes", []))])
        bundle = {"text/plain": text}
        wanted = lambda kind: include is None or kind in include
        if self._html is not None and wanted("text/html"):
            bundle["text/html"] = self._html(self)
        elif self._html is None and wanted("image/png"):
            bundle["image/png"] = self.png()
        return bundle

    def stability(self, prompts=(), **settings) -> "Result":
        """Spearman rank correlation of these values with the same method's values on
        other `prompts` (paraphrases) and with other settings (`steps=[10, 40]`).

        Values must keep their shape: component attributions (`sites=`) compare across
        paraphrases, token attributions across settings. Returns a `Result` with one
        row per variation (`variation`, `spearman`) and the mean in `meta`.
        """
        import pandas as pd
        import torch

        from ..core.errors import ResultError

        if self.rerun is None:
            raise ResultError("this result cannot be recomputed: stability needs a result of "
                              "model.attribute")
        variations = [(f"prompt {p!r}", {"prompt": p}) for p in prompts]
        for key, values in settings.items():
            variations += [(f"{key} {v}", {key: v}) for v in values]
        if not variations:
            raise ResultError("give paraphrases (prompts=[...]) or settings to vary (steps=[10, 40])")
        rows = []
        for name, change in variations:
            other = self.rerun(**change)
            if other.values.shape != self.values.shape:
                raise ResultError(f"{name} gives values of shape {tuple(other.values.shape)}, not "
                                  f"{tuple(self.values.shape)}: paraphrases are compared on component "
                                  "attributions (sites=...), which keep their shape")
            rows.append({"variation": name, "spearman": _spearman(self.values, other.values)})
        df = pd.DataFrame(rows)
        meta = {"title": f"stability of {self.meta.get('title', 'the result')} (Spearman)",
                "mean": float(df.spearman.mean()), "axes": ["variation"],
                "labels": {"variation": df.variation.tolist()}}
        return Result(torch.tensor(df.spearman.tolist()), df, meta)

    def save(self, path) -> Path:
        """Write the result to a directory: values (safetensors), meta (JSON), df (CSV)."""
        from safetensors.torch import save_file

        directory = Path(path)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({"values": self.values.detach().cpu().contiguous()}, str(directory / "values.safetensors"))
        (directory / "meta.json").write_text(json.dumps(self.meta, indent=1, default=str))
        self.df.to_csv(directory / "df.csv", index=False)
        return directory

    @classmethod
    def load(cls, path) -> "Result":
        """Read a result written by `save`."""
        import pandas as pd
        from safetensors.torch import load_file

        directory = Path(path)
        values = load_file(str(directory / "values.safetensors"))["values"]
        meta = json.loads((directory / "meta.json").read_text())
        return cls(values, pd.read_csv(directory / "df.csv"), meta)


def _spearman(a, b) -> float:
    """Spearman's rank correlation of two tensors of one shape (flattened)."""
    import torch

    def ranks(x):
        x = x.detach().float().flatten()
        return torch.argsort(torch.argsort(x)).float()

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()).clamp(min=1e-12))
