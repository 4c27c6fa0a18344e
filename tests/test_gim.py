"""GIM's backward rules, each against a hand-written autograd reference on a tiny model."""

import pytest
import torch

from conftest import PROMPT, hooks_left
from mechnb.core.arch import submodule
from mechnb.core.hookpoints import ATTN_IMPLEMENTATION
from mechnb import AttributionError

NEUTRAL = dict(freeze_norm=False, softmax_temperature=1.0, q_scale=1.0, k_scale=1.0, v_scale=1.0,
               gate_scale=1.0, up_scale=1.0)


def input_gradient(model, target=None):
    """d logit(target) / d input embeddings, and the logits, of a plain HF forward."""
    batch = model.tokenizer(PROMPT, return_tensors="pt")
    embeds = submodule(model.hf, model.arch.embed)(batch["input_ids"]).detach().requires_grad_()
    logits = model.hf(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).logits
    target = int(logits[0, -1].argmax()) if target is None else target
    (grad,) = torch.autograd.grad(logits[0, -1, target], embeds)
    return grad, logits.detach(), target


class _Scale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def scaled_at(model, paths_scales):
    """Reference: forward hooks whose custom backward scales the gradient of a module's output."""
    handles = []
    for layer in submodule(model.hf, model.arch.layers):
        for path, scale in paths_scales:
            handles.append(submodule(layer, path).register_forward_hook(
                lambda m, a, out, s=scale: _Scale.apply(out, s)))
    return handles


def test_forward_is_bit_identical_and_restored(tiny_factory):
    model = tiny_factory("llama")
    plain_grad, plain_logits, target = input_gradient(model)
    with model.gim():
        gim_grad, gim_logits, _ = input_gradient(model, target)
    assert torch.equal(gim_logits, plain_logits)
    assert not torch.allclose(gim_grad, plain_grad)
    after_grad, after_logits, _ = input_gradient(model, target)
    assert torch.equal(after_grad, plain_grad) and torch.equal(after_logits, plain_logits)
    assert hooks_left(model) == 0
    with pytest.raises(RuntimeError):
        with model.gim():
            raise RuntimeError("inside")
    assert torch.equal(input_gradient(model, target)[0], plain_grad)
    assert not any(hasattr(m, "mechnb_gim") for m in model.hf.modules())


def test_neutral_rules_give_the_plain_gradient(tiny_factory):
    model = tiny_factory("llama")
    plain, _, target = input_gradient(model)
    with model.gim(**NEUTRAL):
        neutral, _, _ = input_gradient(model, target)
    assert torch.allclose(neutral, plain, atol=1e-6)


@pytest.mark.parametrize("rules,paths", [
    (dict(q_scale=0.25, k_scale=0.5, v_scale=0.75),
     [("self_attn.q_proj", 0.25), ("self_attn.k_proj", 0.5), ("self_attn.v_proj", 0.75)]),
    (dict(gate_scale=0.3, up_scale=0.6), [("mlp.gate_proj", 0.3), ("mlp.up_proj", 0.6)]),
])
def test_gradient_scales_match_a_reference(tiny_factory, rules, paths):
    model = tiny_factory("llama")
    _, _, target = input_gradient(model)
    with model.gim(**{**NEUTRAL, **rules}):
        got, _, _ = input_gradient(model, target)
    handles = scaled_at(model, paths)
    try:
        expected, _, _ = input_gradient(model, target)
    finally:
        for handle in handles:
            handle.remove()
    assert torch.allclose(got, expected, atol=1e-6)


@pytest.mark.parametrize("name", ["llama", "gpt2", "gemma2"])
def test_frozen_norms_match_a_reference(tiny_factory, name):
    model = tiny_factory(name)
    _, _, target = input_gradient(model)
    with model.gim(**{**NEUTRAL, "freeze_norm": True}):
        got, _, _ = input_gradient(model, target)
    # Reference: every norm's forward rewritten with its statistics detached.
    originals = {}
    for module in model.hf.modules():
        if isinstance(module, torch.nn.LayerNorm):
            def forward(x, m=module):
                mean = x.mean(-1, keepdim=True).detach()
                var = (x - mean).pow(2).mean(-1, keepdim=True).detach()
                return (x - mean) / torch.sqrt(var + m.eps) * m.weight + m.bias
        elif type(module).__name__.endswith("RMSNorm"):
            def forward(x, m=module):
                eps = getattr(m, "variance_epsilon", None) or m.eps
                scale = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps).detach()
                gain = (1 + m.weight) if "Gemma" in type(m).__name__ else m.weight
                return x * scale * gain
        else:
            continue
        originals[module] = module.__dict__.get("forward")
        module.forward = forward
    try:
        expected, _, _ = input_gradient(model, target)
    finally:
        for module, original in originals.items():
            if original is None:
                del module.forward
            else:
                module.forward = original
    assert torch.allclose(got, expected, atol=1e-5)


class _HotSoftmax(torch.autograd.Function):
    """softmax(s) forward; backward the Jacobian of softmax(s / T), written out by hand."""

    @staticmethod
    def forward(ctx, scores, temperature):
        ctx.save_for_backward(scores)
        ctx.temperature = temperature
        return torch.softmax(scores, dim=-1)

    @staticmethod
    def backward(ctx, grad):
        (scores,) = ctx.saved_tensors
        hot = torch.softmax(scores / ctx.temperature, dim=-1)
        return hot * (grad - (grad * hot).sum(-1, keepdim=True)) / ctx.temperature, None


def test_softmax_temperature_matches_a_reference(tiny_factory):
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    model = tiny_factory("llama")
    _, _, target = input_gradient(model)
    with model.gim(**{**NEUTRAL, "softmax_temperature": 3.0}):
        got, _, _ = input_gradient(model, target)

    def reference(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        groups = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
        scores = query @ key.transpose(2, 3) * scaling + attention_mask[..., : key.shape[-2]]
        pattern = _HotSoftmax.apply(scores, 3.0)
        return (pattern @ value).transpose(1, 2).contiguous(), pattern

    AttentionInterface.register("gim_reference", reference)
    AttentionMaskInterface.register("gim_reference", eager_mask)
    model.hf.set_attn_implementation("gim_reference")
    try:
        expected, _, _ = input_gradient(model, target)
    finally:
        model.hf.set_attn_implementation(ATTN_IMPLEMENTATION)
    assert torch.allclose(got, expected, atol=1e-5)


def test_attribution_methods(tiny_factory):
    model = tiny_factory("llama")
    grad, logits, target = input_gradient(model)
    embeds = submodule(model.hf, model.arch.embed)(model.tokenizer(PROMPT, return_tensors="pt")["input_ids"])
    saliency = model.attribute(PROMPT, method="gradient")
    assert saliency.meta["target_id"] == target
    assert torch.allclose(saliency.values, grad[0].norm(dim=-1), atol=1e-5)
    gxi = model.attribute(PROMPT, method="grad_x_input")
    assert torch.allclose(gxi.values, (grad[0] * embeds[0]).sum(-1), atol=1e-5)
    with model.gim():
        gim_grad, _, _ = input_gradient(model, target)
    gim = model.attribute(PROMPT, method="gim")
    assert torch.allclose(gim.values, (gim_grad[0] * embeds[0]).sum(-1), atol=1e-5)
    assert list(gim.df.columns) == ["pos", "token", "value"] and "ColoredTokens" in gim.html()
    assert all(p.grad is None for p in model.hf.parameters())


def test_integrated_gradients_complete(tiny_factory):
    model = tiny_factory("llama")
    batch = model.tokenizer(PROMPT, return_tensors="pt")
    embed = submodule(model.hf, model.arch.embed)
    embeds = embed(batch["input_ids"])
    # A non-zero baseline (the EOS embedding at every position): with RMSNorm, the path
    # from zeros starts at a singular point and Riemann sums converge slowly.
    baseline = embed(torch.tensor([model.tokenizer.eos_token_id]))[0].detach()
    result = model.attribute(PROMPT, target=" Mary", method="integrated_gradients", steps=64,
                             baseline=baseline)
    mary = model.tokenizer.encode(" Mary")[0]
    with torch.no_grad():
        full = model.hf(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).logits[0, -1, mary]
        empty = model.hf(inputs_embeds=baseline.expand_as(embeds), attention_mask=batch["attention_mask"]
                         ).logits[0, -1, mary]
    # Completeness: the attributions add up to the logit's change from the baseline.
    assert abs(result.values.sum().item() - (full - empty).item()) < 0.05 * abs((full - empty).item()) + 1e-3
    with pytest.raises(AttributionError, match="unknown attribution method"):
        model.attribute(PROMPT, method="lime")


def test_component_attribution(tiny_factory):
    model = tiny_factory("llama")
    heads = model.attribute(PROMPT, target=" Mary", method="grad_x_input", sites="head.*.*")
    assert heads.values.shape == (3, 4) and list(heads.df.columns) == ["layer", "head", "value"]
    # Reference: gradient of the logit w.r.t. head 2.1's output, dotted with that output.
    mary = model.tokenizer.encode(" Mary")[0]
    batch = model.tokenizer(PROMPT, return_tensors="pt")
    kept = {}
    hook_z = submodule(model.hf, model.arch.layers)[2].self_attn.hook_z
    handle = hook_z.register_forward_hook(lambda m, a, out: kept.setdefault("z", out))
    try:
        embeds = submodule(model.hf, model.arch.embed)(batch["input_ids"]).detach().requires_grad_()
        logits = model.hf(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).logits
        (grad,) = torch.autograd.grad(logits[0, -1, mary], kept["z"])
    finally:
        handle.remove()
    expected = (grad[:, :, 1] * kept["z"][:, :, 1]).sum()
    assert abs(heads.values[2, 1].item() - expected.item()) < 1e-5
    mlps = model.attribute(PROMPT, method="gim", sites=["mlp_out.*"])
    assert mlps.values.shape == (3,)
    with pytest.raises(AttributionError, match="integrated gradients attribute to input tokens"):
        model.attribute(PROMPT, method="integrated_gradients", sites="head.*.*")
    assert all(p.grad is None for p in model.hf.parameters())


def test_attribution_stability_compares_ranks_across_paraphrases_and_steps(tiny_factory):
    from mechnb import MechnbError

    model = tiny_factory("llama")
    heads = model.attribute(PROMPT, method="grad_x_input", sites="head.*.*")
    same = heads.stability(prompts=[PROMPT])
    assert same.values.tolist() == [pytest.approx(1.0)]
    other = heads.stability(prompts=["When Alice and Bob went to the park, Bob gave a ball to"])
    assert -1 <= other.values[0] < 1
    tokens = model.attribute(PROMPT, method="integrated_gradients", steps=4)
    steps = tokens.stability(steps=[2, 16])
    assert steps.df.variation.tolist() == ["steps 2", "steps 16"] and (steps.values > 0).all()
    with pytest.raises(MechnbError, match="component attributions"):
        tokens.stability(prompts=["Hi there"])
