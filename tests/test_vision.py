"""Vision transformers: the digits data, the embedded tiny ViT, sites and positions over
[CLS] and patches, image inputs to the core verbs, loading ViT and DeiT directories, and
the one-line errors of bad images and token-only methods.

The tiny ViT is the one `make test`'s set-up trained into the mechnb cache (the `vit`
fixture in conftest trains it there first if it is absent); every test of this file and of
test_vision_concepts.py and test_vision_methods.py runs in one xdist group.
"""

import pytest
import torch

import mechnb
from conftest import assert_one_line_errors, with_cache
from mechnb import ModelError, PromptError, SiteError

pytestmark = pytest.mark.xdist_group("vision")


@pytest.fixture(scope="session")
def test_data():
    return mechnb.datasets.digits("test")


def _predictions(model, images):
    return model.cache(images, "logits")["logits"].argmax(-1)


def test_digits_splits_have_fixed_sizes_and_are_deterministic():
    train, test, everything = (mechnb.datasets.digits(s) for s in ("train", "test", "all"))
    assert (len(train), len(test), len(everything)) == (1437, 360, 1797)
    assert train.images.shape == (1437, 1, 8, 8) and train.images.dtype == torch.float32
    assert train.labels.dtype == torch.long and train.classes == [str(d) for d in range(10)]
    assert -1 <= float(train.images.min()) and float(train.images.max()) <= 1
    assert torch.equal(mechnb.datasets.digits("test").images, test.images)
    assert not torch.equal(mechnb.datasets.digits("test", seed=1).labels, test.labels)
    assert set(test.labels.bincount().tolist()) <= {35, 36, 37}  # stratified


def test_tiny_vit_reaches_95_percent_and_reloads_identically_from_the_cache(vit, vit_cache, test_data):
    from mechnb.vision.model import accuracy

    assert isinstance(vit, mechnb.Model) and vit.n_layers == 4 and vit.n_classes == 10
    assert accuracy(vit, test_data) >= 0.95
    assert (vit_cache / "tiny-vit-digits-v3-seed0" / "model.safetensors").is_file()
    again = with_cache(vit_cache, lambda: mechnb.vision.tiny_vit())
    for (name, a), (_, b) in zip(vit.hf.state_dict().items(), again.hf.state_dict().items()):
        assert torch.equal(a, b), name
    assert torch.equal(_predictions(vit, test_data.images), _predictions(again, test_data.images))


def test_sites_and_positions_over_cls_and_patches(vit, test_data):
    images = test_data.images[:3]
    cache = vit.cache(images, ["embed", "resid_post.3", "head.2", "pattern.1", "neuron.0", "logits"])
    assert cache.tokens[0][:3] == ["[CLS]", "patch 0,0", "patch 0,1"] and len(cache.tokens[0]) == 17
    assert cache["embed"].shape == (3, 17, 64)
    assert torch.equal(cache["resid_post.3@0"], cache["resid_post.3"][:, 0])
    # Row 1, column 2 of the 4x4 grid is patch 4 + 2 = 6, position 7.
    assert torch.equal(cache["resid_post.3@'patch 1,2'"][:, 0], cache["resid_post.3"][:, 7])
    assert torch.equal(cache["resid_post.3@'patch 1, 2'"], cache["resid_post.3@'patch 1,2'"])
    assert cache["head.2.1"].shape == (3, 17, 16)
    assert cache["pattern.1"].shape == (3, 4, 17, 17)
    assert torch.allclose(cache["pattern.1"].sum(-1), torch.ones(3, 4, 17))
    assert cache["neuron.0.5"].shape == (3, 17)
    assert cache["logits"].shape == (3, 10)
    # The classifier reads the final norm of [CLS].
    normed = vit.hf.vit.layernorm(cache["resid_post.3@0"])
    assert torch.allclose(vit.hf.classifier(normed), cache["logits"], atol=1e-5)


def test_top_lists_an_images_classes(vit, test_data):
    table = vit.top(test_data.images[0], 3)
    assert list(table.columns) == ["rank", "class", "class_id", "prob", "logit"]
    assert table["class"][0] == str(int(test_data.labels[0])) and table["prob"][0] > 0.5


def test_an_ablated_resid_mid_leaves_only_the_mlps_output_in_the_residual(vit, test_data):
    # resid_mid is the residual stream itself (`mechnb.core.residual`): zeroed, the layer's
    # output is what the MLP adds to nothing.
    images = test_data.images[:2]
    found = {}
    with vit.trace(images):
        vit["resid_mid.1"] = 0
        found["mlp"] = vit["mlp_out.1"].save()
        found["post"] = vit["resid_post.1"].save()
        found["next"] = vit["resid_pre.2"].save()
    assert found["post"].abs().max() > 0.01
    assert torch.allclose(found["post"], found["mlp"], atol=1e-5)
    assert torch.allclose(found["next"], found["mlp"], atol=1e-5)


def test_trace_ablate_hook_and_steer_change_predictions_and_leave_the_model_clean(vit, test_data):
    images = test_data.images[:8]
    base = _predictions(vit, images)
    with vit.trace(images):
        vit["resid_post.3@0"] = 0
        written = vit["logits"].save()
    assert not torch.equal(written.argmax(-1), base)
    with vit.ablated("resid_post.3@0"):
        assert torch.equal(_predictions(vit, images), written.argmax(-1))
    hooked = vit.hook("resid_pre.2@0", lambda value: value * 0 + 5)
    assert hooked and not torch.equal(_predictions(vit, images), base)
    vit.remove(hooked)
    direction = vit.cache(test_data.images[test_data.labels == 3][:5], "resid_post.2@0")["resid_post.2@0"].mean(0)
    with vit.steered("resid_post.2", direction, scale=4.0):
        steered = _predictions(vit, images)
    assert (steered == 3).sum() > (base == 3).sum()
    assert vit.unmodified and torch.equal(_predictions(vit, images), base)


def test_pil_images_go_through_the_digits_preprocessing(vit, test_data):
    from PIL import Image

    pixels = ((test_data.images[0, 0] * 0.5 + 0.5) * 255).round().byte().numpy()
    image = Image.fromarray(pixels, mode="L")
    from_pil = vit.cache([image, image], "logits")["logits"]
    assert from_pil.argmax(-1).tolist() == [int(test_data.labels[0])] * 2


@pytest.mark.parametrize("family", ["vit", "deit"])
def test_a_saved_vision_directory_loads_as_an_image_classifier(tmp_path, family):
    import transformers

    config_class, model_class = {"vit": ("ViTConfig", "ViTForImageClassification"),
                                 "deit": ("DeiTConfig", "DeiTForImageClassification")}[family]
    torch.manual_seed(0)
    config = getattr(transformers, config_class)(image_size=8, patch_size=4, num_channels=3, hidden_size=16,
                                                 num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                                                 num_labels=3)
    getattr(transformers, model_class)(config).save_pretrained(tmp_path)
    model = mechnb.load(tmp_path, device="cpu")
    assert type(model.hf).__name__ == model_class and model.arch.name == family
    images = torch.randn(2, 3, 8, 8)
    expected = model.hf(pixel_values=images).logits
    cache = model.cache(images, ["resid_post.1@0", "pattern.0", "logits"])
    prefix = ["[CLS]"] + (["[DIST]"] if family == "deit" else [])
    assert cache.tokens[0] == prefix + ["patch 0,0", "patch 0,1", "patch 1,0", "patch 1,1"]
    assert cache["pattern.0"].shape == (2, 2, len(prefix) + 4, len(prefix) + 4)
    assert torch.allclose(cache["logits"], expected, atol=1e-5)


def test_bad_images_and_token_only_methods_fail_in_one_line_and_leave_the_model_clean(vit, test_data):
    cases = [
        (PromptError, "the model reads 1x8x8 images, got 3x8x8", lambda: vit.cache(torch.zeros(3, 8, 8), "logits")),
        (PromptError, "the model reads 1x8x8 images, got 1x16x16",
         lambda: vit.cache(torch.zeros(2, 1, 16, 16), "logits")),
        (PromptError, "reads images, not text", lambda: vit.cache("a seven", "logits")),
        (SiteError, "no position axis", lambda: vit.cache(test_data.images[:1], "logits@-1")),
        (SiteError, "patch 9,9 is outside the image", lambda: vit.cache(test_data.images[:1], "resid_post.0")["resid_post.0@'patch 9,9'"]),
        (ModelError, "logit_lens needs a language model", lambda: vit.logit_lens(test_data.images[0])),
        (ModelError, "generate needs a language model", lambda: vit.generate("seven")),
        (ModelError, "edit needs a language model", lambda: vit.edit("a", "b", "c")),
        (ModelError, "circuit needs a language model", lambda: vit.circuit("a", "b", "c")),
    ]
    assert_one_line_errors(vit, cases)
    assert vit.top(test_data.images[0], 1)["class_id"][0] == int(test_data.labels[0])


def test_a_vision_backbone_without_a_classifier_has_no_logits_to_patch(tmp_path):
    import transformers

    from mechnb import PatchError

    torch.manual_seed(0)
    config = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=16, num_hidden_layers=2,
                                    num_attention_heads=2, intermediate_size=32)
    transformers.ViTModel(config).save_pretrained(tmp_path)
    backbone = mechnb.load(tmp_path, device="cpu")
    images = torch.randn(2, 1, 8, 8)
    assert backbone.cache(images, "resid_post.1@0")["resid_post.1@0"].shape == (2, 16)
    with pytest.raises(PatchError, match="vision backbone with none") as error:
        backbone.patch(images[:1], images[1:], "resid_post.*", answer=0, wrong=1)
    assert "\n" not in str(error.value) and backbone.interventions == []
    with pytest.raises(SiteError, match="no classifier, so no logits"):
        backbone.cache(images, "logits")
