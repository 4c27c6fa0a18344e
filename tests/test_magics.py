"""The magics, through a real IPython InteractiveShell."""

import pytest
import torch

from conftest import PARIS, PROMPT, clean_logits
from torchref import Reference
from mechnb.notebook.magics import split_args
from mechnb import MagicError


def assert_one_line_errors(shell, capsys, cases):
    """Each magic line fails with one readable line holding its text, and no traceback."""
    for line, text in cases:
        result = run(shell, line)
        err = capsys.readouterr().err
        assert not result.success and text in err, (line, err)
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def run(shell, source):
    """Run a cell; return (result, stderr text is read by the caller via capsys)."""
    return shell.run_cell(source, store_history=False)


@pytest.fixture
def llama(shell, tiny_factory):
    model = tiny_factory("llama")
    shell.user_ns["m"] = model
    assert run(shell, "%mechnb use m").success
    shell.user_ns["model"] = model
    return model


def test_split_args_expands_python_values():
    ns = {"prompts": ["a b", "c"], "k": 3, "name": "John"}
    assert split_args('top "The cat sat" -k {k}', ns) == ["top", "The cat sat", "-k", 3]
    assert split_args("{prompts} --grad", ns) == [["a b", "c"], "--grad"]
    assert split_args("'Hello {name}!' {{x}}", ns) == ["Hello John!", "{x}"]
    with pytest.raises(MagicError, match="cannot evaluate {missing}"):
        split_args("{missing}", ns)


def test_top_before_load_is_one_readable_line(shell, capsys):
    shell.magics_manager.registry["MechnbMagics"].session.model = None
    result = run(shell, '%mechnb top "Hello"')
    err = capsys.readouterr().err
    assert not result.success
    assert "ModelError: no model loaded: run `%mechnb load` first" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_info_and_top_magics(shell, llama):
    info = run(shell, "%mechnb info").result
    assert info.loc["n_layers", "value"] == 3 and info.loc["d_head", "value"] == 8
    table = run(shell, '%mechnb top "When Mary and John went to the store" -k 4').result
    assert list(table.columns) == ["rank", "token", "token_id", "prob", "logit"]
    assert len(table) == 4


def test_trace_cell_reads_and_writes(shell, llama):
    shell.user_ns["p"] = PROMPT
    result = run(shell, '%%trace {p}\n'
                        'h = model["resid_post.0"].save()\n'
                        'model["head.1.2"] = 0\n'
                        'logits = model["logits"].save()\n')
    assert result.success, result.error_in_exec
    h, logits = shell.user_ns["h"], shell.user_ns["logits"]
    assert isinstance(h, torch.Tensor) and h.shape == (1, len(llama.tokens(PROMPT)), 32)
    clean = clean_logits(llama)
    assert (logits - clean).abs().max() > 1e-4
    assert torch.equal(clean_logits(llama), clean)


def test_unsaved_names_get_a_hint(shell, llama, capsys):
    shell.user_ns.pop("forgotten", None)
    shell.user_ns["kept_old"] = "old"
    result = run(shell, '%%trace "Hello world"\n'
                        'forgotten = model["resid_post.0"]\n'
                        'kept_old = model["resid_post.1"]\n'
                        'saved = model["resid_post.2"].save()\n')
    assert result.success
    err = capsys.readouterr().err
    assert "forgotten, kept_old assigned in the %%trace cell but not kept" in err
    assert "saved" not in err


def test_failed_load_keeps_the_current_model(shell, llama, capsys):
    assert not run(shell, "%mechnb load ./no/such/dir").success
    assert shell.magics_manager.registry["MechnbMagics"].session.model is llama
    assert run(shell, "%mechnb info").success


def test_trace_cell_takes_a_list_of_prompts(shell, llama):
    shell.user_ns["prompts"] = [PROMPT, "Hi"]
    assert run(shell, '%%trace {prompts}\nlast = model["resid_pre.*@-1"].save()\n').success
    assert shell.user_ns["last"].shape == (3, 2, 32)


def test_each_trace_cell_runs_its_own_code(shell, llama):
    for layer in (0, 1, 2):
        assert run(shell, f'%%trace "Hello world"\nx = model["resid_post.{layer}"].save()\n').success
        cache = llama.cache("Hello world", f"resid_post.{layer}")
        assert torch.equal(shell.user_ns["x"], cache[f"resid_post.{layer}"])


@pytest.mark.parametrize("body,kind,text", [
    ('model["resid_post.9"].save()', "SiteError", "layer 9 out of range in resid_post.9: this model has layers 0-2"),
    ('model["head.1.7"] = 0', "SiteError", "head 7 out of range"),
    ('model["blah.1"].save()', "SiteError", "unknown site kind 'blah'"),
    ("model[\"resid_post.1@'Bob'\"].save()", "SiteError", "token 'Bob' is not in prompt 0"),
    ('x = model["resid_post.2"].save()\ny = model["resid_post.0"].save()', "SiteError", "order"),
    ('model["head.1.0"] = 0\nraise ValueError("boom")', "TraceError", "raised ValueError: boom (cell line 2"),
    ('model["head.1.0"] = 0\nraise KeyboardInterrupt', "TraceError", "interrupted"),
    ("x = (", "MagicError", "syntax error"),
])
def test_trace_errors_are_one_line_and_leave_the_model_clean(shell, llama, capsys, body, kind, text):
    clean = clean_logits(llama)
    result = run(shell, f"%%trace {PROMPT!r}\n{body}\n")
    err = capsys.readouterr().err
    assert not result.success
    assert err.startswith(kind + ": ") and text in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert torch.equal(clean_logits(llama), clean)
    assert llama._trace is None
    assert run(shell, f"%%trace {PROMPT!r}\nok = model['logits'].save()\n").success
    assert torch.allclose(shell.user_ns["ok"], clean, atol=1e-5)


def test_bad_magic_arguments_are_one_line(shell, llama, capsys):
    assert_one_line_errors(shell, capsys, [("%mechnb nonsense", "unknown command 'nonsense'"),
                       ('%mechnb top "x" --bogus 1', "unknown option --bogus"),
                       ('%mechnb top "x" -k many', "takes a int"),
                       ("%mechnb top {undefined_name}", "cannot evaluate"),
                       ("%mechnb load ./no/such/dir", "no such file or directory"),
                       ("%%trace\nx = 1", "takes one prompt")])


def test_help_lists_the_commands(shell, capsys):
    run(shell, "%mechnb help")
    out = capsys.readouterr().out
    for word in ["load", "info", "top", "%%trace", "resid_pre.L"]:
        assert word in out


def test_unload_and_reload_the_extension(shell, llama, capsys):
    assert run(shell, "%unload_ext mechnb").success
    assert "mechnb" not in shell.magics_manager.magics["line"]
    assert not run(shell, "%mechnb info").success
    capsys.readouterr()
    assert run(shell, "%load_ext mechnb").success
    assert run(shell, "%mechnb use m").success
    assert run(shell, "%mechnb info").result.loc["n_layers", "value"] == 3


@pytest.mark.slow
def test_load_top_and_trace_on_the_embedded_model(shell, capsys):
    assert run(shell, "%mechnb load").success
    assert "bound to `model`" in capsys.readouterr().out
    table = run(shell, f'%mechnb top "{PARIS}"').result
    assert table.token[0] == " Paris"
    result = run(shell, f'%%trace "{PROMPT}"\n'
                        'h = model["resid_post.5"].save()\n'
                        'model["head.9.6"] = 0\n'
                        'logits = model["logits"].save()\n')
    assert result.success
    assert shell.user_ns["h"].shape == (1, 14, 576)
    model = shell.user_ns["model"]
    clean = model.cache(PROMPT, "logits")["logits"]
    assert (shell.user_ns["logits"] - clean).abs().max() > 1e-3
    assert model.tokenizer.decode(clean[0, -1].argmax()) == " Mary"


def test_ablate_and_interventions_magics(shell, llama):
    shell.user_ns["refs"] = ["The cat sat on the mat", "A dog ran home"]
    before = llama.top(PROMPT, k=3)
    table = run(shell, "%ablate head.1.0 head.2.* --mode mean --ref {refs}").result
    assert list(table["site"]) == ["head.1.0", "head.2.0", "head.2.1", "head.2.2", "head.2.3"]
    assert "mean of" in table["detail"][0]
    after = run(shell, f'%mechnb top "{PROMPT}" -k 3').result
    assert not after["prob"].equals(before["prob"])
    assert len(run(shell, "%interventions --remove 0 1").result) == 3
    assert len(run(shell, "%interventions --clear").result) == 0
    assert llama.top(PROMPT, k=3)["prob"].tolist() == pytest.approx(before["prob"].tolist())


def test_patch_magic_returns_a_result(shell, llama):
    shell.user_ns.update(clean=PROMPT, corrupt="When Mary and John went to the store, Mary gave a drink to")
    result = run(shell, '%patch --clean {clean} --corrupt {corrupt} --answer " Mary" --wrong " John" '
                        '--sites resid_pre.* --per-position -o resid')
    assert result.success, result.error_in_exec
    assert shell.user_ns["resid"] is result.result
    assert result.result.values.shape == (3, len(llama.tokens(PROMPT)))
    heads = run(shell, '%patch --clean {clean} --corrupt {corrupt} --answer " Mary" --wrong " John" '
                       '--sites head.*.* --method attribution').result
    assert heads.values.shape == (3, 4) and heads.meta["method"] == "attribution"
    path = run(shell, '%path_patch --clean {clean} --corrupt {corrupt} --answer " Mary" --wrong " John" '
                      '--senders head.0.* --receivers head.2.1').result
    assert path.values.shape == (1, 4)


def test_causal_magics_give_the_apis_results(shell, llama):
    from test_causal_model import pronoun_model

    data = pronoun_model().counterfactuals(12, intervene="gender", seed=0)
    shell.user_ns.update(data=data)
    result = run(shell, "%interchange {data} \"resid_post.*@'{name}'\" resid_post.1:3@-1 --variable gender -o iia")
    assert result.success, result.error_in_exec
    expected = llama.interchange(data, ["resid_post.*@'{name}'", "resid_post.1:3@-1"], variable="gender")
    assert shell.user_ns["iia"] is result.result
    assert torch.equal(result.result.values.nan_to_num(-1), expected.values.nan_to_num(-1))
    assert result.result.meta["labels"]["position"] == ["@'{name}'", "@-1"]
    trained = run(shell, "%das {data} \"resid_post.1@'{name}'\" -k 2 --epochs 2 --seed 3 -o das")
    assert trained.success, trained.error_in_exec
    again = llama.das(data, "resid_post.1@'{name}'", k=2, epochs=2, seed=3)
    assert torch.allclose(trained.result.basis, again.basis) and trained.result.meta["iia"] == again.meta["iia"]
    reused = run(shell, "%interchange {data} {das}")
    assert reused.success and reused.result.values.item() == llama.interchange(data, again).values.item()


def test_patch_magic_errors_are_one_line(shell, llama, capsys):
    shell.user_ns.update(clean=PROMPT)
    assert_one_line_errors(shell, capsys, [('%patch --clean {clean} --corrupt "Hello" --answer " Mary" --wrong " John" --sites resid_pre.*',
                        "different lengths"),
                       ('%patch --clean {clean} --corrupt {clean} --answer " Mary"', "needs --sites"),
                       ("%ablate", "at least one site"),
                       ("%ablate head.1.0 --mode mean", "needs reference prompts"),
                       ("%ablate head.1.0 --mode average --ref x", "unknown ablation mode"),
                       ("%interventions --remove 7", "--remove takes numbers")])
    assert llama.interventions == []


def test_view_magics(shell, llama):
    shell.user_ns["prompts"] = [PROMPT, "Hello there"]
    # Each magic gives its API call's values (the API's are checked against transformers in
    # test_views.py), and the explorer shows transformers' own numbers.
    attention = run(shell, f'%attention "{PROMPT}" --layers 1:3 -o att').result
    assert attention.values.shape == (2, 4, 14, 14) and shell.user_ns["att"] is attention
    assert torch.equal(attention.values, llama.attention(PROMPT, layers="1:3").values)
    activations = run(shell, "%activations neuron.1.5 {prompts}").result
    assert activations.values.shape == (2, 14)
    assert torch.equal(activations.values, llama.activations("neuron.1.5", [PROMPT, "Hello there"]).values)
    lens = run(shell, f'%lens "{PROMPT}"').result
    assert lens.values.shape == (3, 14) and torch.equal(lens.values, llama.logit_lens(PROMPT).values)
    dla = run(shell, f'%dla "{PROMPT}" --answer " Mary" --wrong " John"').result
    assert abs(dla.meta["total"] - dla.meta["logit_diff"]) < 1e-3
    assert torch.equal(dla.values, llama.dla(PROMPT, " Mary", " John").values)
    heads = run(shell, "%heads --detect induction previous_token --n-samples 2 --seq-len 5").result
    assert heads.values.shape == (2, 3, 4)
    assert torch.equal(heads.values, llama.detect_heads(["induction", "previous_token"], n_samples=2, seq_len=5).values)
    explorer = run(shell, f'%explore "{PROMPT}" --answer " Mary" --wrong " John"').result
    logits = clean_logits(llama)[0, -1]
    mary, john = (llama.tokenizer.encode(word, add_special_tokens=False)[0] for word in (" Mary", " John"))
    assert abs(explorer.logit_diff - (logits[mary] - logits[john]).item()) < 1e-5
    assert explorer.table.equals(llama.top(PROMPT, k=explorer.k))
    layer = llama.n_layers // 2
    eager = Reference(llama.hf, "llama", tokenizer=llama.tokenizer).attentions(PROMPT)
    assert torch.allclose(explorer.pattern, eager[layer, 0, 0], atol=1e-6)


def test_view_magic_errors_are_one_line(shell, llama, capsys):
    assert_one_line_errors(shell, capsys, [("%attention", "takes one prompt"), ('%dla "x y"', "needs --answer"),
                       ('%heads --detect copying', "unknown head kind"),
                       ('%attention "x y" --layers 9', "out of range"),
                       ("%activations neuron.1.5", "takes a site")])


def test_features_magic(shell, llama):
    from mechnb.sae import train

    store = llama.collect("resid_post.1", [PROMPT] * 20, n_tokens=200, progress=False)
    shell.user_ns["my_sae"] = train(store, kind="topk", d_sae=32, k=3, batch_size=64, progress=False)
    table = run(shell, f'%features "{PROMPT}" --sae my_sae -k 2').result
    assert set(table.df["rank"]) <= {1, 2} and len(table.df) > 0
    expected = llama.features(PROMPT, shell.user_ns["my_sae"], k=2)
    assert table.df.equals(expected.df) and torch.equal(table.values, expected.values)


def test_attribute_magic(shell, llama):
    result = run(shell, f'%attribute "{PROMPT}" --method grad_x_input --target " Mary" -o attr').result
    assert result.values.shape == (14,) and shell.user_ns["attr"] is result
    assert result.meta["target"] == " Mary"
    expected = llama.attribute(PROMPT, method="grad_x_input", target=" Mary")
    assert result.values.abs().max() > 0 and torch.equal(result.values, expected.values)


def test_circuit_magic_shows_the_curve_and_returns_the_top_edges(shell, llama, capsys):
    from mechnb.circuits import Circuit

    shell.user_ns.update(clean=[PROMPT, PROMPT.replace("store", "park")],
                         corrupt=[PROMPT.replace("John gave", "Mary gave"),
                                  PROMPT.replace("store", "park").replace("John gave", "Mary gave")],
                         answers=[" Mary", " Mary"], wrongs=[" John", " John"])
    result = run(shell, "%circuit --clean {clean} --corrupt {corrupt} --answer {answers} --wrong {wrongs} "
                        "--method eap --top 5% --fractions 0.05 0.5 1 -o circ")
    assert result.success, result.error_in_exec
    circuit = result.result
    assert isinstance(circuit, Circuit) and shell.user_ns["circ"] is circuit
    assert circuit.n_kept <= int(0.05 * circuit.n_items) and circuit.meta["method"] == "eap"
    assert "faithfulness of eap edges" in capsys.readouterr().out
    nodes = run(shell, "%circuit --clean {clean} --corrupt {corrupt} --answer {answers} --wrong {wrongs} "
                       "--method exact --level node --no-faithfulness --top 3").result
    assert nodes.level == "node" and nodes.n_kept == 3
    assert_one_line_errors(shell, capsys, [
        ("%circuit --clean {clean} --corrupt {corrupt}", "needs --answer"),
        ("%circuit --clean {clean} --corrupt {corrupt} --answer {answers} --wrong {wrongs} --top lots "
         "--no-faithfulness", "--top takes a number"),
        ("%circuit --clean {clean} --corrupt {corrupt} --answer {answers} --wrong {wrongs} "
         "--fractions 2", "fractions must increase"),
        ("%circuit --clean {clean} --corrupt {corrupt} --answer {answers} --wrong {wrongs} --method exact",
         "level='node'")])


def test_generate_steer_and_causal_trace_magics(shell, llama, capsys):
    shell.user_ns["v"] = torch.ones(llama.d_model)
    table = run(shell, "%steer resid_pre.1 {v} --scale 4").result
    assert table.kind.tolist() == ["steer"] and "4 x vector" in table.detail[0]
    both = run(shell, f'%generate "{PROMPT}" --max-new-tokens 5 --compare -o gen').result
    assert both.df.interventions.tolist() == ["on", "off"] and shell.user_ns["gen"] is both
    assert both.df.continuation[0] != both.df.continuation[1]
    assert run(shell, "%steer --clear").success and llama.interventions == []
    trace = run(shell, f'%causal_trace "{PARIS}" --subject "Eiffel Tower" --samples 2 --kind mlp').result
    assert trace.values.shape == (3, len(llama.tokens(PARIS))) and trace.meta["kind"] == "mlp"
    assert_one_line_errors(shell, capsys, [
        ("%steer resid_pre.1", "takes a site and a vector"),
        ("%steer resid_pre.1 {v} --scale lots", "takes a float"),
        (f'%causal_trace "{PARIS}"', "needs --subject"),
        (f'%causal_trace "{PARIS}" --subject Louvre', "does not occur"),
        ('%generate "" --max-new-tokens 3', "non-empty"),
        ('%generate "Hi" --max-new-tokens 0', "max_new_tokens")])
    assert llama.interventions == []


def test_weight_coactivation_and_stability_magics(shell, llama, capsys):
    ov = run(shell, "%ov head.1.2 -k 3").result
    assert ov.kind == "OV head.1.2" and "copying score" in capsys.readouterr().out
    assert run(shell, "%qk head.0.1").result.kind == "QK head.0.1"
    comp = run(shell, "%composition --kind q -o comp").result
    assert comp.meta["kind"] == "q" and shell.user_ns["comp"] is comp
    shell.user_ns["texts"] = [PROMPT, PARIS]
    pca = run(shell, "%coactivation mlp_out.1 {texts} --components 3").result
    assert pca.values.shape == (3,)
    shell.user_ns["circ"] = llama.circuit([PROMPT], [PROMPT.replace("John gave", "Mary gave")], " Mary", " John",
                                          method="eap")
    table = run(shell, "%stability {circ} --resamples 1 --top 10").result
    assert table["stability (resamples)"][0] == 1.0
    assert_one_line_errors(shell, capsys, [("%ov mlp_out.3", "takes one head"),
                                           ("%ov head.7.0", "layer 7 out of range"),
                                           ("%composition --kind z", "'q', 'k' or 'v'"),
                                           ("%coactivation mlp_out.1", "takes a site and texts"),
                                           ("%stability 3", "takes a circuit")])


def test_split_args_drops_a_trailing_comment_as_a_shell_does():
    ns = {"p": "a # b"}
    assert split_args('top "The # sat" -k 3   # the sky', ns) == ["top", "The # sat", "-k", "3"]
    assert split_args("load  # embedded", ns) == ["load"]
    assert split_args("C#x {p} #", ns) == ["C#x", "a # b"]
    assert split_args("'it''s' x#y", ns) == ["its", "x#y"]


def test_load_passes_device_map_and_remote(shell, capsys, saved):
    tmp_path = saved
    assert run(shell, f"%mechnb load {tmp_path} --device-map auto --as spread").success
    spread = shell.user_ns["spread"]
    assert [str(d) for d in spread.devices] == ["cpu"] and spread.top("Hello", k=1).shape[0] == 1
    assert_one_line_errors(shell, capsys, [
        (f"%mechnb load {tmp_path} --device cpu --device-map auto", "ModelError"),
        ("%mechnb load --remote", "RemoteError"),
    ])


# Each magic with only its required words, and the keyword arguments that call must pass on:
# everything else is left to the API's own defaults (a magic has none of its own).
MINIMAL = [
    ('%mechnb top "x"', "top", set()),
    ('%patch --clean {clean} --corrupt {corrupt} --answer " Mary" --wrong " John" --sites resid_pre.*', "patch",
     {"answer", "wrong"}),
    ('%path_patch --clean {clean} --corrupt {corrupt} --answer " Mary" --wrong " John" --senders head.*.* '
     '--receivers head.2.1', "path_patch", {"answer", "wrong"}),
    ('%attention "x y"', "attention", set()),
    ('%activations neuron.1.0 "x y"', "activations", set()),
    ('%lens "x y"', "logit_lens", set()),
    ('%dla "x y" --answer " Mary"', "dla", {"answer"}),
    ("%heads", "detect_heads", set()),
    ('%attribute "x y"', "attribute", set()),
    ('%circuit --clean {clean} --corrupt {corrupt} --answer " Mary" --wrong " John" --no-faithfulness', "circuit",
     {"wrong"}),
    ('%generate "x y"', "generate", set()),
    ("%steer resid_pre.1 {v}", "steer", set()),
    ('%causal_trace "The Eiffel Tower is located in the city of" --subject "Eiffel Tower"', "causal_trace", set()),
    ("%ov head.1.2", "ov", set()),
    ("%qk head.1.2", "qk", set()),
    ("%composition", "composition", set()),
    ("%coactivation mlp_out.1 {texts}", "coactivation", set()),
    ("%ablate head.1.0", "ablate", set()),
    ("%explore", "explore", set()),
    ('%graph "x y" --transcoders {tcs}', "graph", set()),
    ("%interchange {data} resid_post.1@-1", "interchange", set()),
    ("%das {data} resid_post.1@-1", "das", set()),
    ('%%trace "x y"\nlogits = model["logits"].save()', "trace", set()),
]


@pytest.mark.parametrize("line, method, passed", MINIMAL, ids=[m for _, m, _ in MINIMAL])
def test_every_magic_leaves_the_defaults_to_its_api(shell, llama, monkeypatch, line, method, passed):
    from mechnb.methods.weights import FactoredMatrix

    calls = []
    original = getattr(llama, method)

    def recording(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(llama, method, recording, raising=False)
    pairs = []
    monkeypatch.setattr(FactoredMatrix, "top_pairs",
                        lambda self, *a, _top=FactoredMatrix.top_pairs, **kw: pairs.append((a, kw)) or _top(self, *a, **kw))
    from test_graphs import random_set

    from test_causal_model import pronoun_model

    shell.user_ns.update(clean=PROMPT, corrupt=PROMPT.replace("John gave", "Mary gave"), v=torch.zeros(32),
                         texts=[PROMPT, PARIS], tcs=random_set(llama),
                         data=pronoun_model().counterfactuals(10, intervene="gender", seed=0))
    try:
        result = run(shell, line)
        assert result.success, result.error_in_exec
    finally:
        llama.clear()
    assert len(calls) == 1 and set(calls[0]) == passed, calls
    assert all(a == () and kw == {} for a, kw in pairs), pairs  # %ov, %qk: top_pairs' own defaults


def test_stability_magic_leaves_the_defaults_to_quality(shell, llama, monkeypatch):
    from mechnb.circuits import Circuit

    circuit = llama.circuit(PROMPT, PROMPT.replace("John gave", "Mary gave"), " Mary", " John", method="eap")
    calls = []
    monkeypatch.setattr(Circuit, "quality", lambda self, *a, **kw: calls.append((a, kw)) or "table")
    shell.user_ns["circ"] = circuit
    assert run(shell, "%stability {circ}").result == "table"
    assert calls == [((), {})]


def test_magics_take_transformerlens_hook_names(shell, llama):
    table = run(shell, "%ablate blocks.1.attn.hook_z").result
    assert list(table["site"]) == ["head.1 (blocks.1.attn.hook_z)"]
    assert run(shell, "%interventions --clear").success
