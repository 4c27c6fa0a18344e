"""The concept pipeline on the embedded tiny ViT: an SAE on the residual stream of its images,
concepts shown and summarised, a concept bottleneck and what it costs, its interventions,
causality in the real model, and attention drawn over the image."""

import pytest
import torch

import mechnb
from mechnb import BottleneckError, SiteError
from mechnb.vision import attention_over_image, bottleneck, concept_ablation, image_concepts

pytestmark = pytest.mark.xdist_group("vision")
LAYER = 2


@pytest.fixture(scope="module")
def digits():
    return mechnb.datasets.digits("train"), mechnb.datasets.digits("test")


@pytest.fixture(scope="module")
def sae(vit, digits):
    """A TopK SAE on every position of resid_post.2 over the training images (about 5 s)."""
    acts = vit.cache(digits[0].images, f"resid_post.{LAYER}")[f"resid_post.{LAYER}"]
    made = mechnb.sae.train(acts.reshape(-1, acts.shape[-1]), kind="topk", d_sae=256, k=8, batch_size=1024,
                            epochs=20, progress=False)
    made.site = f"resid_post.{LAYER}"
    return made


@pytest.fixture(scope="module")
def head(vit, sae, digits):
    return bottleneck(vit, sae, digits, l1=0.01)


def test_the_bottleneck_costs_a_few_points_and_each_class_uses_a_few_concepts(head):
    row = head.report().iloc[0]
    assert row.model_accuracy >= 0.95
    assert 0.9 <= row.bottleneck_accuracy and row.cost_points < 6  # measured 0.942 against 0.958: 1.7 points
    assert 1 <= row.concepts_per_class <= 6 and row.concepts_used < 64
    assert len(head.concepts_of("7")) >= 1


def test_switching_a_concept_off_moves_the_bottlenecks_logits_by_its_weight(vit, sae, head, digits):
    from mechnb.vision.bottleneck import concepts_of

    test = digits[1]
    sevens = test.images[test.labels == 7]
    concepts = concepts_of(vit, sae, sevens)
    top = int(head.concepts_of("7").concept.iloc[0])
    off = concepts.clone()
    off[:, top] = 0
    moved = head.logits(off) - head.logits(concepts)
    assert torch.allclose(moved, -concepts[:, top:top + 1] / head.scale[top] * head.weight[:, top], atol=1e-5)
    assert (head.intervene(concepts, top, "off") == 7).float().mean() < (head.predict(concepts) == 7).float().mean()


def test_ablating_a_class_concepts_in_the_model_costs_more_than_random_ones(vit, sae, head, digits):
    test = digits[1]
    drops = []
    for cls in ("1", "4", "7"):
        table = concept_ablation(vit, sae, head, test.images, test.labels, cls, n=3).set_index("ablated")
        none, mine, random = table.accuracy["none"], table.accuracy["class concepts"], \
            table.accuracy["random concepts"]
        drops.append((none - mine, none - random))
    assert sum(d[0] for d in drops) > sum(d[1] for d in drops) + 0.1, drops
    assert vit.interventions == [] and vit.saes == []  # attached for the test, detached after


def test_concepts_show_their_top_images_where_they_fire_and_what_they_are_in_words(vit, sae, digits):
    test = digits[1]
    concepts = image_concepts(vit, sae, test.images, test.labels, test.classes)
    assert concepts.activations.shape == (360, 256) and concepts.maps.shape == (360, 4, 4, 256)
    shown = [f for f in range(256) if len(concepts.top(f, 20)) >= 10 and concepts.position_map(f).max() > 0]
    feature = max(shown, key=lambda f: max(concepts.class_distribution(f).values()))
    summary = concepts.summary(feature)
    assert summary.startswith("top ") and "strongest at patch row" in summary
    figure = concepts.grid([feature], k=5)
    assert len(figure.axes) == 5 and len(figure.axes[0].images) == 2
    assert figure.axes[0].get_title().split(" · ")[0] in test.classes


def test_attention_is_drawn_over_the_image_per_head(vit, digits):
    image = digits[1].images[0]
    figure = attention_over_image(vit, image, layer=1)
    assert len(figure.axes) == 4
    heat = figure.axes[0].images[1].get_array()
    pattern = vit.cache(image, "pattern.1")["pattern.1"][0, 0, 0]
    assert heat.shape == (4, 4) and torch.allclose(torch.tensor(heat.data).flatten(), pattern[1:], atol=1e-6)
    assert figure.axes[0].get_title().startswith("L1H0 · prefix ")
    with pytest.raises(SiteError, match="head 9 out of range"):
        attention_over_image(vit, image, layer=1, heads=[9])


def test_bad_bottleneck_input_is_one_line(vit, sae, head, digits):
    with pytest.raises(BottleneckError, match="data is \\(train, test\\)"):
        bottleneck(vit, sae, digits[0])
    with pytest.raises(BottleneckError, match="unknown class 'eleven'"):
        concept_ablation(vit, sae, head, digits[1].images, digits[1].labels, "eleven")
    assert vit.interventions == []


def test_a_model_a_method_builds_is_a_full_model_whatever_was_imported_first(vit, vit_cache):
    import os
    import subprocess
    import sys

    code = "from mechnb.vision import tiny_vit\nm = tiny_vit()\nprint(type(m).__name__, callable(m.steer))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(os.environ, MECHNB_CACHE=str(vit_cache))).stdout
    assert out.split() == ["Model", "True"]
