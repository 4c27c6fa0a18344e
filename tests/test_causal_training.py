"""Training featurizers (`mechnb.causal.training`: DAS, Boundless DAS, DBM), probes beside IIA
(`mechnb.causal.probes`) and MIB's submission layout (`mechnb.causal.mib`): known answers on the
hierarchical equality MLP, and on tiny language models the mechanics (only the featurizer
learns, the held-out IIA is the trained featurizer's IIA on the held-out split, a model left
as it was)."""

import pytest
import torch

import mechnb
from mechnb import CausalError
from mechnb.causal import Identity, SAEFeatures, load, tasks
from mechnb.causal.mib import export_mib, import_mib

from test_causal_model import pronoun_model


@pytest.fixture(scope="module")
def equality():
    """The hierarchical equality task and an MLP computing it exactly (wx in unit 0 of `3`)."""
    cm, embeddings = tasks.hierarchical_equality(entities=20, dim=2, seed=0)
    network = mechnb.load(tasks.equality_network(embeddings), example=torch.zeros(1, 8))
    return cm, network


def test_dbm_over_units_selects_the_unit_that_computes_the_variable(equality):
    cm, network = equality
    data = cm.counterfactuals(300, intervene="wx", seed=0)
    mask = network.das(data, "3.output", variable="wx", kind="dbm", epochs=4, batch_size=32, progress=False)
    assert mask.selected == [0] and mask.meta["iia"] == 1.0
    other = network.das(cm.counterfactuals(300, intervene="yz", seed=1), "3.output", variable="yz", kind="dbm",
                        epochs=4, batch_size=32, progress=False)
    assert other.selected == [1] and other.meta["iia"] == 1.0
    assert network.unmodified


def test_boundless_das_finds_a_one_dimensional_boundary_on_the_known_units(equality):
    cm, network = equality
    data = cm.counterfactuals(300, intervene="wx", seed=0)
    boundless = network.das(data, "3.output", variable="wx", kind="boundless", epochs=6, batch_size=32,
                            lr=0.02, progress=False)
    assert boundless.n_features == 1 and boundless.meta["iia"] >= 0.95
    basis = boundless.tensors()["basis"][:, 0].abs()
    assert basis[0] > 0.9 and basis[0] > 2 * basis[1]  # the swapped direction is mostly unit 0's (0.94 seen)


def test_das_trains_only_its_basis_and_reports_the_held_out_iia_of_what_it_returns(tiny_factory, tmp_path):
    model = tiny_factory("llama")
    weights = {name: p.detach().clone() for name, p in model.hf.named_parameters()}
    data = pronoun_model().counterfactuals(40, intervene="gender", seed=0)
    das = model.das(data, "resid_post.1@'{name}'", variable="gender", k=2, epochs=2, batch_size=8, progress=False)
    assert all(torch.equal(p, weights[name]) for name, p in model.hf.named_parameters())
    assert all(p.grad is None and p.requires_grad for p in model.hf.parameters())
    basis = das.basis.detach()
    assert basis.shape == (32, 2) and torch.allclose(basis.T @ basis, torch.eye(2), atol=1e-5)
    _, test = data.split(0.2, seed=0)
    assert model.interchange(test, das, progress=False).values.item() == das.meta["iia"]
    assert (das.site, das.variable, das.model_name) == ("resid_post.1@'{name}'", "gender", "tiny-llama")
    assert list(das.history.columns) == ["step", "epoch", "loss", "iia"] and len(das.history) == das.meta["steps"] == 8
    assert das.history.iia.notna().sum() == 2  # after each epoch
    das.save(tmp_path / "das")
    again = load(tmp_path / "das")
    assert torch.allclose(again.basis, basis) and model.interchange(test, again, progress=False).values.item() == \
        das.meta["iia"]
    figure = das.plot()
    assert len(figure.axes) == 2 and len(figure.axes[0].lines[0].get_xdata()) == 8
    assert model.unmodified


def random_sae(d_sae: int, k: int, name: str, seed: int):
    """A TopK SAE of tiny-llama's resid_post.1 with random weights, scaled to fire."""
    from mechnb.sae import SAE

    torch.manual_seed(seed)
    sae = SAE(32, d_sae, kind="topk", k=k, site="resid_post.1", name=name)
    with torch.no_grad():
        sae.W_enc.normal_(0, 0.3), sae.W_dec.normal_(0, 0.3)
    return sae


def test_dbm_over_sae_features_masks_features_and_keeps_the_error(tiny_factory, tmp_path):
    from mechnb.sae import SAE

    model = tiny_factory("llama")
    sae = random_sae(48, 6, "tiny", 0)
    data = pronoun_model().counterfactuals(24, intervene="gender", seed=1)
    mask = model.das(data, "resid_post.1@-1", variable="gender", kind="dbm", over=sae, epochs=2, batch_size=8,
                     penalty=0.01, progress=False)
    assert mask.sae is sae and mask.logits.shape == (48,)
    hard = SAEFeatures(sae, features=mask.selected)  # the hard mask: the SAE featurizer of its features
    hard.site = mask.site
    _, test = data.split(0.2, seed=0)
    assert model.interchange(test, hard, progress=False).values.item() == mask.meta["iia"]
    mask.save(tmp_path / "mask")
    again = load(tmp_path / "mask")
    assert again.sae.d_sae == 48 and again.features == mask.selected and again.kind == "dbm"
    assert model.interchange(test, again, progress=False).values.item() == mask.meta["iia"]
    with pytest.raises(CausalError, match="the SAE reads width 48"):
        model.das(data, "neuron.1@-1", kind="dbm", over=SAE(48, 8, kind="relu", site="resid_post.1"), progress=False)
    assert model.unmodified


def test_an_attached_sae_is_a_featurizer_by_name(tiny_factory):
    model = tiny_factory("llama")
    sae = random_sae(40, 5, "attached", 1)
    data = pronoun_model().counterfactuals(12, intervene="gender", seed=0)
    given = model.interchange(data, "resid_post.1@-1", featurizer=sae, progress=False)
    model.attach(sae)
    try:
        named = model.interchange(data, "resid_post.1@-1", featurizer="sae", progress=False)
    finally:
        model.detach(sae)
    assert named.examples().got.tolist() == given.examples().got.tolist()
    assert named.df.featurizer[0] == "sae attached (40 of 40 features)"
    assert model.unmodified


def test_probes_equal_logistic_regression_on_values_read_by_torch_hooks(tiny_factory):
    from sklearn.linear_model import LogisticRegression

    from mechnb.core.arch import submodule

    model = tiny_factory("gpt2")
    data = pronoun_model().counterfactuals(40, intervene="gender", seed=0)
    probes = mechnb.causal.probe(data, "resid_post.1@-1", "gender", model=model, test=0.3, seed=2)
    assert probes.values.shape == (1, 1)
    cm = data.causal_model
    bases = list(dict.fromkeys(tuple(e.base.items()) for e in data))
    values, labels = [], []
    layer = submodule(model.hf, model.arch.layers)[1]
    for base in bases:
        setting = dict(base)
        prompt = cm.render(cm.run(setting))[0]
        seen = []
        handle = layer.register_forward_hook(
            lambda m, a, out: seen.append((out[0] if isinstance(out, tuple) else out)[0, -1]))
        with torch.no_grad():
            model.hf(**model.tokenizer(prompt, return_tensors="pt"))
        handle.remove()
        values.append(seen[0].numpy())
        labels.append(cm.run(setting)["gender"])
    import random

    order = list(range(len(bases)))
    random.Random(2).shuffle(order)
    count = round(0.3 * len(order))
    held, kept = sorted(order[:count]), sorted(order[count:])
    import numpy as np

    x = np.stack(values)
    x = (x - x[kept].mean(0)) / (x[kept].std(0) + 1e-6)
    fitted = LogisticRegression(max_iter=2000).fit(x[kept], [labels[i] for i in kept])
    assert probes.values.item() == pytest.approx(fitted.score(x[held], [labels[i] for i in held]))


def test_a_probe_reads_a_variable_where_the_network_computes_it(equality):
    cm, network = equality
    data = cm.counterfactuals(200, intervene="wx", seed=0)
    probes = mechnb.causal.probe(data, ["3.output", "0.input"], "wx", model=network)
    assert probes.df.set_index("site").probe["3.output"] == 1.0
    with pytest.raises(CausalError, match="probe needs the model"):
        mechnb.causal.probe(data, "3.output", "wx")


def test_mib_export_names_units_as_mib_does_and_reads_back(tmp_path):
    from mechnb.causal import Rotation

    das = Rotation(16, 3, seed=0).eval()
    das.site, das.variable, das.meta = "resid_post.4@'{name}'", "gender", {"model_class": "LlamaForCausalLM"}
    folder = export_mib(das, tmp_path, task="pronoun_task")
    assert folder.name == "pronoun_task_LlamaForCausalLM_gender"
    assert sorted(p.name for p in folder.iterdir()) == [
        "ResidualStream(Layer-5,Token-name_last_token)_featurizer",
        "ResidualStream(Layer-5,Token-name_last_token)_indices",
        "ResidualStream(Layer-5,Token-name_last_token)_inverse_featurizer"]
    saved = torch.load(folder / "ResidualStream(Layer-5,Token-name_last_token)_featurizer", weights_only=True)
    assert saved["model_info"]["featurizer_class"] == "SubspaceFeaturizerModule"
    assert set(saved["state_dict"]) == {"rotate.parametrizations.weight.original",
                                        "rotate.parametrizations.weight.0.base"}
    (back,) = import_mib(folder)
    assert back.site == "resid_pre.5" and back.variable == "gender" and back.meta["token"] == "name_last_token"
    assert torch.allclose(back.basis, das.basis.detach(), atol=1e-6)
    units = Identity(16, features=[2, 5])
    units.site, units.variable = "head.3.1@-1", "answer_pointer"
    folder = export_mib(units, tmp_path, task="4_answer_MCQA", model_class="Qwen2ForCausalLM")
    (back,) = import_mib(folder)
    assert back.site == "head.3.1" and back.features == [2, 5] and back.variable == "answer_pointer"
    units.site = "mlp_out.3@-1"
    with pytest.raises(CausalError, match="MIB's units are residual streams"):
        export_mib(units, tmp_path, task="t", model_class="LlamaForCausalLM")
