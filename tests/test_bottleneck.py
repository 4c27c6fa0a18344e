"""The concept bottleneck on concepts whose meaning is known (synthetic), so what it learns
can be checked: which concepts each class uses, sparsity, and interventions that move the
logits exactly as the weights say."""

import pytest
import torch

from mechnb import BottleneckError
from mechnb.vision import bottleneck
from mechnb.vision.bottleneck import fit


def concepts(n: int, seed: int):
    """Class c (0..2) turns concept c on (about 3) and concept 3 + c weakly; 12 concepts of noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (n,), generator=g)
    x = torch.rand(n, 18, generator=g) * 0.5
    x[torch.arange(n), labels] += 3 + torch.rand(n, generator=g)
    x[torch.arange(n), 3 + labels] += 0.3
    return x, labels


TRAIN, TEST = concepts(600, 0), concepts(300, 1)


def test_the_bottleneck_learns_the_concept_each_class_relies_on_and_few_others():
    head = fit(*TRAIN, classes=["a", "b", "c"], l1=0.05)
    assert head.score(*TEST) > 0.97
    for c, name in enumerate(["a", "b", "c"]):
        assert head.concepts_of(name).concept.iloc[0] == c
    assert set(head.used) <= set(range(6)) and len(head.used) >= 3  # noise concepts get exact zeros
    assert (head.weight[:, 6:] == 0).all()


def test_a_larger_penalty_uses_fewer_concepts():
    dense, sparse = fit(*TRAIN, l1=0.0), fit(*TRAIN, l1=0.05)
    assert len(sparse.used) < len(dense.used) == 18
    assert sparse.score(*TEST) > 0.9


def test_switching_a_concept_moves_each_class_logit_by_its_weight():
    head = fit(*TRAIN, l1=0.05)
    x, labels = TEST
    rows = (labels == 1) & (head.predict(x) == 1)
    before = head.logits(x[rows])
    after_predictions = head.intervene(x[rows], 1, "off")
    off = x[rows].clone()
    off[:, 1] = 0
    moved = head.logits(off) - before
    expected = -x[rows][:, 1:2] / head.scale[1] * head.weight[:, 1]
    assert torch.allclose(moved, expected, atol=1e-5)
    assert (after_predictions == 1).float().mean() < 0.5  # without its concept, class 1 is chosen far less
    on = head.intervene(x[labels == 0], 2, "on")  # class c's concept switched on pulls towards c
    assert (on == 2).float().mean() > (head.predict(x[labels == 0]) == 2).float().mean()


def test_report_and_the_concept_matrix_route():
    head = bottleneck(TRAIN[0], data=(TRAIN[1], *TEST), l1=0.05)
    head.black_box = 0.99
    row = head.report().iloc[0]
    assert row.bottleneck_accuracy == pytest.approx(head.accuracy) and head.accuracy > 0.97
    assert row.cost_points == pytest.approx(100 * (0.99 - head.accuracy))
    assert row.concepts_used == len(head.used)
    assert "concept bottleneck" in head._repr_html_()


@pytest.mark.parametrize("call, message", [
    (lambda: fit(torch.zeros(5), torch.zeros(5)), "must be a matrix"),
    (lambda: fit(torch.full((4, 3), float("nan")), torch.zeros(4)), "NaN"),
    (lambda: fit(torch.zeros(4, 3), torch.zeros(3)), "4 rows of concepts but labels"),
    (lambda: fit(torch.zeros(4, 3), torch.tensor([0, 1, 5, 1]), classes=["x", "y"]), "class indices 0..1"),
    (lambda: fit(torch.zeros(4, 3), torch.zeros(4), l1=-1), "l1 must be"),
    (lambda: fit(torch.zeros(4, 3), torch.zeros(4), steps=0), "steps must be"),
    (lambda: fit(*TRAIN, steps=5).intervene(TEST[0], 99), "concept must be an index 0..17"),
    (lambda: fit(*TRAIN, steps=5).intervene(TEST[0], 1, "maybe"), "value is 'off', 'on' or a number"),
    (lambda: fit(*TRAIN, steps=5).concepts_of("z"), "unknown class 'z'"),
    (lambda: fit(*TRAIN, steps=5).logits(torch.zeros(2, 4)), "n x 18"),
    (lambda: bottleneck(TRAIN[0], data=TRAIN[1]), "data is (train_labels, test_concepts, test_labels)"),
])
def test_bad_input_is_one_line(call, message):
    with pytest.raises(BottleneckError) as error:
        call()
    assert message in str(error.value) and "\n" not in str(error.value)
