import json
import socket
import subprocess
import sys

import pandas as pd
import pytest
import torch

import mechnb
from conftest import PARIS, PROMPT, build_hf, clean_logits
from mechnb import ModelError
from mechnb.model import Model


def test_dimensions_of_a_tiny_model(tiny_factory):
    model = tiny_factory("llama")
    assert (model.n_layers, model.n_heads, model.n_kv_heads) == (3, 4, 2)
    assert (model.d_model, model.d_head, model.d_mlp) == (32, 8, 64)
    assert model.vocab_size == len(model.tokenizer)
    assert model.arch.name == "llama"
    info = model.info()
    assert info["n_layers"] == 3 and info["device"] == "cpu" and info["dtype"] == "float32"
    assert "MiB" in info["memory"]


def test_gpt2_dimensions(tiny_factory):
    model = tiny_factory("gpt2")
    assert (model.n_layers, model.n_heads, model.d_head, model.d_mlp) == (3, 4, 8, 128)


def test_top_is_a_sorted_table(tiny_factory):
    model = tiny_factory("llama")
    table = model.top(PROMPT, k=7)
    assert list(table.columns) == ["rank", "token", "token_id", "prob", "logit"]
    assert table["rank"].tolist() == list(range(1, 8))
    assert table["prob"].is_monotonic_decreasing
    expected = clean_logits(model)[0, -1].topk(7).indices.tolist()
    assert table["token_id"].tolist() == expected
    assert table["token"][0] == model.tokenizer.decode([expected[0]])


def test_load_from_a_local_directory(tmp_path, tokenizer):
    hf = build_hf("qwen2", tokenizer)
    hf.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model = mechnb.load(str(tmp_path), device="cpu")
    assert model.arch.name == "qwen2"
    assert torch.allclose(clean_logits(model), hf(**tokenizer(PROMPT, return_tensors="pt")).logits,
                          atol=1e-5)


def test_load_in_half_precision(tmp_path, tokenizer):
    build_hf("llama", tokenizer).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model = mechnb.load(tmp_path, dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    assert model.top(PROMPT, k=3).shape == (3, 5)


def test_missing_path_is_a_clear_error():
    with pytest.raises(ModelError, match="no such file or directory: './nowhere/model'"):
        mechnb.load("./nowhere/model")
    with pytest.raises(ModelError, match="no such GGUF file"):
        mechnb.load("/tmp/missing-model.gguf")


def test_directory_without_config_is_a_clear_error(tmp_path):
    with pytest.raises(ModelError, match="has no config.json"):
        mechnb.load(tmp_path)


def test_unsupported_architecture_lists_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "vocab_size": 10}))
    with pytest.raises(ModelError) as info:
        mechnb.load(tmp_path)
    for name in ["gpt2", "llama", "mistral", "qwen2", "gpt_neox", "gemma2"]:
        assert name in str(info.value)
    assert "'bert'" in str(info.value)


def test_bad_dtype_is_a_clear_error():
    with pytest.raises(ModelError, match="unknown dtype 'float8'.*float32"):
        mechnb.load("./x", dtype="float8")


def test_unknown_hub_id_offline_fails_fast_and_clearly(monkeypatch):
    import transformers

    tried, asked = [], []

    def refuse(*args, **kwargs):
        tried.append(args)
        raise OSError(-2, "Name or service not known")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", lambda *a, **k: asked.append(a))
    with pytest.raises(ModelError, match="cannot load hub model 'someone/no-such-model'.*unreachable"):
        mechnb.load("someone/no-such-model")
    # One connection attempt, then the error: huggingface_hub (and its 25 s of retries) never runs.
    assert len(tried) == 1 and asked == []


def test_hub_offline_variable_is_honoured(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="HF_HUB_OFFLINE is set"):
        mechnb.load("someone/no-such-model")


def test_wrapping_an_unsupported_model_is_refused(tokenizer):
    from transformers import BertConfig, BertLMHeadModel

    hf = BertLMHeadModel(BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1,
                                    num_attention_heads=2, intermediate_size=32, is_decoder=True))
    with pytest.raises(ModelError, match="unsupported architecture 'bert'"):
        Model(hf, tokenizer)


def test_import_is_light():
    code = "import sys, mechnb; assert 'torch' not in sys.modules and 'nnsight' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.slow
def test_embedded_model_predicts_paris_and_mary(real):
    assert real.name.startswith("SmolLM2-135M-Instruct")
    assert (real.n_layers, real.n_heads, real.d_model, real.d_head) == (30, 9, 576, 64)
    assert real.top(PARIS, k=5).token[0] == " Paris"
    assert real.top(PROMPT, k=5).token[0] == " Mary"


@pytest.mark.slow
def test_embedded_load_touches_no_network(monkeypatch, embedded_dir):
    def refuse(*args, **kwargs):
        raise AssertionError("mechnb.load() tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    model = mechnb.load()
    assert model.top(PARIS, k=1).token[0] == " Paris"


@pytest.mark.slow
def test_gguf_file_is_converted_once_and_cached(tmp_path, monkeypatch):
    from mechnb.core import embedded

    monkeypatch.setenv("MECHNB_CACHE", str(tmp_path))
    model = mechnb.load(embedded.gguf_file())
    assert model.top(PARIS, k=1).token[0] == " Paris"
    (directory,) = list(tmp_path.iterdir())
    assert (directory / "model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(directory.name + ".")]
    before = (directory / "model.safetensors").stat().st_mtime
    assert embedded.converted(embedded.gguf_file()) == directory
    assert (directory / "model.safetensors").stat().st_mtime == before
