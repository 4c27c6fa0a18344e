"""Generation under interventions, against transformers' own greedy generation."""

import pytest
import torch

from conftest import PARIS, PROMPT
from mechnb import GenerationError


def hf_greedy(model, prompt, n):
    ids = model.tokenizer(prompt, return_tensors="pt")
    out = model.hf.generate(**ids, max_new_tokens=n, do_sample=False, pad_token_id=model.tokenizer.eos_token_id)
    return out[0, ids["input_ids"].shape[1]:].tolist()


@pytest.mark.parametrize("name", ["llama", "gpt2", "gpt_neox"])
def test_greedy_generation_equals_transformers_token_for_token(tiny_factory, name):
    model = tiny_factory(name)
    result = model.generate([PROMPT, "Hello"], max_new_tokens=8)
    for row, prompt in enumerate([PROMPT, "Hello"]):
        ours = [t for t in result.values[row].tolist() if t >= 0]
        assert ours == hf_greedy(model, prompt, 8)[:len(ours)]
    assert list(result.df.columns) == ["prompt", "interventions", "continuation", "n_tokens"]


def test_ablating_a_layer_changes_generation_and_compare_runs_both_in_one_batch(tiny_factory):
    model = tiny_factory("llama")
    plain = model.generate(PROMPT, max_new_tokens=8).values[0]
    with model.ablated("head.2.*"):
        both = model.generate(PROMPT, max_new_tokens=8, compare=True)
    assert both.df.interventions.tolist() == ["on", "off"]
    assert torch.equal(both.values[1], plain)
    assert not torch.equal(both.values[0], plain)
    assert model.interventions == []


def test_sampling_is_seeded_and_streams(tiny_factory):
    model = tiny_factory("llama")
    seen = []
    first = model.generate(PROMPT, max_new_tokens=6, do_sample=True, seed=3, top_p=0.9, stream=seen.append)
    again = model.generate(PROMPT, max_new_tokens=6, do_sample=True, seed=3, top_p=0.9)
    other = model.generate(PROMPT, max_new_tokens=6, do_sample=True, seed=4, temperature=5.0)
    assert torch.equal(first.values, again.values) and not torch.equal(first.values, other.values)
    assert len(seen) == 6 and seen[-1] == first.df.continuation.tolist()
    assert len(seen[0][0]) <= len(seen[-1][0])
    assert "<table>" in first._repr_mimebundle_()["text/html"]


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompts=""), "non-empty"), (dict(prompts=PROMPT, max_new_tokens=0), "max_new_tokens"),
    (dict(prompts=PROMPT, do_sample=True, temperature=0), "temperature"),
    (dict(prompts=PROMPT, top_p=1.5), "top_p")])
def test_bad_generation_settings_get_clear_errors(tiny_factory, kwargs, message):
    model = tiny_factory("llama")
    with pytest.raises(GenerationError, match=message):
        model.generate(**kwargs)


@pytest.mark.slow
def test_embedded_model_generation_equals_transformers(real):
    for prompt in (PARIS, "I think the movie was"):
        ours = [t for t in real.generate(prompt, max_new_tokens=12).values[0].tolist() if t >= 0]
        assert ours == hf_greedy(real, prompt, 12)
