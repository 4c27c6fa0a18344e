import json
import socket
import subprocess
import sys

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


def test_half_precision_agrees_with_full_precision(tmp_path, tokenizer):
    """bf16 against fp32 on the same weights. bf16 keeps 8 bits of mantissa (a relative step of
    0.4 %): activations, patterns and logits agree within 2 % of each value's largest entry
    (measured: 0.2-0.7 %), and patching's values within 1 % of the largest logit (measured:
    0.5 %; the tiny model's effects are 1e-2 to 2e-2, so a patch not applied would miss by 2-5
    times the bound)."""
    build_hf("llama", tokenizer).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    half, full = mechnb.load(tmp_path, dtype="bfloat16"), mechnb.load(tmp_path)
    assert half.dtype == torch.bfloat16 and full.dtype == torch.float32
    assert half.top(PROMPT, k=3).shape == (3, 5)
    sites = ["resid_post.2", "pattern.1", "head.1", "logits"]
    low, high = half.cache(PROMPT, sites), full.cache(PROMPT, sites)
    for site in sites:
        scale = high[site].abs().max()
        assert low[site].dtype == torch.bfloat16
        assert (low[site].float() - high[site]).abs().max() < 0.02 * scale, site
    bound = 0.01 * high["logits"].abs().max()
    corrupt = "When Mary and John went to the store, Mary gave a drink to"
    for sites in ["resid_pre.*", "head.*.*"]:
        a, b = (m.patch(PROMPT, corrupt, sites, answer=" Mary", wrong=" John") for m in (half, full))
        assert a.values.dtype == torch.float32
        assert (a.values - b.values).abs().max() < bound, sites


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


def byte_level_alphabet() -> list[str]:
    """The 256 characters GPT-2's byte-level BPE uses for the 256 bytes (printable ones stand for themselves)."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    shifted = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(shifted))]


def write_tiny_gguf(path, seed=0):
    """A two-layer Llama as llama.cpp lays it out (SmolLM2's keys, float32 tensors, q/k rows
    permuted for its rotary layout, tied embeddings), and the transformers model it was written from."""
    import gguf
    import numpy as np
    from transformers import LlamaConfig, LlamaForCausalLM

    merges = ["Ġ P", "a r", "i s", "ĠP ar", "ĠPar is"]
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *byte_level_alphabet(),
              *(m.replace(" ", "") for m in merges)]
    heads, kv_heads = 4, 2
    config = LlamaConfig(vocab_size=len(tokens), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, rms_norm_eps=1e-5,
                         rope_theta=10000.0, max_position_embeddings=128, tie_word_embeddings=True,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(seed)
    reference = LlamaForCausalLM(config).eval()
    weights = {name: tensor.numpy() for name, tensor in reference.state_dict().items()}

    def rotary_rows(w, n):  # llama.cpp's convert_hf_to_gguf permutes q and k this way
        return w.reshape(n, 2, w.shape[0] // n // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(2)
    writer.add_context_length(128)
    writer.add_embedding_length(64)
    writer.add_feed_forward_length(128)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(64 // heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL] * 3 + [gguf.TokenType.NORMAL] * (len(tokens) - 3))
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_tensor("token_embd.weight", weights["model.embed_tokens.weight"])
    parts = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
             "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
             "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj"}
    for layer in range(2):
        for ours, theirs in parts.items():
            w = weights[f"model.layers.{layer}.{theirs}.weight"]
            if ours in ("attn_q", "attn_k"):
                w = rotary_rows(w, heads if ours == "attn_q" else kv_heads)
            writer.add_tensor(f"blk.{layer}.{ours}.weight", np.ascontiguousarray(w))
    writer.add_tensor("output_norm.weight", weights["model.norm.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return reference


def test_gguf_file_is_converted_once_and_cached(tmp_path, monkeypatch):
    """The converter on a GGUF laid out as the embedded one: weights exact, tokenizer whole, cached once.

    The embedded model itself is converted by `make` (mechnb.load() before the tests) and
    answers " Paris" in test_embedded_model_predicts_paris_and_mary.
    """
    from mechnb.core import embedded

    source = tmp_path / "tiny.gguf"
    reference = write_tiny_gguf(source)
    cache = tmp_path / "cache"
    monkeypatch.setenv("MECHNB_CACHE", str(cache))
    model = mechnb.load(source)
    (directory,) = list(cache.iterdir())
    assert (directory / "model.safetensors").is_file()
    assert not [p for p in cache.iterdir() if p.name.startswith(directory.name + ".")]  # no staging left
    converted = model.hf.state_dict()
    for name, tensor in reference.state_dict().items():
        assert torch.equal(converted[name], tensor), name
    assert "quantization_config" not in json.loads((directory / "config.json").read_text())
    assert model.tokenizer.convert_ids_to_tokens(model.tokenizer(" Paris")["input_ids"]) == ["ĠParis"]
    batch = model.tokenizer(" Paris is", return_tensors="pt")
    with torch.no_grad():  # same weights; rope, norm and tying read from the file (mechnb picks its attention kernel)
        torch.testing.assert_close(clean_logits(model, " Paris is"), reference(**batch).logits)
    before = (directory / "model.safetensors").stat().st_mtime_ns
    assert embedded.converted(source) == directory
    assert (directory / "model.safetensors").stat().st_mtime_ns == before
