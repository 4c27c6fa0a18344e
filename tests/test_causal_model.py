"""Causal models (`mechnb.causal.model`) and counterfactual datasets (`mechnb.causal.data`):
runs, interventions, interchanges, seeded balanced counterfactuals, field positions, the
filter, and MIB's records (`mechnb.causal.mib`). Plain Python except where a tokenizer or a
tiny model is named."""

import json

import pytest

from mechnb import CausalError
from mechnb.causal import CausalModel
from mechnb.causal import tasks

GENDER = {"Mary": "f", "Susan": "f", "Kimberly": "f", "John": "m", "Robert": "m", "Tom": "m"}


def pronoun_model(template="<|endoftext|>{name} walked because"):
    return CausalModel(
        variables={"name": list(GENDER), "gender": ["m", "f"], "pronoun": [" he", " she"]},
        parents={"gender": ["name"], "pronoun": ["gender"]},
        mechanisms={"gender": lambda name: GENDER[name], "pronoun": lambda g: {"m": " he", "f": " she"}[g]},
        template=template)


def test_run_follows_the_mechanisms_and_interventions_hold_a_variable():
    cm = pronoun_model()
    assert cm.inputs == ["name"] and cm.output == "pronoun" and cm.variables == ["name", "gender", "pronoun"]
    assert cm.run({"name": "Mary"}) == {"name": "Mary", "gender": "f", "pronoun": " she"}
    assert cm.run({"name": "Mary"}, {"gender": "m"})["pronoun"] == " he"
    assert cm.run({"name": "Mary"}, {"pronoun": " he"})["gender"] == "f"  # downstream only


def test_interchange_takes_the_variable_from_the_sources_run():
    cm = pronoun_model()
    assert cm.interchange({"name": "Mary"}, {"gender": {"name": "John"}})["pronoun"] == " he"
    assert cm.interchange({"name": "Mary"}, {"gender": {"name": "Susan"}})["pronoun"] == " she"
    assert cm.interchange({"name": "John"}, {"name": {"name": "Susan"}})["pronoun"] == " she"


def test_render_gives_the_prompt_and_each_fields_characters():
    cm = pronoun_model()
    prompt, spans = cm.render(cm.run({"name": "Kimberly"}))
    assert prompt == "<|endoftext|>Kimberly walked because"
    assert prompt[slice(*spans["name"])] == "Kimberly"


def test_counterfactuals_are_seeded_balanced_and_change_the_output():
    cm = pronoun_model()
    data = cm.counterfactuals(40, intervene="gender", seed=3)
    again = cm.counterfactuals(40, intervene="gender", seed=3)
    other = cm.counterfactuals(40, intervene="gender", seed=4)
    assert [e.base for e in data] == [e.base for e in again] and [e.base for e in data] != [e.base for e in other]
    expected = data.expected()
    assert expected.count(" he") == expected.count(" she") == 20
    assert data.unchanged() == []
    assert all(e != b for e, b in zip(expected, data.base_outputs()))
    loose = cm.counterfactuals(200, intervene="gender", seed=0, changes=False)
    assert 0 < len(loose.unchanged()) < 200  # about half: same-gender sources


def test_several_variables_get_a_source_each_and_interchange_apart_or_together():
    cm = tasks.ioi(names=["Mary", "John", "Anna", "Tom"])
    data = cm.counterfactuals(30, intervene=["position", "token"], seed=0)
    assert data.variables == ["position", "token"]
    example = data[0]
    assert set(example.sources) == {"position", "token"}
    alone = data.expected(["position"])[0]
    assert alone == cm.interchange(example.base, {"position": example.sources["position"]})["token"]
    both = data.expected()[0]
    assert both == cm.interchange(example.base, example.sources)["token"]


def test_a_split_is_seeded_disjoint_and_whole():
    data = pronoun_model().counterfactuals(50, intervene="gender", seed=0)
    train, test = data.split(0.2, seed=1)
    assert (len(train), len(test)) == (40, 10)
    ids = lambda part: [id(e) for e in part]
    assert not set(ids(train)) & set(ids(test)) and set(ids(train)) | set(ids(test)) == set(ids(data))
    assert ids(data.split(0.2, seed=1)[1]) == ids(test)


def test_bad_causal_models_are_one_line_errors():
    cases = [
        ("cycle, a -> b -> a", lambda: CausalModel({"a": [0, 1], "b": [0, 1]}, parents={"a": ["b"], "b": ["a"]},
                                                  mechanisms={"a": lambda b: b, "b": lambda a: a})),
        ("'c' in the parents of 'b' is not a variable", lambda: CausalModel({"a": [0], "b": [0]}, parents={"b": ["c"]})),
        ("'b' has parents but no mechanism", lambda: CausalModel({"a": [0], "b": [0]}, parents={"b": ["a"]})),
        ("has 2 outputs", lambda: CausalModel({"a": [0], "b": [0], "c": [0]}, parents={"b": ["a"], "c": ["a"]},
                                              mechanisms={"b": lambda a: a, "c": lambda a: a})),
        ("'nom' in the template's fields is not a variable", lambda: pronoun_model("{nom} walked")),
        ("needs a non-empty list of values", lambda: CausalModel({"a": []})),
    ]
    for words, call in cases:
        with pytest.raises(CausalError) as raised:
            call()
        assert words in str(raised.value) and "\n" not in str(raised.value), str(raised.value)
    cm = CausalModel({"a": [0, 1], "b": [0, 1]}, parents={"b": ["a"]}, mechanisms={"b": lambda a: a + 1})
    with pytest.raises(CausalError, match=r"the mechanism of 'b' gives b = 2 on \{'a': 1\}, which is not one of its "
                                          r"values \(0, 1\)"):
        cm.run({"a": 1})
    with pytest.raises(CausalError, match="cannot change pronoun"):
        CausalModel({"name": ["Mary"], "gender": ["f"], "pronoun": [" she"]}, parents={"gender": ["name"],
                    "pronoun": ["gender"]}, mechanisms={"gender": lambda n: "f", "pronoun": lambda g: " she"},
                    template="{name}").counterfactuals(4, intervene="gender")


def test_field_positions_are_the_fields_tokens_in_each_prompt(tokenizer):
    from mechnb.causal.data import token_fields

    cm = pronoun_model()
    for name in GENDER:
        prompt, spans = cm.render(cm.run({"name": name}))
        found = token_fields(tokenizer, prompt, spans)["name"]
        ids = tokenizer(prompt)["input_ids"]
        assert tokenizer.decode(ids[found[0]:found[-1] + 1]) == name
        assert found == list(range(1, 1 + len(tokenizer.encode(name, add_special_tokens=False))))


def test_positions_pair_base_and_source_tokens_when_their_lengths_differ(tiny_factory):
    model = tiny_factory("llama")
    cm = pronoun_model()
    data = cm.counterfactuals(12, intervene="gender", seed=0)
    table = data.positions(model, "resid_post.1@'{name}'")
    lengths = {name: len(model.tokens(name)) for name in GENDER}
    for example, row in zip(data, table.itertuples()):
        assert row.base_pos == [lengths[example.base["name"]]]  # the name's last token, after <|endoftext|>
        assert row.source_pos == [lengths[example.sources["gender"]["name"]]]
    last = data.positions(model, "resid_post.1@-1")
    assert [p[0] for p in last.base_pos] == [lengths[e.base["name"]] + 2 for e in data]
    assert [p[0] for p in last.source_pos] == [lengths[e.sources["gender"]["name"]] + 2 for e in data]
    assert {len(set(pair)) for pair in zip(map(tuple, last.base_pos), map(tuple, last.source_pos))} == {1, 2}
    with pytest.raises(CausalError, match=r"template field \{place\} is not in example 0 \(its fields: \{name\}\)"):
        data.positions(model, "resid_post.1@'{place}'")


def test_mib_records_round_trip_through_json_and_parquet(tmp_path):
    from mechnb.causal import read_mib, write_mib

    cm = tasks.ioi(names=["Mary", "John", "Anna", "Tom"])
    data = cm.counterfactuals(16, intervene=["position", "token"], seed=2)
    for name in ("data.json", "data.parquet"):
        path = write_mib(data, tmp_path / name)
        back = read_mib(path, cm, ["position", "token"])
        assert [e.base for e in back] == [e.base for e in data]
        assert [e.sources for e in back] == [e.sources for e in data]
        assert back.expected() == data.expected()
    record = json.loads((tmp_path / "data.json").read_text())[0]
    assert set(record) == {"input", "counterfactual_inputs"} and len(record["counterfactual_inputs"]) == 2
    assert record["input"]["raw_input"] == cm.render(cm.run(data[0].base))[0]
    record["input"]["raw_input"] = "something else"
    (tmp_path / "bad.json").write_text(json.dumps([record]))
    with pytest.raises(CausalError, match="is not what the template renders"):
        read_mib(tmp_path / "bad.json", cm, ["position", "token"])
    with pytest.raises(CausalError, match="2 counterfactual inputs for the 1 variables"):
        read_mib(tmp_path / "data.json", cm, ["position"])
