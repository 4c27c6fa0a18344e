"""ROME weight edits on the embedded model: efficacy, paraphrases, neighbourhood, exact revert."""

import pytest
import torch

from conftest import PARIS
from mechnb import EditError

PARAPHRASES = ["The Eiffel Tower stands in the city of", "Where is the Eiffel Tower? It is in the city of",
               "The Eiffel Tower, a famous landmark, is in the city of"]
NEIGHBOURS = ["The Colosseum is located in the city of", "Big Ben is located in the city of",
              "The Statue of Liberty is located in the city of", "The Brandenburg Gate is located in the city of",
              "The Louvre is located in the city of"]


def down_weights(model):
    return {n: p.detach().clone() for n, p in model.hf.named_parameters() if "down_proj" in n}


@pytest.mark.parametrize("kwargs, message", [
    (dict(subject="Louvre", target=" Rome"), "does not occur"), (dict(subject="Eiffel Tower", target=""), "target"),
    (dict(subject="Eiffel Tower", target=" Rome", layer=99), "out of range"),
    (dict(subject="Eiffel Tower", target=" Rome", method="memit"), "unknown edit method")])
def test_bad_edits_get_clear_errors_and_change_nothing(tiny_factory, kwargs, message):
    from mechnb import CausalTraceError

    model = tiny_factory("llama")
    before = down_weights(model)
    with pytest.raises((EditError, CausalTraceError), match=message):
        model.edit(PARIS, **kwargs)
    assert all(torch.equal(p, before[n]) for n, p in down_weights(model).items())
    assert model.edits == []


def test_edits_stack_and_revert_in_any_order_on_a_tiny_model(tiny_factory, tmp_path, monkeypatch):
    monkeypatch.setenv("MECHNB_CACHE", str(tmp_path))
    model = tiny_factory("llama")
    before = down_weights(model)
    first = model.edit(PARIS, "Eiffel Tower", " Rome", layer=1, steps=3, cov_tokens=300)
    second = model.edit("The Colosseum is located in the city of", "Colosseum", " Paris", layer=1, steps=3,
                        cov_tokens=300)
    assert model.edits == [first, second]
    assert list(tmp_path.glob("rome/*layer1-300.safetensors"))  # covariance cached on disk
    first.revert()
    name = "model.layers.1.mlp.down_proj.weight"
    assert torch.allclose(dict(model.hf.named_parameters())[name], before[name] + second.delta, atol=1e-6)
    second.revert()
    assert all(torch.equal(p, before[n]) for n, p in down_weights(model).items())
    with pytest.raises(EditError, match="already been reverted"):
        first.revert()


@pytest.mark.slow
def test_rome_moves_the_eiffel_tower_to_rome_and_reverts_exactly(real):
    before = down_weights(real)
    edit = real.edit(PARIS, subject="Eiffel Tower", target=" Rome", paraphrases=PARAPHRASES, neighbours=NEIGHBOURS)
    report = edit.report()
    assert report.meta["efficacy"]["after"] > 0.5 > report.meta["efficacy"]["before"]
    assert report.meta["paraphrase_success"] >= 2
    assert report.meta["neighbourhood_kept"] >= 0.8
    assert " Rome" in report.meta["generations"]["after"][0]
    assert "<table" in report._repr_mimebundle_()["text/html"]
    edit.revert()
    assert all(torch.equal(p, before[n]) for n, p in down_weights(real).items())
    assert real.top(PARIS, k=1).token[0] == " Paris"
