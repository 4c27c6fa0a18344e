"""The explorer widget, driven by setting widget values."""

import torch

from conftest import PROMPT


def test_explorer_recomputes_on_changes(tiny_factory):
    model = tiny_factory("llama")
    explorer = model.explore(PROMPT, answer=" Mary", wrong=" John")
    assert explorer.table.equals(model.top(PROMPT, k=8))
    clean_diff = explorer.logit_diff
    explorer.boxes[(2, 1)].value = True
    with model.ablated("head.2.1"):
        expected = model.top(PROMPT, k=8)
    assert explorer.ablated == ["head.2.1"]
    assert explorer.table["prob"].tolist() == expected["prob"].tolist()
    assert explorer.logit_diff != clean_diff
    assert model.interventions == []  # the explorer's ablations live only in its runs
    explorer.boxes[(2, 1)].value = False
    assert abs(explorer.logit_diff - clean_diff) < 1e-6
    explorer.layer.value, explorer.head.value = 1, 3
    assert torch.allclose(explorer.pattern, model.cache(PROMPT, "pattern.1")["pattern.1.3"][0])
    explorer.prompt.value = "Hello there"
    assert explorer.table.equals(model.top("Hello there", k=8))
    assert explorer.pattern.shape == (2, 2)
    assert "logit diff" in explorer.status.value and "<b>" in explorer.status.value


def test_explorer_shows_errors_without_raising(tiny_factory):
    model = tiny_factory("llama")
    explorer = model.explore(PROMPT)
    explorer.prompt.value = ""
    assert explorer.error and "empty prompt" in explorer.status.value
    explorer.prompt.value = PROMPT
    assert explorer.error is None
