import pytest
import torch

from conftest import PROMPT
from mechnb import SiteError


def test_cache_shapes_padding_and_lookups(tiny_factory):
    model = tiny_factory("llama")
    prompts = [PROMPT, "Hello there"]
    cache = model.cache(prompts, ["resid_pre.1", "pattern.2", "head.1", "neuron.0", "logits"])
    n = max(cache.lengths)
    assert cache.lengths == [len(model.tokens(p)) for p in prompts]
    assert cache.tokens[1] == model.tokens("Hello there")
    assert cache.attention_mask.sum(1).tolist() == cache.lengths
    assert cache["resid_pre.1"].shape == (2, n, model.d_model)
    assert cache["pattern.2"].shape == (2, model.n_heads, n, n)
    assert cache["pattern.2.1"].shape == (2, n, n)
    assert cache["head.1.3"].shape == (2, n, model.d_head)
    assert cache["neuron.0.7"].shape == (2, n)
    assert cache["logits"].shape == (2, n, model.vocab_size)
    last = cache["resid_pre.1@-1"]
    assert torch.equal(last[1], cache["resid_pre.1"][1, cache.lengths[1] - 1])
    assert torch.equal(cache["head.1.3@0:2"], cache["head.1"][:, 0:2, 3])
    assert "resid_pre.1" in cache and "resid_pre.2" not in cache
    assert cache.keys() == ["neuron.0", "resid_pre.1", "head.1", "pattern.2", "logits"]


def test_pattern_positions_select_query_rows(tiny_factory):
    model = tiny_factory("llama")
    cache = model.cache(PROMPT, "pattern.1")
    assert torch.equal(cache["pattern.1@-1"], cache["pattern.1"][:, :, -1])
    assert torch.equal(cache["pattern.1.2@-1"], cache["pattern.1"][:, 2, -1])


def test_missing_sites_say_what_the_cache_holds(tiny_factory):
    model = tiny_factory("llama")
    cache = model.cache(PROMPT, "resid_pre.1")
    with pytest.raises(SiteError, match="resid_post.1 is not in this cache, which holds resid_pre.1"):
        cache["resid_post.1"]
    with pytest.raises(SiteError):
        model.cache(PROMPT, [])
    with pytest.raises(SiteError, match="out of range"):
        model.cache(PROMPT, "resid_pre.9")


def test_token_positions_in_a_cache(tiny_factory):
    model = tiny_factory("llama")
    cache = model.cache(PROMPT, "resid_post.0")
    johns = [i for i, t in enumerate(cache.tokens[0]) if t.strip() == "John"]
    assert len(johns) == 2
    assert torch.equal(cache["resid_post.0@'John'"], cache["resid_post.0"][:, johns])


def test_a_cache_without_logits_stops_after_its_last_site(tiny_factory):
    model = tiny_factory("llama")
    ran = []
    handles = [model.hf.lm_head.register_forward_hook(lambda *a: ran.append("unembed")),
               model.hf.model.layers[2].register_forward_hook(lambda *a: ran.append("layer 2"))]
    try:
        early = model.cache(PROMPT, ["resid_post.0", "pattern.1"])
        assert ran == []
        full = model.cache(PROMPT, ["resid_post.0", "pattern.1", "logits"])
        assert ran == ["layer 2", "unembed"]
    finally:
        for handle in handles:
            handle.remove()
    assert torch.equal(early["resid_post.0"], full["resid_post.0"])
    assert torch.equal(early["pattern.1"], full["pattern.1"])
