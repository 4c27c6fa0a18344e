"""Memory: sweeps run in chunks, halve a chunk that runs out of memory, and finish with the
values of a run that never failed. Out-of-memory errors are simulated: a chunk function
(or a hook inside the forward) raises the error CUDA raises, for chunks above a size."""

from __future__ import annotations

import warnings

import pytest
import torch

from conftest import PARIS, PROMPT, clean_logits
from mechnb.core.arch import submodule
from mechnb import MechnbError, MemoryBudgetError, OutOfMemoryWarning
from mechnb.core.memory import Chunks, is_out_of_memory

CLEAN, CORRUPT = PROMPT, "When Mary and John went to the store, Mary gave a drink to"
CUDA_OOM = ("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 7.79 GiB total capacity; "
            "5.12 GiB already allocated)")
CPU_OOM = ("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
           "you tried to allocate 8589934592 bytes. Error code 12 (Cannot allocate memory)")
TEXTS = [f"Text {i}: the quick brown fox jumps over the lazy dog {'again ' * (i % 4)}." for i in range(7)]


def fail_above(monkeypatch, owner, name: str, limit: int, size_of, error=None) -> list[int]:
    """Make `owner.name` record the size of every call and run out of memory above `limit`."""
    real, sizes = getattr(owner, name), []

    def flaky(*args, **kwargs):
        sizes.append(size_of(*args, **kwargs))
        if sizes[-1] > limit:
            raise error or torch.OutOfMemoryError(CUDA_OOM)
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, flaky)
    return sizes


def halvings(sizes: list[int], start: int, limit: int) -> list[int]:
    """The sizes a sweep starting at `start` tries before one fits under `limit`."""
    tried = [start]
    while tried[-1] > limit:
        tried.append(tried[-1] // 2)
    return tried


def warned(caught) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, OutOfMemoryWarning)]


def hook_counts(model) -> dict:
    return {name: (len(m._forward_hooks), len(m._forward_pre_hooks)) for name, m in model.hf.named_modules()}


def assert_clean(model, hooks_before) -> None:
    """No trace open, no hook or attribute left behind, and a forward equal to a clean one."""
    assert model._trace is None and model.context is None and model.interventions == []
    assert hook_counts(model) == hooks_before
    for module in model.hf.modules():
        assert not {"mechnb_prefix", "mechnb_record", "mechnb_capture", "mechnb_split"} & set(vars(module))
    with model.trace(PROMPT):
        logits = model["logits"].save()
    assert torch.allclose(logits, clean_logits(model), atol=1e-6)


# -- the mechanism -----------------------------------------------------------------------

def test_chunks_halve_until_they_fit_warn_once_and_keep_the_smaller_size():
    tried = []

    def double(chunk):
        tried.append(len(chunk))
        if len(chunk) > 3:
            raise torch.OutOfMemoryError(CUDA_OOM)
        return [2 * i for i in chunk]

    chunks = Chunks(8, "a test sweep", "rows")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        done = list(chunks.run(double, range(11)))
        again = list(chunks.run(double, range(3)))
    assert tried == [8, 4, 2, 2, 2, 2, 2, 1] + [2, 1]  # the halved size holds for the next run
    assert [v for _, part in done for v in part] == [2 * i for i in range(11)]
    assert [list(c) for c, _ in again] == [[0, 1], [2]]
    assert chunks.limit == 2
    assert warned(caught) == ["a test sweep ran out of memory with 8 rows at once; halved the batch size "
                              "to 2 and continued (batch_size=2 avoids the failed tries)"]


@pytest.mark.parametrize("error,expected", [
    (torch.OutOfMemoryError(CUDA_OOM), True),
    (RuntimeError(CPU_OOM), True),
    (RuntimeError("not enough memory: you tried to allocate 123 bytes. Buy new RAM!"), True),
    (RuntimeError("MPS backend out of memory (MPS allocated: 1.2 GB)"), True),
    (MemoryError(), True),
    (RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)"), False),
    (ValueError("a site named out of memory"), False),
    (MemoryBudgetError("already ran out of memory one at a time"), False),
])
def test_out_of_memory_errors_are_recognised_by_type_or_allocator_message(error, expected):
    assert is_out_of_memory(error) is expected


def test_one_item_that_does_not_fit_is_a_clear_mechnb_error():
    def never(chunk):
        raise RuntimeError(CPU_OOM)

    with pytest.raises(MemoryBudgetError) as caught, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        list(Chunks(4, "a test sweep", "rows", advice="patch fewer sites").run(never, range(5)))
    message = str(caught.value)
    assert message.startswith("a test sweep ran out of memory even with one of its rows at a time "
                              "([enforce fail at alloc_cpu.cpp:117]")
    assert "patch fewer sites" in message and "device_map='auto'" in message and "dtype" in message
    assert isinstance(caught.value, MechnbError) and isinstance(caught.value, MemoryError)
    assert caught.value.__context__ is None  # the failed chunk's frames are let go


def test_other_errors_pass_through_on_the_first_try():
    tried = []

    def broken(chunk):
        tried.append(len(chunk))
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)")

    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        list(Chunks(8).run(broken, range(20)))
    assert tried == [8]


# -- patching, path patching, causal tracing -----------------------------------------------

def test_patch_halves_its_chunks_and_equals_a_run_that_fits(tiny_factory, monkeypatch):
    from mechnb.core import runner

    model = tiny_factory("llama")
    args = dict(answer=" Mary", wrong=" John", per_position=False, batch_size=12, progress=False)
    expected = model.patch(CLEAN, CORRUPT, "head.*.*", **args)
    sizes = fail_above(monkeypatch, runner, "_run_chunk", 4, lambda model, target, rows, *a, **k: len(rows))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = model.patch(CLEAN, CORRUPT, "head.*.*", **args)
    assert sizes == [12, 6, 3, 3, 3, 3]  # 12 heads of one group: halved twice, then four chunks
    assert torch.allclose(result.values, expected.values, atol=1e-6)
    assert warned(caught) == ["exact patching ran out of memory with 12 rows at once; halved the batch size "
                              "to 3 and continued (batch_size=3 avoids the failed tries)"]


def test_a_halved_size_holds_for_every_later_group_and_pair(tiny_factory, monkeypatch):
    from mechnb.core import runner

    model = tiny_factory("llama")
    pairs = dict(clean=[CLEAN, CLEAN], corrupt=[CORRUPT, CORRUPT], answer=" Mary", wrong=" John",
                 progress=False)
    expected = model.patch(sites="resid_pre.*", batch_size=3, **pairs)
    sizes = fail_above(monkeypatch, runner, "_run_chunk", 1, lambda model, target, rows, *a, **k: len(rows))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = model.patch(sites="resid_pre.*", batch_size=3, **pairs)
    # Positions 9-13 (the prompts differ from 9 on; earlier patches change nothing and do not
    # run) x 2 pairs, each a group of 3 layers: one failed try, then single rows.
    assert sizes == [3] + [1] * (3 * 5 * 2)
    assert torch.allclose(result.values, expected.values, atol=1e-6)
    assert len(warned(caught)) == 1


def test_path_patch_and_causal_trace_finish_with_the_same_values(tiny_factory, monkeypatch):
    from mechnb.core import runner

    model = tiny_factory("llama")
    path_args = dict(answer=" Mary", wrong=" John", batch_size=8, progress=False)
    trace_args = dict(subject="Eiffel Tower", samples=2, noise=5.0, batch_size=3)
    expected_path = model.path_patch(CLEAN, CORRUPT, "head.0:2.*", "head.2.1", **path_args)
    expected_trace = model.causal_trace(PARIS, **trace_args)
    sizes = fail_above(monkeypatch, runner, "_run_chunk", 2, lambda model, target, rows, *a, **k: len(rows))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = model.path_patch(CLEAN, CORRUPT, "head.0:2.*", "head.2.1", **path_args)
        assert sizes[:3] == [8, 4, 2] and max(sizes[2:]) == 2
        sizes.clear()
        trace = model.causal_trace(PARIS, **trace_args)
    assert sizes[:2] == [3, 1] and max(sizes[1:]) == 1
    assert torch.allclose(path.values, expected_path.values, atol=1e-6)
    assert torch.allclose(trace.values, expected_trace.values, atol=1e-6)
    assert len(warned(caught)) == 2  # once per sweep


def test_running_out_of_memory_on_one_row_leaves_the_model_clean(tiny_factory, monkeypatch):
    from mechnb.core import runner

    model = tiny_factory("llama")
    hooks = hook_counts(model)
    real, tried = runner._run_chunk, []

    def out_of_memory_inside_the_forward(model, target, rows, *args, **kwargs):
        # Raised from inside the batched forward, while the runner's own hooks are installed.
        tried.append(len(rows))
        mlp = submodule(submodule(model.hf, model.arch.layers)[2], model.arch.mlp_out)

        def raise_error(*_):
            raise torch.OutOfMemoryError(CUDA_OOM)

        handle = mlp.register_forward_hook(raise_error)
        try:
            return real(model, target, rows, *args, **kwargs)
        finally:
            handle.remove()

    monkeypatch.setattr(runner, "_run_chunk", out_of_memory_inside_the_forward)
    with pytest.raises(MemoryBudgetError, match="exact patching ran out of memory even with one of its rows "
                                                r"at a time \(CUDA out of memory.*patch fewer sites"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.patch(CLEAN, CORRUPT, "head.*.*", answer=" Mary", wrong=" John", per_position=False,
                        batch_size=4, progress=False)
    assert tried == [4, 2, 1]
    assert_clean(model, hooks)


def test_other_errors_in_a_sweep_are_not_swallowed(tiny_factory, monkeypatch):
    from mechnb.core import runner

    model = tiny_factory("llama")
    hooks = hook_counts(model)
    sizes = fail_above(monkeypatch, runner, "_run_chunk", 0, lambda model, target, rows, *a, **k: len(rows),
                       error=RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)"))
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied") as caught:
        model.patch(CLEAN, CORRUPT, "head.*.*", answer=" Mary", wrong=" John", per_position=False,
                    batch_size=12, progress=False)
    assert not isinstance(caught.value, MechnbError)
    assert sizes == [12]
    assert_clean(model, hooks)


# -- circuits ------------------------------------------------------------------------------

@pytest.fixture()
def circuit_task(tiny_factory):
    from mechnb.datasets import ioi

    model = tiny_factory("llama")
    with torch.no_grad():
        for parameter in model.hf.parameters():
            if parameter.dim() == 2:
                parameter.mul_(6)  # large enough weights for edges to move the logits
    pairs = ioi(4, model.tokenizer, seed=1)
    return model, tuple([p[key] for p in pairs] for key in ("clean", "corrupt", "answer", "wrong"))


def test_edge_scores_halve_their_chunks_and_equal_a_run_that_fits(circuit_task, monkeypatch):
    from mechnb.circuits import discover

    model, task = circuit_task
    expected = model.circuit(*task, method="eap-ig", steps=2, batch_size=4)
    sizes = fail_above(monkeypatch, discover, "writer_outputs", 1, lambda model, graph, batch: len(batch))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        circuit = model.circuit(*task, method="eap-ig", steps=2, batch_size=4)
    assert sizes == [4, 2] + [1] * 8  # two writer runs (clean, corrupt) per chunk of one pair
    torch.testing.assert_close(circuit.scores, expected.scores, atol=1e-6, rtol=1e-5, equal_nan=True)
    assert warned(caught) == ["eap-ig edge scores ran out of memory with 4 prompt pairs at once; halved the "
                              "batch size to 1 and continued (batch_size=1 avoids the failed tries)"]


def test_faithfulness_halves_its_chunks_and_equals_a_run_that_fits(circuit_task, monkeypatch):
    from mechnb.circuits import engine

    model, task = circuit_task
    circuit = model.circuit(*task, method="eap")
    expected = circuit.faithfulness(fractions=(0.1, 1.0), batch_size=4, progress=False)
    sizes = fail_above(monkeypatch, engine, "patched_logits", 2, lambda model, graph, batch, *a: len(batch))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        curve = circuit.faithfulness(fractions=(0.1, 1.0), batch_size=4, progress=False)
    # one patched run per chunk of 2: the 10 % circuit's (the whole and the empty circuit need none)
    assert sizes == [4] + [2] * 1 * 2
    assert torch.allclose(curve.values, expected.values, atol=1e-6)
    assert abs(curve.meta["empty_metric"] - expected.meta["empty_metric"]) < 1e-6
    assert len(warned(caught)) == 1


# -- caches and collections ------------------------------------------------------------------

SITES = ["resid_pre.*", "pattern.1", "head.2", "neuron.0", "logits"]


def test_cache_in_chunks_equals_one_run(tiny_factory):
    model = tiny_factory("llama")
    whole = model.cache(TEXTS, SITES)
    chunked = model.cache(TEXTS, SITES, batch_size=2)
    assert chunked.keys() == whole.keys() and chunked.lengths == whole.lengths
    for name in whole.keys():
        assert chunked[name].shape == whole[name].shape and chunked[name].device.type == "cpu"
        assert torch.allclose(chunked[name], whole[name], atol=1e-6), name
    assert torch.allclose(chunked["resid_pre.*@-1"], whole["resid_pre.*@-1"], atol=1e-6)
    assert torch.allclose(chunked["pattern.1.2@-1"], whole["pattern.1.2@-1"], atol=1e-6)


def test_cache_halves_its_chunks_when_one_runs_out_of_memory(tiny_factory, monkeypatch):
    from mechnb.core import cache

    model = tiny_factory("llama")
    whole = model.cache(TEXTS, SITES)
    sizes = fail_above(monkeypatch, cache, "_run", 2, lambda model, batch, order: len(batch))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        chunked = model.cache(TEXTS, SITES)
    assert sizes == [7, 3, 1, 1, 1, 1, 1, 1, 1]  # 7 fails, 3 fails, then the limit of 1
    for name in whole.keys():
        assert torch.allclose(chunked[name], whole[name], atol=1e-6), name
    assert warned(caught) == ["model.cache ran out of memory with 7 prompts at once; halved the batch size "
                              "to 1 and continued (batch_size=1 avoids the failed tries)"]


def test_a_cache_that_runs_out_of_memory_on_one_prompt_leaves_the_model_clean(tiny_factory):
    model = tiny_factory("llama")
    mlp = submodule(submodule(model.hf, model.arch.layers)[1], model.arch.mlp_out)

    def raise_error(*_):
        raise RuntimeError(CPU_OOM)

    hooks = hook_counts(model)
    handle = mlp.register_forward_hook(raise_error)
    try:
        with pytest.raises(MemoryBudgetError, match="model.cache ran out of memory even with one of its "
                                                    r"prompts at a time \(\[enforce fail.*cache fewer sites"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model.cache(TEXTS[:3], SITES)
    finally:
        handle.remove()
    assert_clean(model, hooks)


def test_collect_to_disk_halves_its_batches_and_equals_a_run_that_fits(tiny_factory, monkeypatch, tmp_path):
    import numpy as np

    from mechnb.sae import store

    model = tiny_factory("llama")
    texts = TEXTS * 6
    expected = model.collect("resid_post.1", texts, n_tokens=300, context=16, batch_size=4, progress=False)
    sizes = fail_above(monkeypatch, store, "_forward", 1, lambda model, rows, *a: len(rows))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        on_disk = model.collect("resid_post.1", texts, n_tokens=300, context=16, batch_size=4,
                                store=tmp_path, progress=False)
    assert isinstance(on_disk.data, np.memmap) and len(on_disk) == len(expected) == 300
    assert sizes[:3] == [4, 2, 1] and set(sizes[2:]) == {1}
    assert torch.allclose(on_disk.rows(0, 300), expected.rows(0, 300), atol=1e-6)
    assert torch.allclose(store.open_store(tmp_path).rows(0, 300), expected.rows(0, 300), atol=1e-6)
    assert len(warned(caught)) == 1


def test_head_detection_and_coactivation_halve_their_chunks(tiny_factory, monkeypatch):
    from mechnb.core import cache
    from mechnb.methods import heads

    model = tiny_factory("llama")
    expected_heads = model.detect_heads(["induction", "previous_token"], n_samples=6)
    expected_pca = model.coactivation("resid_post.1", TEXTS, components=3, batch_size=4)
    in_chunks = model.detect_heads(["induction", "previous_token"], n_samples=6, batch_size=4)
    assert torch.allclose(in_chunks.values, expected_heads.values, atol=1e-6)
    head_sizes = fail_above(monkeypatch, heads, "_picked", 2, lambda model, tokens, *a: len(tokens))
    cache_sizes = fail_above(monkeypatch, cache, "_run", 2, lambda model, batch, order: len(batch))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        found = model.detect_heads(["induction", "previous_token"], n_samples=6)
        pca = model.coactivation("resid_post.1", TEXTS, components=3, batch_size=4)
    assert head_sizes == [6, 3, 1, 1, 1, 1, 1, 1]
    assert cache_sizes == [4, 2, 2, 2, 1]  # the outer chunks of 4 and 3 texts share one budget
    assert torch.allclose(found.values, expected_heads.values, atol=1e-6)
    assert abs(found.meta["loss_repeated_half"] - expected_heads.meta["loss_repeated_half"]) < 1e-6
    assert torch.allclose(pca.values, expected_pca.values, atol=1e-5)
    assert len(warned(caught)) == 2
