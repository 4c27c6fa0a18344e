"""Attribution graphs: exact edges (completeness and intervention), pruning, files, bad input."""

import json

import pytest
import torch

from conftest import PARIS, clean_logits
from mechnb import GraphError, TranscoderError
from mechnb.graphs import build
from mechnb.graphs.prune import edge_scores, influence, normalised, prune
from mechnb.transcoders import Transcoder, TranscoderSet


def random_set(model, width=48, kind="topk", k=6, skip=False, reads="mlp_in", layers=None, seed=0):
    """Random transcoders for every layer (or `layers`) of `model`, small enough to keep the
    replacement model well conditioned."""
    g = torch.Generator().manual_seed(seed)
    d = model.d_model
    made = {}
    for layer in (range(model.n_layers) if layers is None else layers):
        tc = Transcoder(d, width, kind=kind, k=k if kind == "topk" else None, skip=skip)
        with torch.no_grad():
            tc.W_enc.copy_(torch.randn(d, width, generator=g) / d ** 0.5)
            tc.W_dec.copy_(torch.randn(width, d, generator=g) / width ** 0.5)
            tc.b_enc.copy_(torch.randn(width, generator=g) * 0.1)
            tc.b_dec.copy_(torch.randn(d, generator=g) * 0.1)
            if skip:
                tc.W_skip.copy_(torch.randn(d, d, generator=g) * 0.1 / d ** 0.5)
            if kind == "jumprelu":
                tc.threshold.fill_(0.1)
        made[layer] = tc
    return TranscoderSet(made, reads=reads, model={"n_layers": model.n_layers, "d_model": d})


CASES = [("llama", {}), ("llama", dict(skip=True)), ("gpt2", dict(kind="jumprelu", layers=[0, 2])),
         ("gpt_neox", {}), ("gpt_neox_sequential", dict(reads="resid_mid")), ("gemma2", dict(skip=True))]


@pytest.mark.parametrize("arch,options", CASES, ids=[f"{a}-{'-'.join(o) or 'plain'}" for a, o in CASES])
def test_every_edge_is_exact_on_tiny_models(tiny_factory, arch, options):
    model = tiny_factory(arch)
    before = clean_logits(model)
    graph = build(model, PARIS, random_set(model, **options), batch_size=16)
    # Completeness: incoming edges plus bias terms give each target's value in the real forward.
    assert graph.completeness_error() < 1e-4
    # Every source checked by intervention on the frozen model.
    checked = graph.verify(n=None)
    assert len(checked) == graph.logit_start
    assert checked.max_error.max() < 1e-3, checked.sort_values("max_error").tail(3)
    assert graph.n_features > 20 and graph.adjacency[:graph.n_features].abs().sum() > 0
    assert torch.equal(clean_logits(model), before)  # nothing left hooked


def test_batches_and_feature_budget_change_nothing_but_what_is_kept(tiny_factory):
    model = tiny_factory("llama")
    tcs = random_set(model)
    whole = build(model, PARIS, tcs, batch_size=7)
    one_batch = build(model, PARIS, tcs, batch_size=4096)
    assert torch.allclose(whole.adjacency, one_batch.adjacency, atol=1e-5)
    budget = build(model, PARIS, tcs, batch_size=16, max_feature_nodes=40, update_every=16)
    assert budget.n_features == 40 and budget.n_active == whole.n_features
    assert any("40 of" in note for note in budget.meta["notes"])
    # The kept features' rows are the same rows as in the whole graph.
    names = [budget.node_name(i) for i in range(budget.n_features)]
    index = {whole.node_name(i): i for i in range(whole.n_features)}
    rows = torch.tensor([index[n] for n in names])
    kept_columns = torch.cat([rows, torch.arange(whole.error_start, whole.n_nodes)])
    assert torch.allclose(budget.adjacency[:40], whole.adjacency[rows][:, kept_columns], atol=1e-5)
    # The budget goes to the features of most influence on the logits (estimated as rows come in).
    top = set(whole.top(10).node)
    assert len(top & set(names)) >= 7


def test_embedded_model_graph_is_complete_and_checks_out(real):
    tcs = random_set(real, width=256, k=8, seed=1)
    graph = real.graph(PARIS, tcs, target=" Paris")
    assert graph.n_features == 8 * real.n_layers * len(real.tokens(PARIS))
    assert graph.completeness_error() < 1e-4
    assert graph.verify(n=12, seed=0).max_error.max() < 1e-3
    assert real.tokenizer.decode([graph.logit_ids[0]]) == " Paris"
    scores = graph.scores
    assert 0 <= scores["replacement"] <= 1 and 0 <= scores["completeness"] <= 1


def test_influence_and_pruning_match_circuit_tracers_reference_graph():
    # circuit-tracer's tests/test_graph.py: 12 nodes, logit 11, every edge 10.
    a = torch.zeros(12, 12)
    for target, sources in {11: [1, 3, 6, 8], 3: [0, 1, 6], 1: [9, 10], 0: [9]}.items():
        a[target, sources] = 10
    weights = torch.zeros(12)
    weights[11] = 1.0
    expected = torch.tensor([1 / 12, 1 / 3, 0, 1 / 4, 0, 0, 1 / 3, 0, 1 / 4, 1 / 4, 1 / 6, 0])
    assert torch.allclose(influence(normalised(a), weights), expected)
    pruned = a.clone()
    pruned[0, 9] = pruned[3, 0] = 0
    scores = edge_scores(pruned, weights)
    assert torch.allclose(scores[11, [1, 3, 6, 8]], torch.tensor(1 / 4))
    assert torch.allclose(scores[3, [1, 6]], torch.tensor(1 / 8))
    assert torch.allclose(scores[1, [9, 10]], torch.tensor(3 / 16))
    features = torch.zeros(12, dtype=torch.bool)
    features[:9] = True
    tokens = ~features
    tokens[11] = False
    node_mask, edge_mask, _ = prune(a, weights, features, torch.zeros(12, dtype=torch.bool), tokens,
                                    node_threshold=0.8, edge_threshold=0.98)
    assert node_mask[11] and node_mask[9] and node_mask[10]       # the logit and the tokens stay
    assert not node_mask[[2, 4, 5, 7]].any()                        # no path to the logit
    kept = node_mask.nonzero().squeeze(-1)
    assert not edge_mask[~node_mask].any() and not edge_mask[:, ~node_mask].any()
    for node in kept[kept < 9]:                                     # kept features: an edge in and out
        assert edge_mask[node].any() and edge_mask[:, node].any()


def test_graph_tables_json_and_figure(tiny_factory, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    from test_viz import check

    model = tiny_factory("llama")
    graph = build(model, PARIS, random_set(model, layers=[0, 1]), batch_size=32)
    assert "(layers 2 without transcoders: error nodes only)" in graph.summary()
    df, edges = graph.df, graph.edges
    assert set(df.kind) >= {"feature", "embedding", "logit"}
    assert set(edges.source) <= set(df.node) and set(edges.target) <= set(df.node)
    top = graph.top(5)
    assert list(top.influence) == sorted(top.influence, reverse=True) and (top.kind == "feature").all()
    path = graph.save(tmp_path / "g.json")
    data = json.loads(path.read_text())
    assert set(data) == {"metadata", "qParams", "nodes", "links"}
    ids = {node["node_id"] for node in data["nodes"]}
    assert all(link["source"] in ids and link["target"] in ids for link in data["links"])
    assert sum(node["is_target_logit"] for node in data["nodes"]) == 1
    assert data["metadata"]["prompt"] == PARIS and data["metadata"]["schema_version"] == 1
    figure = graph.plot()
    check(figure, "attribution_graph", prompt=None)
    assert PARIS in figure.axes[0].get_title()


def test_bad_input_is_one_clear_line_and_leaves_the_model_clean(tiny_factory):
    model = tiny_factory("llama")
    before = clean_logits(model)
    tcs = random_set(model)
    with pytest.raises(GraphError, match="graph budget"):
        build(model, "word " * 80, tcs)
    with pytest.raises(GraphError, match="TranscoderSet"):
        build(model, PARIS, {0: tcs[0]})
    narrow = TranscoderSet({0: Transcoder(16, 8, kind="topk", k=2)})
    with pytest.raises(TranscoderError, match="16-wide"):
        build(model, PARIS, narrow)
    with pytest.raises(GraphError, match="max_feature_nodes"):
        build(model, PARIS, tcs, max_feature_nodes=0)
    model.ablate("head.0.1")
    with pytest.raises(GraphError, match="intervention"):
        build(model, PARIS, tcs)
    model.clear()
    graph = build(model, PARIS, tcs, target=" zebra")
    assert any("not among the top logits" in note for note in graph.meta["notes"])
    assert torch.equal(clean_logits(model), before)


def test_live_widget_selects_groups_and_intervenes_on_the_real_model(tiny_factory, shell):
    from mechnb.graphs.widget import GraphWidget, _view_class

    model = tiny_factory("llama")
    before = clean_logits(model)
    tcs = random_set(model)
    graph = build(model, PARIS, tcs)
    texts = ["def add(a, b):\n    return a + b\n" * 4, "The Eiffel Tower is in Paris, the capital of France. " * 4]
    widget = graph.widget(labels={"tc.1.3": "<b>made up</b>"}, contexts=texts, max_edges=50)
    data = widget.view.data
    kept = graph.node_table().query("kept")
    assert [n["name"] for n in data["nodes"]] == kept.node.tolist() and len(data["edges"]) <= 50
    assert data["tokens"] == graph.tokens and data["n_layers"] == model.n_layers
    features = [n for n in data["nodes"] if n["kind"] == "feature"]
    assert all(isinstance(c, str) and "«" in c for n in features for c in n["contexts"])
    assert any(n["contexts"] for n in features)
    assert all(n["label"] == "<b>made up</b>" for n in features if n["name"].startswith("tc.1.3@"))
    assert "export default" in _view_class()._esm  # the view's module ships in the package
    # The selection (as the view sets it) ablated on the real model, with the set attached for
    # that run only: the same figures as attaching and ablating by hand.
    chosen = [n["name"] for n in features[:2]]
    widget.selected = chosen + ["error.1@2"]
    figures = widget.ablate()
    assert figures["sites"] == chosen and figures["skipped"] == ["error.1@2"]
    model.attach(tcs)
    with model.ablated(chosen):
        by_hand = torch.softmax(model.cache(graph.input_ids, "logits@-1")["logits@-1"][0], -1)
    model.detach(tcs)
    target = graph.logit_ids[0]
    assert figures["p_after"] == pytest.approx(float(by_hand[target]), rel=1e-5)
    assert figures["p_after"] != pytest.approx(figures["p_before"], rel=1e-4)
    assert "p(" in widget.result.value and "&lt;" not in figures["target"]
    assert widget.scale(0.0)["p_after"] == pytest.approx(figures["p_after"], rel=1e-5)  # x0 = zero ablation
    assert model.unmodified and torch.equal(clean_logits(model), before)
    from mechnb import SiteError

    with pytest.raises(SiteError, match="feature 999 out of range"):
        widget.ablate(["tc.1.999@0"])
    assert model.unmodified and not model.transcoder_sets and torch.equal(clean_logits(model), before)
    widget.selected = chosen
    assert widget.group("Paris features") == {"Paris features": chosen} and widget.selected == []
    with pytest.raises(GraphError, match="not a node of the drawn graph"):
        widget.selected = ["tc.99.1@0"]
    # %graph: the API's graph, or its live view.
    shell.user_ns.update(tcs=tcs, m=model)
    assert shell.run_cell("%mechnb use m", store_history=False).success
    result = shell.run_cell(f'%graph "{PARIS}" --transcoders {{tcs}} --widget -o g', store_history=False)
    assert result.success and isinstance(result.result, GraphWidget)
    assert torch.equal(shell.user_ns["g"].adjacency, graph.adjacency)
