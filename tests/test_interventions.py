"""Persistent interventions: ablations and hooks, applied to every forward until removed."""

import pytest
import torch

from conftest import PROMPT, clean_logits, hooks_left
from torchref import Reference
from mechnb import InterventionError, SiteError
from mechnb.core.interventions import Ablate, Hook

REFS = ["The cat sat on the mat", "A dog ran home quickly today"]


def traced_logits(model, writes=()):
    found = []
    with model.trace(PROMPT):
        for site, value in writes:
            model[site] = value
        found.append(model["logits"].save())
    return found[0]


@pytest.mark.parametrize("site", ["head.1.2", "neuron.1.5", "attn_out.1", "mlp_out.0",
                                  "resid_pre.1", "resid_mid.2", "resid_post.0", "embed"])
def test_zero_ablation_equals_zero_written_by_a_torch_hook(tiny_factory, site):
    model = tiny_factory("llama")
    # The reference: a fresh transformers copy with a torch hook zeroing the site.
    expected = Reference(model.hf, "llama", tokenizer=model.tokenizer).logits(PROMPT, {site: torch.zeros_like})
    model.ablate(site)
    assert torch.allclose(clean_logits(model), expected, atol=1e-5)  # plain HF forward too
    assert torch.allclose(traced_logits(model), expected, atol=1e-5)
    model.clear()
    assert not torch.allclose(clean_logits(model), expected, atol=1e-5)


def test_ablation_at_positions_only(tiny_factory):
    model = tiny_factory("llama")
    reference = Reference(model.hf, "llama", tokenizer=model.tokenizer)
    expected = reference.logits(PROMPT, {"head.1.0@3:5": torch.zeros_like})
    assert (expected[0, :3] == reference.logits(PROMPT)[0, :3]).all()
    assert (expected[0, 3:] - reference.logits(PROMPT)[0, 3:]).abs().max() > 1e-4
    model.ablate("head.1.0", positions="3:5")
    assert torch.allclose(traced_logits(model), expected, atol=1e-5)
    model.clear()
    model.ablate("head.1.0@'John'")
    assert torch.allclose(traced_logits(model), traced_logits_clear(model, "head.1.0@'John'"), atol=1e-5)


def traced_logits_clear(model, site):
    saved = model.interventions
    model.clear()
    try:
        return traced_logits(model, [(site, 0.0)])
    finally:
        model.add(saved)


def test_mean_ablation_uses_the_mean_over_reference_tokens(tiny_factory):
    model = tiny_factory("llama")
    # The reference: each prompt alone (no padding) through a fresh transformers copy, the head's
    # output read by a torch hook at every token.
    reference = Reference(model.hf, "llama", tokenizer=model.tokenizer)
    mean = torch.cat([reference.read(prompt, "head.1.2")[0] for prompt in REFS]).mean(0)
    (ablation,) = model.ablate("head.1.2", mode="mean", ref=REFS)
    assert torch.allclose(ablation.pool.mean(0), mean, atol=1e-6)
    ablated = reference.logits(PROMPT, {"head.1.2": lambda part: mean})
    assert (ablated - reference.logits(PROMPT)).abs().max() > 1e-3
    assert torch.allclose(clean_logits(model), ablated, atol=1e-5)
    found = []
    with model.trace(PROMPT):
        found.append(model["head.1"].save())
    assert torch.allclose(found[0][0, :, 2], mean.expand(found[0].shape[1], -1), atol=1e-6)
    assert "mean of" in model.interventions_table()["detail"][0]


def test_resample_ablation_is_seeded_and_draws_reference_values(tiny_factory):
    model = tiny_factory("llama")
    model.ablate("mlp_out.1", mode="resample", ref=REFS, seed=3)
    first, second = traced_logits(model), traced_logits(model)
    assert torch.equal(first, second)
    found = []
    with model.trace(PROMPT):
        found.append(model["mlp_out.1"].save())
    pool = model.interventions[0].pool
    for vector in found[0][0]:
        assert (pool - vector).abs().sum(-1).min() < 1e-5
    # The pool is the MLP's outputs at the reference prompts' tokens, read by a torch hook.
    reference = Reference(model.hf, "llama", tokenizer=model.tokenizer)
    rows = torch.cat([reference.read(prompt, "mlp_out.1")[0] for prompt in REFS])
    assert pool.shape == rows.shape and torch.cdist(pool, rows).min(1).values.max() < 1e-5
    model.clear()
    model.ablate("mlp_out.1", mode="resample", ref=REFS, seed=4)
    assert not torch.equal(traced_logits(model), first)


def test_scoped_ablation_is_removed_even_after_an_error(tiny_factory):
    model = tiny_factory("llama")
    clean = clean_logits(model)
    with pytest.raises(ValueError):
        with model.ablated(["head.1.0", "head.2.*"]):
            assert len(model.interventions) == 5
            raise ValueError
    assert model.interventions == []
    assert torch.equal(clean_logits(model), clean)
    assert hooks_left(model) == 0


def test_hook_runs_a_user_function_and_is_listed(tiny_factory):
    model = tiny_factory("llama")
    seen = []

    def double(value):
        seen.append(tuple(value.shape))
        return value * 2

    (hook,) = model.hook("resid_pre.1@-1", double)
    assert isinstance(hook, Hook)
    found = []
    with model.trace(PROMPT):
        found.append(model["resid_pre.1"].save())
    model.clear()
    plain = model.cache(PROMPT, "resid_pre.1")["resid_pre.1"]
    assert seen == [(1, model.d_model)]
    assert torch.allclose(found[0][:, -1], plain[:, -1] * 2)
    assert torch.allclose(found[0][:, :-1], plain[:, :-1])
    table = model.interventions_table()
    assert table.empty


def test_a_read_in_a_trace_shows_the_ablated_value(tiny_factory):
    model = tiny_factory("llama")
    model.ablate("head.1.1")
    found = []
    with model.trace(PROMPT):
        found.append(model["head.1"].save())
    assert found[0][:, :, 1].abs().max() == 0 and found[0][:, :, 0].abs().max() > 0


def test_interventions_are_data(tiny_factory):
    model = tiny_factory("llama")
    added = model.ablate(["head.1.0", "mlp_out.2"], mode="zero")
    assert all(isinstance(a, Ablate) for a in added)
    assert model.interventions == added
    assert repr(added[0]) == "Ablate('head.1.0', zero)"
    model.remove(added[0])
    assert model.interventions == added[1:]
    assert list(model.interventions_table()["site"]) == ["mlp_out.2"]


def test_bad_ablations_are_refused_and_leave_nothing(tiny_factory):
    model = tiny_factory("llama")
    for kwargs, error, text in [(dict(sites="head.9.0"), SiteError, "out of range"),
                                (dict(sites="head.1.0", mode="average"), InterventionError, "unknown ablation mode"),
                                (dict(sites="head.1.0", mode="mean"), InterventionError, "needs reference prompts"),
                                (dict(sites="pattern.1", mode="mean", ref=REFS), SiteError, "undefined"),
                                (dict(sites="logits"), SiteError, "ablating the logits"),
                                (dict(sites=[]), SiteError, "at least one site")]:
        with pytest.raises(error, match=text):
            model.ablate(**kwargs)
    assert model.interventions == []
    with pytest.raises(InterventionError, match="hook takes a function"):
        model.hook("head.1.0", 3)
