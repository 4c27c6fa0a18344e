"""ROME weight edits on tiny models: errors leave the weights alone, edits stack and revert exactly.

On the embedded model (efficacy, paraphrases, neighbourhood) ROME is checked where tutorial 06
runs it (tests/test_notebooks.py).
"""

import pytest
import torch

from conftest import PARIS
from mechnb import EditError


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
    assert list(tmp_path.glob("rome/*layer1-300-packed.safetensors"))  # covariance cached on disk
    first.revert()
    name = "model.layers.1.mlp.down_proj.weight"
    assert torch.allclose(dict(model.hf.named_parameters())[name], before[name] + second.delta, atol=1e-6)
    second.revert()
    assert all(torch.equal(p, before[n]) for n, p in down_weights(model).items())
    with pytest.raises(EditError, match="already been reverted"):
        first.revert()
