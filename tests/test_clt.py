"""Cross-layer transcoders: exact graphs over them, the sink, circuit-tracer's files (lazy
decoders), features as sites, evaluation, and bad input."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import PARIS, PROMPT as IOI, clean_logits
from mechnb import GraphError, TranscoderError
from mechnb.graphs import build
from mechnb.transcoders import Transcoder, load
from mechnb.transcoders.clt import CrossLayerTranscoder

from test_graphs import random_set


def random_clt(model, width=32, kind="relu", skip=False, reads="mlp_in", window=None, seed=0, k=6):
    """A random CLT for every layer of `model`, small enough to keep the replacement model well
    conditioned (decoders shrink with the layers they write to)."""
    g = torch.Generator().manual_seed(seed)
    d, n = model.d_model, model.n_layers
    encoders, decoders = {}, {}
    for layer in range(n):
        tc = Transcoder(d, width, kind=kind, k=k if kind == "topk" else None, skip=skip, decoder=False)
        with torch.no_grad():
            tc.W_enc.copy_(torch.randn(d, width, generator=g) / d ** 0.5)
            tc.b_enc.copy_(torch.randn(width, generator=g) * 0.1 - 0.05)
            tc.b_dec.copy_(torch.randn(d, generator=g) * 0.1)
            if skip:
                tc.W_skip.copy_(torch.randn(d, d, generator=g) * 0.1 / d ** 0.5)
            if kind == "jumprelu":
                tc.threshold.fill_(0.1)
        tc.requires_grad_(False)
        encoders[layer] = tc
        count = n - layer if window is None else min(window, n - layer)
        decoders[layer] = torch.randn(width, count, d, generator=g) / (width * count) ** 0.5
    return CrossLayerTranscoder(encoders, decoders, reads=reads, window=window,
                                model={"n_layers": n, "d_model": d})


CASES = [("llama", {}), ("llama", dict(skip=True, kind="jumprelu")), ("gpt2", dict(window=2, kind="topk")),
         ("gemma2", dict(skip=True))]


@pytest.mark.parametrize("arch,options", CASES, ids=[f"{a}-{'-'.join(o) or 'plain'}" for a, o in CASES])
def test_every_clt_edge_is_exact_and_features_write_to_later_layers(tiny_factory, arch, options):
    model = tiny_factory(arch)
    before = clean_logits(model)
    clt = random_clt(model, **options)
    graph = build(model, PARIS, clt, batch_size=16)
    assert graph.completeness_error() < 1e-4
    checked = graph.verify(n=None)
    assert len(checked) == graph.logit_start and checked.max_error.max() < 1e-3, checked.sort_values("max_error").tail(3)
    # The sink: a special token first, nothing at position 0.
    assert int(graph.input_ids[0, 0]) in model.tokenizer.all_special_ids and graph.tokens[1:] == \
        [model.tokenizer.decode([t]) for t in model.tokenizer(PARIS)["input_ids"]]
    assert graph.n_features > 10 and (graph.feature_pos > 0).all()
    assert graph.replacement.errors[:, 0].abs().max() == 0 and "attention sink" in " ".join(graph.meta["notes"])
    # Edges from layer 0's features reach features beyond layer 1: through their later decoders.
    deep = graph.feature_layer >= 2
    first = (graph.feature_layer == 0).nonzero().squeeze(-1)
    assert graph.adjacency[:graph.n_features][deep][:, first].abs().sum() > 0
    assert torch.equal(clean_logits(model), before)


def test_a_clt_with_one_layer_windows_is_the_per_layer_set(tiny_factory):
    """window=1: each feature writes to its own layer only, the graph of the same per-layer set."""
    model = tiny_factory("llama")
    tcs = random_set(model, kind="topk")
    encoders = {}
    for layer, tc in tcs.transcoders.items():
        encoder = Transcoder(tc.d_in, tc.width, kind="topk", k=tc.k, decoder=False)
        encoder.load_state_dict({k: v for k, v in tc.state_dict().items() if k != "W_dec"})
        encoders[layer] = encoder
    clt = CrossLayerTranscoder(encoders, {layer: tc.W_dec.detach()[:, None] for layer, tc in tcs.transcoders.items()},
                               window=1, model=tcs.model)
    a, b = build(model, PARIS, tcs), build(model, PARIS, clt)
    assert torch.allclose(a.adjacency, b.adjacency, atol=1e-5) and a.n_features == b.n_features
    without = build(model, PARIS, tcs, sink=False)
    assert (without.feature_pos == 0).any() and without.tokens[0] == model.tokenizer.decode(
        model.tokenizer(PARIS)["input_ids"][:1])


def test_circuit_tracer_layout_round_trip_with_lazy_decoders(tiny_factory, tmp_path):
    model = tiny_factory("llama")
    clt = random_clt(model, kind="jumprelu", window=2)
    clt.model["name"] = model.name
    folder = clt.save(tmp_path / "clt")
    # circuit-tracer's layout: every later layer's decoder, zero beyond the window.
    W_dec_0 = load_file(str(folder / "W_dec_0.safetensors"))["W_dec_0"]
    assert W_dec_0.shape == (32, model.n_layers, model.d_model) and W_dec_0[:, 2:].abs().max() == 0
    assert load_file(str(folder / "W_enc_1.safetensors"))["W_enc_1"].shape == (32, model.d_model)
    loaded = load(folder)
    assert isinstance(loaded, CrossLayerTranscoder) and loaded.lazy and loaded.window == 2
    assert torch.equal(loaded.decoder(1), clt.decoder(1)) and torch.equal(loaded[1].W_enc, clt[1].W_enc)
    a, b = build(model, PARIS, clt), build(model, PARIS, loaded)
    assert torch.equal(a.adjacency, b.adjacency)
    assert load(folder, lazy=False).lazy is False
    norms = loaded.decoder_norms()
    assert norms.shape == (model.n_layers, model.n_layers) and norms.iloc[0, 2:].isna().all()
    # circuit-tracer's own files (no mechnb section): relu or jumprelu from the threshold files.
    (folder / "config.yaml").write_text("model_kind: cross_layer_transcoder\nfeature_input_hook: mlp.hook_in\n"
                                        "feature_output_hook: mlp.hook_out\n")
    plain = load(folder)
    assert plain.kind == "jumprelu" and plain.window is None and len(plain.targets(0)) == model.n_layers
    assert torch.allclose(build(model, PARIS, plain).adjacency, a.adjacency, atol=1e-6)


def test_attached_clt_features_are_sites_that_write_to_every_later_layer(tiny_factory):
    model = tiny_factory("llama")
    before = clean_logits(model, IOI)
    clt = random_clt(model, skip=True)
    model.attach(clt)
    assert torch.allclose(clean_logits(model, IOI), before, atol=1e-5)  # unedited: the same model
    acts = model.cache(IOI, "tc.0")["tc.0"][0]
    feature = int(acts[-1].argmax())
    assert acts[-1, feature] > 0
    model.ablate(f"tc.0.{feature}@-1")
    ablated = clean_logits(model, IOI)
    model.clear("ablate")
    model.detach(clt)
    assert model.unmodified
    handles = []
    for layer in range(model.n_layers):
        def remove(module, args, output, layer=layer):
            output = output.clone()
            output[0, -1] -= acts[-1, feature] * clt.decoder(0)[feature, layer]
            return output
        handles.append(model.hf.model.layers[layer].mlp.register_forward_hook(remove))
    expected = clean_logits(model, IOI)
    for handle in handles:
        handle.remove()
    assert torch.allclose(ablated, expected, atol=1e-5) and not torch.allclose(ablated, before, atol=1e-3)
    ev = clt.evaluate(model, [IOI * 4, PARIS * 6], n_tokens=200, context=16)
    assert len(ev.layers) == model.n_layers and 0 <= ev.summary["agreement"] <= 1
    assert torch.equal(clean_logits(model, IOI), before)


def test_bad_clt_input_is_one_clear_line_and_the_model_stays_clean(tiny_factory, tmp_path):
    model = tiny_factory("llama")
    before = clean_logits(model)
    clt = random_clt(model, kind="jumprelu")
    clt.model["name"] = model.name
    folder = clt.save(tmp_path / "clt")
    (folder / "W_dec_1.safetensors").rename(tmp_path / "away.safetensors")
    with pytest.raises(TranscoderError, match="W_dec_1.safetensors is missing"):
        load(folder)
    (tmp_path / "away.safetensors").rename(folder / "W_dec_1.safetensors")
    # NaN in the decoder rows of a feature the graph reads: said when the rows are read.
    graph = build(model, PARIS, clt)
    layer, feature = int(graph.feature_layer[0]), int(graph.feature_id[0])
    tensors = load_file(str(folder / f"W_dec_{layer}.safetensors"))
    tensors[f"W_dec_{layer}"][feature, 0, 0] = float("nan")
    save_file(tensors, str(folder / f"W_dec_{layer}.safetensors"))
    with pytest.raises(TranscoderError, match=f"NaN or infinite values in W_dec_{layer}"):
        build(model, PARIS, load(folder))
    assert torch.equal(clean_logits(model), before)
    with pytest.raises(TranscoderError, match="window is how many layers"):
        random_clt(model, window=0)
    with pytest.raises(GraphError, match="only the special token"):
        build(model, model.tokenizer.decode([model.tokenizer.eos_token_id]), clt)
    other = tiny_factory("gpt2")
    with pytest.raises(TranscoderError, match="made for tiny-llama"):
        build(other, PARIS, clt)
    tcs = random_set(model)
    model.attach(tcs)
    with pytest.raises(TranscoderError, match="already have the per-layer set 'tc' attached"):
        model.attach(clt, name="clt")
    model.detach(tcs)
    assert torch.equal(clean_logits(model), before)


def test_a_clt_loads_by_hub_id_from_the_cache_offline(tiny_factory, tmp_path, monkeypatch):
    from huggingface_hub import constants

    from hubcache import lay_out

    model = tiny_factory("llama")
    clt = random_clt(model, kind="jumprelu")
    folder = clt.save(tmp_path / "saved")
    cache = tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    files = {f"clt/{p.name}": p.read_bytes() for p in folder.iterdir()}
    lay_out(cache, "org/tiny-clt", files)
    loaded = load("org/tiny-clt", "clt")
    assert isinstance(loaded, CrossLayerTranscoder) and loaded.lazy and loaded.n_layers == model.n_layers
    assert torch.equal(loaded.decoder(0), clt.decoder(0)) and loaded.meta["scan"] == "org/tiny-clt//clt"
    with pytest.raises(TranscoderError, match="not in the Hugging Face cache|no SAE or transcoder files"):
        load("org/tiny-clt", "elsewhere")


def test_clt_training_learns_writes_later_layers_and_resumes_exactly(tiny_factory, tmp_path, monkeypatch):
    from mechnb.transcoders import train
    from test_transcoders import TRAIN, count_forwards, stop_at_batch, texts

    model = tiny_factory("llama")
    forwards = count_forwards(monkeypatch)
    clt = train(model, texts(), cross_layer=True, **TRAIN)
    assert isinstance(clt, CrossLayerTranscoder) and len(forwards) == clt.history.step.iloc[-1] == 13
    assert clt.history.l0.iloc[-1] <= 4 and clt.meta["forward_seconds"] < clt.meta["seconds"]
    # Cross-layer blocks start at zero and learn: layer 0's features write to layer 2.
    assert clt.decoder(0)[:, 2].norm() > 0.01 * clt.decoder(0)[:, 0].norm()
    fvu = clt.history.fvu  # it learns: the last three steps' FVU well below the first three's
    assert fvu.iloc[-3:].mean() < fvu.iloc[:3].mean() - 0.04, fvu.tolist()
    held_out = clt.evaluate(model, texts(50)[40:], n_tokens=300, context=40)
    assert (held_out.layers.fvu < 0.9).all() and 0 <= held_out.summary["agreement"] <= 1
    graph = model.graph(PARIS, clt)
    assert graph.completeness_error() < 1e-4 and graph.verify(n=5).max_error.max() < 1e-3
    # Stopped by Ctrl-C at the 6th batch, then resumed: the same CLT as one run.
    undo = stop_at_batch(monkeypatch, 6)
    first = train(model, texts(), cross_layer=True, checkpoint=tmp_path / "ck", save_every=2, **TRAIN)
    assert first.meta["interrupted"] and first.meta["steps"] == 5
    undo()
    resumed = train(model, texts(), cross_layer=True, checkpoint=tmp_path / "ck", save_every=2, **TRAIN)
    for layer in clt.layers:
        assert torch.allclose(resumed.decoder(layer), clt.decoder(layer), atol=1e-6)
        assert torch.allclose(resumed[layer].W_enc, clt[layer].W_enc, atol=1e-6)
    windowed = train(model, texts(10), cross_layer=True, window=2, kind="jumprelu", skip=True,
                     **{**TRAIN, "n_tokens": 2000})
    assert windowed.window == 2 and windowed.kind == "jumprelu" and len(windowed.targets(0)) == 2
    with pytest.raises(TranscoderError, match="window is how many layers"):
        train(model, texts(), cross_layer=True, window=0, **TRAIN)
    with pytest.raises(TranscoderError, match="covers every layer"):
        train(model, texts(), cross_layer=True, layers=[0, 1], **TRAIN)


def test_a_clt_decoders_learning_rate_is_scaled_by_its_blocks():
    """A decoder row is unit over its T blocks, its weights about 1/sqrt(T d): Adam's step, about
    lr a weight, is scaled by 1/sqrt(T) so that it moves each layer's decoders by the same fraction."""
    from mechnb.transcoders.train import _clt_groups, _CrossLayer

    clt = _CrossLayer(4, 8, 6, "topk", 2, False, None, "cpu")
    groups = _clt_groups(clt, 0.01)
    by_parameter = {id(p): group["lr"] for group in groups for p in group["params"]}
    assert [by_parameter[id(W)] for W in clt.W_dec] == pytest.approx([0.01 / 2, 0.01 / 3 ** 0.5, 0.01 / 2 ** 0.5, 0.01])
    assert by_parameter[id(clt.W_enc[0])] == by_parameter[id(clt.b_dec)] == 0.01
    assert sum(len(group["params"]) for group in groups) == sum(1 for p in clt.parameters() if p.requires_grad)
    windowed = _CrossLayer(4, 8, 6, "topk", 2, False, 2, "cpu")
    assert [group["lr"] for group in _clt_groups(windowed, 0.01)[1:]] == pytest.approx([0.01 / 2 ** 0.5] * 3 + [0.01])
