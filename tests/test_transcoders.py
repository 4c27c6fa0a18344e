"""Transcoders: the model, and sets read and written in mechnb's, SAELens 6's and circuit-tracer's layouts."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import PARIS
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
    tc = random_set_one()
    x, y = torch.randn(5, 16), torch.randn(5, 16)
    assert torch.allclose(tc.splice(x, y), y, atol=1e-6)
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
    with pytest.raises(TranscoderError, match="not a directory"):
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
