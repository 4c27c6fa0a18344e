"""Transcoders: the model, and sets read and written in mechnb's, SAELens 6's and circuit-tracer's layouts."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import PARIS, clean_logits
from mechnb import TranscoderError
from mechnb.transcoders import Transcoder, TranscoderSet, load
from test_graphs import random_set


def same(a: TranscoderSet, b: TranscoderSet):
    assert a.layers == b.layers and a.reads == b.reads
    for layer in a.layers:
        x, y = a[layer], b[layer]
        assert (x.kind, x.k, x.skip, x.width) == (y.kind, y.k, y.skip, y.width)
        for key in ("W_enc", "W_dec", "b_enc", "b_dec"):
            assert torch.equal(getattr(x, key), getattr(y, key)), key
        if x.skip:
            assert torch.equal(x.W_skip, y.W_skip)


def test_splice_without_edits_returns_the_mlp_output():
    torch.manual_seed(0)
    tc = random_set_one()
    x, y = torch.randn(5, 16), torch.randn(5, 16)
    assert torch.allclose(tc.splice(x, y), y, atol=1e-5)  # decode + (y - decode): rounding only
    assert (tc.encode(x) > 0).sum(-1).max() <= 3


def random_set_one():
    tc = Transcoder(16, 32, kind="topk", k=3, skip=True)
    with torch.no_grad():
        for p in (tc.W_enc, tc.W_dec, tc.W_skip, tc.b_enc):
            p.copy_(torch.randn_like(p))
    return tc


@pytest.mark.parametrize("options", [dict(), dict(kind="jumprelu", skip=True, layers=[0, 2])])
def test_mechnb_layout_round_trip(tiny_factory, tmp_path, options):
    model = tiny_factory("llama")
    tcs = random_set(model, **options)
    loaded = load(tcs.save(tmp_path / "tcs"))
    same(tcs, loaded)
    assert torch.equal(model.graph(PARIS, tcs).adjacency, model.graph(PARIS, loaded).adjacency)


def test_saelens_transcoders_load_as_a_set(tiny_factory, tmp_path):
    model = tiny_factory("llama")
    tcs = random_set(model, kind="jumprelu", skip=True)
    for layer, tc in tcs.transcoders.items():
        directory = tmp_path / f"layer_{layer}"
        directory.mkdir()
        cfg = {"d_in": 32, "d_sae": tc.width, "d_out": 32, "architecture": "jumprelu_skip_transcoder",
               "apply_b_dec_to_input": False, "normalize_activations": "none", "dtype": "float32",
               "metadata": {"hook_name": f"blocks.{layer}.ln2.hook_normalized",
                            "hook_name_out": f"blocks.{layer}.hook_mlp_out", "model_name": "tiny"}}
        (directory / "cfg.json").write_text(json.dumps(cfg))
        save_file({k: getattr(tc, k).detach().contiguous() for k in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold",
                                                                       "W_skip")},
                  str(directory / "sae_weights.safetensors"))
    loaded = load(tmp_path)
    same(tcs, loaded)
    assert loaded.meta["format"] == "saelens"


def test_circuit_tracer_transcoders_load_transposed(tiny_factory, tmp_path):
    model = tiny_factory("llama")
    tcs = random_set(model, kind="topk", k=6)
    for layer, tc in tcs.transcoders.items():
        save_file({"W_enc": tc.W_enc.detach().T.contiguous(), "W_dec": tc.W_dec.detach().contiguous(),
                   "b_enc": tc.b_enc.detach().contiguous(), "b_dec": tc.b_dec.detach().contiguous(),
                   "k": torch.tensor(6)}, str(tmp_path / f"layer_{layer}.safetensors"))
    (tmp_path / "config.yaml").write_text("model_kind: transcoder_set\nfeature_input_hook: mlp.hook_in\n"
                                          "feature_output_hook: mlp.hook_out\n")
    loaded = load(tmp_path)
    same(tcs, loaded)
    assert loaded.meta["format"] == "circuit-tracer" and loaded.meta["notes"]


def test_bad_files_are_one_clear_line(tiny_factory, tmp_path):
    model = tiny_factory("llama")
    tcs = random_set(model)
    path = tcs.save(tmp_path / "tcs")
    with pytest.raises(TranscoderError, match="no transcoders.json"):
        load(tmp_path)
    with pytest.raises(TranscoderError, match="not a transcoder directory"):
        load(tmp_path / "nowhere")
    broken = load_file(str(path / "layer_1.safetensors"))
    broken["W_dec"][0, 0] = float("nan")
    save_file(broken, str(path / "layer_1.safetensors"))
    with pytest.raises(TranscoderError, match="NaN"):
        load(path)
    other = tiny_factory("gpt2")
    wide = random_set(other)
    assert wide.d_model == other.d_model
    narrow = TranscoderSet({0: Transcoder(16, 8, kind="topk", k=2)})
    with pytest.raises(TranscoderError, match="16-wide"):
        narrow.check_model(model)
    with pytest.raises(TranscoderError, match="share one width"):
        TranscoderSet({0: Transcoder(32, 8, kind="topk", k=2), 1: Transcoder(32, 16, kind="topk", k=2)})


# -- training and evaluation ---------------------------------------------------------------

TEXTS = None


def texts(n=40):
    from mechnb.datasets import python_docs

    global TEXTS
    if TEXTS is None:
        TEXTS = list(python_docs("train", sources=("topics",)))[:60]
    return TEXTS[:n]


TRAIN = dict(width=64, k=4, n_tokens=12_000, batch_size=1000, context=40, progress=False, log_every=1)


def count_forwards(monkeypatch) -> list:
    """The layers of every forward the trainer runs (its `mlp_values` calls), from now on."""
    import sys

    module = sys.modules["mechnb.transcoders.train"]
    forwards, original = [], module.mlp_values

    def counting(*args, **kwargs):
        forwards.append(args[1])
        return original(*args, **kwargs)

    monkeypatch.setattr(module, "mlp_values", counting)
    return forwards


def stop_at_batch(monkeypatch, batch: int):
    """Ctrl-C at the trainer's `batch`-th forward; returns what undoes it."""
    import sys

    module = sys.modules["mechnb.transcoders.train"]
    calls, original = [], module.mlp_values

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == batch:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(module, "mlp_values", interrupted)
    return lambda: monkeypatch.setattr(module, "mlp_values", original)


def test_training_runs_one_forward_per_batch_for_every_layer_and_resumes_exactly(tiny_factory, tmp_path,
                                                                                  monkeypatch):
    from mechnb.transcoders import train

    model = tiny_factory("llama")
    forwards = count_forwards(monkeypatch)
    tcs = train(model, texts(), **TRAIN)
    history = tcs.history
    assert len(forwards) == history.step.iloc[-1] == 13 and all(layers == [0, 1, 2] for layers in forwards)
    assert tcs.layers == [0, 1, 2] and tcs.kind == "topk" and tcs.width == 64
    # It learns: held-out FVU below that of the set after its first step.
    start = train(model, texts(), **{**TRAIN, "n_tokens": 1000})
    held_out = [t.evaluate(model, texts(50)[40:], n_tokens=800, context=40).layers.fvu for t in (start, tcs)]
    assert (held_out[1] < held_out[0] - 0.02).all(), held_out
    assert history.l0.iloc[-1] <= 4
    for tc in tcs:  # unit decoder rows in training units: one norm per layer after folding
        norms = tc.W_dec.norm(dim=-1)
        assert torch.allclose(norms, norms[0].expand_as(norms), rtol=1e-4)
    # Stopped by Ctrl-C at the 6th batch, then resumed: the same transcoders as one run.
    undo = stop_at_batch(monkeypatch, 6)
    first = train(model, texts(), checkpoint=tmp_path / "ck", save_every=2, **TRAIN)
    assert first.meta["interrupted"] and first.meta["steps"] == 5
    undo()
    resumed = train(model, texts(), checkpoint=tmp_path / "ck", save_every=2, **TRAIN)
    assert not resumed.meta["interrupted"] and resumed.meta["tokens"] == tcs.meta["tokens"]
    same(tcs, resumed)
    with pytest.raises(TranscoderError, match="other settings.*k differ"):
        train(model, texts(), checkpoint=tmp_path / "ck", **{**TRAIN, "k": 5})


def test_jumprelu_skip_transcoders_train_on_resid_mid_and_give_an_exact_graph(tiny_factory):
    from mechnb.transcoders import train

    model = tiny_factory("gpt2")
    tcs = train(model, texts(20), kind="jumprelu", skip=True, reads="resid_mid", layers=[0, 2],
                **{**TRAIN, "n_tokens": 4000})
    assert tcs.layers == [0, 2] and tcs.reads == "resid_mid" and all(tc.skip for tc in tcs)
    assert all((tc.threshold > 0).all() for tc in tcs) and tcs.history.l0.iloc[-1] > 0
    graph = model.graph(PARIS, tcs)
    assert graph.verify(n=20).max_error.max() < 1e-3
    assert "1" in graph.node_table().query("kind == 'error'").layer.astype(str).values  # layer 1: errors only


def test_evaluation_measures_each_layer_and_the_replaced_model(tiny_factory):
    from mechnb.transcoders import train

    model = tiny_factory("llama")
    trained = train(model, texts(), **TRAIN)
    evaluation = trained.evaluate(model, texts(10), n_tokens=600, context=40)
    layers, summary = evaluation.layers, evaluation.summary
    assert list(layers.columns) == ["layer", "l0", "fvu", "cosine", "dead"] and list(layers.layer) == [0, 1, 2]
    assert (layers.fvu < 1).all() and (layers.l0 <= 4).all() and 0 <= summary["agreement"] <= 1
    assert summary["tokens"] >= 600
    # Transcoders predicting zero: the replaced model is the zero-ablated one, and each
    # layer's FVU is sum |y|^2 / sum |y - mean y|^2 over the same tokens.
    zero = random_set(model, width=64, k=4)
    for tc in zero:
        with torch.no_grad():
            tc.W_dec.zero_()
            tc.b_dec.zero_()
    evaluation = zero.evaluate(model, texts(10), n_tokens=600, context=40)
    assert evaluation.summary["loss_replaced"] == pytest.approx(evaluation.summary["loss_zero"], rel=1e-6)
    assert evaluation.summary["loss_recovered"] == pytest.approx(0.0, abs=1e-6)
    from mechnb.sae.store import documents_of, take_documents, windows

    rows = windows(model, list(take_documents(documents_of(texts(10)), 600, model)), 40, 600)
    ys = []
    for row in rows:
        ids = torch.tensor([row])
        kept = {}
        handle = model.hf.model.layers[1].mlp.register_forward_hook(lambda m, a, out: kept.update(y=out))
        with torch.no_grad():
            model.hf(input_ids=ids)
        handle.remove()
        ys.append(kept["y"][0, 1:])
    y = torch.cat(ys).double()
    expected = y.pow(2).sum() / (y - y.mean(0)).pow(2).sum()
    assert evaluation.layers.fvu[1] == pytest.approx(float(expected), rel=1e-4)
    assert evaluation.summary["loss_replaced"] > evaluation.summary["loss_clean"]


def test_bad_training_input_is_one_clear_line(tiny_factory, tmp_path):
    from mechnb.transcoders import train

    model = tiny_factory("llama")
    before = clean_logits(model)
    cases = [(dict(kind="relu"), "train as topk or jumprelu"), (dict(k=0), "needs k"),
             (dict(layers=[7]), "layer numbers"), (dict(reads="resid_post"), "mlp_in or resid_mid"),
             (dict(width=-1), "width must be"), (dict(context=1), "context")]
    for options, message in cases:
        with pytest.raises(TranscoderError, match=message):
            train(model, texts(), **{**TRAIN, **options})
    with pytest.raises(TranscoderError, match="no resid_mid"):
        train(tiny_factory("gpt_neox"), texts(), reads="resid_mid", **TRAIN)
    with pytest.raises(TranscoderError, match="no full window"):
        train(model, ["short"], **TRAIN)
    assert torch.equal(clean_logits(model), before) and model.unmodified


# -- features as sites -----------------------------------------------------------------------

IOI = "When Mary and John went to the store, John gave a drink to"


def test_attached_transcoder_features_are_sites_everywhere(tiny_factory):
    model = tiny_factory("llama")
    before = clean_logits(model, IOI)
    tcs = random_set(model, skip=True)
    model.attach(tcs)
    assert [i.kind for i in model.interventions] == ["transcoder"] * 3 and model.transcoder_sets == [tcs]
    assert torch.allclose(clean_logits(model, IOI), before, atol=1e-5)  # attached, unedited: the same model
    cache = model.cache(IOI, ["mlp_out.1", "tc.1"])
    acts = cache["tc.1"][0]
    assert acts.shape == (len(model.tokenizer(IOI)["input_ids"]), 48)
    feature = int(acts[-1].argmax())
    assert acts[-1, feature] > 0
    # Ablating one feature at the last position = removing its decoder row from that MLP output.
    model.ablate(f"tc.1.{feature}@-1")
    ablated = clean_logits(model, IOI)
    model.clear("ablate")
    model.detach(tcs)
    assert model.unmodified and not [n for n, _ in model.hf.named_modules() if "mechnb_tc" in n]

    def remove_row(module, args, output):
        output = output.clone()
        output[0, -1] -= acts[-1, feature] * tcs[1].W_dec[feature]
        return output

    handle = model.hf.model.layers[1].mlp.register_forward_hook(remove_row)
    expected = clean_logits(model, IOI)
    handle.remove()
    assert torch.allclose(ablated, expected, atol=1e-5) and not torch.allclose(ablated, before, atol=1e-3)
    # Steering along a feature, a trace's write, and a patching grid over features.
    model.attach(tcs)
    with model.steered("mlp_out.1", f"tc.1.{feature}", scale=2.0):
        steered = clean_logits(model, IOI)
    assert not torch.allclose(steered, before, atol=1e-3)
    with model.trace(IOI):
        model[f"tc.1.{feature}@-1"] = 0.0
        written = model["logits"].save()
    assert torch.allclose(written, expected, atol=1e-5)
    result = model.patch(IOI, IOI.replace("John gave", "Mary gave"), "tc.1.0:8@-1", " Mary", " John")
    assert result.meta["axes"][-1] == "feature" and result.values.shape == (1, 8)
    # A node of the graph is a site: its intervention runs on the real model.
    graph = model.graph(IOI, tcs)
    node = graph.top(1).node[0]
    graph_logits = model.hf(graph.input_ids).logits
    model.ablate(node)
    assert not torch.allclose(model.hf(graph.input_ids).logits, graph_logits, atol=1e-4)
    model.clear("ablate")
    model.detach(tcs)
    assert torch.equal(clean_logits(model, IOI), before)


def test_transcoder_sites_and_attach_errors_are_one_line(tiny_factory):
    from mechnb import SiteError

    model = tiny_factory("llama")
    before = clean_logits(model)
    tcs = random_set(model, layers=[0, 2])
    with pytest.raises(SiteError, match="no transcoder set is attached"):
        model.cache(PARIS, "tc.0.1")
    narrow = TranscoderSet({0: Transcoder(16, 8, kind="topk", k=2)})
    with pytest.raises(TranscoderError, match="16-wide"):
        model.attach(narrow)
    tcs.model["name"] = "org/another-model"
    with pytest.raises(TranscoderError, match="made for org/another-model, not tiny-llama"):
        model.attach(tcs)
    tcs.model["name"] = "somewhere/TINY-llama"  # the same model under another organisation
    model.attach(tcs)
    with pytest.raises(TranscoderError, match="already attached"):
        model.attach(tcs)
    with pytest.raises(SiteError, match="no attached transcoder covers layer 1"):
        model.ablate("tc.1.3")
    with pytest.raises(SiteError, match="feature 48 out of range"):
        model.ablate("tc.0.48")
    other = random_set(model, layers=[0], seed=1)
    model.attach(other, name="second")
    with pytest.raises(SiteError, match="several attached sets"):
        model.ablate("tc.0.3")
    model.ablate("tc.second.0.3@-1")
    assert str(model.interventions[-1].site) == "tc.second.0.3@-1"
    with pytest.raises(SiteError, match="no attached transcoder set is named 'third'"):
        model.ablate("tc.third.0.3")
    with pytest.raises(TranscoderError, match="not attached"):
        model.detach(random_set(model))
    model.detach(other)
    assert all(i.site.kind != "tc" for i in model.interventions)
    model.detach(tcs)
    assert model.unmodified and torch.equal(clean_logits(model), before)
