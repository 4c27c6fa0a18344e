"""Any torch module: module paths as sites, tensors as prompts (mechnb.core.modules)."""

import pytest
import torch
from torch import nn

import mechnb
from mechnb import InterventionError, ModelError, SiteError
from mechnb.core.interventions import Steer
from mechnb.core.sites import parse


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 16)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Linear(4 * 4 * 4, 10)

    def forward(self, x):
        return self.head(self.pool(torch.relu(self.conv(x))).flatten(1))


class Mixer(nn.Module):
    """A sequence model: values with a position axis (batch pos d)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(6, 6)
        self.out = nn.Linear(6, 2)

    def forward(self, x):
        return self.out(self.proj(x)).mean(1)


def built(kind):
    torch.manual_seed(0)
    return {"sequential": lambda: nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3)),
            "mlp": MLP, "cnn": CNN}[kind]()


INPUTS = {"sequential": (5, 4), "mlp": (5, 4), "cnn": (5, 1, 8, 8)}
# A site inside each model, its module, and whether it is an output.
INNER = {"sequential": ("0.output", "0"), "mlp": ("fc1.output", "fc1"), "cnn": ("pool.output", "pool")}


def plain_output(module, x, path=None, fn=None):
    """The module's output with `fn` applied to the output of `path` by a plain torch hook."""
    handle = None
    if path is not None:
        handle = module.get_submodule(path).register_forward_hook(lambda m, a, out: fn(out))
    try:
        with torch.no_grad():
            return module(x)
    finally:
        if handle is not None:
            handle.remove()


def value_at(module, x, path):
    kept = []
    handle = module.get_submodule(path).register_forward_hook(lambda m, a, out: kept.append(out))
    with torch.no_grad():
        module(x)
    handle.remove()
    return kept[0]


@pytest.fixture(params=["sequential", "mlp", "cnn"])
def case(request):
    kind = request.param
    module = built(kind)
    x = torch.randn(*INPUTS[kind], generator=torch.Generator().manual_seed(1))
    return kind, module, mechnb.load(module, example=x[:1]), x


def test_load_wraps_a_module_as_a_plain_model(case):
    kind, module, model, x = case
    assert isinstance(model, mechnb.Model) and model.is_plain and model.hf is module


def test_trace_reads_a_module_output_as_a_torch_hook_sees_it(case):
    kind, module, model, x = case
    site, path = INNER[kind]
    with model.trace(x):
        inner = model[site].save()
        out = model["output"].save()
    torch.testing.assert_close(inner, value_at(module, x, path))
    torch.testing.assert_close(out, plain_output(module, x))


def test_trace_write_equals_a_torch_hook_writing_the_same(case):
    kind, module, model, x = case
    site, path = INNER[kind]
    with model.trace(x):
        model[site] = model[site] * 2
        out = model["output"].save()
    torch.testing.assert_close(out, plain_output(module, x, path, lambda v: v * 2))


def test_cache_keeps_inputs_and_outputs_in_any_order_given(case):
    kind, module, model, x = case
    site, path = INNER[kind]
    last = {"sequential": "2", "mlp": "fc2", "cnn": "head"}[kind]
    cache = model.cache(x, ["output", f"{last}.input", site])
    torch.testing.assert_close(cache[site], value_at(module, x, path))
    torch.testing.assert_close(cache["output"], plain_output(module, x))
    kept = []
    handle = module.get_submodule(last).register_forward_pre_hook(lambda m, a: kept.append(a[0]))
    with torch.no_grad():
        module(x)
    handle.remove()
    torch.testing.assert_close(cache[f"{last}.input"], kept[0])


def test_cache_in_chunks_equals_one_run(case):
    kind, module, model, x = case
    site, _ = INNER[kind]
    torch.testing.assert_close(model.cache(x, site, batch_size=2)[site], model.cache(x, site)[site])


def test_zero_ablation_equals_a_zeroing_torch_hook_and_clear_restores(case):
    kind, module, model, x = case
    site, path = INNER[kind]
    clean = plain_output(module, x)
    with model.ablated(site):
        ablated = model.cache(x, "output")["output"]
        direct = plain_output(module, x)  # a plain forward sees the ablation too
    expected = plain_output(module, x, path, torch.zeros_like)
    torch.testing.assert_close(ablated, expected)
    torch.testing.assert_close(direct, expected)
    assert not model.interventions
    torch.testing.assert_close(model.cache(x, "output")["output"], clean)


def test_mean_ablation_uses_the_reference_inputs_mean(case):
    kind, module, model, x = case
    site, path = INNER[kind]
    ref = torch.randn(*INPUTS[kind], generator=torch.Generator().manual_seed(2))
    mean = value_at(module, ref, path).mean(0)
    with model.ablated(site, mode="mean", ref=ref):
        ablated = model.cache(x, "output")["output"]
    torch.testing.assert_close(ablated, plain_output(module, x, path, lambda v: mean.expand_as(v)))


def test_hook_equals_a_torch_hook_with_the_same_function(case):
    kind, module, model, x = case
    site, path = INNER[kind]
    with model.hooked(site, lambda v: v.flip(0) + 1):
        hooked = model.cache(x, "output")["output"]
    torch.testing.assert_close(hooked, plain_output(module, x, path, lambda v: v.flip(0) + 1))


def test_input_sites_are_hooked_before_the_module_runs():
    module = built("mlp")
    model = mechnb.load(module)
    x = torch.randn(3, 4)
    with model.hooked("fc2.input", torch.zeros_like):
        out = model.cache(x, "output")["output"]
    torch.testing.assert_close(out, module.fc2.bias.detach().expand(3, 3))


def test_a_steer_intervention_adds_its_vector():
    module = built("mlp")
    model = mechnb.load(module)
    x, vector = torch.randn(3, 4), torch.arange(16.0)
    model.add(Steer(parse("fc1.output"), vector=vector, scale=0.5))
    steered = model.cache(x, "output")["output"]
    model.clear()
    torch.testing.assert_close(steered, plain_output(module, x, "fc1", lambda v: v + 0.5 * vector))


def test_model_steer_on_a_plain_module_checks_the_width_it_knows():
    module = built("mlp")
    x, vector = torch.randn(3, 4), torch.arange(16.0)
    free = mechnb.load(module)  # no example: any one vector is taken
    with free.steered("fc1.output", vector, scale=0.5):
        steered = free.cache(x, "output")["output"]
    torch.testing.assert_close(steered, plain_output(module, x, "fc1", lambda v: v + 0.5 * vector))
    known = mechnb.load(module, example=torch.zeros(1, 4))
    with pytest.raises(mechnb.SteerError, match="16-wide values but the vector has shape \\(3,\\)"):
        known.steer("fc1.output", torch.ones(3))
    with pytest.raises(mechnb.SteerError, match="one vector"):
        free.steer("fc1.output", torch.ones(2, 16))
    assert known.interventions == [] and free.interventions == []


def test_positions_index_axis_one_of_a_sequence_value():
    module = Mixer()
    model = mechnb.load(module, example=torch.zeros(1, 5, 6))
    x = torch.randn(2, 5, 6)
    cache = model.cache(x, "proj.output")
    full = value_at(module, x, "proj")
    torch.testing.assert_close(cache["proj.output@-1"], full[:, -1])
    torch.testing.assert_close(cache["proj.output@1:3"], full[:, 1:3])
    with model.ablated("proj.output@0"):
        out = model.cache(x, "output")["output"]
    zeroed = full.clone()
    zeroed[:, 0] = 0
    torch.testing.assert_close(out, module.out(zeroed).mean(1).detach())


def test_positions_on_a_value_without_a_position_axis_are_a_site_error():
    model = mechnb.load(built("mlp"), example=torch.zeros(1, 4))
    with pytest.raises(SiteError, match="no position axis"):
        model.cache(torch.zeros(2, 4), "fc1.output@-1")


def test_tuple_and_dict_inputs_are_the_forwards_arguments():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x, y):
            return self.fc(x) * y

    module = Two()
    model = mechnb.load(module)
    x, y = torch.randn(3, 4), torch.randn(3, 2)
    expected = (module.fc(x) * y).detach()
    torch.testing.assert_close(model.cache((x, y), "output")["output"], expected)
    torch.testing.assert_close(model.cache({"x": x, "y": y}, "output")["output"], expected)


def test_info_lists_module_paths_with_kinds_and_example_shapes():
    table = mechnb.load(built("cnn"), example=torch.zeros(1, 1, 8, 8)).info()["modules"]
    rows = table.set_index("path")
    assert list(rows.index) == ["(the model)", "conv", "pool", "head"]
    assert rows.loc["conv", "kind"] == "Conv2d" and rows.loc["conv", "output"] == "1 x 4 x 8 x 8"
    assert rows.loc["pool", "output"] == "1 x 4 x 4 x 4" and rows.loc["(the model)", "output"] == "1 x 10"
    blank = mechnb.load(built("cnn")).info()["modules"]
    assert set(blank["output"]) == {""} and list(blank["path"]) == list(rows.index)


def test_an_example_the_forward_rejects_is_one_model_error():
    module = built("mlp")
    with pytest.raises(ModelError, match="example forward of MLP failed"):
        mechnb.load(module, example=torch.zeros(1, 5))
    assert not module._forward_hooks and not module.fc1._forward_pre_hooks


def test_a_missing_module_names_the_nearest_paths():
    model = mechnb.load(built("mlp"))
    with pytest.raises(SiteError, match=r"^no module 'fc3' in this MLP: the nearest are fc1, fc2$"):
        model.cache(torch.zeros(1, 4), "fc3.output")


def test_transformer_sites_on_a_plain_module_are_a_site_error():
    with pytest.raises(SiteError, match="needs a transformer from the architecture table"):
        mechnb.load(built("mlp")).cache(torch.zeros(1, 4), "resid_post.0")


@pytest.mark.parametrize("call", [
    lambda m: m.logit_lens("The sky is"),
    lambda m: m.generate("The sky is"),
    lambda m: m.top(torch.zeros(1, 4)),
    lambda m: m.n_layers,
    lambda m: m.detect_heads(),
], ids=["logit_lens", "generate", "top", "n_layers", "detect_heads"])
def test_token_and_transformer_methods_raise_one_line(call):
    model = mechnb.load(built("mlp"))
    with pytest.raises(ModelError) as raised:
        call(model)
    assert "\n" not in str(raised.value) and "plain torch module" in str(raised.value)
    assert model.unmodified


def test_text_prompts_are_a_prompt_error():
    with pytest.raises(mechnb.PromptError, match="reads tensors"):
        mechnb.load(built("mlp")).cache("hello", "output")


def test_model_is_clean_after_a_failing_hook():
    module = built("mlp")
    model = mechnb.load(module)
    x = torch.randn(3, 4)
    clean = plain_output(module, x)

    def broken(value):
        raise ValueError("boom")

    model.hook("fc1.output", broken)
    with pytest.raises(InterventionError, match="boom"):
        model.cache(x, "output")
    model.clear()
    with pytest.raises(InterventionError):
        with model.hooked("fc1.output", broken):
            with model.trace(x):
                model["output"].save()
    assert model.unmodified
    torch.testing.assert_close(model.cache(x, "output")["output"], clean)
    torch.testing.assert_close(plain_output(module, x), clean)


def test_model_is_clean_after_a_failing_trace_body():
    module = built("mlp")
    model = mechnb.load(module)
    x = torch.randn(3, 4)
    with pytest.raises(SiteError):
        with model.trace(x):
            model["fc1.output"] = torch.zeros(7)
    assert model.unmodified
    torch.testing.assert_close(model.cache(x, "output")["output"], plain_output(module, x))


def test_a_supported_language_model_needs_its_tokenizer(tiny_factory, tokenizer):
    hf = tiny_factory("gpt2").hf
    with pytest.raises(ModelError, match="tokenizer"):
        mechnb.load(hf)
    assert mechnb.load(hf, tokenizer=tokenizer).arch.name == "gpt2"
