"""Attention views, token activations, the logit lens, DLA and head detectors."""

import pytest
import torch

from conftest import PARIS, PROMPT
from mechnb import HeadError, ViewError
from torchref import Reference


def test_attention_values_are_the_patterns(tiny_factory):
    model = tiny_factory("llama")
    result = model.attention(PROMPT, layers="1:3", heads=[0, 2])
    # transformers' eager attention weights of a fresh copy (`output_attentions`).
    attentions = Reference(model.hf, "llama", tokenizer=model.tokenizer).attentions(PROMPT)
    assert result.values.shape == (2, 2, 14, 14)
    assert torch.allclose(result.values, attentions[1:3, 0][:, [0, 2]], atol=1e-6)
    assert set(result.df.columns) >= {"layer", "head", "pos_q", "pos_k", "value"}
    html = result.html()
    assert html.count("window.CircuitsVis.AttentionHeads") == 2 and "Layer 2" in html and "L2H2" in html
    with pytest.raises(ViewError, match="layer 7 out of range"):
        model.attention(PROMPT, layers=[7])


def test_activations_of_a_neuron_a_head_and_a_direction(tiny_factory):
    model = tiny_factory("llama")
    prompts = [PROMPT, "Hello there"]
    neuron = model.activations("neuron.1.5", prompts)
    # Read by torch hooks on a fresh transformers copy, each prompt alone.
    reference = Reference(model.hf, "llama", tokenizer=model.tokenizer)
    assert torch.allclose(neuron.values[0, :14], reference.read(PROMPT, "neuron.1.5")[0], atol=1e-6)
    assert torch.allclose(neuron.values[1, :2], reference.read("Hello there", "neuron.1.5")[0], atol=1e-6)
    assert neuron.values[1, 2:].abs().max() == 0  # padding
    head = model.activations("head.1.2", PROMPT)
    assert torch.allclose(head.values[0], reference.read(PROMPT, "head.1.2")[0].norm(dim=-1), atol=1e-6)
    direction = torch.randn(model.d_model)
    projected = model.activations(direction, PROMPT, site="resid_post.1")
    assert torch.allclose(projected.values[0], reference.read(PROMPT, "resid_post.1")[0] @ direction, atol=1e-5)
    assert "ColoredTokens" in projected.html() and "TextNeuronActivations" in neuron.html()
    with pytest.raises(ViewError, match="d_model"):
        model.activations(torch.randn(3), PROMPT, site="resid_post.1")
    with pytest.raises(ViewError, match="needs the residual site"):
        model.activations(direction, PROMPT)


def test_logit_lens_decodes_each_layer(tiny_factory):
    model = tiny_factory("gpt2")
    result = model.logit_lens(PROMPT)
    assert result.values.shape == (3, 14)
    assert list(result.df.columns)[:5] == ["layer", "pos", "token", "top_token", "top_prob"]
    last = model.cache(PROMPT, "logits")["logits@-1"][0]
    # The last layer's lens is the model's own output distribution.
    expected = torch.softmax(last, -1)[last.argmax()]
    assert abs(result.values[-1, -1].item() - expected.item()) < 1e-5
    assert result.df["top_token"].iloc[-1] == model.tokenizer.decode([last.argmax().item()])


@pytest.mark.parametrize("name, layers, norm", [("gpt2", "transformer.h", "transformer.ln_f"),
                                                ("llama", "model.layers", "model.norm")])
def test_the_logit_lens_at_every_layer_is_the_residual_through_the_final_norm_and_unembedding(
        tiny_factory, name, layers, norm):
    """By hand, without mechnb: each decoder layer's output (a torch forward hook), the final
    norm, the unembedding, softmax; the probability of the next prompt token (the model's own
    prediction at the last position), at every layer and position."""
    model = tiny_factory(name)
    result = model.logit_lens(PROMPT)
    hf = model.hf
    outputs = []
    handles = [block.register_forward_hook(lambda m, a, out: outputs.append(out[0] if isinstance(out, tuple) else out))
               for block in hf.get_submodule(layers)]
    try:
        ids = model.tokenizer(PROMPT, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logits = hf(input_ids=ids).logits[0]
            final_norm = hf.get_submodule(norm)
            probs = torch.stack([torch.softmax(hf.get_output_embeddings()(final_norm(h))[0], -1) for h in outputs])
    finally:
        for handle in handles:
            handle.remove()
    targets = torch.cat([ids[0, 1:], logits[-1].argmax()[None]])
    expected = probs[:, torch.arange(len(targets)), targets]  # layer pos
    assert result.values.shape == expected.shape == (model.n_layers, len(targets))
    # Relative: a random tiny model spreads its probability near 1/vocab (2e-5) everywhere.
    assert torch.allclose(result.values.float(), expected, rtol=1e-4, atol=0)


@pytest.mark.parametrize("name", ["gpt2", "llama", "gpt_neox", "gemma2", "qwen2"])
def test_dla_parts_sum_to_the_logit_difference(tiny_factory, name):
    model = tiny_factory(name)
    result = model.dla(PROMPT, " Mary", " John")
    meta = result.meta
    parts = (result.values.sum() + meta["embed"] + meta["attention_biases"] + meta["norm_bias"]
             + meta["unembed_bias"])
    assert abs(parts.item() - meta["logit_diff"]) < 1e-3
    assert abs(meta["total"] - meta["logit_diff"]) < 1e-3
    if name != "gemma2":  # Gemma's final soft-capping is outside DLA
        logits = model.cache(PROMPT, "logits")["logits@-1"][0]
        mary, john = model.tokenizer.encode(" Mary")[0], model.tokenizer.encode(" John")[0]
        assert abs(meta["logit_diff"] - (logits[mary] - logits[john]).item()) < 1e-3
    assert result.values.shape == (model.n_layers, model.n_heads + 1)


def test_dla_zeroing_a_head_removes_its_share(tiny_factory):
    model = tiny_factory("llama")
    before = model.dla(PROMPT, " Mary", " John")
    with model.ablated("head.2.1"):
        after = model.dla(PROMPT, " Mary", " John")
    assert after.values[2, 1] == 0 and before.values[2, 1] != 0


def test_head_detectors_score_in_unit_interval(tiny_factory):
    model = tiny_factory("llama")
    result = model.detect_heads(["induction", "previous_token", "duplicate_token"], n_samples=2, seq_len=6)
    assert result.values.shape == (3, 3, 4)
    assert (result.values >= 0).all() and (result.values <= 1).all()
    assert result.meta["loss_first_half"] > 0
    with pytest.raises(HeadError, match="unknown head kind"):
        model.detect_heads("copying")


def test_head_scores_read_the_diagonals_of_transformers_attention(tiny_factory):
    model = tiny_factory("llama")
    kinds = ["previous_token", "duplicate_token", "induction"]
    result = model.detect_heads(kinds, n_samples=2, seq_len=5, seed=1)
    from mechnb.methods.heads import random_repeated_tokens

    tokens = random_repeated_tokens(model, 2, 5, 1)
    reference = Reference(model.hf, "llama")
    with torch.no_grad():
        attentions = reference.hf(tokens, output_attentions=True).attentions
    # By hand, position by position: query i attends to i-1, to i-5 (the same token in the
    # first half) and to i-4 (the token after it).
    for layer, pattern in enumerate(attentions):
        expected = torch.zeros(3, 4)
        for head in range(4):
            expected[0, head] = sum(pattern[:, head, i, i - 1].mean() for i in range(1, 10)) / 9
            expected[1, head] = sum(pattern[:, head, i, i - 5].mean() for i in range(5, 10)) / 5
            expected[2, head] = sum(pattern[:, head, i, i - 4].mean() for i in range(5, 10)) / 5
        assert torch.allclose(result.values[:, layer], expected, atol=1e-6), layer


def test_head_scores_of_hand_built_patterns():
    from mechnb.methods.heads import attention_at

    n = 4  # two halves of 4 tokens
    pattern = torch.zeros(1, 4, 2 * n, 2 * n)
    for i in range(2 * n):
        pattern[0, 0, i, max(i - 1, 0)] = 1  # previous token
        pattern[0, 1, i, i - n if i >= n else i] = 1  # duplicate token
        pattern[0, 2, i, i - n + 1 if i >= n else i] = 1  # induction
        pattern[0, 3, i, : i + 1] = 1 / (i + 1)  # uniform over what it may see
    scores = {kind: attention_at(pattern, kind, n).mean((0, 2))
              for kind in ("previous_token", "duplicate_token", "induction")}
    uniform_second_half = sum(1 / (i + 1) for i in range(n, 2 * n)) / n
    assert torch.allclose(scores["previous_token"],
                          torch.tensor([1, 0, 0, sum(1 / (i + 1) for i in range(1, 2 * n)) / (2 * n - 1)]))
    assert torch.allclose(scores["duplicate_token"], torch.tensor([0, 1, 0, uniform_second_half]))
    assert torch.allclose(scores["induction"], torch.tensor([0, 0, 1, uniform_second_half]))


@pytest.mark.slow
def test_embedded_model_has_induction_heads(real):
    result = real.detect_heads("induction")
    assert result.values.max() > 0.5
    assert result.meta["loss_repeated_half"] < 0.5 * result.meta["loss_first_half"]


@pytest.mark.slow
def test_embedded_logit_lens_and_dla(real):
    lens = real.logit_lens(PARIS)
    assert lens.df["top_token"].iloc[-1] == " Paris"
    assert lens.values[-1, -1] > lens.values[0, -1]
    dla = real.dla(PROMPT, " Mary", " John")
    assert abs(dla.meta["total"] - dla.meta["logit_diff"]) < 1e-3 and dla.meta["logit_diff"] > 3
