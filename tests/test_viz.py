"""Every figure mechnb draws reads at a glance: it fits a notebook column, its colours say
whether values are signed, its ticks are few enough to read, its title names the prompt.

Each figure is saved to `tests/artifacts/figures/` (git-ignored) to be looked at.
"""

from pathlib import Path

import matplotlib
import pytest
import torch

from conftest import PARIS, PROMPT

matplotlib.use("Agg")

FIGURES = Path(__file__).parent / "artifacts" / "figures"
CORRUPT = PROMPT.replace("John gave", "Mary gave")


def check(figure, name: str, scale: str | None = None, prompt: str | None = None):
    """Save the figure and check what every figure promises; returns its heatmap images."""
    import matplotlib.pyplot as plt

    FIGURES.mkdir(parents=True, exist_ok=True)
    figure.savefig(FIGURES / f"{name}.png", dpi=80, bbox_inches="tight")
    width, height = figure.get_size_inches()
    assert width <= 9 and height <= 8, (name, width, height)
    images = [image for ax in figure.axes for image in ax.get_images()]
    for image in images:
        low, high = image.get_clim()
        if scale == "signed":
            assert image.get_cmap().name == "RdBu_r" and low == pytest.approx(-high), (name, low, high)
        elif scale in ("positive", "probability"):
            assert image.get_cmap().name == "viridis" and low == 0, (name, low, high)
            assert scale != "probability" or high == 1
    for ax in figure.axes:
        if ax.get_images():
            assert len(ax.get_xticks()) <= 33 and len(ax.get_yticks()) <= 33, name
    titles = " ".join([figure._suptitle.get_text() if figure._suptitle else ""]
                      + [ax.get_title() for ax in figure.axes])
    if prompt is not None:
        assert repr(prompt[:40])[:-1] in titles, (name, titles)
    plt.close(figure)
    return images


@pytest.fixture(scope="module")
def llama(tiny_factory):
    return tiny_factory("llama")


def test_patching_grids_are_diverging_around_zero_and_name_both_prompts(llama):
    resid = llama.patch(PROMPT, CORRUPT, "resid_pre.*", " Mary", " John", normalize=True, progress=False)
    check(resid.plot(), "patching_resid_pre", "signed", prompt=PROMPT)
    heads = llama.patch(PROMPT, CORRUPT, "head.*.*", " Mary", " John", per_position=True, progress=False)
    images = check(heads.plot(), "patching_heads_per_position", "signed", prompt=PROMPT)
    assert len(images) == llama.n_heads  # a panel per head, layers against positions
    prob = llama.patch(PROMPT, CORRUPT, "mlp_out.*", " Mary", metric="prob", progress=False)
    check(prob.plot(), "patching_probability", "positive")


def test_lens_dla_and_attribution(llama):
    check(llama.logit_lens(PARIS).plot(), "logit_lens", "probability", prompt=PARIS)
    check(llama.dla(PROMPT, " Mary", " John").plot(), "dla", "signed", prompt=PROMPT)
    check(llama.attribute(PROMPT, sites="head.*.*").plot(), "attribution_heads", "signed", prompt=PROMPT)


def test_head_scores_and_causal_traces_are_probabilities(llama):
    check(llama.detect_heads(n_samples=2, seq_len=6).plot(), "head_scores", "probability")
    trace = llama.causal_trace(PARIS, "Eiffel Tower", samples=1, kind="mlp", window=2)
    check(trace.plot(), "causal_trace", "probability", prompt=PARIS)


def test_composition_and_coactivation_group_their_ticks(llama):
    composition = llama.composition("k")
    check(composition.plot(), "composition", "positive")
    # Pairs that do not apply (into an earlier head) are NaN: the one-line summary skips them.
    known = composition.values[~composition.values.isnan()]
    assert composition.values.isnan().any() and known.numel()
    assert f"min {known.min():.3g}, max {known.max():.3g}" in composition.summary()
    assert "nan" not in composition.summary()
    clusters = llama.coactivation("mlp_out.1", [PROMPT, PARIS], components=3, method="kmeans")
    check(clusters.plot(), "coactivation_clusters", "signed")
    check(llama.coactivation("mlp_out.1", [PROMPT, PARIS], components=3).plot(), "coactivation_pca",
          "probability")


def test_circuit_figures_fit_a_column_and_draw_the_results_values(llama):
    circuit = llama.circuit(PROMPT, CORRUPT, " Mary", " John", method="eap")
    top = circuit.top(20)
    figure = top.plot()
    # One line per kept edge, in the table's order: from the writer (head H of layer L at
    # x=H, y=L) to logits (centre, top), width by |score|, dashed where negative.
    drawn = [line for line in figure.axes[0].lines if len(line.get_xdata()) == 2]
    assert len(drawn) == len(top.df) > 0
    largest = top.df["score"].abs().max()
    for line, row in zip(drawn, top.df.itertuples()):
        assert line.get_linewidth() == pytest.approx(0.5 + 4 * abs(row.score) / largest)
        assert line.get_linestyle() == ("--" if row.score < 0 else "-")
        if row.upstream.startswith("head") and row.downstream == "logits":
            layer, head = map(int, row.upstream.split(".")[1:])
            assert list(line.get_xdata()) == [head, llama.n_heads / 2]
            assert list(line.get_ydata()) == [layer, llama.n_layers]
    check(figure, "circuit_edges", prompt=PROMPT)
    curve = circuit.faithfulness([0.05, 0.5, 1.0], progress=False)
    figure = curve.plot()
    assert list(figure.axes[0].lines[0].get_ydata()) == curve.values.tolist()
    check(figure, "faithfulness", prompt=PROMPT)
    nodes = llama.circuit(PROMPT, CORRUPT, " Mary", " John", method="eap", level="node")
    figure = nodes.plot()
    # The heatmap's cell (layer, head) is head L.H's score, the last column the MLP's.
    grid = torch.tensor(figure.axes[0].get_images()[0].get_array().data)
    assert grid.shape == (llama.n_layers, llama.n_heads + 1)
    for row in nodes.df.itertuples():
        kind, layer, *head = row.node.split(".")
        column = int(head[0]) if kind == "head" else llama.n_heads
        assert grid[int(layer), column].item() == pytest.approx(row.score, rel=1e-6), row.node
    check(figure, "circuit_nodes", "signed", prompt=PROMPT)


def test_a_grid_of_270_heads_is_labelled_by_layer():
    from mechnb.display.viz import heatmap

    labels = [f"{layer}.{head}" for layer in range(30) for head in range(9)]
    meta = {"axes": ["head", "later_head"], "labels": {"head": labels, "later_head": labels},
            "groups": {"head": "layer", "later_head": "layer"}, "title": "composition", "scale": "positive"}
    figure = heatmap(torch.rand(270, 270), meta)
    ax = figure.axes[0]
    shown = [t.get_text() for t in ax.get_xticklabels()]
    assert shown == [str(layer) for layer in range(30)] and "by layer" in ax.get_xlabel()
    check(figure, "grouped_heads", "positive")
    # Without groups, a long axis shows every k-th label.
    figure = heatmap(torch.randn(40, 100), {"axes": ["layer", "pos"], "title": "long"})
    check(figure, "long_axes", "signed")


def test_sae_dashboard_centres_contexts_on_their_peak(llama):
    import re

    from mechnb.sae import train

    texts = [PROMPT, PARIS, "def add(a, b):\n    return a + b"] * 12
    store = llama.collect("resid_post.1", texts, n_tokens=300, context=16, progress=False)
    sae = train(store, kind="topk", d_sae=16, k=2, batch_size=64, progress=False)
    feature = int(sae.encode(store.rows(0, len(store))).sum(0).argmax())
    board = sae.dashboard(feature, llama, texts, n_tokens=150, top=5, context=16)
    page = board._repr_mimebundle_()["text/html"]
    assert page.count("<tr>") == len(board.meta["contexts"]) + 1 > 1
    for context in board.meta["contexts"]:
        assert context["values"][context["focus"]] == pytest.approx(context["activation"])  # centred on the peak
    assert re.search(r'title="activation [0-9.e+-]+"', page)  # the number on hover
    image = re.search(r'src="data:image/png;base64,([^"]+)"', page).group(1)
    FIGURES.mkdir(parents=True, exist_ok=True)
    (FIGURES / "sae_histogram.png").write_bytes(__import__("base64").b64decode(image))
    (FIGURES / "sae_dashboard.html").write_text(page)
