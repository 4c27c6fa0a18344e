"""Reading and writing sites inside a trace, on tiny models of every architecture."""

import pytest
import torch

from conftest import PROMPT, clean_logits
from torchref import Reference
from mechnb.core.arch import submodule
from mechnb import PromptError, SiteError, TraceError

ALL_SITES = ["embed", "resid_pre.1", "pattern.1", "head.1", "head.1.2", "attn_out.1",
             "neuron.1", "neuron.1.5", "mlp_out.1", "resid_post.1", "logits"]


def shapes(model, n):
    return {
        "embed": (1, n, model.d_model),
        "resid_pre.1": (1, n, model.d_model),
        "pattern.1": (1, model.n_heads, n, n),
        "head.1": (1, n, model.n_heads, model.d_head),
        "head.1.2": (1, n, model.d_head),
        "attn_out.1": (1, n, model.d_model),
        "resid_mid.1": (1, n, model.d_model),
        "neuron.1": (1, n, model.d_mlp),
        "neuron.1.5": (1, n),
        "mlp_out.1": (1, n, model.d_model),
        "resid_post.1": (1, n, model.d_model),
        "logits": (1, n, model.vocab_size),
    }


def test_every_site_kind_reads_with_its_documented_shape(tiny):
    sites = ALL_SITES if tiny.parallel_attn_mlp else ALL_SITES[:6] + ["resid_mid.1"] + ALL_SITES[6:]
    n = len(tiny.tokens(PROMPT))
    found = {}
    with tiny.trace(PROMPT):
        for site in sites:
            found[site] = tiny[site].save()
    expected = shapes(tiny, n)
    for site in sites:
        assert tuple(found[site].shape) == expected[site], site


def test_residual_stream_identities(tiny):
    sites = ["resid_pre.*", "resid_post.*", "attn_out.*", "mlp_out.*", "logits"]
    if not tiny.parallel_attn_mlp:
        sites.append("resid_mid.*")
    cache = tiny.cache(PROMPT, sites)
    for layer in range(tiny.n_layers - 1):
        assert torch.equal(cache[f"resid_post.{layer}"], cache[f"resid_pre.{layer + 1}"])
    for layer in range(tiny.n_layers):
        pre, post = cache[f"resid_pre.{layer}"], cache[f"resid_post.{layer}"]
        total = pre + cache[f"attn_out.{layer}"] + cache[f"mlp_out.{layer}"]
        assert torch.allclose(total, post, atol=1e-5)
        if not tiny.parallel_attn_mlp:
            mid = pre + cache[f"attn_out.{layer}"]
            assert torch.allclose(cache[f"resid_mid.{layer}"], mid, atol=1e-5)
    assert torch.allclose(cache["logits"], clean_logits(tiny), atol=1e-5)


def test_heads_recombine_through_the_output_projection(tiny):
    o_proj = submodule(submodule(tiny.hf, tiny.arch.layers)[1], tiny.arch.o_proj)
    found = {}
    with tiny.trace(PROMPT):
        found["z"] = tiny["head.1"].save()
        found["out"] = submodule(submodule(tiny.nn, tiny.arch.layers)[1], tiny.arch.o_proj).output.save()
        found["attn_out"] = tiny["attn_out.1"].save()
    z = found["z"]  # batch pos head d_head
    weight = o_proj.weight  # Conv1D (GPT-2) stores (in, out); Linear (out, in)
    w = weight if tiny.arch.o_proj_conv1d else weight.T
    w = w.reshape(tiny.n_heads, tiny.d_head, tiny.d_model)
    per_head = torch.einsum("bphd,hdm->bphm", z, w)
    bias = o_proj.bias if getattr(o_proj, "bias", None) is not None else 0
    recombined = per_head.sum(2) + bias
    assert torch.allclose(recombined, found["out"], atol=1e-5)
    if tiny.arch.attn_out == tiny.arch.attn:  # Gemma normalises attn_out after o_proj
        assert torch.allclose(recombined, found["attn_out"], atol=1e-5)


def test_writing_a_head_changes_the_logits_and_nothing_persists(tiny):
    found = {}
    with tiny.trace(PROMPT):
        tiny["head.1.2"] = 0
        found["z"] = tiny["head.1"].save()
        found["logits"] = tiny["logits"].save()
    assert found["z"][:, :, 2].abs().max() == 0
    assert found["z"][:, :, 1].abs().max() > 0
    clean = clean_logits(tiny)
    assert (found["logits"] - clean).abs().max() > 1e-4
    assert torch.equal(clean_logits(tiny), clean)


def test_writing_one_position_leaves_earlier_positions_alone(tiny):
    found = {}
    with tiny.trace(PROMPT):
        tiny["resid_pre.1@5"] = 0
        found["logits"] = tiny["logits"].save()
    clean = clean_logits(tiny)
    assert torch.allclose(found["logits"][:, :5], clean[:, :5], atol=1e-5)
    assert (found["logits"][:, 5:] - clean[:, 5:]).abs().max() > 1e-4


def test_written_value_is_read_back(tiny_factory):
    model = tiny_factory("llama")
    vector = torch.arange(model.d_model, dtype=torch.float)
    found = {}
    with model.trace(PROMPT):
        model["resid_mid.1@-1"] = vector
        found["mid"] = model["resid_mid.1"].save()
    assert torch.equal(found["mid"][0, -1], vector)
    with model.trace(PROMPT):
        model["neuron.1.5"] = 3.0
        model["pattern.2.0"] = 0.0
        found["neuron"] = model["neuron.1"].save()
        found["pattern"] = model["pattern.2"].save()
    assert (found["neuron"][..., 5] == 3.0).all()
    assert found["pattern"][:, 0].abs().max() == 0 and found["pattern"][:, 1].sum() > 0


SEQUENTIAL = ["llama", "gpt2", "gemma2", "gpt_neox_sequential"]


@pytest.mark.parametrize("name", SEQUENTIAL)
def test_a_write_of_resid_mid_is_a_write_of_the_residual_stream(tiny_factory, name):
    """Written in a trace, by steering or by an ablation, resid_mid changes what the MLP reads
    and what the skip connection carries past it, as TransformerLens' hook_resid_mid does. The
    reference changes attention's output by hand on a fresh transformers copy (`torchref`)."""
    model = tiny_factory(name)
    reference = Reference(model.hf, name, tokenizer=model.tokenizer)
    vector = torch.randn(model.d_model)
    edits = {"resid_mid.1@-1": lambda part: part + vector}
    expected, read = reference.run(PROMPT, edits, reads=["resid_post.1"])
    assert (expected.logits - clean_logits(model)).abs().max() > 1e-3
    found = {}
    with model.trace(PROMPT):
        model["resid_mid.1@-1"] = model["resid_mid.1@-1"] + vector
        found["post"] = model["resid_post.1"].save()
        found["logits"] = model["logits"].save()
    assert torch.allclose(found["logits"], expected.logits, atol=1e-5)
    assert torch.allclose(found["post"], read["resid_post.1"], atol=1e-5)  # read after the write
    with model.steered("resid_mid.1@-1", vector):
        assert torch.allclose(clean_logits(model), expected.logits, atol=1e-5)
    refs = ["The cat sat on the mat", "A dog ran home quickly today"]
    mean = torch.cat([reference.read(ref, "resid_mid.2")[0] for ref in refs]).mean(0)
    with model.ablated("resid_mid.2", mode="mean", ref=refs):
        averaged = reference.logits(PROMPT, {"resid_mid.2": lambda part: mean})
        assert torch.allclose(clean_logits(model), averaged, atol=1e-5)
    # A later write of the layer's output replaces what the resid_mid write would carry.
    clean_post = model.cache(PROMPT, "resid_post.1")["resid_post.1"]
    with model.trace(PROMPT):
        model["resid_mid.1"] = 0.0
        model["resid_post.1"] = clean_post
        found["replaced"] = model["logits"].save()
    assert torch.allclose(found["replaced"], clean_logits(model), atol=1e-5)
    # Patching the whole of resid_mid from the clean run restores the clean run.
    corrupt = PROMPT.replace("John gave", "Mary gave")
    patched = model.patch(PROMPT, corrupt, "resid_mid.1", answer=" Mary", wrong=" John", per_position=False)
    assert abs(patched.values.item() - patched.meta["clean_metric"]) < 1e-5
    assert abs(patched.meta["clean_metric"] - patched.meta["corrupt_metric"]) > 1e-3


def test_the_clean_resid_mid_written_into_the_corrupt_run_gives_the_clean_answer(tiny):
    """Every architecture: resid_mid is the whole residual stream after attention, so the clean
    value written there (by a trace, and by patching) leaves nothing of the corrupt run."""
    if tiny.parallel_attn_mlp:
        pytest.skip("attention and MLP read the same residual: no resid_mid")
    corrupt = PROMPT.replace("John gave", "Mary gave")
    patched = tiny.patch(PROMPT, corrupt, "resid_mid.1", answer=" Mary", wrong=" John", per_position=False)
    clean, moved = patched.meta["clean_metric"], patched.meta["clean_metric"] - patched.meta["corrupt_metric"]
    assert abs(moved) > 1e-3 and abs(patched.values.item() - clean) < 1e-6
    mid = tiny.cache(PROMPT, "resid_mid.1")["resid_mid.1"]
    with tiny.trace(corrupt):
        tiny["resid_mid.1"] = mid
        logits = tiny["logits@-1"].save()
    mary, john = (tiny.tokenizer.encode(word)[0] for word in (" Mary", " John"))
    assert abs((logits[0, mary] - logits[0, john]).item() - clean) < 1e-6


def test_batched_prompts_equal_their_solo_runs(tiny):
    prompts = [PROMPT, "Hello there", "A much longer prompt than the other two, to pad them a lot"]
    cache = tiny.cache(prompts, ["resid_post.2", "logits"])
    assert cache.lengths == [len(tiny.tokens(p)) for p in prompts]
    for row, prompt in enumerate(prompts):
        n = cache.lengths[row]
        solo = clean_logits(tiny, prompt)[0]
        assert torch.allclose(cache["logits"][row, :n], solo, atol=1e-4)
    last = cache["logits@-1"]
    assert torch.allclose(last[1], clean_logits(tiny, prompts[1])[0, -1], atol=1e-4)


def test_wildcard_reads_stack_layers(tiny):
    found = {}
    with tiny.trace(PROMPT):
        found["all"] = tiny["resid_post.*@-1"].save()
        found["last"] = tiny[f"resid_post.{tiny.n_layers - 1}"].save()
    assert found["all"].shape == (tiny.n_layers, 1, tiny.d_model)
    assert torch.equal(found["all"][-1], found["last"][:, -1])


def test_exception_inside_a_trace_leaves_the_model_clean(tiny):
    clean = clean_logits(tiny)
    with pytest.raises(ZeroDivisionError):
        with tiny.trace(PROMPT):
            tiny["resid_pre.1"] = 0
            tiny["head.1.0"] = 0
            1 / 0
    assert torch.equal(clean_logits(tiny), clean)
    assert tiny._trace is None
    found = []
    with tiny.trace(PROMPT):
        found.append(tiny["logits"].save())
    assert torch.allclose(found[0], clean, atol=1e-5)


def test_keyboard_interrupt_inside_a_trace_leaves_the_model_clean(tiny_factory):
    model = tiny_factory("llama")
    clean = clean_logits(model)
    with pytest.raises(KeyboardInterrupt):
        with model.trace(PROMPT):
            model["head.1.0"] = 0
            raise KeyboardInterrupt
    assert model._trace is None
    assert torch.equal(clean_logits(model), clean)


def test_out_of_order_reads_say_how_to_order_them(tiny_factory):
    model = tiny_factory("llama")
    before = clean_logits(model)  # transformers' own forward, before the failure
    with pytest.raises(SiteError, match="resid_post.0 was requested after.*order"):
        with model.trace(PROMPT):
            model["resid_post.2"].save()
            model["resid_post.0"] = 0  # a write the failure must not leave behind
    assert torch.equal(clean_logits(model), before)


def test_bad_sites_inside_a_trace_raise_site_errors_and_leave_it_clean(tiny_factory):
    model = tiny_factory("llama")
    clean = clean_logits(model)
    for bad in ["resid_post.7", "head.1.9", "blah.1", "resid_pre.1@'Bob'", "resid_pre.1@40"]:
        with pytest.raises(SiteError):
            with model.trace(PROMPT):
                model["head.0.1"] = 0
                model[bad].save()
        assert torch.equal(clean_logits(model), clean)


def test_wrong_shaped_write_names_both_shapes(tiny_factory):
    model = tiny_factory("llama")
    with pytest.raises(SiteError, match=r"shape \(7,\).*resid_pre.1"):
        with model.trace(PROMPT):
            model["resid_pre.1"] = torch.zeros(7)


def test_reading_outside_a_trace_says_where_to_read(tiny_factory):
    model = tiny_factory("llama")
    with pytest.raises(TraceError, match="inside `with model.trace"):
        model["resid_post.1"]
    with pytest.raises(TraceError):
        model["resid_post.1"] = 0


def test_traces_do_not_nest(tiny_factory):
    model = tiny_factory("llama")
    with pytest.raises(TraceError, match="do not nest"):
        with model.trace(PROMPT):
            with model.trace(PROMPT):
                model["logits"].save()
    assert model._trace is None


def test_bad_prompts_are_refused(tiny_factory):
    model = tiny_factory("llama")
    for bad in [[], [""], [3], None]:
        with pytest.raises(PromptError):
            model.trace(bad)


def test_grad_trace_keeps_gradients(tiny_factory):
    model = tiny_factory("llama")
    found = {}
    with model.trace(PROMPT, grad=True):
        found["logits"] = model["logits"].save()
    assert found["logits"].requires_grad
    with model.trace(PROMPT):
        found["plain"] = model["logits"].save()
    assert not found["plain"].requires_grad


def test_interrupt_in_the_middle_of_the_forward_leaves_the_model_clean(tiny_factory):
    model = tiny_factory("llama")
    clean = clean_logits(model)

    def ctrl_c(module, args, output):
        raise KeyboardInterrupt

    handle = submodule(model.hf, model.arch.layers)[1].register_forward_hook(ctrl_c)
    try:
        with pytest.raises(KeyboardInterrupt):
            with model.trace(PROMPT):
                model["resid_pre.0"] = 0
                model["logits"].save()
    finally:
        handle.remove()
    assert model._trace is None
    assert torch.equal(clean_logits(model), clean)
    found = []
    with model.trace(PROMPT):
        found.append(model["logits"].save())
    assert torch.allclose(found[0], clean, atol=1e-5)
