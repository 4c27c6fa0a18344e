"""Models spread by accelerate (`device_map`): every method gives the numbers of the whole model.

This machine has no GPU, so the spread is over the CPU and the disk: layer 1 and the
final norm are offloaded, so their weights sit on the `meta` device between forwards
and accelerate's `AlignDevicesHook`s load them for each forward. That exercises the
hooks, inputs placed on the embedding's device, and every weight read outside a
forward; tensors on two different GPUs cannot be made here.
"""

from __future__ import annotations

import pytest
import torch

import mechnb
from conftest import PARIS, PROMPT, build_hf
from mechnb import ModelError
from mechnb.model import Model

CLEAN = PROMPT
CORRUPT = "When Mary and John went to the store, Mary gave a drink to"
DEVICE_MAP = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
              "model.layers.1": "disk", "model.layers.2": "cpu", "model.norm": "disk", "lm_head": "cpu"}


def close(a, b, atol=1e-5):
    return torch.allclose(torch.as_tensor(a).float().cpu(), torch.as_tensor(b).float().cpu(),
                          atol=atol, equal_nan=True)


@pytest.fixture(scope="module")
def whole(saved):
    return mechnb.load(saved, device="cpu")


@pytest.fixture(scope="module")
def spread(saved, tmp_path_factory):
    return mechnb.load(saved, device_map=DEVICE_MAP, offload_folder=str(tmp_path_factory.mktemp("offload")))


def test_offloaded_layers_keep_no_data_between_forwards(spread):
    devices = {name: p.device.type for name, p in spread.hf.named_parameters()}
    assert devices["model.layers.1.mlp.down_proj.weight"] == "meta"
    assert devices["model.norm.weight"] == "meta"
    assert devices["model.layers.0.mlp.down_proj.weight"] == "cpu"
    assert spread.devices == ["cpu", "disk"]
    assert spread.device == torch.device("cpu")  # inputs go to the embedding's device
    assert spread.info()["device"] == "cpu, disk (device_map)"


def test_trace_reads_and_writes_match_the_whole_model(whole, spread):
    def run(model):
        with model.trace([CLEAN, PARIS]):
            early = model["resid_pre.0:2"].save()  # a range: stacked on one device
            model["head.1.2"] = 0
            later = model["resid_post.1"].save()
            model["mlp_out.2@-1"] = model["mlp_out.2@-1"] * 2
            logits = model["logits"].save()
        return torch.cat([early, later[None]]), logits

    (a_resid, a_logits), (b_resid, b_logits) = run(whole), run(spread)
    assert close(a_resid, b_resid) and close(a_logits, b_logits)


def test_cache_of_offloaded_layers_matches(whole, spread):
    sites = ["resid_pre.*", "pattern.1", "head.1", "neuron.1", "mlp_out.*", "logits"]
    a, b = whole.cache([CLEAN, PARIS], sites), spread.cache([CLEAN, PARIS], sites)
    for site in ("resid_pre.*@-1", "pattern.1.2", "head.1.3", "neuron.1", "mlp_out.*", "logits"):
        assert close(a[site], b[site]), site
    assert whole.top(PARIS, 5).token_id.tolist() == spread.top(PARIS, 5).token_id.tolist()


def test_exact_and_attribution_patching_match(whole, spread):
    for sites, method in (("resid_pre.*", "exact"), ("head.*.*", "exact"), ("resid_pre.*", "attribution")):
        a = whole.patch(CLEAN, CORRUPT, sites, answer=" Mary", wrong=" John", method=method, progress=False)
        b = spread.patch(CLEAN, CORRUPT, sites, answer=" Mary", wrong=" John", method=method, progress=False)
        assert close(a.values, b.values), (sites, method)


def test_ablation_and_steering_references_follow_the_layers(whole, spread):
    def run(model):
        vector = model.steering_vector([CLEAN], [CORRUPT], "resid_pre.2")
        with model.ablated(["mlp_out.1", "head.1.0"], mode="mean", ref=[CLEAN, PARIS]), \
                model.steered("resid_pre.2", vector, 4.0):
            return vector, model.cache(PARIS, "logits")["logits"]

    (a_vector, a_logits), (b_vector, b_logits) = run(whole), run(spread)
    assert close(a_vector, b_vector) and close(a_logits, b_logits)
    assert spread.interventions == []


def test_generation_matches(whole, spread):
    a = whole.generate([PARIS, CLEAN], max_new_tokens=4)
    b = spread.generate([PARIS, CLEAN], max_new_tokens=4)
    assert torch.equal(a.values, b.values)


def test_circuit_scores_match(whole, spread):
    a = whole.circuit(CLEAN, CORRUPT, " Mary", " John", method="eap-ig", steps=2)
    b = spread.circuit(CLEAN, CORRUPT, " Mary", " John", method="eap-ig", steps=2)
    assert close(a.scores, b.scores)
    assert close(a.faithfulness([0.1, 0.5], progress=False).values,
                 b.faithfulness([0.1, 0.5], progress=False).values)


def test_methods_reading_offloaded_weights_match(whole, spread):
    assert close(whole.logit_lens(PARIS).values, spread.logit_lens(PARIS).values)
    a, b = whole.dla(CLEAN, " Mary", " John"), spread.dla(CLEAN, " Mary", " John")
    assert close(a.values, b.values) and abs(a.meta["total"] - b.meta["total"]) < 1e-4
    assert close(whole.attribute(PARIS).values, spread.attribute(PARIS).values)  # GIM's norm hooks
    assert close(whole.ov(1, 2).A, spread.ov(1, 2).A) and close(whole.ov(1, 2).B, spread.ov(1, 2).B)
    assert close(whole.composition("k").values, spread.composition("k").values)


def test_an_sae_spliced_into_an_offloaded_layer_and_collected_activations_match(whole, spread):
    from mechnb.sae.model import SAE

    def run(model):
        torch.manual_seed(0)
        sae = SAE(32, 64, kind="relu", site="resid_post.1")
        with torch.no_grad():
            for parameter in (sae.W_enc, sae.W_dec, sae.b_enc):
                parameter.normal_(0, 0.3)
        model.attach(sae)
        try:
            cache = model.cache(PARIS, ["sae.1", "logits"])
            features, logits = cache["sae.1"], cache["logits"]
        finally:
            model.detach(sae)
        store = model.collect("resid_post.1", [CLEAN, PARIS], n_tokens=16, progress=False)
        return features, logits, store.rows(0, len(store))

    for a, b in zip(run(whole), run(spread)):
        assert close(a, b)


def test_a_weight_edit_of_an_offloaded_layer_is_refused(spread):
    from mechnb import EditError

    with pytest.raises(EditError, match="layer 1's MLP is offloaded"):
        spread.edit(PARIS, "Eiffel Tower", " Rome", layer=1)
    assert spread.edits == []


def test_a_model_dispatched_in_code_matches(tokenizer, whole, tmp_path):
    from accelerate import dispatch_model

    hf = dispatch_model(build_hf("llama", tokenizer), device_map=DEVICE_MAP, offload_dir=str(tmp_path))
    model = Model(hf, tokenizer)
    assert model.hf.model.layers[1].mlp.down_proj.weight.device.type == "meta"
    with model.trace(CLEAN):
        model["neuron.1.5"] = 0
        logits = model["logits"].save()
    with whole.trace(CLEAN):
        whole["neuron.1.5"] = 0
        expected = whole["logits"].save()
    assert close(logits, expected)


def test_device_map_auto_on_a_cpu_machine_loads_on_the_cpu(saved, whole):
    model = mechnb.load(saved, device_map="auto")
    assert model.devices == ["cpu"] and model.info()["device"] == "cpu"
    assert close(model.cache(PARIS, "logits")["logits"], whole.cache(PARIS, "logits")["logits"])


def test_device_and_device_map_together_are_a_clear_error(saved):
    with pytest.raises(ModelError, match=r"device='cuda' and device_map='auto' contradict each other"):
        mechnb.load(saved, device="cuda", device_map="auto")
