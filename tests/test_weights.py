"""OV / QK circuits and composition scores, on tiny models with hand-set weights."""

import pytest
import torch

from mechnb import WeightError


def copy_head(model, sign: float):
    """Head 0.0 reads and writes the first 8 residual dimensions (sign -1: negated)."""
    hf = model.hf
    attn = hf.model.layers[0].self_attn
    with torch.no_grad():
        hf.lm_head.weight.copy_(hf.model.embed_tokens.weight)
        attn.v_proj.weight.zero_()
        attn.v_proj.weight[:8, :8] = torch.eye(8)
        attn.o_proj.weight[:, :8] = 0
        attn.o_proj.weight[:8, :8] = sign * torch.eye(8)


@pytest.mark.parametrize("sign, expected", [(1.0, 1.0), (-1.0, 0.0)])
def test_a_copying_head_scores_one_and_an_anti_copying_head_zero(tiny_factory, sign, expected):
    model = tiny_factory("llama")
    copy_head(model, sign)
    ov = model.ov(0, 0)
    assert ov.copying_score() == pytest.approx(expected, abs=1e-3)
    assert ov.shape == (model.vocab_size, model.vocab_size) and ov.A.shape[1] == model.d_head


def test_factored_matrix_agrees_with_the_full_matrix(tiny_factory):
    model = tiny_factory("llama")
    ov = model.ov(1, 2)
    small = type(ov)(ov.A[:300], ov.B[:, :200])
    full = small.full()
    for centre, matrix in ((False, full), (True, full - full.mean(0))):
        top = small.top_pairs(5, centre=centre, block=64)
        values, index = matrix.flatten().topk(5)
        assert torch.allclose(torch.tensor(top.value.tolist()), values, atol=1e-5)
        assert [r * 200 + c for r, c in zip(top.row, top.column)] == index.tolist()
    assert small.top_pairs(3, vocab=50).row.max() < 50
    u, s, v = small.svd()
    assert torch.allclose(u @ torch.diag(s) @ v.T, full, atol=1e-4)
    square = type(ov)(ov.A[:300], ov.B[:, :300])
    reference = torch.linalg.eigvals(square.full())
    assert torch.allclose(square.eigenvalues().abs().sort().values,
                          reference.abs().sort().values[-model.d_head:], atol=1e-3)


def test_qk_is_query_embeddings_times_key_embeddings(tiny_factory):
    model = tiny_factory("gpt2")
    qk = model.qk(1, 3)
    attn = model.hf.transformer.h[1].attn
    d = model.d_model
    normed = model.hf.transformer.h[1].ln_1(model.hf.transformer.wte.weight[:50]).detach()
    w = attn.c_attn.weight.detach()  # Conv1D: d_model x 3 d_model
    q = normed @ w[:, 3 * 8:4 * 8]
    k = normed @ w[:, d + 3 * 8:d + 4 * 8]
    assert torch.allclose((qk.A[:50] @ qk.B[:, :50]), q @ k.T, atol=1e-5)


def test_heads_set_up_to_compose_have_the_largest_k_composition(tiny_factory):
    model = tiny_factory("llama")
    first, second = model.hf.model.layers[0].self_attn, model.hf.model.layers[1].self_attn
    with torch.no_grad():
        # head 0.2 (value group 1) reads dimension 8 and writes dimension 16 ...
        first.v_proj.weight[8:16] = 0
        first.v_proj.weight[8, 8] = 1
        first.o_proj.weight[:, 16:24] = 0
        first.o_proj.weight[16, 16] = 1
        # ... and heads 1.2 and 1.3 (key group 1, shared) key on dimension 16.
        second.k_proj.weight[8:16] = 0
        second.k_proj.weight[8, 16] = 1
    result = model.composition("k")
    labels = result.meta["labels"]["head"]
    designed = [(labels.index("0.2"), labels.index(later)) for later in ("1.2", "1.3")]
    for i, j in designed:
        assert result.values[i, j] == pytest.approx(1.0, abs=1e-4)
    others = result.values.nan_to_num(-1).clone()
    for i, j in designed:
        others[i, j] = -1
    assert others.max() < 0.9
    assert torch.isnan(result.values[labels.index("1.0"), labels.index("0.1")])  # no backwards scores
    for kind in ("q", "v"):
        assert model.composition(kind).values.nan_to_num().max() <= 1 + 1e-5


@pytest.mark.parametrize("call, message", [(lambda m: m.ov(3, 0), "layer 3 out of range"),
                                           (lambda m: m.qk(0, 4), "head 4 out of range"),
                                           (lambda m: m.composition("x"), "'q', 'k' or 'v'"),
                                           (lambda m: m.ov(0, 0).top_pairs(0), "positive number")])
def test_bad_heads_get_clear_errors(tiny_factory, call, message):
    with pytest.raises(WeightError, match=message):
        call(tiny_factory("llama"))


def induction_scores_by_transformers(model, n: int = 8, length: int = 24, seed: int = 0) -> torch.Tensor:
    """`layer head` induction scores computed without mechnb: transformers' eager attention
    weights (`output_attentions`) of a fresh copy of the model (`torchref`) on random token
    sequences said twice, each second-half position's attention to the token after its earlier copy."""
    from torchref import Reference

    hf = Reference(model.hf, "llama").hf
    generator = torch.Generator().manual_seed(seed)
    half = torch.randint(1000, hf.config.vocab_size - 1000, (n, length), generator=generator)
    with torch.no_grad():
        attentions = hf(torch.cat([half, half], 1), output_attentions=True).attentions
    rows = torch.arange(length, 2 * length)
    return torch.stack([a[:, :, rows, rows - length + 1].mean((0, 2)) for a in attentions])


@pytest.mark.slow
def test_induction_head_of_the_embedded_model_copies(real):
    heads = real.detect_heads("induction")
    best = heads.df.sort_values("value", ascending=False).iloc[0]
    # The model's own fact: head 18.6 is its strongest induction head. Measured independently
    # of mechnb from transformers' attention weights (`induction_scores_by_transformers`).
    assert (best["layer"], best["head"]) == (18, 6)
    independent = induction_scores_by_transformers(real)
    assert divmod(int(independent.argmax()), real.n_heads) == (18, 6)
    assert abs(independent[18, 6].item() - best["value"]) < 0.1
    assert real.ov(18, 6).copying_score() > 0.6
