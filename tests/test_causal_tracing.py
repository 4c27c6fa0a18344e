"""Causal tracing: subject positions and the trace's end points (the embedded model's trace: tutorial 06)."""

import pytest
import torch

from conftest import PARIS
from mechnb import CausalTraceError
from mechnb.methods.causal_tracing import subject_positions


def test_subject_positions_cover_the_subject_tokens(tiny_factory):
    model = tiny_factory("llama")
    tokens = model.tokens(PARIS)
    found = subject_positions(model, PARIS, "Eiffel Tower")
    assert "".join(tokens[i] for i in found).strip() == "Eiffel Tower"
    assert found == list(range(found[0], found[-1] + 1))


def test_trace_end_points_are_the_clean_and_corrupted_probabilities(tiny_factory):
    model = tiny_factory("llama")
    result = model.causal_trace(PARIS, "Eiffel Tower", samples=2, noise=5.0)
    n = len(model.tokens(PARIS))
    assert result.values.shape == (model.n_layers, n)
    # The last layer's output at the last position is the whole clean answer.
    assert result.values[-1, -1].item() == pytest.approx(result.meta["clean_prob"], abs=1e-5)
    # Position 0 lies before the subject: noise never reaches it, restoring it does nothing.
    assert torch.allclose(result.values[:, 0], torch.full((model.n_layers,), result.meta["corrupt_prob"]), rtol=1e-4, atol=0)
    assert result.meta["clean_prob"] != pytest.approx(result.meta["corrupt_prob"], rel=1e-3)
    assert set(result.df.columns) == {"layer", "pos", "token", "subject", "prob"}
    mlp = model.causal_trace(PARIS, "Eiffel Tower", samples=2, kind="mlp", window=2, positions=[3])
    assert mlp.values.shape == (model.n_layers, 1)
    assert model.interventions == []


@pytest.mark.parametrize("kwargs, message", [
    (dict(subject="Louvre"), "does not occur"), (dict(subject=" "), "non-empty"),
    (dict(subject="Eiffel Tower", kind="neurons"), "unknown kind"),
    (dict(subject="Eiffel Tower", samples=0), "samples"), (dict(subject="Eiffel Tower", noise=-1.0), "noise")])
def test_bad_causal_trace_input_gets_a_clear_error(tiny_factory, kwargs, message):
    model = tiny_factory("llama")
    with pytest.raises(CausalTraceError, match=message):
        model.causal_trace(PARIS, **kwargs)
    assert model.interventions == []
