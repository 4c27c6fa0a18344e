"""Activation, attribution and path patching: exact against one trace per patch."""

import weakref

import pytest
import torch

from conftest import PROMPT, hooks_left
from torchref import Reference
from mechnb.core.arch import submodule
from mechnb import MechnbError, PatchError

CLEAN = PROMPT
CORRUPT = "When Mary and John went to the store, Mary gave a drink to"


def logit_diff(model, logits):
    mary = model.tokenizer.encode(" Mary")[0]
    john = model.tokenizer.encode(" John")[0]
    return (logits[..., mary] - logits[..., john]).item()


def naive(model, source, target, site, family="llama", ablated=()):
    """The reference: one forward of a fresh transformers copy per patch, a torch hook writing
    the source run's value at `site` (`torchref`, no mechnb in the path); `ablated` sites are
    zeroed in every run."""
    if model.hf not in REFERENCES:
        REFERENCES[model.hf] = Reference(model.hf, family, tokenizer=model.tokenizer)
    reference = REFERENCES[model.hf]
    reference.always = [(site, torch.zeros_like) for site in ablated]
    return logit_diff(model, reference.patched(source, target, site)[0, -1])


REFERENCES = weakref.WeakKeyDictionary()


def cell_sites(result):
    """(site string for the naive reference, value) for every cell of a patch result."""
    pattern = result.meta["sites"][0]
    kind = pattern.split(".")[0]
    for row in result.df.itertuples():
        name = kind
        if hasattr(row, "layer"):
            name += f".{row.layer}"
        for axis in ("head", "neuron"):
            if hasattr(row, axis):
                name += f".{getattr(row, axis)}"
        if hasattr(row, "pos"):
            name += f"@{row.pos}"
        yield name, row.value


# The references agree to about 1e-7; a tiny random model's effects run from 3e-5 (a pattern)
# to 2e-2 (the residual stream), so the tolerance is absolute and small (8 times the largest
# difference measured, 1.2e-7).
TOL = 1e-6

CASES = [
    ("resid_pre.*", True), ("resid_post.*", True), ("attn_out.*", True), ("mlp_out.*", False),
    ("head.*.*", False), ("head.1:3.0:2", True), ("pattern.2.*", False), ("neuron.1.0:3", True),
    ("embed", True), ("resid_mid.*", False),
]


@pytest.mark.parametrize("sites,per_position", CASES)
@pytest.mark.parametrize("direction", ["denoising", "noising"])
def test_exact_patching_equals_one_trace_per_patch(tiny_factory, sites, per_position, direction):
    model = tiny_factory("llama")
    result = model.patch(CLEAN, CORRUPT, sites, answer=" Mary", wrong=" John",
                         per_position=per_position, direction=direction, batch_size=7)
    source, target = (CLEAN, CORRUPT) if direction == "denoising" else (CORRUPT, CLEAN)
    checked = 0
    for site, value in cell_sites(result):
        assert abs(naive(model, source, target, site) - value) < TOL, site
        checked += 1
    assert checked == result.values.numel() > 0
    # The largest effect is well above the tolerance, so a patch written wrong shows.
    assert (result.values - result.meta["corrupt_metric" if direction == "denoising" else "clean_metric"]
            ).abs().max() > 10 * TOL


@pytest.mark.parametrize("name", ["gpt2", "gpt_neox", "gemma2", "qwen2"])
def test_exact_patching_on_other_architectures(tiny_factory, name):
    model = tiny_factory(name)
    for sites, per_position in [("resid_pre.*", True), ("head.*.*", False), ("mlp_out.*", True)]:
        result = model.patch(CLEAN, CORRUPT, sites, answer=" Mary", wrong=" John",
                             per_position=per_position)
        for site, value in list(cell_sites(result))[::5]:
            assert abs(naive(model, CLEAN, CORRUPT, site, name) - value) < TOL, (name, site)


def test_result_shapes_and_tidy_frame(tiny_factory):
    model = tiny_factory("llama")
    n = len(model.tokens(CLEAN))
    resid = model.patch(CLEAN, CORRUPT, "resid_pre.*", answer=" Mary", wrong=" John")
    assert resid.values.shape == (3, n)
    assert list(resid.df.columns) == ["layer", "pos", "token", "value"]
    assert resid.df["token"][9] == " John/ Mary"
    heads = model.patch(CLEAN, CORRUPT, "head.*.*", answer=" Mary", wrong=" John", per_position=False)
    assert heads.values.shape == (3, 4)
    assert list(heads.df.columns) == ["layer", "head", "value"]
    per_pos = model.patch(CLEAN, CORRUPT, "head.*.*", answer=" Mary", wrong=" John", per_position=True)
    assert per_pos.values.shape == (3, 4, n)
    # The default sweeps positions for the residual stream, not for components.
    assert model.patch(CLEAN, CORRUPT, "head.*.*", answer=" Mary", wrong=" John").values.shape == (3, 4)
    both = model.patch(CLEAN, CORRUPT, ["attn_out.*", "mlp_out.*"], answer=" Mary", wrong=" John")
    assert both.values.shape == (2, 3, n) and both.meta["axes"] == ["site", "layer", "pos"]
    last = model.patch(CLEAN, CORRUPT, "resid_pre.*@-1", answer=" Mary", wrong=" John")
    assert torch.allclose(last.values, resid.values[:, -1], atol=1e-5)


def test_normalized_values_run_from_corrupt_to_clean(tiny_factory):
    model = tiny_factory("llama")
    raw = model.patch(CLEAN, CORRUPT, "resid_pre.*", answer=" Mary", wrong=" John")
    norm = model.patch(CLEAN, CORRUPT, "resid_pre.*", answer=" Mary", wrong=" John", normalize=True)
    clean, corrupt = raw.meta["clean_metric"], raw.meta["corrupt_metric"]
    assert torch.allclose(norm.values, (raw.values - corrupt) / (clean - corrupt), atol=1e-5)
    # Patching every position of the first residual restores the clean run exactly.
    whole = model.patch(CLEAN, CORRUPT, "resid_pre.0", answer=" Mary", wrong=" John",
                        per_position=False, normalize=True)
    assert abs(whole.values.item() - 1) < 1e-4


@pytest.mark.parametrize("metric", ["prob", "logprob", "kl"])
def test_other_metrics_match_the_reference(tiny_factory, metric):
    model = tiny_factory("llama")
    result = model.patch(CLEAN, CORRUPT, "resid_pre.1", answer=" Mary", metric=metric)
    value = model.cache(CLEAN, "resid_pre.1")["resid_pre.1@9"]
    with model.trace(CORRUPT):
        model["resid_pre.1@9"] = value
        patched = model["logits@-1"].save()
    clean = model.cache(CLEAN, "logits")["logits@-1"]
    mary = model.tokenizer.encode(" Mary")[0]
    expected = {
        "prob": torch.softmax(patched, -1)[0, mary],
        "logprob": torch.log_softmax(patched, -1)[0, mary],
        "kl": torch.nn.functional.kl_div(torch.log_softmax(patched, -1), torch.log_softmax(clean, -1),
                                         log_target=True, reduction="sum"),
    }[metric]
    assert abs(result.values[0, 9].item() - expected.item()) < 1e-4


def test_callable_metric_and_several_pairs_average(tiny_factory):
    model = tiny_factory("llama")
    pairs_clean = [CLEAN, "When Anna and Bob went to the park, Bob gave a ball to"]
    pairs_corrupt = [CORRUPT, "When Anna and Bob went to the park, Anna gave a ball to"]
    assert len(model.tokens(pairs_clean[1])) == len(model.tokens(pairs_corrupt[1]))
    first = model.tokenizer.encode(" Mary")[0]
    metric = lambda logits: logits[:, first]
    both = model.patch(pairs_clean, pairs_corrupt, "resid_pre.*", metric=metric, per_position=False)
    each = [model.patch(c, x, "resid_pre.*", metric=metric, per_position=False)
            for c, x in zip(pairs_clean, pairs_corrupt)]
    assert torch.allclose(both.values, (each[0].values + each[1].values) / 2, atol=1e-5)
    assert both.meta["n_pairs"] == 2


def test_multi_token_answers_are_noted(tiny_factory):
    model = tiny_factory("llama")
    result = model.patch(CLEAN, CORRUPT, "resid_pre.0", answer=" Maryanne-Louise", wrong=" John")
    assert any("only the first" in note for note in result.meta["notes"])


def test_attribution_costs_constant_passes_and_tracks_exact(tiny_factory):
    model = tiny_factory("llama")
    calls = []
    handle = model.hf.register_forward_hook(lambda *a: calls.append(1))
    try:
        attribution = model.patch(CLEAN, CORRUPT, "resid_pre.*", answer=" Mary", wrong=" John",
                                  method="attribution")
        assert len(calls) == 2  # a clean forward, a corrupt forward (and its backward)
        model.patch(CLEAN, CORRUPT, ["head.*.*", "pattern.*.*"], answer=" Mary", wrong=" John",
                    method="attribution")
        assert len(calls) == 4  # the same two passes for 24 sites x 14 positions x 2 kinds
    finally:
        handle.remove()
    exact = model.patch(CLEAN, CORRUPT, "resid_pre.*", answer=" Mary", wrong=" John")
    assert attribution.values.shape == exact.values.shape
    # Patching the whole first residual is where the linear approximation must agree in sign.
    untouched = exact.values[:, :9].abs().max()
    assert attribution.values[:, :9].abs().max() <= untouched + 1e-4
    corr = torch.corrcoef(torch.stack([attribution.values.flatten(), exact.values.flatten()]))[0, 1]
    assert corr > 0.5


def test_attribution_leaves_no_gradients_on_weights(tiny_factory):
    model = tiny_factory("llama")
    model.patch(CLEAN, CORRUPT, "head.*.*", answer=" Mary", wrong=" John", method="attribution")
    assert all(p.grad is None for p in model.hf.parameters())


def test_bad_input_is_refused_clearly(tiny_factory):
    model = tiny_factory("llama")
    with pytest.raises(PatchError, match="different lengths .* clean .* corrupt"):
        model.patch(CLEAN, "Hello there", "resid_pre.*", answer=" Mary", wrong=" John")
    with pytest.raises(MechnbError, match="needs a wrong token"):
        model.patch(CLEAN, CORRUPT, "resid_pre.*", answer=" Mary")
    with pytest.raises(MechnbError, match="unknown metric"):
        model.patch(CLEAN, CORRUPT, "resid_pre.*", answer=" Mary", metric="accuracy")
    with pytest.raises(MechnbError, match="out of range"):
        model.patch(CLEAN, CORRUPT, "resid_pre.7", answer=" Mary", wrong=" John")
    with pytest.raises(MechnbError, match="unknown method"):
        model.patch(CLEAN, CORRUPT, "resid_pre.*", answer=" Mary", wrong=" John", method="fast")
    with pytest.raises(PatchError, match="non-empty"):
        model.patch("", "", "resid_pre.*", answer=" Mary", wrong=" John")
    with pytest.raises(MechnbError, match="token id 99999999 out of range"):
        model.patch(CLEAN, CORRUPT, "resid_pre.*", answer=99999999, wrong=" John")


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_failure_halfway_through_a_sweep_leaves_the_model_clean(tiny_factory, error):
    model = tiny_factory("llama")
    model.ablate("head.0.1")
    before_hooks = hooks_left(model)
    batch = model.tokenizer(CORRUPT, return_tensors="pt")
    with torch.no_grad():
        clean = model.hf(**batch).logits
    calls = []

    def failing(logits):
        calls.append(1)
        if len(calls) == 3:
            raise error("stop")
        return logits[:, 0]

    with pytest.raises(error):
        model.patch(CLEAN, CORRUPT, "resid_pre.*", metric=failing, batch_size=4)
    assert len(calls) == 3
    assert hooks_left(model) == before_hooks
    assert model.context is None and len(model.interventions) == 1
    for layer in submodule(model.hf, model.arch.layers):
        assert not hasattr(submodule(layer, model.arch.attn), "mechnb_prefix")
        assert not hasattr(submodule(layer, model.arch.attn), "mechnb_record")
    with torch.no_grad():
        assert torch.equal(model.hf(**batch).logits, clean)


def test_patching_runs_under_persistent_interventions(tiny_factory):
    model = tiny_factory("llama")
    model.ablate("head.1.0")
    result = model.patch(CLEAN, CORRUPT, "resid_pre.*", answer=" Mary", wrong=" John")
    for site, value in list(cell_sites(result))[::4]:
        assert abs(naive(model, CLEAN, CORRUPT, site, ablated=["head.1.0"]) - value) < TOL, site
    model.clear()
    plain = model.patch(CLEAN, CORRUPT, "resid_pre.*", answer=" Mary", wrong=" John")
    assert (plain.values - result.values).abs().max() > 1e-4


def naive_path(model, source, target, sender, receiver):
    """Path patching by hand: sender from source, other heads frozen at target, then receiver only."""
    s_layer, s_head = sender
    r_layer, r_head = receiver
    src = model.cache(source, [f"head.{s_layer}"])[f"head.{s_layer}"]
    tgt = model.cache(target, [f"head.{l}" for l in range(model.n_layers)])
    recorded = []
    with model.trace(target):
        for layer in range(s_layer, model.n_layers):
            z = model[f"head.{layer}"]
            new = tgt[f"head.{layer}"].clone()
            if layer == s_layer:
                new[:, :, s_head] = src[:, :, s_head]
            if layer == r_layer:
                new[:, :, r_head] = z[:, :, r_head]
                recorded.append(z[:, :, r_head].clone().save())
            model[f"head.{layer}"] = new
    found = []
    with model.trace(target):
        model[f"head.{r_layer}.{r_head}"] = recorded[0]
        found.append(model["logits@-1"].save())
    return logit_diff(model, found[0][0])


def test_attribution_of_resid_mid_takes_the_gradient_of_the_whole_residual(tiny_factory):
    """(clean - corrupt) . dmetric/dresid_mid, the gradient through the MLP and the skip
    connection both, by autograd on the torch reference."""
    model = tiny_factory("llama")
    result = model.patch(CLEAN, CORRUPT, "resid_mid.*", answer=" Mary", wrong=" John", per_position=False,
                         method="attribution")
    reference = Reference(model.hf, "llama", tokenizer=model.tokenizer)
    mary, john = (model.tokenizer.encode(word)[0] for word in (" Mary", " John"))
    for layer in range(model.n_layers):
        kept = {}

        def keep(module, args):
            args[0].retain_grad()
            kept["mid"] = args[0]

        handle = reference.layer(layer).post_attention_layernorm.register_forward_pre_hook(keep)
        try:
            logits = reference.hf(**model.tokenizer(CORRUPT, return_tensors="pt")).logits[0, -1]
            (logits[mary] - logits[john]).backward()
        finally:
            handle.remove()
        change = reference.read(CLEAN, f"resid_mid.{layer}") - kept["mid"].detach()
        expected = result.meta["corrupt_metric"] + (change * kept["mid"].grad).sum().item()
        assert abs(result.values[layer].item() - expected) < 1e-5, layer


def test_path_patching_equals_the_hand_made_reference(tiny_factory):
    model = tiny_factory("llama")
    result = model.path_patch(CLEAN, CORRUPT, "head.0:2.*", "head.2.1", answer=" Mary", wrong=" John")
    assert result.values.shape == (2, 4)
    for layer in range(2):
        for head in range(4):
            expected = naive_path(model, CLEAN, CORRUPT, (layer, head), (2, 1))
            assert abs(result.values[layer, head].item() - expected) < 1e-4, (layer, head)


def test_path_patching_to_the_final_residual_is_activation_patching(tiny_factory):
    model = tiny_factory("llama")
    path = model.path_patch(CLEAN, CORRUPT, "head.*.*", "resid_post.2", freeze="none",
                            answer=" Mary", wrong=" John")
    plain = model.patch(CLEAN, CORRUPT, "head.*.*", answer=" Mary", wrong=" John", per_position=False)
    assert torch.allclose(path.values, plain.values, atol=1e-4)
    # With every other head frozen, a sender only reaches the final residual directly
    # (and through MLPs), so the values move away from full activation patching.
    frozen = model.path_patch(CLEAN, CORRUPT, "head.0.*", "resid_post.2",
                              answer=" Mary", wrong=" John")
    assert (frozen.values - plain.values[:1]).abs().max() > 1e-5


def test_result_round_trips_through_save(tiny_factory, tmp_path):
    from mechnb.display.results import Result

    model = tiny_factory("llama")
    result = model.patch(CLEAN, CORRUPT, "head.*.*", answer=" Mary", wrong=" John", per_position=False)
    loaded = Result.load(result.save(tmp_path / "r"))
    assert torch.equal(loaded.values, result.values)
    assert loaded.meta["clean_metric"] == result.meta["clean_metric"]
    assert len(loaded.df) == len(result.df)
    figure = result.plot()
    assert figure.axes[0].get_xlabel() == "head" and figure.axes[0].get_ylabel() == "layer"


@pytest.mark.slow
def test_ioi_science_on_the_embedded_model(real):
    result = real.patch(CLEAN, CORRUPT, "resid_pre.*", answer=" Mary", wrong=" John", normalize=True)
    assert result.meta["clean_metric"] > 0 > result.meta["corrupt_metric"]
    assert result.values.shape == (30, 14)
    assert result.values[-1, -1] > 0.8
    second_name = real.tokens(CLEAN).index(" John", 4)
    assert second_name == 9
    assert result.values[0].argmax().item() == second_name
    assert result.values[0, second_name] > 0.99
    for layer, pos in [(0, 9), (14, 13), (29, 13)]:
        expected = naive(real, CLEAN, CORRUPT, f"resid_pre.{layer}@{pos}")
        raw = result.meta["corrupt_metric"] + result.values[layer, pos].item() * (
            result.meta["clean_metric"] - result.meta["corrupt_metric"])
        assert abs(expected - raw) < 1e-3
