"""`AttributionGraph`: what `model.graph(prompt, tcs)` returns.

    >>> g = model.graph("The Eiffel Tower is located in the city of", tcs)
    >>> g.scores                    # replacement and completeness
    >>> g.top(20)                   # the most influential features
    >>> g.df, g.edges               # nodes and edges of the pruned graph, DataFrames
    >>> g.plot()                    # a static figure; g.widget() the live one
    >>> g.save("eiffel.json")       # the graph JSON Neuronpedia and circuit-tracer read
    >>> g.verify(n=20)              # edges checked by intervention on the frozen model

Node names are sites where a site exists: a feature is `tc.L.F@P` (ablate or steer it on
the real model with that string once the transcoders are attached, running
`graph.input_ids`: the prompt as the graph read it, a special token first), an error node
`error.L@P`, a token `embed@P`, a logit `logit@ID`.

`adjacency[target, source]` holds every computed direct effect, before pruning;
`replacement` is the prompt's frozen model (`mechnb.graphs.replacement`); `prune`
chooses what `df`, `edges`, `plot` and `save` show (by default node threshold 0.8,
edge threshold 0.98, as circuit-tracer).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..core.errors import GraphError
from . import prune as pruning


class AttributionGraph:
    """An attribution graph of one prompt (see the module docstring)."""

    def __init__(self, model, prompt, tokens, tcs, rep, adjacency, feature_layer, feature_pos, feature_id,
                 feature_act, n_active, logit_ids, logit_probs, notes):
        self.model, self.prompt, self.tokens, self.tcs, self.replacement = model, prompt, list(tokens), tcs, rep
        self.adjacency = adjacency
        self.feature_layer, self.feature_pos, self.feature_id = feature_layer, feature_pos, feature_id
        self.feature_act = feature_act
        self.n_active, self.logit_ids, self.logit_probs = n_active, list(logit_ids), logit_probs
        self.n_layers, self.n_pos = rep.n_layers, rep.n_pos
        self.n_features = len(feature_layer)
        self.error_start = self.n_features
        self.token_start = self.error_start + self.n_layers * self.n_pos
        self.logit_start = self.token_start + self.n_pos
        self.n_nodes = self.logit_start + len(self.logit_ids)
        self.meta = {"notes": list(notes), "model": model.name, "prompt": prompt,
                     "transcoders": repr(tcs), "missing_layers": [l for l in range(self.n_layers) if l not in tcs]}
        self._values = None
        self.prune()

    @property
    def input_ids(self) -> torch.Tensor:
        """`1 pos`: the token ids the graph is of (with `sink`, the special token first), what to run
        the real model on for node positions to be its sites' positions."""
        return self.replacement.rec.input_ids.clone()

    # -- nodes ----------------------------------------------------------------------------

    def kind_masks(self):
        """`(features, errors, tokens, logits)`: `node` bools saying each node's kind."""
        n = self.n_nodes
        index = torch.arange(n)
        return (index < self.error_start, (index >= self.error_start) & (index < self.token_start),
                (index >= self.token_start) & (index < self.logit_start), index >= self.logit_start)

    @property
    def weights(self) -> torch.Tensor:
        """Each node's weight as an output: the logit nodes' probabilities, zero elsewhere."""
        w = torch.zeros(self.n_nodes)
        w[self.logit_start:] = self.logit_probs
        return w

    def node_name(self, i: int) -> str:
        if i < self.error_start:
            return f"tc.{int(self.feature_layer[i])}.{int(self.feature_id[i])}@{int(self.feature_pos[i])}"
        if i < self.token_start:
            layer, pos = divmod(i - self.error_start, self.n_pos)
            return f"error.{layer}@{pos}"
        if i < self.logit_start:
            return f"embed@{i - self.token_start}"
        return f"logit@{self.logit_ids[i - self.logit_start]}"

    def node_table(self):
        """Every node (pruned or not): name, kind, layer, position, token, feature,
        activation, influence, kept (by the current pruning)."""
        import pandas as pd

        rows = []
        decode = self.model.tokenizer.decode
        for i in range(self.n_nodes):
            row = {"node": self.node_name(i), "influence": float(self.node_influence[i]),
                   "kept": bool(self.node_mask[i])}
            if i < self.error_start:
                pos = int(self.feature_pos[i])
                row.update(kind="feature", layer=int(self.feature_layer[i]), position=pos,
                           feature=int(self.feature_id[i]), activation=float(self.feature_act[i]))
            elif i < self.token_start:
                layer, pos = divmod(i - self.error_start, self.n_pos)
                row.update(kind="error", layer=layer, position=pos,
                           activation=float(self.replacement.errors[layer, pos].norm()))
            elif i < self.logit_start:
                pos = i - self.token_start
                row.update(kind="embedding", layer=-1, position=pos)
            else:
                j = i - self.logit_start
                pos = self.n_pos - 1
                row.update(kind="logit", layer=self.n_layers, position=pos, feature=self.logit_ids[j],
                           activation=float(self.logit_probs[j]))
            row["token"] = decode([self.logit_ids[i - self.logit_start]]) if row["kind"] == "logit" \
                else self.tokens[row["position"]]
            rows.append(row)
        columns = ["node", "kind", "layer", "position", "token", "feature", "activation", "influence", "kept"]
        return pd.DataFrame(rows, columns=columns)

    # -- pruning and scores ---------------------------------------------------------------

    def prune(self, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> "AttributionGraph":
        """Choose the nodes and edges shown (see `mechnb.graphs.prune`); returns the graph."""
        features, errors, tokens, _ = self.kind_masks()
        self.node_mask, self.edge_mask, self.node_influence = pruning.prune(
            self.adjacency, self.weights, features, errors, tokens, node_threshold, edge_threshold)
        self.meta.update(node_threshold=node_threshold, edge_threshold=edge_threshold)
        return self

    @property
    def scores(self) -> dict:
        """`replacement` and `completeness` of the unpruned graph (1 = fully explained)."""
        _, errors, tokens, _ = self.kind_masks()
        return pruning.scores(self.adjacency, self.weights, errors, tokens)

    @property
    def df(self):
        """The pruned graph's nodes, most influential first (logits and tokens last)."""
        table = self.node_table()
        table = table[table.kept].drop(columns="kept")
        order = table.kind.map({"feature": 0, "error": 0, "embedding": 1, "logit": 2})
        return table.assign(_o=order).sort_values(["_o", "influence"], ascending=[True, False]) \
            .drop(columns="_o").reset_index(drop=True)

    @property
    def edges(self):
        """The pruned graph's edges: source, target, weight (direct effect), largest |weight| first."""
        import pandas as pd

        targets, sources = self.edge_mask.nonzero(as_tuple=True)
        weights = self.adjacency[targets, sources]
        order = weights.abs().argsort(descending=True)
        return pd.DataFrame({"source": [self.node_name(int(s)) for s in sources[order]],
                             "target": [self.node_name(int(t)) for t in targets[order]],
                             "weight": weights[order].tolist()})

    def top(self, n: int = 20):
        """The `n` features of most influence on the logits (whether pruned or not)."""
        from ..core.checks import is_int

        if not is_int(n) or n < 1:
            raise GraphError(f"top takes a positive number of features, got {n!r}")
        table = self.node_table()
        return table[table.kind == "feature"].nlargest(n, "influence").drop(columns="kept").reset_index(drop=True)

    def widget(self, labels: dict | None = None, contexts=None, max_edges: int = 1500, k: int = 5):
        """The live graph in the cell (`mechnb.graphs.widget`): hover, select, group, and ablate or
        scale the selection on the real model. `labels` maps feature sites (`tc.14.1203`) or node
        names to text; `contexts` (texts) gives each shown feature its top contexts.
        Example: `w = graph.widget(); w.selected; w.ablate()`."""
        from .widget import GraphWidget

        return GraphWidget(self, labels=labels, contexts=contexts, max_edges=max_edges, k=k)

    # -- checks -------------------------------------------------------------------------

    def _targets(self):
        """`(values, biases)` of every target node (features: pre-activation; logits: logit
        minus the mean logit): values from the model's real forward, biases from the frozen
        model with every source set to zero."""
        if self._values is None:
            rep = self.replacement
            reads0, logits0 = rep.forward(zero_sources=True)
            real = self._target_values(rep.rec.reads, rep.rec.logits)
            bias = self._target_values(reads0, logits0)
            self._values = (real, bias)
        return self._values

    def _target_values(self, reads: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Feature pre-activations and demeaned logits for these transcoder inputs and logits."""
        values = torch.zeros(self.n_nodes)
        with torch.no_grad():
            for layer in self.tcs.layers:
                rows = (self.feature_layer == layer).nonzero().squeeze(-1)
                if not len(rows):
                    continue
                tc = self.tcs[layer]
                pre = tc.pre(reads[layer].to(tc.W_enc)).float().cpu()
                values[rows] = pre[self.feature_pos[rows], self.feature_id[rows]]
            centred = logits.float().cpu() - logits.float().mean().cpu()
            values[self.logit_start:] = centred[self.logit_ids]
        return values

    def completeness_error(self) -> float:
        """The largest gap, over feature and logit nodes, between a node's value in the real
        forward and the sum of its incoming edges plus its bias terms (0: exact), relative to
        the node's value, or for values near zero to a tenth of the root mean square of its
        kind's values, or to a hundredth of the summed size of its terms where they cancel
        (float32 rounding of large sums is not an error)."""
        real, bias = self._targets()
        worst = 0.0
        for rows in (torch.arange(self.n_features), torch.arange(self.logit_start, self.n_nodes)):
            if not len(rows):
                continue
            total = self.adjacency[rows].sum(1) + bias[rows]
            floor = 0.1 * float(real[rows].pow(2).mean().sqrt().clamp(min=1e-12))
            # float32 sums are exact to ~1e-7 of the size of their terms: a hundredth of that
            # size is the least scale a gap is measured against.
            terms = self.adjacency[rows].abs().sum(1) + bias[rows].abs()
            scale = torch.maximum(real[rows].abs().clamp(min=floor), 1e-2 * terms)
            worst = max(worst, float(((total - real[rows]).abs() / scale).max()))
        return worst

    def verify(self, n: int | None = 20, seed: int = 0):
        """Check edges by intervention on the frozen model: for `n` sampled source nodes
        (None: all), scale the source (a feature's activation, an error vector, a token's
        embedding) by `1 + delta` in the frozen model run forward, and compare each
        target's change with `delta` times the source's edge into it. The frozen model is
        linear, so `delta` is chosen per source to make the largest expected change 1 (a
        change well above float32 rounding). Returns a DataFrame: source, delta, max_error
        (the largest |change - expected|, relative to the largest expected change: 0 when exact)."""
        import pandas as pd

        rep = self.replacement
        rows = torch.cat([torch.arange(self.n_features), torch.arange(self.logit_start, self.n_nodes)])
        reads0, logits0 = rep.forward()
        base = self._target_values(reads0, logits0)[rows]
        sources = list(range(self.logit_start))
        if n is not None and n < len(sources):
            generator = torch.Generator().manual_seed(seed)
            sources = [sources[i] for i in torch.randperm(len(sources), generator=generator)[:n].tolist()]
        results = []
        for s in sources:
            column = self.adjacency[rows, s]
            largest = float(column.abs().max())
            delta = 1.0 / largest if largest > 0 else 1.0
            embed_delta = mlp_delta = None
            if s < self.error_start:  # a feature writes at each of its target layers
                layer = int(self.feature_layer[s])
                mlp_delta = torch.zeros_like(rep.rec.mlp_out)
                written = self.tcs.rows(layer, self.feature_id[s:s + 1])[0].to(mlp_delta.device)
                mlp_delta[self.tcs.targets(layer), int(self.feature_pos[s])] = \
                    delta * float(self.feature_act[s]) * written
            elif s < self.token_start:
                layer, pos = divmod(s - self.error_start, self.n_pos)
                mlp_delta = torch.zeros_like(rep.rec.mlp_out)
                mlp_delta[layer, pos] = delta * rep.errors[layer, pos]
            else:
                pos = s - self.token_start
                embed_delta = torch.zeros_like(rep.rec.resid0)
                embed_delta[pos] = delta * rep.rec.resid0[pos]
            reads, logits = rep.forward(embed_delta=embed_delta, mlp_delta=mlp_delta)
            change = self._target_values(reads, logits)[rows] - base
            expected = delta * column
            results.append({"source": self.node_name(s), "delta": delta,
                            "max_error": float((change - expected).abs().max()) / max(delta * largest, 1e-12)})
        return pd.DataFrame(results)

    # -- pictures and files ---------------------------------------------------------------

    def _title(self) -> str:
        top = self.model.tokenizer.decode([self.logit_ids[0]])
        title = f"Attribution graph: {self.prompt!r} -> {top!r}"
        missing = self.meta["missing_layers"]
        if missing:
            from ..transcoders.model import layer_ranges

            title += f" (layers {layer_ranges(missing)} without transcoders: error nodes only)"
        return title

    def summary(self) -> str:
        s = self.scores
        kept = int(self.node_mask.sum())
        text = (f"{self._title()}: {self.n_features} features ({self.n_active} active), {kept} nodes and "
                f"{int(self.edge_mask.sum())} edges after pruning; replacement {s['replacement']:.2f}, "
                f"completeness {s['completeness']:.2f}")
        return text

    def __repr__(self) -> str:
        return f"<mechnb.AttributionGraph {self.summary()}>"

    def plot(self, ax=None, max_edges: int = 300):
        """The pruned graph: layers bottom to top, positions left to right, edge width by
        |weight|, blue positive and red negative. Returns the matplotlib figure."""
        from .plot import figure

        return figure(self, ax=ax, max_edges=max_edges)

    def png(self) -> bytes:
        """`plot()` as PNG bytes."""
        from ..display.viz import png

        return png(self.plot())

    def _repr_mimebundle_(self, include=None, exclude=None) -> dict:
        text = "\n".join([self.summary(), *(f"note: {n}" for n in self.meta["notes"])])
        bundle = {"text/plain": text}
        if include is None or "image/png" in include:
            bundle["image/png"] = self.png()
        return bundle

    def to_json(self, slug: str = "graph") -> dict:
        """The graph in the JSON layout Neuronpedia's and circuit-tracer's graph viewers read."""
        return graph_json(self, slug)

    def save(self, path, slug: str | None = None) -> Path:
        """Write `to_json` to `path` (a `.json` file); returns the path."""
        path = Path(path)
        if path.suffix != ".json":
            raise GraphError(f"a graph is saved as a .json file, got {str(path)!r}")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(slug or path.stem)))
        return path


def graph_json(graph: AttributionGraph, slug: str) -> dict:
    """Neuronpedia's graph JSON (schema 1): metadata, qParams, nodes, links."""
    decode = graph.model.tokenizer.decode
    ids = graph.replacement.rec.input_ids[0].tolist()
    cumulative = torch.zeros(graph.n_nodes)
    order = graph.node_influence.argsort(descending=True)
    total = graph.node_influence.sum().clamp(min=1e-30)
    cumulative[order] = graph.node_influence[order].cumsum(0) / total
    nodes, names = [], {}
    for i in graph.node_mask.nonzero().squeeze(-1).tolist():
        if i < graph.error_start:
            layer, feat, pos = int(graph.feature_layer[i]), int(graph.feature_id[i]), int(graph.feature_pos[i])
            node = {"node_id": f"{layer}_{feat}_{pos}", "feature": (layer + feat) * (layer + feat + 1) // 2 + feat,
                    "layer": str(layer), "ctx_idx": pos, "feature_type": "cross layer transcoder",
                    "jsNodeId": f"{layer}_{feat}-0", "activation": float(graph.feature_act[i])}
        elif i < graph.token_start:
            layer, pos = divmod(i - graph.error_start, graph.n_pos)
            node = {"node_id": f"0_{layer}_{pos}", "feature": -1, "layer": str(layer), "ctx_idx": pos,
                    "feature_type": "mlp reconstruction error", "jsNodeId": f"{layer}_{pos}-0"}
        elif i < graph.logit_start:
            pos = i - graph.token_start
            node = {"node_id": f"E_{ids[pos]}_{pos}", "feature": pos, "layer": "E", "ctx_idx": pos,
                    "feature_type": "embedding", "jsNodeId": f"E_{ids[pos]}-{pos}"}
        else:
            j = i - graph.logit_start
            vocab, pos, p = graph.logit_ids[j], graph.n_pos - 1, float(graph.logit_probs[j])
            node = {"node_id": f"{graph.n_layers + 1}_{vocab}_{pos}", "feature": vocab,
                    "layer": str(graph.n_layers + 1), "ctx_idx": pos, "feature_type": "logit",
                    "jsNodeId": f"L_{vocab}-{pos}", "token_prob": p, "is_target_logit": j == 0,
                    "clerp": f'Output "{decode([vocab])}" (p={p:.3f})'}
        node.setdefault("token_prob", 0.0)
        node.setdefault("is_target_logit", False)
        node.setdefault("clerp", "")
        node.update(run_idx=0, reverse_ctx_idx=0,
                    influence=None if i >= graph.logit_start else float(cumulative[i]))
        node.setdefault("activation", None)
        names[i] = node["node_id"]
        nodes.append(node)
    targets, sources = graph.edge_mask.nonzero(as_tuple=True)
    links = [{"source": names[s], "target": names[t], "weight": float(graph.adjacency[t, s])}
             for t, s in zip(targets.tolist(), sources.tolist()) if s in names and t in names]
    metadata = {"slug": slug, "scan": graph.tcs.meta.get("scan", graph.tcs.name),
                "transcoder_list": [], "prompt_tokens": [decode([i]) for i in ids], "prompt": graph.prompt,
                "node_threshold": graph.meta.get("node_threshold"), "schema_version": 1,
                "info": {"creator_name": "mechnb", "generator": {"name": "mechnb"}}}
    q_params = {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""}
    return {"metadata": metadata, "qParams": q_params, "nodes": nodes, "links": links}
