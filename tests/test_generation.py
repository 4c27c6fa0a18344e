"""Generation under interventions: against transformers' own greedy generation, and against
hand-written reference loops (plain PyTorch hooks on the HF model) for both position semantics."""

from types import SimpleNamespace

import pytest
import torch

from conftest import PARIS, PROMPT, clean_logits
from mechnb import GenerationError, InterventionError, SiteError

N = 6
# Two prompts of different lengths, both long enough for the span @3:7.
PROMPTS = [PROMPT, "The cat sat on the mat and"]


def hf_greedy(model, prompt, n):
    ids = model.tokenizer(prompt, return_tensors="pt")
    out = model.hf.generate(**ids, max_new_tokens=n, do_sample=False, pad_token_id=model.tokenizer.eos_token_id)
    return out[0, ids["input_ids"].shape[1]:].tolist()


def tokens_of(result, row):
    return result.values[row, :int(result.df.n_tokens[row])].tolist()


def hook_counts(model) -> dict:
    return {name: (len(m._forward_hooks), len(m._forward_pre_hooks)) for name, m in model.hf.named_modules()}


# -- the reference loops ---------------------------------------------------------------------
#
# `state.start` is the absolute position of the running forward's first column and
# `state.total` the length of the sequence so far; a reference hook acts on the absolute
# positions it names that the forward computes. The cached loop feeds the prompt, then one
# token at a time through transformers' cache; the whole loop feeds the whole sequence
# every step. Each returns the greedy tokens and the logits at each generated token's
# position (one forward more than the tokens need).


def reference(model, prompt, n, install, cached):
    ids = model.tokenizer(prompt)["input_ids"]
    prompt_length = len(ids)
    state = SimpleNamespace(start=0, total=0)
    handles = install(model, state) if install else []
    logits_at, past, feed = [], None, list(ids)
    try:
        with torch.no_grad():
            while True:
                state.total = len(ids)
                if cached:
                    state.start = len(ids) - len(feed)
                    out = model.hf(input_ids=torch.tensor([feed]), cache=past, use_cache=True)
                    past = out.cache
                else:
                    state.start = 0
                    out = model.hf(input_ids=torch.tensor([ids]), use_cache=False)
                logits = out.logits[0, -1]
                if len(ids) > prompt_length:
                    logits_at.append(logits)
                generated = ids[prompt_length:]
                if len(generated) == n or generated[-1:] == [model.tokenizer.eos_token_id]:
                    break
                ids.append(int(logits.argmax()))
                feed = ids[-1:]
    finally:
        for handle in handles:
            handle.remove()
    return ids[prompt_length:], torch.stack(logits_at)


def columns(state, width, which):
    """The columns of the running forward holding the absolute positions `which` names."""
    if which is None:
        return list(range(width))
    wanted = [state.total - 1] if which == "last" else list(which)
    return [p - state.start for p in wanted if 0 <= p - state.start < width]


def layers(model):
    return model.hf.model.layers


def on_input(module, fn):
    """A pre-hook replacing a module's first input by `fn(value)`."""
    def hook(module, args, kwargs):
        if args:
            return (fn(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": fn(kwargs["hidden_states"])}

    return module.register_forward_pre_hook(hook, with_kwargs=True)


def on_output(module, fn):
    def hook(module, args, output):
        if isinstance(output, tuple):
            return (fn(output[0]), *output[1:])
        return fn(output)

    return module.register_forward_hook(hook)


def changed(state, which, fn):
    """`fn` applied to the columns of a `batch pos ...` value that `which` names."""
    def change(value):
        value = value.clone()
        cols = columns(state, value.shape[1], which)
        if cols:
            value[:, cols] = fn(value[:, cols])
        return value

    return change


def random_sae(model, width=32):
    from mechnb.sae import SAE

    generator = torch.Generator().manual_seed(1)
    sae = SAE(model.d_model, width, kind="relu", site="resid_post.1")
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(model.d_model, width, generator=generator))
        sae.W_dec.copy_(torch.randn(width, model.d_model, generator=generator) * 0.5)
        sae.b_dec.copy_(torch.randn(model.d_model, generator=generator) * 0.1)
    return sae


def random_transcoders(model, width=32):
    from mechnb.transcoders import Transcoder, TranscoderSet

    generator = torch.Generator().manual_seed(2)
    made = {}
    for layer in (0, 1):
        tc = Transcoder(model.d_model, width, kind="relu")
        with torch.no_grad():
            tc.W_enc.copy_(torch.randn(model.d_model, width, generator=generator))
            tc.W_dec.copy_(torch.randn(width, model.d_model, generator=generator) * 0.5)
        made[layer] = tc
    return TranscoderSet(made)


STEER = torch.linspace(-1, 1, 32) * 3  # a fixed vector as wide as the tiny models' d_model


class Case:
    """One intervention kind: `setup(model)` adds it through mechnb and returns its undo;
    `install(model, state)` is the hand-written reference (a list of hook handles)."""

    def head_ablation_setup(model):
        added = model.ablate("head.1.2")
        return lambda: model.remove(added)

    def head_ablation_install(model, state):
        def zero_head(x):
            x = x.clone()
            x[..., 16:24] = 0  # head 2 of d_head 8
            return x

        return [on_input(layers(model)[1].self_attn.o_proj, zero_head)]

    def hook_setup(model):
        added = model.hook("mlp_out.0@-1", lambda value: -3 * value)
        return lambda: model.remove(added)

    def hook_install(model, state):
        return [on_output(layers(model)[0].mlp, changed(state, "last", lambda v: -3 * v))]

    def steer_last_setup(model):
        added = model.steer("resid_pre.2", STEER, scale=2, positions=-1)
        return lambda: model.remove(added)

    def steer_last_install(model, state):
        return [on_input(layers(model)[2], changed(state, "last", lambda v: v + 2 * STEER))]

    def steer_span_setup(model):
        added = model.steer("resid_pre.1", STEER, scale=2, positions="3:7")
        return lambda: model.remove(added)

    def steer_span_install(model, state):
        return [on_input(layers(model)[1], changed(state, range(3, 7), lambda v: v + 2 * STEER))]

    def sae_setup(model):
        sae = random_sae(model)
        model.attach(sae)
        model.ablate("sae.1.0:16")
        return lambda: model.detach(sae)

    def sae_install(model, state):
        sae = random_sae(model)
        W_enc, W_dec, b_enc, b_dec = sae.W_enc.data, sae.W_dec.data, sae.b_enc.data, sae.b_dec.data

        def splice(x):
            features = torch.relu((x - b_dec) @ W_enc + b_enc)
            error = x - (features @ W_dec + b_dec)
            features[..., :16] = 0
            return features @ W_dec + b_dec + error

        return [on_output(layers(model)[1], splice)]

    def transcoder_setup(model):
        tcs = random_transcoders(model)
        model.attach(tcs)
        model.ablate("tc.0.0:16")
        model.ablate("tc.1.5")
        return lambda: model.detach(tcs)

    def transcoder_install(model, state):
        tcs = random_transcoders(model)
        handles, read = [], {}
        for layer, ablated in ((0, slice(0, 16)), (1, slice(5, 6))):
            tc = tcs[layer]
            W_enc, W_dec, b_enc, b_dec = tc.W_enc.data, tc.W_dec.data, tc.b_enc.data, tc.b_dec.data

            def keep(x, layer=layer):
                read[layer] = x
                return x

            def splice(y, layer=layer, W_enc=W_enc, W_dec=W_dec, b_enc=b_enc, b_dec=b_dec, ablated=ablated):
                features = torch.relu(read[layer] @ W_enc + b_enc)
                error = y - (features @ W_dec + b_dec)
                features[..., ablated] = 0
                return features @ W_dec + b_dec + error

            mlp = layers(model)[layer].mlp
            handles += [on_input(mlp, keep), on_output(mlp, splice)]
        return handles

    def weight_edit_setup(model):
        edit = SimpleNamespace(module=layers(model)[1].mlp.down_proj, delta=Case.delta(model))
        model.weight_edits.apply(edit)
        return lambda: model.weight_edits.revert(edit)

    def weight_edit_install(model, state):
        delta = Case.delta(model)
        # The edited weight's effect, by hand on the unedited model: y + x @ delta.T.
        def hook(module, args, output):
            return output + args[0] @ delta.T

        return [layers(model)[1].mlp.down_proj.register_forward_hook(hook)]

    def delta(model):
        generator = torch.Generator().manual_seed(3)
        return torch.randn(model.d_model, 64, generator=generator) * 0.3


KINDS = ["head_ablation", "hook", "steer_last", "steer_span", "sae", "transcoder", "weight_edit"]


@pytest.mark.parametrize("kind", KINDS)
def test_generation_under_each_intervention_equals_the_reference_loop_of_each_semantics(tiny_factory, kind):
    model = tiny_factory("llama")
    setup, install = getattr(Case, f"{kind}_setup"), getattr(Case, f"{kind}_install")
    plain = model.generate(PROMPTS, max_new_tokens=N, sites="logits")
    hooks = hook_counts(model)
    undo = setup(model)
    try:
        results = {cache: model.generate(PROMPTS, max_new_tokens=N, cache=cache, sites=["logits"])
                   for cache in (True, False)}
    finally:
        undo()
    assert model.interventions == [] and not model.edits and hook_counts(model) == hooks
    for cache, result in results.items():
        for row, prompt in enumerate(PROMPTS):
            tokens, logits = reference(model, prompt, N, install, cached=cache)
            assert tokens_of(result, row) == tokens, (cache, row)
            torch.testing.assert_close(result.activations["logits"][row, :len(tokens)], logits,
                                       atol=1e-4, rtol=1e-4)
        # The intervention changes what the model computes (else this test could not fail).
        assert (result.activations["logits"] - plain.activations["logits"]).abs().max() > 1e-2
    same = torch.allclose(results[True].activations["logits"], results[False].activations["logits"], atol=1e-4)
    # Only an intervention at the newest token reads differently with and without the cache.
    assert same == (kind not in ("hook", "steer_last"))  # both act @-1


def test_plain_generation_equals_the_reference_loops(tiny_factory):
    model = tiny_factory("gpt2")
    for cache in (True, False):
        result = model.generate(PROMPTS, max_new_tokens=N, cache=cache, sites="logits")
        for row, prompt in enumerate(PROMPTS):
            tokens, logits = reference(model, prompt, N, None, cached=cache)
            assert tokens_of(result, row) == tokens
            torch.testing.assert_close(result.activations["logits"][row], logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["llama", "gpt2", "gpt_neox", "gemma2", "gemma3_text"])
def test_greedy_generation_equals_transformers_token_for_token(tiny_factory, name):
    model = tiny_factory(name)
    prompts = [PROMPT, "Hello", PARIS]
    for cache in (True, False):
        result = model.generate(prompts, max_new_tokens=8, cache=cache)
        for row, prompt in enumerate(prompts):
            ours = tokens_of(result, row)
            assert ours == hf_greedy(model, prompt, 8)[:len(ours)]
        assert list(result.df.columns) == ["prompt", "interventions", "continuation", "n_tokens"]
        assert result.activations is None and result.meta["cache"] is cache


@pytest.mark.parametrize("name", ["gpt2", "gemma2"])
@pytest.mark.parametrize("cache", [True, False])
def test_a_prompt_generates_the_same_alone_and_beside_a_longer_one(tiny_factory, name, cache):
    model = tiny_factory(name)
    # At the newest token, so that each row's positions must be its own.
    with model.steered("resid_pre.1", STEER, scale=2, positions=-1):
        alone = model.generate("Hello", max_new_tokens=8, cache=cache, sites=["resid_post.1", "logits"])
        beside = model.generate([PROMPT, "Hello"], max_new_tokens=8, cache=cache, sites=["resid_post.1", "logits"])
    tokens = tokens_of(alone, 0)
    assert tokens == tokens_of(beside, 1)
    for site in ("resid_post.1", "logits"):
        torch.testing.assert_close(beside.activations[site][1, :len(tokens)], alone.activations[site][0],
                                   atol=1e-5, rtol=1e-5)


def test_positions_resolve_against_each_rows_own_offset():
    from mechnb.core.interventions import Context
    from mechnb.core.sites import parse_positions

    tokens = [list("abcdef"), list("abc")]
    # A cached step: each row computes only its newest token, at its own position.
    step = Context(tokens, offset=[5, 2])
    assert step.resolve(parse_positions("-1"), 2, 1).tolist() == [[0], [0]]
    assert step.resolve(parse_positions("0:2"), 2, 1) is None
    # Left padding: row 1's first real token is column 3 of the prompts' forward.
    prompts = Context(tokens, offset=[0, -3])
    assert prompts.resolve(parse_positions("1:3"), 2, 6).tolist() == [[1, 2], [4, 5]]
    assert prompts.resolve(parse_positions("-1"), 2, 6).tolist() == [[5], [5]]
    with pytest.raises(SiteError, match=r"fall \[1, 0\] times"):
        Context([list("abcd"), list("abcd")], offset=[3, 4]).resolve(parse_positions("3:4"), 2, 1)


def test_each_forward_computes_the_newest_token_with_the_cache_and_the_whole_sequence_without(tiny_factory):
    model = tiny_factory("gpt2")
    n = len(model.tokens("The cat sat"))
    for cache, widths in ((True, [n, 1, 1]), (False, [n, n + 1, n + 2])):
        seen, last, span = [], [], []
        with model.hooked("resid_post.0", lambda value: seen.append(value.shape[1])), \
                model.hooked("resid_post.0@-1", lambda value: last.append(tuple(value.shape))), \
                model.hooked("resid_post.0@1:3", lambda value: span.append(value.shape[1])):
            model.generate("The cat sat", max_new_tokens=3, cache=cache)
        assert seen == widths and last == [(1, 32)] * 3
        # A prompt span: once, in the prompt's forward, with the cache; in every forward without.
        assert span == ([2] if cache else [2, 2, 2])


def test_kept_sites_hold_every_generated_token_and_equal_a_cache_of_the_final_sequences(tiny_factory):
    model = tiny_factory("llama")
    sae = random_sae(model)
    model.attach(sae)
    try:
        with model.ablated("head.1.2"):
            results = {cache: model.generate(PROMPTS, max_new_tokens=N, cache=cache,
                                             sites=["resid_post.1", "head.0", "sae.1.*", "logits"])
                       for cache in (True, False)}
            for result in results.values():
                found = result.activations
                assert found["resid_post.1"].shape == (2, N, 32) and found["head.0"].shape == (2, N, 4, 8)
                assert found["sae.1.*"].shape == (32, 2, N) and found["sae.1"].shape == (2, N, 32)
                assert found["logits"].shape == (2, N, model.vocab_size) and found.lengths == [N, N]
                torch.testing.assert_close(found["head.0.3@-1"], found["head.0"][:, -1, 3])
                for row, prompt in enumerate(PROMPTS):
                    ids = model.tokenizer(prompt)["input_ids"]
                    sequence = torch.tensor([ids + tokens_of(result, row)])
                    # Two caches: one holding both resid_post.1 and the SAE there is refused.
                    for kept in (["resid_post.1", "head.0", "logits"], ["sae.1"]):
                        whole = model.cache(sequence, kept)
                        for site in kept:
                            torch.testing.assert_close(found[site][row], whole[site][0, len(ids):],
                                                       atol=1e-4, rtol=1e-4)
    finally:
        model.detach(sae)
    assert results[True].meta["sites"] == ["head.0", "resid_post.1", "sae.1", "logits"]


@pytest.mark.parametrize("cache", [True, False])
def test_kept_values_end_with_each_row(tiny_factory, cache):
    model = tiny_factory("llama")
    eos = model.tokenizer.eos_token_id
    direction = model.hf.lm_head.weight[eos].detach() * 100
    calls = []

    def end_row_zero(value):
        calls.append(1)
        if len(calls) == 3:  # the third forward chooses row 0's third token: end of sequence
            value = value.clone()
            value[0] += direction
        return value

    with model.hooked("resid_post.2", end_row_zero):
        result = model.generate(PROMPTS, max_new_tokens=N, cache=cache, sites="resid_post.1")
    alone = model.generate(PROMPTS[1], max_new_tokens=N, cache=cache, sites="resid_post.1")
    assert result.df.n_tokens.tolist() == [3, N] and tokens_of(result, 0)[-1] == eos
    found = result.activations
    assert found.lengths == [3, N] and found["resid_post.1"].shape == (2, N, 32)
    assert not found["resid_post.1"][0, 3:].any() and found["resid_post.1"][0, :3].abs().sum(-1).all()
    assert tokens_of(result, 1) == tokens_of(alone, 0)
    torch.testing.assert_close(found["resid_post.1"][1], alone.activations["resid_post.1"][0], atol=1e-5, rtol=1e-5)
    assert torch.equal(found["resid_post.1@-1"][0], found["resid_post.1"][0, 2])


def test_chunks_of_prompts_give_the_values_of_one_batch(tiny_factory):
    from mechnb.core.memory import Chunks

    model = tiny_factory("llama")
    with model.steered("resid_pre.1", STEER, scale=2, positions=-1):
        one = model.generate(PROMPTS, max_new_tokens=N, sites="resid_post.2", compare=True)
        chunks = Chunks(1, "generation", "prompts")
        chunked = model.generate(PROMPTS, max_new_tokens=N, sites="resid_post.2", compare=True, batch_size=chunks)
    assert torch.equal(one.values, chunked.values) and chunks.size == 1
    torch.testing.assert_close(one.activations["resid_post.2"], chunked.activations["resid_post.2"],
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sites, error, message", [
    (["pattern.1"], GenerationError, "pattern"),
    (["resid_post.9"], SiteError, "layer 9 out of range"),
    ([], GenerationError, "sites takes a site or a list"),
    (5, GenerationError, "sites takes a site or a list"),
    (["sae.1.3"], SiteError, "no SAE is attached"),
    (["resid_post.1@'x"], SiteError, "bad positions")])
def test_bad_sites_get_one_line_errors(tiny_factory, sites, error, message):
    model = tiny_factory("llama")
    with pytest.raises(error, match=message) as raised:
        model.generate(PROMPT, max_new_tokens=2, sites=sites)
    assert "\n" not in str(raised.value)


def test_ablating_a_layer_changes_generation_and_compare_runs_both_in_one_batch(tiny_factory):
    model = tiny_factory("llama")
    plain = model.generate(PROMPT, max_new_tokens=8).values[0]
    sizes = []
    embed = model.hf.model.embed_tokens.register_forward_hook(lambda m, args, out: sizes.append(out.shape[:2]))
    try:
        with model.ablated("head.2.*"):
            both = model.generate(PROMPT, max_new_tokens=8, compare=True, sites="resid_post.2")
    finally:
        embed.remove()
    assert both.df.interventions.tolist() == ["on", "off"]
    assert torch.equal(both.values[1], plain)
    assert not torch.equal(both.values[0], plain)
    assert model.interventions == []
    # One batch of both copies: the prompt once, then one token per row and step (and one more for sites).
    assert sizes == [(2, len(model.tokens(PROMPT)))] + [(2, 1)] * 8
    assert both.activations["resid_post.2"].shape == (2, 8, 32)


def test_a_failure_mid_generation_leaves_the_model_clean(tiny_factory):
    model = tiny_factory("llama")
    before, hooks = clean_logits(model), hook_counts(model)
    calls = []

    def breaks(value):
        calls.append(value.shape)
        if len(calls) == 3:
            raise ValueError("step three")
        return value

    def stream(texts):
        calls.append(texts)
        if len(calls) == 3:
            raise ValueError("step three")

    for cache in (True, False):
        calls.clear()
        added = model.hook("resid_post.1", breaks)
        with pytest.raises(InterventionError, match="step three"):
            model.generate(PROMPTS, max_new_tokens=N, cache=cache, sites=["resid_post.0", "logits"])
        model.remove(added)
        calls.clear()
        with pytest.raises(GenerationError, match="the stream function raised ValueError: step three"):
            model.generate(PROMPTS, max_new_tokens=N, cache=cache, sites="resid_post.0", stream=stream)
        assert hook_counts(model) == hooks and model.unmodified
        torch.testing.assert_close(clean_logits(model), before, atol=0, rtol=0)


def test_sampling_is_seeded_per_prompt_and_streams(tiny_factory):
    model = tiny_factory("llama")
    seen = []
    first = model.generate(PROMPT, max_new_tokens=6, do_sample=True, seed=3, top_p=0.9, stream=seen.append)
    again = model.generate(PROMPT, max_new_tokens=6, do_sample=True, seed=3, top_p=0.9)
    other = model.generate(PROMPT, max_new_tokens=6, do_sample=True, seed=4, temperature=5.0)
    assert torch.equal(first.values, again.values) and not torch.equal(first.values, other.values)
    assert len(seen) == 6 and seen[-1] == first.df.continuation.tolist()
    assert len(seen[0][0]) <= len(seen[-1][0])
    assert "<table>" in first._repr_mimebundle_()["text/html"]
    # Prompt 0 draws from seed 3 in a batch too, with or without the cache.
    for cache in (True, False):
        batch = model.generate([PROMPT, "Hello"], max_new_tokens=6, do_sample=True, seed=3, top_p=0.9, cache=cache)
        assert torch.equal(batch.values[0], first.values[0])


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(prompts=""), "GenerationError", "non-empty"),
    (dict(prompts=PROMPT, max_new_tokens=0), "GenerationError", "max_new_tokens"),
    (dict(prompts=PROMPT, do_sample=True, temperature=0), "GenerationError", "temperature"),
    (dict(prompts=PROMPT, top_p=1.5), "GenerationError", "top_p"),
    (dict(prompts=PROMPT, cache="yes"), "GenerationError", "cache must be True"),
    (dict(prompts=PROMPT, batch_size=0), "ArgumentError", "batch_size")])
def test_bad_generation_settings_get_clear_errors(tiny_factory, kwargs, error, message):
    import mechnb

    model = tiny_factory("llama")
    with pytest.raises(getattr(mechnb, error), match=message):
        model.generate(**kwargs)


def test_the_generate_magic_takes_no_cache(shell, tiny_factory):
    model = tiny_factory("llama")
    shell.user_ns["m"] = model
    assert shell.run_cell("%mechnb use m", store_history=False).success
    with model.steered("resid_pre.1", STEER, scale=2, positions=-1):
        cached = shell.run_cell(f'%generate "{PROMPT}" --max-new-tokens 4', store_history=False).result
        whole = shell.run_cell(f'%generate "{PROMPT}" --max-new-tokens 4 --no-cache', store_history=False).result
        assert cached.meta["cache"] is True and whole.meta["cache"] is False
        assert torch.equal(whole.values, model.generate(PROMPT, max_new_tokens=4, cache=False).values)
    shell.magics_manager.registry["MechnbMagics"].session.model = None


@pytest.mark.slow
def test_embedded_model_generation_equals_transformers(real):
    prompts = [PARIS, "I think the movie was"]
    for cache in (True, False):
        result = real.generate(prompts, max_new_tokens=12, cache=cache)
        for row, prompt in enumerate(prompts):
            assert tokens_of(result, row) == hf_greedy(real, prompt, 12)
