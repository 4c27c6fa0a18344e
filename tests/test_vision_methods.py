"""The core methods on images: activation patching of clean/corrupt image pairs, steering
vectors from images, SAE collection over every position of many images, and attention
drawn over the image, on the embedded tiny ViT (the shared `vit` fixture, xdist group
"vision").
"""

import pytest
import torch

import mechnb
from mechnb import MetricError, PatchError

pytestmark = pytest.mark.xdist_group("vision")


@pytest.fixture(scope="module")
def digits():
    return mechnb.datasets.digits("test")


@pytest.fixture(scope="module")
def sevens_and_ones(digits):
    return digits.images[digits.labels == 7][:3], digits.images[digits.labels == 1][:3]


def _logit_diff(vit, images, answer=7, wrong=1, layer=None, position=None, values=None):
    """The mean logit difference over `images`, with plain torch hooks: `values` (one
    `d_model` row per image) written into `resid_post.layer` at `position`."""
    handles = []
    if layer is not None:
        def replace(module, args, output):
            hidden = (output[0] if isinstance(output, tuple) else output).clone()
            hidden[:, position] = values
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        handles.append(vit.hf.vit.layers[layer].register_forward_hook(replace))
    try:
        with torch.no_grad():
            logits = vit.hf(pixel_values=images).logits
    finally:
        for handle in handles:
            handle.remove()
    return (logits[:, answer] - logits[:, wrong]).mean().item()


def _resid_post(vit, images, layer):
    kept = {}
    handle = vit.hf.vit.layers[layer].register_forward_hook(
        lambda module, args, output: kept.update(value=output[0] if isinstance(output, tuple) else output))
    try:
        with torch.no_grad():
            vit.hf(pixel_values=images)
    finally:
        handle.remove()
    return kept["value"]


def test_patching_the_last_layers_cls_token_restores_the_clean_logit_difference(vit, sevens_and_ones):
    sevens, ones = sevens_and_ones
    result = vit.patch(sevens[0], ones[0], f"resid_post.{vit.n_layers - 1}@0", answer="7", wrong="1")
    clean, corrupt = _logit_diff(vit, sevens[:1]), _logit_diff(vit, ones[:1])
    assert clean > 2 and corrupt < -2
    assert result.meta["clean_metric"] == pytest.approx(clean, abs=1e-4)
    assert result.meta["corrupt_metric"] == pytest.approx(corrupt, abs=1e-4)
    assert result.values.flatten()[0].item() == pytest.approx(clean, abs=1e-4)
    assert vit.unmodified


def test_a_residual_sweep_over_images_is_a_layer_by_position_grid_equal_to_torch_hooks(vit, sevens_and_ones):
    sevens, ones = sevens_and_ones
    result = vit.patch(sevens, ones, "resid_post.*", answer=7, wrong="1", normalize=True)
    assert result.values.shape == (vit.n_layers, 17) and result.meta["axes"] == ["layer", "pos"]
    assert result.meta["labels"]["pos"][:2] == ["'[CLS]'", "'patch 0,0'"]
    assert list(result.df.token[:2]) == ["[CLS]", "patch 0,0"]
    assert result.values[-1, 0].item() == pytest.approx(1, abs=1e-4)
    # Patches do not all act alike: the grid is not a constant.
    assert result.values[-1, 1:].abs().max() < 0.5
    clean, corrupt = _logit_diff(vit, sevens), _logit_diff(vit, ones)
    for layer, position in [(0, 0), (1, 6), (2, 0), (2, 11), (3, 16)]:
        source = _resid_post(vit, sevens, layer)[:, position]
        patched = _logit_diff(vit, ones, layer=layer, position=position, values=source)
        expected = (patched - corrupt) / (clean - corrupt)
        assert result.values[layer, position].item() == pytest.approx(expected, abs=1e-4), (layer, position)
    assert vit.unmodified


def test_attribution_patching_on_images_approximates_the_exact_effect_at_the_last_layer(vit, sevens_and_ones):
    sevens, ones = sevens_and_ones
    exact = vit.patch(sevens[:1], ones[:1], "resid_post.3", answer="7", wrong="1")
    approximate = vit.patch(sevens[:1], ones[:1], "resid_post.3", answer="7", wrong="1", method="attribution")
    assert approximate.values.shape == exact.values.shape == (1, 17)
    # Only [CLS] reaches the classifier: every other position's effect is exactly nothing.
    assert torch.all(approximate.values[0, 1:] == approximate.meta["corrupt_metric"])
    assert torch.sign(approximate.values[0, 0] - approximate.meta["corrupt_metric"]) == 1
    assert vit.unmodified


def test_bad_image_patching_fails_in_one_line_and_leaves_the_model_clean(vit, sevens_and_ones):
    sevens, ones = sevens_and_ones
    cases = [
        (PatchError, "the corrupt images: the model reads 1x8x8 images, got 1x16x16",
         lambda: vit.patch(sevens, torch.zeros(3, 1, 16, 16), "resid_post.*", answer="7", wrong="1")),
        (PatchError, "3 clean images but 2 corrupt ones",
         lambda: vit.patch(sevens, ones[:2], "resid_post.*", answer="7", wrong="1")),
        (PatchError, "reads images, not text", lambda: vit.patch("a seven", "a one", "resid_post.*", answer="7")),
        (MetricError, "'seven' is not a class of", lambda: vit.patch(sevens, ones, "resid_post.*", answer="seven",
                                                                      wrong="1")),
        (MetricError, "wrong class 10 out of range", lambda: vit.patch(sevens, ones, "resid_post.*", answer=7,
                                                                       wrong=10)),
    ]
    for error, words, call in cases:
        with pytest.raises(error) as raised:
            call()
        message = str(raised.value)
        assert words in message and "\n" not in message, message
        assert vit.unmodified
