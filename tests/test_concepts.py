"""Image concepts: top images, summaries in words, grids, and names from a labeller that sees
the images (a local server speaking the chat API decodes them) or reads the summary."""

import base64
import io

import pytest
import torch

from conftest import json_server
from mechnb import SAEError
from mechnb.sae import SAE
from mechnb.vision.concepts import ImageConcepts, png_data_url


def synthetic(n: int = 48):
    """Digits-like 8x8 images of classes 0..3. Concept 0 fires on class 2, in the top-left patch
    (where class 2's images have a bright pixel); concept 1 on class 0, bottom right; concept 2 never."""
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % 4
    images = torch.rand(n, 1, 8, 8, generator=g) * 0.3
    images[labels == 2, 0, 0, 0] = 1.0
    activations = torch.zeros(n, 3)
    maps = torch.zeros(n, 4, 4, 3)
    strength = 1 + torch.rand(n, generator=g)
    activations[labels == 2, 0] = strength[labels == 2]
    maps[labels == 2, 0, 0, 0] = strength[labels == 2]
    activations[labels == 0, 1] = strength[labels == 0]
    maps[labels == 0, 3, 3, 1] = strength[labels == 0]
    return ImageConcepts(images, labels, ["zero", "one", "two", "three"], activations, maps)


def test_top_images_class_shares_and_summaries_in_words():
    concepts = synthetic()
    top = concepts.top(0, 5)
    assert len(top) == 5 and all(concepts.labels[i] == 2 for i in top)
    assert concepts.activations[top, 0].tolist() == sorted(concepts.activations[top, 0].tolist(), reverse=True)
    assert concepts.class_distribution(0) == {"two": 1.0}
    assert concepts.summary(0) == ("top 12 images: two (100%); strongest at patch row 0, column 0 "
                                   "(top left of the image)")
    assert "bottom right" in concepts.summary(1)
    assert concepts.summary(2) == "concept 2 never fires on these images" and concepts.top(2) == []
    with pytest.raises(SAEError, match="feature must be an index 0..2"):
        concepts.top(3)


def test_the_grid_draws_each_concepts_top_images_with_its_map_over_them():
    figure = synthetic().grid([0, 1], k=4)
    axes = figure.axes
    assert len(axes) == 8
    assert all(len(axis.images) == 2 for axis in axes)  # the image and the heatmap laid over it
    assert axes[0].get_title().startswith("two · ") and axes[4].get_title().startswith("zero · ")
    heat = axes[0].images[1].get_array()
    assert heat.shape == (4, 4) and heat[0, 0] == 1 and heat.sum() == 1


def test_png_data_urls_are_enlarged_pngs_of_the_image():
    from PIL import Image

    image = torch.zeros(1, 8, 8)
    image[0, 0, 0] = 1
    url = png_data_url(image, size=64)
    assert url.startswith("data:image/png;base64,")
    picture = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert picture.size == (64, 64) and picture.getpixel((0, 0)) == 255 and picture.getpixel((63, 63)) == 0


def bright_corner(url: str) -> bool:
    from PIL import Image

    picture = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    return picture.getpixel((0, 0)) > 200


def test_a_multimodal_chat_server_sees_the_images_names_the_concept_and_is_scored(tmp_path):
    seen = []

    def chat(body):
        parts = body["messages"][0]["content"]
        images = [p["image_url"]["url"] for p in parts if p["type"] == "image_url"]
        seen.append(len(images))
        if parts[0]["text"].startswith("Here are the images"):
            text = "a bright top-left corner"
        else:  # judged from the image itself: the simulation the score measures
            text = "9" if bright_corner(images[0]) else "1"
        return 200, {"choices": [{"message": {"role": "assistant", "content": text}}]}

    sae = SAE(16, 3, kind="relu")
    synthetic().record(sae)
    with json_server(chat) as base:
        table = sae.label([0], labeler=f"{base}/v1", n_examples=8, cache_dir=tmp_path)
    assert table.label.tolist() == ["a bright top-left corner"]
    assert seen[0] == 4 and set(seen[1:]) == {1}  # the labelling prompt shows 4 images, each judgement one
    assert table.score[0] > 0.95 and abs(table.shuffled_score[0]) < 0.5


def test_the_local_model_gets_the_summary_in_words_and_a_multimodal_labeller_chat_parts():
    from mechnb.sae.label import _explain_images, _judge_prompt

    contexts = synthetic().contexts()[0]
    words = _explain_images(contexts["positive"][:3], contexts["summary"], multimodal=False)
    assert isinstance(words, str) and "two (100%)" in words and "top left" in words
    judged = _judge_prompt("a corner", contexts["negative"][0], multimodal=False)
    assert "handwritten" in judged and contexts["negative"][0]["class"] in judged
    parts = _explain_images(contexts["positive"][:3], contexts["summary"], multimodal=True)
    assert [p["type"] for p in parts] == ["text", "image_url", "image_url", "image_url", "text"]


def test_a_function_labeller_is_called_with_the_images(tmp_path):
    received = []

    def labeller(prompt):
        received.append(prompt)
        return "corner" if len(received) == 1 else ("9" if bright_corner(prompt[1]["image_url"]["url"]) else "0")

    sae = SAE(16, 3, kind="relu")
    synthetic().record(sae)
    table = sae.label([0], labeler=labeller, n_examples=6, cache_dir=tmp_path)
    assert table.label[0] == "corner" and table.score[0] > 0.95
    assert all(isinstance(p, list) for p in received)
