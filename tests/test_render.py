"""Offline, small and safe circuitsvis views."""

import socket

import pytest

from mechnb.display import render


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("rendering tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_bundle_is_sent_once_then_views_stay_small(tiny_factory, no_network):
    model = tiny_factory("llama")
    prompt = " ".join(["apple", "banana", "river", "stone", "light"] * 6)
    render.reset()
    first = model.attention(prompt, layers=1).html()
    later = model.attention(prompt, layers=1).html()
    assert "var CircuitsVis" in first and len(first) > 1_000_000
    assert "var CircuitsVis" not in later
    assert len(model.tokens(prompt)) == 30
    assert len(later) < 50_000
    assert "AttentionHeads" in later


def test_no_rendered_output_references_a_url(tiny_factory, no_network):
    model = tiny_factory("llama")
    render.reset()
    for html in [model.attention("Hello there world", layers=0).html(),
                 model.activations("neuron.1.3", "Hello there").html(),
                 model.activations("head.1.0", ["Hello there", "A b c"]).html(),
                 model.patch("Hello there", "Hello here", "resid_pre.*", metric=lambda l: l[:, 0]).html()]:
        for needle in ("http://", "https://", "//unpkg", "cdn.", "src=\"//"):
            assert needle not in html


def test_tokens_are_escaped(tiny_factory):
    model = tiny_factory("llama")
    evil = 'He said "<script>alert(1)</script>" & left'
    for html in [model.attention(evil, layers=0).html(), model.activations("neuron.0.1", evil).html()]:
        assert "<script>alert(1)</script>" not in html
        assert "alert" in html  # still shown, as text
        assert "\\u003cscript\\u003e" in html or "\\u003c" in html


def test_safe_json_cannot_close_a_script():
    text = render.safe_json({"t": "</script><b>&"})
    assert "<" not in text and ">" not in text and "&" not in text


def test_results_show_as_text_in_a_terminal_and_richly_in_a_notebook(tiny_factory):
    model = tiny_factory("llama")
    lens = model.logit_lens("Hello there world")
    bundle = lens._repr_mimebundle_()
    assert bundle["text/plain"].startswith("logit lens")
    assert bundle["image/png"][:4] == b"\x89PNG"
    only_text = lens._repr_mimebundle_(include={"text/plain"})
    assert set(only_text) == {"text/plain"}
    view = model.attention("Hello there", layers=0)._repr_mimebundle_()
    assert "text/html" in view and "mechnb-view" in view["text/html"]
