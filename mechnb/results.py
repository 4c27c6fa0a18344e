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

    def __init__(self, values, df, meta: dict):
        self.values, self.df, self.meta = values, df, meta

    def __repr__(self) -> str:
        shape = "x".join(str(n) for n in self.values.shape)
        axes = ", ".join(self.meta.get("axes", []))
        return f"<mechnb.Result {self.meta.get('title', '')}: {shape} ({axes})>"

    def summary(self) -> str:
        """One line: what was measured and the extreme values."""
        values = self.values.float()
        where = ""
        if len(self.df):
            best = self.df["value"].abs().idxmax()
            where = ", ".join(f"{k}={self.df[k][best]}" for k in self.meta.get("axes", [])
                              if k in self.df.columns)
        text = f"{self.meta.get('title', 'result')}: min {values.min():.3g}, max {values.max():.3g}"
        if where:
            text += f"; largest |value| at {where}"
        return text

    def plot(self, ax=None):
        """A labelled heatmap (or bar chart for one axis); returns the figure."""
        from .viz import heatmap

        return heatmap(self.values, self.meta, ax=ax)

    def _ipython_display_(self) -> None:
        from IPython.display import display

        import matplotlib.pyplot as plt

        figure = self.plot()
        display(figure)
        plt.close(figure)
        for note in self.meta.get("notes", []):
            print("note:", note)
        print(self.summary())

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
