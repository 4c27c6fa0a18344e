"""Text and prompt sets that ship with mechnb (no network)."""

import pytest

from mechnb.datasets import ioi, python_docs


def test_python_docs_split_is_fixed_and_disjoint():
    train, held_out = list(python_docs("train")), list(python_docs("eval"))
    assert len(held_out) > 100 and len(train) > 19 * len(held_out) - 20
    assert not set(train) & set(held_out)
    assert held_out == list(python_docs("eval"))
    with pytest.raises(ValueError):
        list(python_docs("validation"))


def test_python_docs_reads_the_standard_library_only_as_far_as_asked():
    import itertools

    from mechnb import datasets

    datasets._documents.cache_clear()
    try:
        first = list(itertools.islice(python_docs("eval"), 20))
        docstrings = datasets._documents("docstrings", 200)
        read = len(docstrings._kept)
        assert 0 < read < 1000  # of 2,351: the held-out split's first 20 need a few hundred
        assert first == list(itertools.islice(python_docs("eval"), 20)) and len(docstrings._kept) == read
    finally:
        datasets._documents.cache_clear()


def test_ioi_pairs_are_aligned_and_flip_the_answer(tokenizer):
    pairs = ioi(40, tokenizer, seed=1)
    assert len(pairs) == 40 and pairs == ioi(40, tokenizer, seed=1)
    for pair in pairs:
        clean, corrupt = tokenizer.encode(pair["clean"]), tokenizer.encode(pair["corrupt"])
        assert len(clean) == len(corrupt)
        differ = [i for i, (a, b) in enumerate(zip(clean, corrupt)) if a != b]
        assert len(differ) == 1  # only the second mention of the subject changes
        assert tokenizer.decode([clean[differ[0]]]) == pair["wrong"]
        assert tokenizer.decode([corrupt[differ[0]]]) == pair["answer"]
        assert pair["clean"].count(pair["wrong"].strip()) == 2


@pytest.mark.slow
def test_the_embedded_model_solves_most_ioi_prompts(real):
    pairs = ioi(16, real.tokenizer, seed=0)
    solved = sum(real.top(p["clean"], k=1).token[0] == p["answer"] for p in pairs)
    assert solved >= 10
