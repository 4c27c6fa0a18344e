"""mechnb's attention function reproduces each architecture's own attention."""

import pytest
import torch

from conftest import ARCH_NAMES, PROMPT, build_hf


@pytest.mark.parametrize("name", ARCH_NAMES)
def test_hooked_attention_matches_the_stock_model(name, tokenizer):
    from mechnb.model import Model

    batch = tokenizer([PROMPT, "Hello there"], return_tensors="pt", padding=True,
                      padding_side="right")
    stock = build_hf(name, tokenizer)
    stock.set_attn_implementation("eager")
    with torch.no_grad():
        expected = stock(**batch).logits
    model = Model(build_hf(name, tokenizer), tokenizer)
    assert model.hf.config._attn_implementation == "mechnb"
    with torch.no_grad():
        got = model.hf(**batch).logits
    mask = batch["attention_mask"].bool()
    assert torch.allclose(got[mask], expected[mask], atol=1e-5)


def test_patterns_are_causal_probabilities(tiny):
    cache = tiny.cache(PROMPT, "pattern.*")
    patterns = cache["pattern.*"]  # layer batch head q k
    assert torch.allclose(patterns.sum(-1), torch.ones(()), atol=1e-5)
    n = patterns.shape[-1]
    above = torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)
    assert patterns[..., above].abs().max() == 0


def test_sliding_window_reaches_the_pattern(tiny_factory):
    model = tiny_factory("gemma2")  # sliding_window=4 on alternate layers
    pattern = model.cache(PROMPT, "pattern.0")["pattern.0"][0]
    # Layer 0 is a sliding layer: the last query sees only its 4 most recent keys.
    assert pattern[:, -1, :-4].abs().max() == 0
    assert pattern[:, -1, -4:].sum(-1).allclose(torch.ones(()), atol=1e-5)
