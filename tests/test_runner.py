"""The layer-by-layer runner (`mechnb.core.runner`) on a record of several prompts: each row
runs on its own prompt, and equals a plain forward of that prompt with the edit made by a
torch hook, whatever the prompts' lengths and the row's first layer and position."""

import pytest
import torch

from mechnb.core.arch import submodule
from mechnb.core.runner import Edit, Row, TargetRun, run_rows
from mechnb.core.sites import parse

PROMPTS = ["When Mary and John went to the store, John gave a drink to",
           "Elizabeth walked because",
           "The Eiffel Tower is located in the city of"]


def hooked_forward(model, prompt, site, position, value):
    """Last-position logits of `prompt` with `site`'s value at `position` set to `value` by a
    plain torch hook on the module that holds it (no mechnb engine)."""
    layers = submodule(model.hf, model.arch.layers)
    kind, layer = site.kind, site.layer
    ids = model.tokenizer(prompt, return_tensors="pt").input_ids

    def output(module, args, out):
        hidden = out[0] if isinstance(out, tuple) else out
        hidden = hidden.clone()
        if kind == "head":
            hidden[0, position, site.index] = value
        else:
            hidden[0, position] = value
        return (hidden, *out[1:]) if isinstance(out, tuple) else hidden

    module = {"resid_post": layers[layer],
              "head": submodule(layers[layer], f"{model.arch.attn}.hook_z"),
              "mlp_out": submodule(layers[layer], model.arch.mlp_out)}[kind]
    handle = module.register_forward_hook(output)
    try:
        with torch.no_grad():
            return model.hf(input_ids=ids).logits[0, -1]
    finally:
        handle.remove()


@pytest.mark.parametrize("name", ["llama", "gpt2", "gemma2", "gpt_neox"])
def test_rows_of_several_prompts_equal_hooked_forwards_of_each(tiny_factory, name):
    model = tiny_factory(name)
    target = TargetRun(model, PROMPTS)
    assert target.several and target.lengths == [len(model.tokens(p)) for p in PROMPTS]
    for index, prompt in enumerate(PROMPTS):  # the record's own logits: each prompt alone
        with torch.no_grad():
            alone = model.hf(**model.tokenizer(prompt, return_tensors="pt")).logits[0, -1]
        assert torch.allclose(target.logits[index], alone, atol=1e-4)
    generator = torch.Generator().manual_seed(0)
    cases = []
    for site_name in ["resid_post.0", "head.1.2", "mlp_out.1", "resid_post.1"]:
        site = parse(site_name)
        width = model.d_head if site.kind == "head" else model.d_model
        for base, position in [(0, 9), (1, 1), (2, 3), (1, 2), (0, 13), (1, 0)]:
            cases.append((site, base, position, torch.randn(width, generator=generator)))
    rows = [Row([Edit(site, [position], value[None, None])], base=base) for site, base, position, value in cases]
    got = run_rows(model, target, rows, batch_size=7)
    for (site, base, position, value), logits in zip(cases, got):
        expected = hooked_forward(model, PROMPTS[base], site, position, value)
        assert torch.allclose(logits, expected, atol=1e-4), (site, base, position)
    assert model.unmodified


def test_a_record_from_a_layer_runs_rows_from_there_only(tiny_factory):
    model = tiny_factory("llama")
    target = TargetRun(model, PROMPTS[:2], start=1)
    assert target.resid[0] is None and target.resid[1] is not None
    value = torch.ones(1, 1, model.d_model)
    got = run_rows(model, target, [Row([Edit(parse("resid_post.1"), [2], value)], base=1)])
    assert torch.allclose(got[0], hooked_forward(model, PROMPTS[1], parse("resid_post.1"), 2, value[0, 0]),
                          atol=1e-4)


def test_rows_carry_gradients_to_their_edit_values_when_asked(tiny_factory):
    from mechnb.core.runner import _run_chunk

    model = tiny_factory("llama")
    target = TargetRun(model, PROMPTS[:2])
    value = torch.zeros(1, 1, model.d_model, requires_grad=True)
    logits = _run_chunk(model, target, [Row([Edit(parse("resid_post.1"), [1], value)], base=1)], 1, grad=True)
    logits[0, 5].backward()
    assert value.grad is not None and value.grad.abs().sum() > 0
    assert all(p.requires_grad for p in model.hf.parameters()) and all(p.grad is None for p in model.hf.parameters())
    assert model.unmodified
