"""Automatic feature labels: recorded contexts, labellers (function, HTTP server, local), cache."""

import json

import pytest
import torch

from conftest import json_server
from mechnb.sae import train
from mechnb import LabelError, SAEError
from test_sae import DOCS


@pytest.fixture(scope="module")
def recorded(tiny_factory):
    model = tiny_factory("llama")
    store = model.collect("resid_post.1", DOCS, n_tokens=700, progress=False)
    sae = train(store, kind="topk", d_sae=64, k=4, batch_size=128, epochs=2, progress=False)
    sae.record_contexts(model, DOCS, n_tokens=700, per_feature=10)
    return model, sae


def firing(sae, n=3):
    return [f for f, c in sae.contexts.items() if len(c["positive"]) >= 6 and len(c["negative"]) >= 3][:n]


def test_recorded_contexts_hold_top_and_quiet_windows(recorded):
    _, sae = recorded
    feature = firing(sae, 1)[0]
    found = sae.contexts[feature]
    top = [c["activation"] for c in found["positive"]]
    assert top == sorted(top, reverse=True) and top[0] > 0
    assert all(c["values"][c["focus"]] == pytest.approx(c["activation"]) for c in found["positive"][:3])
    assert all(max(c["values"][c["focus"]], 0) == 0 for c in found["negative"])


def test_a_function_labeller_labels_scores_and_caches(recorded, tmp_path):
    _, sae = recorded
    features = firing(sae)
    calls = []

    def labeller(prompt):
        calls.append(prompt)
        if prompt.startswith("Here are text excerpts"):
            assert "[[" in prompt
            return "a made-up label\nextra line"
        return "9" if "[[" not in prompt and "the" in prompt else "2"

    table = sae.label(features, labeler=labeller, n_examples=6, cache_dir=tmp_path)
    assert table.feature.tolist() == features and set(table.label) == {"a made-up label"}
    assert table.score.between(-1, 1).all() and table.n_examples.tolist() == [3] * len(features)
    count = len(calls)
    again = sae.label(features, labeler=labeller, n_examples=6, cache_dir=tmp_path)
    assert len(calls) == count and again.equals(table)  # served from the cache
    assert len(list(tmp_path.glob("*.json"))) == 1


def chat(body):
    """An OpenAI-compatible chat reply: a label to the labelling prompt, a score to the others."""
    text = "punctuation" if body["messages"][0]["content"].startswith("Here are") else "7"
    return 200, {"choices": [{"message": {"role": "assistant", "content": text}}]}


def test_an_openai_compatible_server_labels_and_a_refusing_one_fails_clearly(recorded, tmp_path):
    _, sae = recorded
    features = firing(sae, 2)
    with json_server(chat) as base:
        url = f"{base}/v1"
        table = sae.label(features[:1], labeler=url, n_examples=6, cache_dir=tmp_path)
    assert table.label.tolist() == ["punctuation"]
    with pytest.raises(LabelError, match="could not be reached"):
        sae.label(features, labeler=url, n_examples=6, cache_dir=tmp_path)
    cached = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert list(cached) == [f"{features[0]}|6"]  # the first label survived the failure


@pytest.mark.parametrize("call, error, message", [
    (lambda sae: sae.label([0], labeler="ftp://x"), LabelError, "OpenAI-compatible"),
    (lambda sae: sae.label([10_000]), SAEError, "never fired"),
])
def test_bad_labelling_requests_get_clear_errors(recorded, call, error, message):
    with pytest.raises(error, match=message):
        call(recorded[1])


def test_an_sae_without_recorded_contexts_says_what_to_do():
    from mechnb.sae import SAE

    with pytest.raises(SAEError, match="record_contexts"):
        SAE(8, 16, kind="relu").label([0])


def test_features_that_never_fired_are_left_out_with_a_warning(recorded, tmp_path):
    _, sae = recorded
    feature = firing(sae, 1)[0]
    with pytest.warns(UserWarning, match="never fired"):
        table = sae.label([feature, 10_000], labeler=lambda prompt: "a label 5", n_examples=6, cache_dir=tmp_path)
    assert table.feature.tolist() == [feature]


@pytest.mark.slow
def test_the_local_labeller_runs_on_the_embedded_model_already_loaded_while_it_is_clean(real, monkeypatch):
    """No second copy of the embedded model (540 MB) while the user's is in the state load() gives."""
    from mechnb.core import model as models
    from mechnb.sae import label as labelling

    # `real` the only live model (other tests of this process may hold embedded models too)
    monkeypatch.setattr(models, "_LIVE", models._Registry([real]))
    assert labelling._local() is real
    monkeypatch.setitem(labelling._LOCAL, "model", "the labeller's own")
    with real.steered("resid_pre.3", torch.ones(real.d_model), scale=1):
        assert labelling._local() == "the labeller's own"  # steered: it would answer otherwise
    assert labelling._local() is real
