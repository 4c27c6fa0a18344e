"""The live attribution graph: the pruned graph drawn in the cell, selections back in Python,
and interventions on the selection computed on the real model in the same kernel.

    >>> w = graph.widget(contexts=python_docs("eval"))   # or labels={"tc.14.1203": "Paris"}
    >>> w                                                # draw it; click nodes to select them
    >>> w.selected                                       # ['tc.14.1203@9', ...]
    >>> w.ablate()                                       # the selection zeroed in the real model
    >>> w.scale(2.0)                                     # or multiplied

The view is an anywidget module shipped in the package (`graph_view.js`): layers bottom to
top, positions left to right, edge width by |weight| and colour by sign. Hover a node for
its label and top contexts; click to select; shift-click groups the selection into a
supernode named by the box beside the graph (`w.supernodes`; `w.group(name, nodes)` from Python). The buttons ablate or scale the selection: the transcoders are
attached for that run (if they are not already), the selected feature sites (`tc.L.F@P`)
and token embeddings (`embed@P`) are changed, and the panel shows the target logit's
probability and logit before and after and the new top tokens. Error and logit nodes are
not intervened on (the panel says which were skipped). The model is left as it was.
"""

from __future__ import annotations

import functools
import html
from pathlib import Path

from ..core.errors import GraphError


@functools.cache
def _view_class():
    import anywidget
    import traitlets

    class GraphView(anywidget.AnyWidget):
        """The drawing (see `graph_view.js`); `selected` and `supernodes` sync both ways."""

        _esm = (Path(__file__).with_name("graph_view.js")).read_text()
        data = traitlets.Dict().tag(sync=True)
        selected = traitlets.List(traitlets.Unicode()).tag(sync=True)
        supernodes = traitlets.Dict().tag(sync=True)

    return GraphView


class GraphWidget:
    """The live view of an `AttributionGraph` (see the module docstring).

    Attributes: `view` (the drawing), `last` (the last intervention's figures: action,
    sites, skipped, target, p_before, p_after, logit_before, logit_after, top_after),
    `result` (the panel under the buttons).
    """

    def __init__(self, graph, labels: dict | None = None, contexts=None, max_edges: int = 1500, k: int = 5):
        import ipywidgets as widgets

        from ..core.checks import is_int

        if labels is not None and not isinstance(labels, dict):
            raise GraphError(f"labels map feature sites ('tc.14.1203') or node names to text; got "
                             f"{type(labels).__name__}")
        if not is_int(max_edges) or max_edges < 1:
            raise GraphError(f"max_edges must be a positive int, got {max_edges!r}")
        self.graph, self.k, self.last = graph, k, None
        self.view = _view_class()(data=view_data(graph, labels or {}, contexts, max_edges))
        self.factor = widgets.FloatText(value=2.0, description="factor", layout=widgets.Layout(width="160px"))
        self.ablate_button = widgets.Button(description="ablate selection")
        self.scale_button = widgets.Button(description="scale selection")
        self.clear_button = widgets.Button(description="clear selection")
        self.ablate_button.on_click(lambda _: self._run("ablate"))
        self.scale_button.on_click(lambda _: self._run("scale"))
        self.clear_button.on_click(lambda _: setattr(self, "selected", []))
        self.result = widgets.HTML(self._describe(None))
        self.result.add_class("mechnb-graph-result")
        self.box = widgets.VBox([self.view, widgets.HBox([self.ablate_button, self.scale_button, self.factor,
                                                         self.clear_button]), self.result])

    # -- what is selected -------------------------------------------------------------------

    @property
    def selected(self) -> list[str]:
        """The selected nodes' names (clicked in the view, or set here)."""
        return list(self.view.selected)

    @selected.setter
    def selected(self, names) -> None:
        known = {node["name"] for node in self.view.data["nodes"]}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise GraphError(f"{unknown[0]!r} is not a node of the drawn graph: nodes are named as in "
                             f"graph.df.node, e.g. {next(iter(known))!r}")
        self.view.selected = list(names)

    @property
    def supernodes(self) -> dict:
        """Named groups of nodes (shift-click in the view): name -> node names."""
        return dict(self.view.supernodes)

    def group(self, name: str, nodes=None) -> dict:
        """Make a supernode `name` of the selected (or given) nodes, as shift-click does; the supernodes."""
        if not isinstance(name, str) or not name.strip():
            raise GraphError(f"a supernode's name is a non-empty string, got {name!r}")
        members = self.selected if nodes is None else list(nodes)
        self.selected = members  # checks the names
        self.view.supernodes = {**self.view.supernodes, name: members}
        self.view.selected = []
        return self.supernodes

    # -- interventions on the real model ------------------------------------------------------

    def ablate(self, nodes=None) -> dict:
        """Zero the selected (or given) feature and embedding nodes in the real model; the figures."""
        return self._run("ablate", nodes)

    def scale(self, factor: float, nodes=None) -> dict:
        """Multiply the selected (or given) nodes' values by `factor` in the real model; the figures."""
        if isinstance(factor, bool) or not isinstance(factor, (int, float)):
            raise GraphError(f"scale takes a number, got {factor!r}")
        self.factor.value = float(factor)
        return self._run("scale", nodes)

    def _run(self, action: str, nodes=None) -> dict:
        import torch

        graph, model = self.graph, self.graph.model
        nodes = self.selected if nodes is None else list(nodes)
        sites = [n for n in nodes if n.startswith(("tc.", "embed@"))]
        skipped = [n for n in nodes if n not in sites]
        if not sites:
            self.result.value = self._describe(None, "select feature or token nodes first (click them)")
            return {}
        target = graph.logit_ids[0]
        factor = float(self.factor.value)
        attached_here = graph.tcs not in model.transcoder_sets
        if attached_here and any(t.name == graph.tcs.name for t in model.transcoder_sets):
            raise GraphError(f"another transcoder set named {graph.tcs.name!r} is attached: detach it first")
        added = []
        try:
            if attached_here:
                model.attach(graph.tcs)
            before = _last_logits(model, graph.input_ids)
            if action == "ablate":
                added = model.ablate(sites)
            else:
                added = [h for site in sites for h in model.hook(site, lambda value: value * factor)]
            after = _last_logits(model, graph.input_ids)
        finally:
            if added:
                model.remove(added)
            if attached_here and graph.tcs in model.transcoder_sets:
                model.detach(graph.tcs)
        p_before, p_after = torch.softmax(before, -1), torch.softmax(after, -1)
        decode = model.tokenizer.decode
        top = p_after.topk(self.k)
        self.last = {"action": action if action == "ablate" else f"scale x{factor:g}", "sites": sites,
                     "skipped": skipped, "target": decode([target]), "p_before": float(p_before[target]),
                     "p_after": float(p_after[target]), "logit_before": float(before[target]),
                     "logit_after": float(after[target]),
                     "top_after": [(decode([int(i)]), float(p)) for p, i in zip(top.values, top.indices)]}
        self.result.value = self._describe(self.last)
        return self.last

    def _describe(self, last, note: str = "") -> str:
        if last is None:
            text = note or "select nodes, then ablate or scale them: the real model runs here"
            return f"<div class='mechnb-graph-status'>{html.escape(text)}</div>"
        target = html.escape(repr(last["target"]))
        rows = "".join(f"<li>{html.escape(repr(token))} {p:.3g}</li>" for token, p in last["top_after"])
        skipped = (f"<div>not intervened on: {html.escape(', '.join(last['skipped']))}</div>"
                   if last["skipped"] else "")
        return (f"<div class='mechnb-graph-status'>{html.escape(last['action'])} of "
                f"{html.escape(', '.join(last['sites']))}: "
                f"<span class='mechnb-graph-probability'>p({target}) {last['p_before']:.3g} &rarr; "
                f"{last['p_after']:.3g}</span>, logit {last['logit_before']:.2f} &rarr; {last['logit_after']:.2f}"
                f"{skipped}<div>new top tokens:</div><ol>{rows}</ol></div>")

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.box)


def _last_logits(model, prompt):
    """The real model's next-token logits after `prompt` (token ids: the graph's own, its special
    token first) with the active interventions."""
    return model.cache(prompt, "logits@-1")["logits@-1"][0].float()


def view_data(graph, labels: dict, contexts, max_edges: int) -> dict:
    """The drawing's data: the pruned graph's nodes and its `max_edges` largest edges."""
    table = graph.node_table()
    table = table[table.kept]
    edges = graph.edges.head(max_edges)
    shown_contexts = {}
    features = table[table.kind == "feature"]
    if contexts is not None and len(features):
        shown_contexts = feature_contexts(graph.model, graph.tcs, sorted({(int(r.layer), int(r.feature))
                                                                         for r in features.itertuples()}), contexts)
    nodes = []
    for row in table.itertuples():
        site = f"tc.{row.layer}.{int(row.feature)}" if row.kind == "feature" else None
        nodes.append({"name": row.node, "kind": row.kind, "layer": int(row.layer), "pos": int(row.position),
                      "token": row.token, "influence": _number(row.influence), "activation": _number(row.activation),
                      "label": labels.get(row.node) or (labels.get(site) if site else None),
                      "contexts": shown_contexts.get((int(row.layer), int(row.feature))) if site else None})
    prompt_tokens = list(graph.tokens)
    scores = graph.scores
    title = (f"{graph._title()}: {len(nodes)} nodes, {len(edges)} edges shown; replacement "
             f"{scores['replacement']:.2f}, completeness {scores['completeness']:.2f}")
    return {"nodes": nodes, "edges": [{"s": s, "t": t, "w": float(w)} for s, t, w in edges.itertuples(index=False)],
            "tokens": prompt_tokens, "n_layers": graph.n_layers, "title": title}


def _number(value):
    import math

    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def feature_contexts(model, tcs, features: list[tuple[int, int]], texts, windows: int = 16, context: int = 64,
                     top: int = 3) -> dict:
    """`{(layer, feature): [snippet, ...]}`: each feature's `top` strongest tokens over `windows`
    windows of `texts`, shown with the tokens before them (the peak token in «»)."""
    import torch

    from ..sae.store import padded
    from ..transcoders.mlp import mlp_values
    from ..transcoders.train import token_windows

    rows = [w for _, w in zip(range(windows), token_windows(model, texts, context))]
    if not rows:
        raise GraphError("the context texts gave no window: pass more text, or none")
    ids, mask = padded(model, rows)
    layers = sorted({layer for layer, _ in features})
    inputs, _ = mlp_values(model, layers, tcs.reads, ids, mask)
    keep = mask.bool().clone()
    keep[:, 0] = False
    where = keep.nonzero()  # (window, position) of each kept row, in the order mlp_values keeps them
    decode = model.tokenizer.decode
    found = {}
    with torch.no_grad():
        for i, layer in enumerate(layers):
            tc = tcs[layer]
            acts = tc.encode(inputs[i].to(tc.W_enc))
            for _, feature in [f for f in features if f[0] == layer]:
                column = acts[:, feature]
                best = column.topk(min(top, len(column)))
                snippets = []
                for value, row in zip(best.values.tolist(), best.indices.tolist()):
                    if value <= 0:
                        break
                    window, pos = where[row].tolist()
                    before = decode(ids[window, max(1, pos - 8):pos].tolist())
                    snippet = f"{before}«{decode([int(ids[window, pos])])}» ({value:.2g})"
                    snippets.append(snippet.replace("\n", "⏎"))
                found[(layer, feature)] = snippets
    del inputs, acts
    from ..core.memory import return_to_system

    return_to_system()
    return found
