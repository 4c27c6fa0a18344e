"""A scored circuit: edges (or nodes) with scores, the top of them, and proof by patching.

    >>> circ = model.circuit(clean, corrupt, answers, wrongs, method="eap-ig")
    >>> circ.df.head(20)              # edge, upstream, downstream, input, score
    >>> small = circ.top(0.02)        # the top 2 % of edges, pruned to paths embed -> logits
    >>> small.plot()                  # layered graph: embeddings at the bottom, logits on top
    >>> circ.faithfulness()           # f per fraction of edges kept, CPR and CMD
    >>> circ.save("ioi.json"); Circuit.load("ioi.json", model)

Faithfulness (as the MIB benchmark measures it): keep the top fraction of edges, run
the clean prompts with every other edge carrying its corrupt value (the reader's input
is its input in that run minus `(that run's - corrupt)` output of each removed writer;
Gemma's heads at that run's frozen norm scale, see `mechnb.circuits.engine`), and
report `f = (m(C) - m(empty)) / (m(N) - m(empty))`, where N is the full model on the
clean prompts and "empty" keeps no edge (it equals the corrupt run).
CPR is the area under f over the fraction of edges kept (higher: a small circuit
already does the task); CMD the area between f and 1 (lower: closer to the model).
MIB ranks edges by signed scores for CPR and by absolute scores for CMD
(`absolute=`). The x axis counts edges left after pruning, over all edges.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from ..core.checks import is_int
from ..display.results import Result
from ..display.viz import title
from ..core.errors import CircuitError
from ..core.progress import progress as progress_bar
from .task import Task
from .graph import Graph

FRACTIONS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


class Circuit:
    """Scores over a model's graph, and the part of it kept (see the module docstring).

    `scores` is `upstream downstream` (NaN where no edge) at edge level, `upstream`
    (writers: embed, heads, MLPs) at node level.
    """

    def __init__(self, graph: Graph, scores: torch.Tensor, meta: dict, model=None, task: Task | None = None,
                 kept: torch.Tensor | None = None):
        self.graph, self.scores, self.meta = graph, scores, meta
        self.model, self.task = model, task
        self.level = meta["level"]
        self.kept = kept if kept is not None else self._all()

    # -- what it holds ---------------------------------------------------------------

    def _all(self) -> torch.Tensor:
        if self.level == "edge":
            return self.graph.valid.clone()
        return torch.ones(self.graph.n_upstream, dtype=torch.bool)

    @property
    def n_items(self) -> int:
        """How many edges (or nodes: heads and MLPs) the graph has."""
        return self.graph.n_edges if self.level == "edge" else self.graph.n_upstream - 1

    @property
    def n_kept(self) -> int:
        return int(self.kept.sum()) - (1 if self.level == "node" else 0)

    def _items(self) -> list[tuple[int, int | None]]:
        """`(u, v)` per edge, or `(node, None)` per scored node, in graph order."""
        if self.level == "node":
            return [(u, None) for u in range(1, self.graph.n_upstream)]
        return [tuple(pair) for pair in self.graph.valid.nonzero().tolist()]

    def _flat(self) -> torch.Tensor:
        if self.level == "node":
            return self.scores[1:]
        return self.scores[self.graph.valid]

    @property
    def df(self):
        """One row per kept edge (or node), largest |score| first."""
        import pandas as pd

        graph = self.graph
        if self.level == "node":
            nodes = self.kept[1:].nonzero().flatten() + 1
            df = pd.DataFrame({"node": [graph.upstream[u] for u in nodes.tolist()],
                               "score": self.scores[nodes].tolist()}, columns=["node", "score"])
        else:
            u, v = (self.kept & graph.valid).nonzero(as_tuple=True)
            upstream = [graph.upstream[i] for i in u.tolist()]
            readers = [graph.downstream[j].partition(":") for j in v.tolist()]
            df = pd.DataFrame({"edge": [f"{a} -> {b}{c}{k}" for a, (b, c, k) in zip(upstream, readers)],
                               "upstream": upstream, "downstream": [b for b, _, _ in readers],
                               "input": [k or None for _, _, k in readers], "score": self.scores[u, v].tolist()},
                              columns=["edge", "upstream", "downstream", "input", "score"])
        if len(df):
            df = df.reindex(df["score"].abs().sort_values(ascending=False).index).reset_index(drop=True)
        return df

    def __repr__(self) -> str:
        what = "edges" if self.level == "edge" else "nodes"
        return (f"<mechnb.Circuit {self.meta.get('method')} {self.level}s: {self.n_kept} of {self.n_items} "
                f"{what} kept, {self.meta.get('n_pairs')} prompt pairs>")

    # -- choosing --------------------------------------------------------------------

    def _ranked(self, absolute: bool) -> torch.Tensor:
        flat = self._flat().nan_to_num()
        key = flat.abs() if absolute else flat
        return torch.argsort(key, descending=True, stable=True)

    def _mask(self, count: int, absolute: bool) -> torch.Tensor:
        """The kept mask of the top `count` items (edges pruned to embed -> logits paths)."""
        chosen = self._ranked(absolute)[:count]
        if self.level == "node":
            kept = torch.zeros(self.graph.n_upstream, dtype=torch.bool)
            kept[0] = True
            kept[chosen + 1] = True
            return kept
        items = self.graph.valid.nonzero()
        kept = torch.zeros_like(self.graph.valid)
        kept[items[chosen, 0], items[chosen, 1]] = True
        return self.graph.prune(kept)

    def top(self, n, absolute: bool = True) -> "Circuit":
        """The circuit of the top `n` edges (or nodes) by |score| (`absolute=False`: by
        score); a float below 1 is a fraction of all of them, and `"2%"` a percentage.
        Edges off every path from the embeddings to the logits are pruned."""
        count = self._count(n)
        return Circuit(self.graph, self.scores, self.meta, self.model, self.task, self._mask(count, absolute))

    def _count(self, n) -> int:
        if isinstance(n, str) and n.endswith("%"):
            try:
                n = float(n[:-1]) / 100
            except ValueError:
                raise CircuitError(f"cannot read {n!r} as a percentage: write e.g. '2%'") from None
            if not 0 <= n <= 1:
                raise CircuitError(f"a percentage of the circuit lies in 0%-100%, got {n * 100:g}%")
        if isinstance(n, bool) or not isinstance(n, (int, float)) or n < 0 or (isinstance(n, float) and n > 1):
            raise CircuitError(f"top() takes a count (int >= 0), a fraction (float in [0, 1]) or a "
                               f"percentage ('2%'), got {n!r}")
        return int(n * self.n_items) if isinstance(n, float) else min(int(n), self.n_items)

    def randomized(self, seed: int = 0) -> "Circuit":
        """The same graph with random scores: the baseline every method must beat."""
        generator = torch.Generator().manual_seed(seed)
        scores = torch.randn(self.scores.shape, generator=generator)
        if self.level == "edge":
            scores = scores.masked_fill(~self.graph.valid, float("nan"))
        meta = {**self.meta, "method": "random", "seed": seed}
        return Circuit(self.graph, scores, meta, self.model, self.task)

    # -- proof -----------------------------------------------------------------------

    def faithfulness(self, fractions=FRACTIONS, absolute: bool = True, batch_size: int = 16,
                     progress: bool = True) -> Result:
        """f = (m(C) - m(empty)) / (m(N) - m(empty)) for the top fraction of items.

        Args:
            fractions: fractions of edges (or nodes) kept, increasing, in (0, 1].
            absolute: rank by |score| (MIB's CMD) or by signed score (MIB's CPR).
            batch_size: prompt pairs per patched forward; a chunk that runs out of
                memory is halved and run again (`mechnb.core.memory`).
            progress: a progress bar when it takes more than two seconds.

        Returns:
            A `Result`: `.values` is f per fraction; `.df` has `fraction`, `kept`
            (items after pruning), `metric`, `faithfulness`; `.meta` has `cpr`, `cmd`,
            `full_metric` m(N) and `empty_metric` m(empty). It plots as a curve.

        m(N) is the task's clean run and, for edges, m(empty) its corrupt run (a patched
        run with no edge removed, or every one, equals them; a node circuit keeps the
        embeddings, so its empty circuit is run). Each other circuit is one patched run.
        """
        from .engine import patched_logits, writer_outputs

        if self.task is None or self.model is None:
            raise CircuitError("this circuit has no model to run: load it with Circuit.load(path, model)")
        try:
            fractions = [float(f) for f in fractions]
        except (TypeError, ValueError):
            raise CircuitError(f"fractions must be a list of numbers increasing within (0, 1], got "
                               f"{fractions!r}") from None
        if not fractions or any(not 0 < f <= 1 for f in fractions) or fractions != sorted(fractions):
            raise CircuitError(f"fractions must increase within (0, 1], got {fractions}")
        masks = [self._mask(int(f * self.n_items), absolute) for f in fractions]
        masks.append(self._mask(0, absolute))
        removed = [self._removed(mask) for mask in masks]
        task, graph, model = self.task, self.graph, self.model
        # Masks that need no patched run: none removed is the clean run and every edge
        # removed the corrupt one (each reader then reads the corrupt run's writers); a
        # mask seen before (two fractions pruned to the same circuit) is run once.
        metrics = torch.empty(len(masks))
        runs: list[torch.Tensor] = []
        slots: list[int] = []
        for mask in removed:
            if not mask.any():
                slots.append(-1)
            elif torch.equal(mask, graph.valid):
                slots.append(-2)
            else:
                same = [i for i, seen in enumerate(runs) if torch.equal(seen, mask)]
                slots.append(same[0] if same else len(runs))
                if not same:
                    runs.append(mask)
        totals = torch.zeros(len(runs))
        bar = progress_bar(progress and bool(runs), len(runs) * len(task), "faithfulness")
        def chunk_totals(rows, clean, corrupt):
            corrupt_outputs = writer_outputs(model, graph, corrupt)
            return torch.tensor([task.metric(patched_logits(model, graph, clean, corrupt_outputs, mask), rows)
                                 .sum().item() for mask in runs])

        try:
            for rows, part in task.chunks(chunk_totals, batch_size, "faithfulness") if runs else ():
                totals += part
                if bar is not None:
                    bar.update(len(rows) * len(runs))
        finally:
            if bar is not None:
                bar.close()
        known = {-1: task.clean_metric, -2: task.corrupt_metric}
        for index, slot in enumerate(slots):
            metrics[index] = known[slot] if slot < 0 else totals[slot] / len(task)
        full, empty = task.clean_metric, metrics[-1].item()
        if abs(full - empty) <= 1e-6 * max(1.0, abs(full)):
            raise CircuitError(
                f"the metric is the same with every edge and with none ({full:.6g}): faithfulness "
                "divides by their difference. Choose prompts, answers or a metric the corrupt "
                "prompts change")
        f = (metrics[:-1] - empty) / (full - empty)
        kept = [int(mask.sum()) - (1 if self.level == "node" else 0) for mask in masks[:-1]]
        x = [k / self.n_items for k in kept]
        cpr = sum((x[i + 1] - x[i]) * (f[i] + f[i + 1]).item() / 2 for i in range(len(x) - 1))
        cmd = sum((x[i + 1] - x[i]) * ((1 - f[i]).abs() + (1 - f[i + 1]).abs()).item() / 2
                  for i in range(len(x) - 1))
        import pandas as pd

        df = pd.DataFrame({"fraction": fractions, "kept": kept, "metric": metrics[:-1].tolist(),
                           "faithfulness": f.tolist()})
        meta = {"title": f"faithfulness of {self.meta['method']} {self.level}s "
                         f"({'|score|' if absolute else 'score'} ranking): CPR {cpr:.3f}, CMD {cmd:.3f}",
                "axes": ["fraction"], "labels": {"fraction": [f"{v:g}" for v in fractions]},
                "cpr": cpr, "cmd": cmd, "full_metric": full, "empty_metric": empty,
                "corrupt_metric": task.corrupt_metric, "absolute": absolute, "x": x,
                "method": self.meta["method"], "level": self.level, "n_pairs": len(task),
                "clean": task.clean, "corrupt": task.corrupt}
        return _Curve(f, df, meta)

    def stability(self, n_resamples: int = 5, top=0.01, steps=None, seed: int = 0) -> Result:
        """How much the top of the ranking moves when the evidence changes.

        Jaccard overlap of the top `top` items (a count, fraction or percentage as in
        `top()`, by |score|) between this circuit and the same method run on
        `n_resamples` bootstrap resamples of the prompt pairs (seeded), and, for
        `eap-ig`, with other numbers of integration `steps` (default half and double).
        Returns a `Result` with one row per variation (`variation`, `jaccard`); its
        meta holds the mean over resamples and over steps.
        """
        import random

        import pandas as pd

        if self.task is None or self.model is None:
            raise CircuitError("this circuit has no model to run: load it with Circuit.load(path, model)")
        if self.meta["method"] in ("random",):
            raise CircuitError("a random ranking has no method to rerun")
        if not is_int(n_resamples) or n_resamples < 0:
            raise CircuitError(f"n_resamples must be a non-negative integer, got {n_resamples!r}")
        count = max(1, self._count(top))
        reference = self._mask(count, True) if self.level == "node" else self._top_items(count)
        task, rows = self.task, []
        settings = dict(method=self.meta["method"], level=self.level, metric=task.metric_name,
                        steps=self.meta.get("steps") or 5)
        generator = random.Random(seed)
        for r in range(n_resamples):
            picks = [generator.randrange(len(task)) for _ in range(len(task))]
            other = self.model.circuit([task.clean[i] for i in picks], [task.corrupt[i] for i in picks],
                                       [task.answers[i] for i in picks], [task.wrongs[i] for i in picks],
                                       **settings)
            rows.append({"variation": f"resample {r}", "jaccard": _jaccard(reference, other, count, self.level)})
        if self.meta["method"] == "eap-ig":
            base = settings["steps"]
            for value in steps if steps is not None else sorted({max(1, base // 2), base * 2}):
                other = self.model.circuit(task.clean, task.corrupt, task.answers, task.wrongs,
                                           **{**settings, "steps": value})
                rows.append({"variation": f"steps {value}", "jaccard": _jaccard(reference, other, count, self.level)})
        df = pd.DataFrame(rows, columns=["variation", "jaccard"])
        resampled = df[df.variation.str.startswith("resample")].jaccard
        stepped = df[df.variation.str.startswith("steps")].jaccard
        meta = {"title": f"stability of the top {count} {self.level}s of {self.meta['method']} (Jaccard)",
                "scale": "probability",
                "top": count, "resample_mean": float(resampled.mean()) if len(resampled) else None,
                "steps_mean": float(stepped.mean()) if len(stepped) else None,
                "axes": ["variation"], "labels": {"variation": df.variation.tolist()}}
        return Result(torch.tensor(df.jaccard.tolist()), df, meta)

    def quality(self, fractions=(0.01, 0.1, 1.0), n_resamples: int = 3, top=0.01):
        """Fidelity and stability side by side: faithfulness (CPR, CMD, f at each
        fraction) and the Jaccard stability of the top items, one row."""
        import pandas as pd

        curve = self.faithfulness(fractions, progress=False)
        stable = self.stability(n_resamples=n_resamples, top=top)
        row = {"method": self.meta["method"], "level": self.level, "pairs": len(self.task),
               "CPR": curve.meta["cpr"], "CMD": curve.meta["cmd"]}
        row.update({f"f at {f:g}": v for f, v in zip(fractions, curve.values.tolist())})
        row.update({"stability (resamples)": stable.meta["resample_mean"],
                    "stability (steps)": stable.meta["steps_mean"]})
        return pd.DataFrame([row])

    def _top_items(self, count: int) -> set:
        """The top `count` items by |score|, unpruned: what a ranking puts first."""
        return set(self._ranked(True)[:count].tolist())

    def _removed(self, kept: torch.Tensor) -> torch.Tensor:
        """`upstream downstream` bool: the edges that carry corrupt values."""
        valid = self.graph.valid
        if self.level == "edge":
            return valid & ~kept
        return valid & ~kept[:, None]

    # -- pictures and files -------------------------------------------------------------

    def plot(self, max_edges: int = 60, ax=None):
        """The kept edges as a layered graph (at most `max_edges`, largest |score| first);
        embeddings at the bottom, logits at the top, width by |score|, colour by the input
        read (query, key, value, MLP, logits), dashed where the score is negative."""
        import matplotlib.pyplot as plt

        graph = self.graph
        if self.level == "node":
            return self._plot_nodes(ax)
        df = self.df.head(max_edges)
        if ax is None:
            # A notebook column: at most 9 x 8 inches, whatever the model's size.
            figure, ax = plt.subplots(figsize=(min(3 + 0.6 * (graph.n_heads + 2), 9), min(2.5 + 0.2 * graph.n_layers, 8)))
        else:
            figure = ax.figure
        centre = graph.n_heads / 2

        def writer_at(name):
            if name == "embed":
                return centre, -1.0
            kind, layer, *head = name.split(".")
            return (int(head[0]), int(layer)) if kind == "head" else (graph.n_heads + 0.8, int(layer) + 0.45)

        def reader_at(name, kind):
            if name == "logits":
                return centre, float(graph.n_layers)
            x, y = writer_at(name)
            return (x + {"q": -0.22, "k": 0.0, "v": 0.22}[kind], y - 0.12) if kind else (x, y - 0.12)

        colours = {"q": "tab:green", "k": "tab:purple", "v": "tab:orange", None: "tab:blue"}
        largest = float(df["score"].abs().max()) if len(df) else 1.0
        used = set()
        for row in df.itertuples():
            kind = row.input if isinstance(row.input, str) else None
            x0, y0 = writer_at(row.upstream)
            x1, y1 = reader_at(row.downstream, kind)
            colour = "tab:red" if row.downstream == "logits" else colours[kind]
            ax.plot([x0, x1], [y0, y1], color=colour, alpha=0.75,
                    linewidth=0.5 + 4 * abs(row.score) / (largest or 1.0),
                    linestyle="-" if row.score >= 0 else "--")
            used.update([row.upstream, row.downstream])
        for name in used:
            x, y = reader_at(name, None) if name == "logits" else writer_at(name)
            label = {"embed": "embed", "logits": "logits"}.get(name) or (
                f"{name.split('.')[1]}.{name.split('.')[2]}" if name.startswith("head") else f"MLP {name.split('.')[1]}")
            ax.annotate(label, (x, y), fontsize=6.5, ha="center", va="center", zorder=4,
                        bbox=dict(boxstyle="round,pad=0.15", facecolor="white", edgecolor="0.3", linewidth=0.6))
        for kind, colour in (("query", "tab:green"), ("key", "tab:purple"), ("value", "tab:orange"),
                             ("MLP input", "tab:blue"), ("logits", "tab:red")):
            ax.plot([], [], color=colour, label=kind)
        ax.legend(loc="upper left", fontsize=7, frameon=False)
        ax.set_xlim(-1, graph.n_heads + 1.8)
        ax.set_ylim(-1.6, graph.n_layers + 0.6)
        ax.set_xlabel("head (MLP on the right)")
        ax.set_ylabel("layer")
        ax.set_title(title({**self.meta, "title": f"{self.meta['method']} circuit: {len(df)} of {self.n_kept} "
                                                   "kept edges shown (width: |score|, dashed: negative)"}),
                     fontsize=8)
        figure.tight_layout()
        return figure

    def _plot_nodes(self, ax=None):
        """Node scores as a layer x (heads, MLP) heatmap, kept nodes outlined."""
        from ..display.viz import heatmap

        graph = self.graph
        grid = torch.full((graph.n_layers, graph.n_heads + 1), float("nan"))
        for layer in range(graph.n_layers):
            first = graph.head(layer, 0)
            grid[layer] = self.scores[first:first + graph.n_heads + 1]
        meta = {"axes": ["layer", "node"], "title": f"{self.meta['method']} node scores", "scale": "signed",
                "clean": self.meta.get("clean"), "corrupt": self.meta.get("corrupt"),
                "labels": {"layer": [str(i) for i in range(graph.n_layers)],
                           "node": [f"H{h}" for h in range(graph.n_heads)] + ["MLP"]}}
        return heatmap(grid.nan_to_num(), meta, ax=ax)

    def _repr_mimebundle_(self, include=None, exclude=None) -> dict:
        import base64
        import html

        from ..display.viz import png

        text = repr(self)
        image = base64.b64encode(png(self.plot())).decode()
        table = self.df.head(10).to_html(index=False, float_format=lambda v: f"{v:.4g}")
        return {"text/plain": text,
                "text/html": f"<div><b>{html.escape(text)}</b><br/><img src='data:image/png;base64,{image}'/>"
                             f"{table}</div>"}

    def save(self, path) -> Path:
        """Write the circuit as JSON: graph shape, scores, the kept part, meta."""
        path = Path(path)
        values = self._flat() if self.level == "edge" else self.scores
        flat = [None if math.isnan(v) else v for v in values.tolist()]
        kept = (self.kept.nonzero().tolist() if self.level == "edge" else self.kept.nonzero().flatten().tolist())
        data = {"format": "mechnb.circuit", "version": 1,
                "graph": {"n_layers": self.graph.n_layers, "n_heads": self.graph.n_heads,
                          "parallel": self.graph.parallel},
                "level": self.level, "scores": flat, "kept": kept, "meta": self.meta}
        path.write_text(json.dumps(data, default=str))
        return path

    @classmethod
    def load(cls, path, model=None) -> "Circuit":
        """Read a circuit written by `save`; with `model`, it can measure faithfulness again."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as error:
            raise CircuitError(f"cannot read a circuit from {str(path)!r}: {error}") from None
        if not isinstance(data, dict) or data.get("format") != "mechnb.circuit":
            raise CircuitError(f"{str(path)!r} is not a circuit saved by Circuit.save")
        graph = Graph(**data["graph"])
        meta = data["meta"]
        flat = torch.tensor([float("nan") if v is None else v for v in data["scores"]])
        if data["level"] == "edge":
            scores = torch.full((graph.n_upstream, graph.n_downstream), float("nan"))
            scores[graph.valid] = flat
            kept = torch.zeros_like(graph.valid)
            for u, v in data["kept"]:
                kept[u, v] = True
        else:
            scores = flat
            kept = torch.zeros(graph.n_upstream, dtype=torch.bool)
            kept[data["kept"]] = True
        task = None
        if model is not None:
            if Graph.of(model) != graph:
                raise CircuitError(f"the circuit was found on a model of {graph.n_layers} layers x "
                                   f"{graph.n_heads} heads; this model has {model.n_layers} x {model.n_heads}")
            if meta.get("metric") != "custom":
                def answer(value):
                    return set(value) if isinstance(value, list) else value

                task = Task(model, meta["clean"], meta["corrupt"], [answer(a) for a in meta["answer"]],
                            [answer(w) for w in meta["wrong"]], meta["metric"])
        return cls(graph, scores, meta, model=model, task=task, kept=kept)


def _jaccard(reference, other: "Circuit", count: int, level: str) -> float:
    if level == "node":
        mine = set(reference.nonzero().flatten().tolist()) - {0}
        theirs = set(other._mask(count, True).nonzero().flatten().tolist()) - {0}
    else:
        mine, theirs = reference, other._top_items(count)
    return len(mine & theirs) / max(len(mine | theirs), 1)


class _Curve(Result):
    """A faithfulness curve: f against the fraction of edges kept."""

    def plot(self, ax=None):
        import matplotlib.pyplot as plt

        if ax is None:
            figure, ax = plt.subplots(figsize=(6, 3.6))
        else:
            figure = ax.figure
        x = [max(v, 1e-4) for v in self.meta["x"]]
        ax.plot(x, self.values.tolist(), marker="o")
        ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
        ax.axhline(0.0, color="grey", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("fraction of edges kept" if self.meta["level"] == "edge" else "fraction of nodes kept")
        ax.set_ylabel("faithfulness f")
        ax.set_title(title(self.meta), fontsize=8)
        figure.tight_layout()
        return figure
