"""Steering vectors and the Steer intervention."""

import pytest
import torch

from conftest import PROMPT
from torchref import Reference
from mechnb.core.batch import Batch
from mechnb import SiteError, SteerError

POSITIVE = ["I love this movie, it was", "What a wonderful day, I feel", "This is great, I am so happy and"]
NEGATIVE = ["I hate this movie, it was", "What a terrible day, I feel", "This is awful, I am so sad and"]


def logits(model, prompt=PROMPT):
    with torch.no_grad():
        return model.hf(**Batch.of(model.tokenizer, prompt).inputs("cpu")).logits


def test_steering_vector_is_the_difference_of_means_at_last_tokens(tiny_factory):
    model = tiny_factory("llama")
    vector = model.steering_vector(POSITIVE, NEGATIVE, "resid_pre.2")

    def mean(prompts):
        # transformers' own hidden states (entry 2 is what layer 2 reads), each prompt alone.
        rows = []
        for prompt in prompts:
            with torch.no_grad():
                states = model.hf(**model.tokenizer(prompt, return_tensors="pt"), output_hidden_states=True)
            rows.append(states.hidden_states[2][0, -1])
        return torch.stack(rows).mean(0)

    assert vector.shape == (model.d_model,)
    # A tiny random model's entries are about 5e-3: the check is relative to the largest.
    assert (vector - (mean(POSITIVE) - mean(NEGATIVE))).abs().max() < 1e-4 * vector.abs().max()
    means = model.steering_vector(POSITIVE, NEGATIVE, "resid_pre.2", positions="mean")
    assert not torch.allclose(means, vector)


def test_scale_zero_is_no_steering_and_steering_adds_the_vector(tiny_factory):
    model = tiny_factory("llama")
    vector = torch.randn(model.d_model)
    clean = logits(model)
    with model.steered("resid_pre.1", vector, scale=0):
        assert torch.equal(logits(model), clean)
    with model.steered("resid_pre.1@-1", vector, scale=3):
        steered = logits(model)
        with model.trace(PROMPT):
            seen = model["resid_pre.1"].save()
    assert torch.equal(steered[:, :-1], clean[:, :-1]) and not torch.allclose(steered[:, -1], clean[:, -1])
    with model.trace(PROMPT):
        plain = model["resid_pre.1"].save()
    assert torch.allclose(seen[0, -1] - plain[0, -1], 3 * vector, atol=1e-5)
    # A torch hook adding 3 * vector to what layer 1 reads at the last token, on a fresh copy.
    added = Reference(model.hf, "llama", tokenizer=model.tokenizer).logits(
        PROMPT, {"resid_pre.1@-1": lambda part: part + 3 * vector})
    assert torch.allclose(steered, added, atol=1e-5)
    assert model.interventions == [] and torch.equal(logits(model), clean)


def test_steering_along_an_sae_feature_uses_its_decoder_direction(tiny_factory):
    from mechnb.sae import SAE

    model = tiny_factory("llama")
    sae = SAE(model.d_model, 16, kind="relu", site="resid_post.1", name="tiny")
    torch.nn.init.normal_(sae.W_dec)
    model.attach(sae)
    (made,) = model.steer("resid_post.1", "sae.1.5", scale=2.0)
    assert torch.equal(made.vector, sae.W_dec[5].detach()) and made.source == "sae.1.5"
    table = model.interventions_table()
    assert "steer" in table.kind.tolist()
    with pytest.raises(SiteError, match="features 0-15"):
        model.steer("resid_post.1", "sae.1.99")
    model.clear()


@pytest.mark.parametrize("site, vector, scale, error, message", [
    ("resid_pre.1", torch.zeros(5), 1.0, SteerError, "32-wide"),
    ("resid_pre.1", torch.full((32,), float("nan")), 1.0, SteerError, "NaN"),
    ("pattern.1", torch.zeros(32), 1.0, SiteError, "not a vector-valued site"),
    ("resid_pre.1", [0.0] * 32, 1.0, SteerError, "takes a tensor"),
    ("resid_pre.1", torch.zeros(32), "big", SteerError, "scale must be a number"),
    ("resid_pre.9", torch.zeros(32), 1.0, SiteError, "out of range"),
])
def test_bad_steering_gets_a_clear_error_and_adds_nothing(tiny_factory, site, vector, scale, error, message):
    model = tiny_factory("llama")
    clean = logits(model)
    with pytest.raises(error, match=message):
        model.steer(site, vector, scale=scale)
    assert model.interventions == [] and torch.equal(logits(model), clean)


@pytest.mark.slow
def test_sentiment_steering_shifts_positive_against_negative_words(real):
    good = [" great", " good", " amazing", " wonderful", " fantastic"]
    bad = [" terrible", " bad", " awful", " boring", " horrible"]
    good_ids, bad_ids = ([real.tokenizer.encode(w, add_special_tokens=False)[0] for w in words] for words in (good, bad))
    vector = real.steering_vector(POSITIVE, NEGATIVE, "resid_pre.12")

    def shift(scale):
        """log P(positive words) - log P(negative words) after "I think the movie was"."""
        with real.steered("resid_pre.12", vector, scale=scale):
            probs = torch.softmax(logits(real, "I think the movie was")[0, -1], -1)
        return (probs[good_ids].sum().log() - probs[bad_ids].sum().log()).item()

    plain = torch.softmax(logits(real, "I think the movie was")[0, -1], -1)
    assert shift(0) == pytest.approx((plain[good_ids].sum().log() - plain[bad_ids].sum().log()).item(), abs=1e-5)
    # Measured: 1.92 nats unsteered, 4.95 at scale 4, 0.74 at scale -4.
    assert shift(4) > shift(0) + 1.0 and shift(-4) < shift(0) - 1.0
