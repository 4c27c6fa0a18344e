import pytest
import torch

from mechnb import SiteError
from mechnb.core.sites import KINDS, Positions, Site, parse, select_positions, assign_positions


@pytest.mark.parametrize("text,kind,layer,index", [
    ("embed", "embed", None, None),
    ("logits", "logits", None, None),
    ("resid_pre.5", "resid_pre", 5, None),
    ("resid_mid.0", "resid_mid", 0, None),
    ("resid_post.29", "resid_post", 29, None),
    ("attn_out.2", "attn_out", 2, None),
    ("mlp_out.2", "mlp_out", 2, None),
    ("head.9", "head", 9, None),
    ("head.9.6", "head", 9, 6),
    ("neuron.5.123", "neuron", 5, 123),
    ("pattern.3", "pattern", 3, None),
    ("pattern.3.1", "pattern", 3, 1),
])
def test_parse_reads_kind_layer_and_index(text, kind, layer, index):
    site = parse(text)
    assert (site.kind, site.layer, site.index, site.positions) == (kind, layer, index, None)
    assert site.name == text


def test_parse_ranges_and_wildcards_become_slices():
    assert parse("resid_pre.*").layer == slice(None)
    assert parse("resid_pre.0:5").layer == slice(0, 5)
    assert parse("head.*.*").index == slice(None)
    assert parse("head.3:.2").layer == slice(3, None)
    assert parse("resid_pre.0:5").name == "resid_pre.0:5"
    assert not parse("head.*.1").is_concrete and parse("head.2.1").is_concrete


def test_parse_positions():
    assert parse("resid_post.5@-1").positions == Positions("-1", index=-1)
    assert parse("head.9.6@3:7").positions == Positions("3:7", start=3, stop=7)
    assert parse("resid_pre.2@'John'").positions.token == "John"
    assert parse('resid_pre.2@" John"').positions.token == " John"
    assert str(parse("head.9.6@-1")) == "head.9.6@-1"


def test_unknown_kind_lists_the_valid_kinds():
    with pytest.raises(SiteError) as info:
        parse("resid_foo.3")
    message = str(info.value)
    assert "'resid_foo'" in message
    for kind in KINDS:
        assert kind in message


@pytest.mark.parametrize("bad", ["", "resid_pre", "resid_pre.x", "head.1.2.3", "embed.3",
                                 "resid_pre.2@", "resid_pre.2@x", "logits.1", 5])
def test_malformed_sites_raise_site_error(bad):
    with pytest.raises(SiteError):
        parse(bad)


def test_expand_validates_against_the_model(tiny_factory):
    model = tiny_factory("llama")
    with pytest.raises(SiteError, match=r"layer 3 out of range .*layers 0-2"):
        parse("resid_pre.3").expand(model)
    with pytest.raises(SiteError, match=r"head 4 out of range .*heads 0-3"):
        parse("head.1.4").expand(model)
    with pytest.raises(SiteError, match=r"neuron 64 out of range .*neurons 0-63"):
        parse("neuron.1.64").expand(model)
    assert [s.name for s in parse("resid_pre.*").expand(model)] == [
        "resid_pre.0", "resid_pre.1", "resid_pre.2"]
    assert len(parse("head.*.*").expand(model)) == 3 * 4
    assert [s.name for s in parse("head.1:3.0").expand(model)] == ["head.1.0", "head.2.0"]


def test_resid_mid_is_refused_for_parallel_attention(tiny_factory):
    with pytest.raises(SiteError, match="in parallel"):
        parse("resid_mid.1").expand(tiny_factory("gpt_neox"))


def test_order_is_execution_order():
    names = ["logits", "resid_post.1", "mlp_out.1", "neuron.1", "resid_mid.1", "attn_out.1",
             "head.1", "pattern.1", "resid_pre.1", "resid_post.0", "embed"]
    ordered = sorted((parse(n) for n in names), key=lambda s: s.order)
    assert [s.name for s in ordered] == list(reversed(names))


def test_positions_resolve_per_prompt_length():
    tokens = [["a", " b", " c", " d"], ["x", " y"]]
    assert Positions("-1", index=-1).resolve(tokens).tolist() == [[3], [1]]
    assert Positions("0:2", start=0, stop=2).resolve(tokens).tolist() == [[0, 1], [0, 1]]
    assert Positions("'c'", token="c").resolve([["a", " c", " b", " c"]]).tolist() == [[1, 3]]


def test_positions_errors_name_the_problem():
    tokens = [["a", " b"]]
    with pytest.raises(SiteError, match=r"position 5 out of range: prompt 0 has 2 tokens"):
        Positions("5", index=5).resolve(tokens)
    with pytest.raises(SiteError, match=r"token 'John' is not in prompt 0"):
        Positions("'John'", token="John").resolve(tokens)
    with pytest.raises(SiteError, match="same number"):
        Positions("'b'", token="b").resolve([["b", " b"], ["b"]])


def test_select_and_assign_positions_round_trip():
    value = torch.arange(2 * 4 * 3, dtype=torch.float).reshape(2, 4, 3)
    positions = torch.tensor([[3], [1]])
    picked = select_positions(value, 1, positions, squeeze=True)
    assert torch.equal(picked, torch.stack([value[0, 3], value[1, 1]]))
    assign_positions(value, 1, positions, torch.zeros(2, 3), squeeze=True)
    assert value[0, 3].abs().sum() == 0 and value[1, 1].abs().sum() == 0
    assert value[0, 2].abs().sum() > 0
    pattern = torch.rand(2, 5, 4, 4)
    rows = select_positions(pattern, 2, torch.tensor([[0, 2], [1, 3]]), squeeze=False)
    assert rows.shape == (2, 5, 2, 4)
    assert torch.equal(rows[1, :, 1], pattern[1, :, 3])


def test_site_objects_pass_through_parse():
    site = Site("resid_pre", 2)
    assert parse(site) is site


@pytest.mark.parametrize("tl, canonical", [
    ("hook_embed", "embed"),
    ("blocks.5.hook_resid_pre", "resid_pre.5"),
    ("blocks.5.hook_resid_mid", "resid_mid.5"),
    ("blocks.*.hook_resid_post@-1", "resid_post.*@-1"),
    ("blocks.2.hook_attn_out", "attn_out.2"),
    ("blocks.2.hook_mlp_out@3:7", "mlp_out.2@3:7"),
    ("blocks.3.attn.hook_pattern", "pattern.3"),
    ("blocks.3.attn.hook_z@'John'", "head.3@'John'"),
    ("blocks.0:2.mlp.hook_post", "neuron.0:2"),
])
def test_transformerlens_hook_names_are_aliases_of_sites(tl, canonical):
    site = parse(tl)
    assert site == parse(canonical) and str(site) == canonical
    assert site.alias == tl.split("@")[0] and site.shown == f"{canonical} ({site.alias})"
    assert parse(canonical).tl_name == site.alias


@pytest.mark.parametrize("bad", ["blocks.5.hook_q", "blocks.5.attn.hook_result", "blocks.x.hook_resid_pre",
                                 "blocks.hook_resid_pre"])
def test_unknown_transformerlens_names_list_the_supported_ones(bad):
    with pytest.raises(SiteError) as error:
        parse(bad)
    assert "blocks.L.attn.hook_z" in str(error.value) or "bad layer" in str(error.value)
    assert "\n" not in str(error.value)


def test_transformerlens_names_read_write_and_show_in_results(tiny_factory):
    model = tiny_factory("llama")
    prompt = "When Mary and John went to the store"
    cache = model.cache(prompt, ["blocks.1.hook_resid_post", "blocks.2.attn.hook_z"])
    assert torch.equal(cache["blocks.1.hook_resid_post@-1"], cache["resid_post.1@-1"])
    assert torch.equal(cache["head.2"], model.cache(prompt, "head.2")["head.2"])
    clean = model.top(prompt)["prob"].tolist()
    with model.ablated("blocks.2.attn.hook_z"):
        assert model.interventions[0].describe()["site"] == "head.2 (blocks.2.attn.hook_z)"
        assert "head.2 (blocks.2.attn.hook_z)" in repr(model.interventions[0])
        ablated = model.top(prompt)["prob"].tolist()
        with model.ablated("head.2"):
            assert model.top(prompt)["prob"].tolist() == pytest.approx(ablated)
    assert ablated != pytest.approx(clean)
