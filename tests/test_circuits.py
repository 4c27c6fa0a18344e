"""Circuit discovery: the graph, reader gradients and patched runs against a hand-written
Llama forward with one input per head, Gemma's heads (whose sum is normalised) against a
reference built from its own modules with the norm's scale frozen, faithfulness end points
on every family, the Circuit object, errors, and the greater-than behaviour of the embedded
model (its IOI circuit against random edges is checked where tutorial 05 runs it)."""

from __future__ import annotations

import pytest
import torch

from conftest import ARCH_NAMES, PROMPT, hooks_left

from mechnb import CircuitError, ModelError
from mechnb.circuits import Circuit, Graph
from mechnb.circuits import engine

CLEAN = [PROMPT, "When Alice and Bob went to the park, Bob gave a ball to"]
CORRUPT = [PROMPT.replace("John gave", "Mary gave"), "When Alice and Bob went to the park, Alice gave a ball to"]
ANSWERS, WRONGS = [" Mary", " Alice"], [" John", " Bob"]
GEMMAS = ["gemma2", "gemma3_text"]


def test_graph_counts_writers_readers_and_edges_of_the_embedded_model_shape():
    graph = Graph(n_layers=30, n_heads=9, parallel=False)
    assert (graph.n_upstream, graph.n_downstream, graph.n_edges) == (301, 841, 123211)
    assert graph.upstream[graph.head(2, 3)] == "head.2.3"
    assert graph.downstream[graph.head_input(2, "k", 3)] == "head.2.3:k"
    assert graph.downstream[graph.mlp_input(4)] == "mlp_out.4"


def test_graph_heads_feed_their_own_mlp_only_when_attention_and_mlp_are_sequential():
    sequential, parallel = Graph(2, 2, False), Graph(2, 2, True)
    head, mlp = sequential.head(1, 0), sequential.mlp_input(1)
    assert sequential.valid[head, mlp] and not parallel.valid[head, mlp]
    assert not sequential.valid[head, sequential.head_input(1, "q", 1)]  # same layer's heads
    assert sequential.valid[head, sequential.logits_input]


def test_prune_keeps_only_edges_on_a_path_from_embed_to_logits():
    graph = Graph(2, 2, False)
    kept = torch.zeros_like(graph.valid)
    on_path = [(0, graph.head_input(0, "q", 1)), (graph.head(0, 1), graph.logits_input)]
    dangling_out = (graph.head(1, 0), graph.logits_input)          # head.1.0 reads nothing kept
    dangling_in = (0, graph.mlp_input(1))                            # mlp_out.1 feeds nothing kept
    for u, v in on_path + [dangling_out, dangling_in]:
        kept[u, v] = True
    pruned = graph.prune(kept)
    assert {tuple(e) for e in pruned.nonzero().tolist()} == set(on_path)


# -- a hand-written Llama forward in which every head reads its own q, k, v inputs -------------

def hand_llama(hf, ids, change=lambda name, x: x, record=None):
    """Last-position logits; `change(reader, x)` gives a reader's input from the residual
    `x` (readers named as in `Graph.downstream`); `record` receives writer outputs."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    config = hf.config
    n_heads, n_kv = config.num_attention_heads, config.num_key_value_heads
    d_head = config.hidden_size // n_heads
    positions = ids.shape[1]
    record = {} if record is None else record
    x = hf.model.embed_tokens(ids)
    record["embed"] = x
    cos, sin = hf.model.rotary_emb(x, torch.arange(positions)[None])
    causal = torch.full((positions, positions), float("-inf")).triu(1)
    for layer_index, layer in enumerate(hf.model.layers):
        attn, outputs = layer.self_attn, []
        for h in range(n_heads):
            group = h // (n_heads // n_kv)
            normed = {kind: layer.input_layernorm(change(f"head.{layer_index}.{h}:{kind}", x)) for kind in "qkv"}
            q = normed["q"] @ attn.q_proj.weight[h * d_head:(h + 1) * d_head].T
            k = normed["k"] @ attn.k_proj.weight[group * d_head:(group + 1) * d_head].T
            v = normed["v"] @ attn.v_proj.weight[group * d_head:(group + 1) * d_head].T
            q, k = apply_rotary_pos_emb(q[:, None], k[:, None], cos, sin)
            pattern = torch.softmax(q[:, 0] @ k[:, 0].transpose(1, 2) * d_head ** -0.5 + causal, -1)
            out = (pattern @ v) @ attn.o_proj.weight[:, h * d_head:(h + 1) * d_head].T
            record[f"head.{layer_index}.{h}"] = out
            outputs.append(out)
        x = x + sum(outputs)
        mlp_out = layer.mlp(layer.post_attention_layernorm(change(f"mlp_out.{layer_index}", x)))
        record[f"mlp_out.{layer_index}"] = mlp_out
        x = x + mlp_out
    return hf.lm_head(hf.model.norm(change("logits", x)))[0, -1]


def strong(model):
    """`model` with weights large enough for one edge to move the logits; Gemma's norms,
    which scale by `1 + weight` (zero at init), get gains other than 1."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.hf.named_parameters():
            if parameter.dim() == 2:
                parameter.mul_(6)
            elif model.hf.config.model_type.startswith("gemma") and name.endswith("norm.weight"):
                parameter.copy_(0.5 * torch.randn(parameter.shape, generator=generator))
    return model


@pytest.fixture()
def llama(tiny_factory):
    """A tiny Llama whose weights are large enough for one edge to move the logits."""
    return strong(tiny_factory("llama"))


def test_hand_forward_equals_the_model(llama):
    from mechnb.core.batch import Batch

    batch = Batch.of(llama.tokenizer, PROMPT)
    with torch.no_grad():
        expected = llama.hf(**batch.inputs("cpu")).logits[0, -1]
        assert torch.allclose(hand_llama(llama.hf, batch.input_ids), expected, atol=1e-5)


def test_reader_gradients_equal_autograd_through_separate_head_inputs(llama):
    from mechnb.core.batch import Batch

    graph = Graph.of(llama)
    batch = Batch.of(llama.tokenizer, PROMPT)
    readers = torch.zeros(graph.n_downstream, 1, batch.input_ids.shape[1], llama.d_model)
    metric = lambda logits: logits[:, 5] - logits[:, 7]
    engine.reader_gradients(llama, graph, batch, metric, engine.embeddings(llama, batch), readers)

    offsets = {name: torch.zeros(1, batch.input_ids.shape[1], llama.d_model, requires_grad=True)
               for name in graph.downstream}
    logits = hand_llama(llama.hf, batch.input_ids, lambda name, x: x + offsets[name])
    (logits[5] - logits[7]).backward()
    for column, name in enumerate(graph.downstream):
        assert torch.allclose(readers[column], offsets[name].grad, atol=1e-5, rtol=1e-4), name
    assert readers[graph.head_input(1, "k", 2)].abs().sum() > 0


@pytest.mark.parametrize("edge", [("head.0.1", "head.1.2:k"), ("embed", "head.2.3:v"),
                                  ("mlp_out.0", "head.1.0:q"), ("head.1.3", "mlp_out.1"),
                                  ("head.2.0", "logits")])
def test_patching_one_edge_equals_the_hand_written_reference(llama, edge):
    from mechnb.core.batch import Batch

    graph = Graph.of(llama)
    clean, corrupt = Batch.of(llama.tokenizer, CLEAN[0]), Batch.of(llama.tokenizer, CORRUPT[0])
    upstream, reader = edge
    removed = torch.zeros_like(graph.valid)
    removed[graph.upstream.index(upstream), graph.downstream.index(reader)] = True
    corrupt_outputs = engine.writer_outputs(llama, graph, corrupt)
    patched = engine.patched_logits(llama, graph, clean, corrupt_outputs, removed)[0]

    with torch.no_grad():
        clean_record, corrupt_record = {}, {}
        hand_llama(llama.hf, clean.input_ids, record=clean_record)
        plain = hand_llama(llama.hf, corrupt.input_ids, record=corrupt_record)
        difference = clean_record[upstream] - corrupt_record[upstream]
        expected = hand_llama(llama.hf, clean.input_ids,
                              lambda name, x: x - difference if name == reader else x)
    with torch.no_grad():
        unpatched = llama.hf(**clean.inputs("cpu")).logits[0, -1]
    effect = (expected - unpatched).abs().max().item()
    assert effect > 1e-3  # the edge matters
    assert torch.allclose(patched - unpatched, expected - unpatched, atol=0.01 * effect)
    assert not torch.allclose(expected, plain, atol=1e-2)


@pytest.mark.parametrize("name", ARCH_NAMES)
def test_faithfulness_is_one_with_every_edge_and_the_corrupt_run_with_none(tiny_factory, name):
    from mechnb.core.batch import Batch

    model = tiny_factory(name)
    circuit = model.circuit(CLEAN, CORRUPT, ANSWERS, WRONGS, method="eap")
    # faithfulness takes these two from the task's runs instead of patching: the patched
    # run must agree, with no edge removed and with every one
    graph = circuit.graph
    clean, corrupt = Batch.of(model.tokenizer, CLEAN), Batch.of(model.tokenizer, CORRUPT)
    corrupt_outputs = engine.writer_outputs(model, graph, corrupt)
    none = engine.patched_logits(model, graph, clean, corrupt_outputs, torch.zeros_like(graph.valid))
    every = engine.patched_logits(model, graph, clean, corrupt_outputs, graph.valid.clone())
    apart = (circuit.task.clean_logits - circuit.task.corrupt_logits).abs().max().item()
    assert apart > 1e-4  # random weights: small logits, but the two runs differ
    assert torch.allclose(none.float(), circuit.task.clean_logits, atol=1e-3 * apart)
    assert torch.allclose(every.float(), circuit.task.corrupt_logits, atol=1e-3 * apart)
    curve = circuit.faithfulness(fractions=(0.05, 0.5, 1.0), progress=False)
    assert curve.values[-1].item() == 1
    assert curve.meta["empty_metric"] == circuit.task.corrupt_metric
    assert curve.df["kept"].tolist()[-1] == circuit.graph.n_edges
    assert circuit.scores.shape == (circuit.graph.n_upstream, circuit.graph.n_downstream)
    assert torch.isnan(circuit.scores[~circuit.graph.valid]).all()
    assert not torch.isnan(circuit.scores[circuit.graph.valid]).any()


# -- Gemma: the heads' sum is normalised; each head's write is frozen at the run's scale ---------

def gemma_apart(name, tokenizer):
    """A tiny strong Gemma with one key and value head per query head, so that a reference
    can change one head's key or value through the projection's output."""
    import transformers

    from conftest import TINY_CONFIGS
    from mechnb.model import Model

    cls_name, kwargs = TINY_CONFIGS[name]
    config = getattr(transformers, cls_name)(vocab_size=len(tokenizer),
                                             **{**kwargs, "num_key_value_heads": kwargs["num_attention_heads"]})
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    return strong(Model(hf, tokenizer, name=f"tiny-{name}-apart"))


def gemma_record(hf, ids, deltas=None):
    """Last-position logits of `ids` and the run's record (embeddings, each layer's input,
    its heads' z and sum, its MLP's normed output), with `deltas[reader]` subtracted from
    that reader's input (readers named as in `Graph.downstream`), through plain torch hooks."""
    import torch.nn.functional as F

    deltas, record, hooks = deltas or {}, {}, []
    d_head = hf.config.head_dim

    def keep(key):
        return lambda module, args, output: record.__setitem__(key, output)

    def minus(delta):
        return lambda module, args: (args[0] - delta, *args[1:])

    def one_head(layer, l, h, delta):
        def hook(projection, args, output):  # this head's columns read x - delta, the others x
            moved = F.linear(layer.input_layernorm(record[("x", l)] - delta), projection.weight, projection.bias)
            output = output.clone()
            output[..., h * d_head:(h + 1) * d_head] = moved[..., h * d_head:(h + 1) * d_head]
            return output

        return hook

    hooks.append(hf.model.embed_tokens.register_forward_hook(keep("embed")))
    for l, layer in enumerate(hf.model.layers):
        hooks.append(layer.register_forward_pre_hook(lambda module, args, l=l: record.__setitem__(("x", l), args[0])))
        hooks.append(layer.self_attn.o_proj.register_forward_hook(
            lambda module, args, output, l=l: record.update({("z", l): args[0], ("sum", l): output})))
        hooks.append(layer.post_feedforward_layernorm.register_forward_hook(keep(("mlp", l))))
        if f"mlp_out.{l}" in deltas:
            hooks.append(layer.pre_feedforward_layernorm.register_forward_pre_hook(minus(deltas[f"mlp_out.{l}"])))
        for h in range(hf.config.num_attention_heads):
            for kind in "qkv":
                if f"head.{l}.{h}:{kind}" in deltas:
                    hooks.append(getattr(layer.self_attn, f"{kind}_proj").register_forward_hook(
                        one_head(layer, l, h, deltas[f"head.{l}.{h}:{kind}"])))
    if "logits" in deltas:
        hooks.append(hf.model.norm.register_forward_pre_hook(minus(deltas["logits"])))
    try:
        with torch.no_grad():
            logits = hf(input_ids=ids).logits[0, -1]
    finally:
        for hook in hooks:
            hook.remove()
    return logits, record


def gemma_writes(hf, record, scales):
    """Each writer's write in a recorded run, heads through the post-attention norm with the
    scale of the run `scales` (a record): share of o_proj * (1 + w) / rms(that run's heads' sum)."""
    d_head = hf.config.head_dim
    writes = {"embed": record["embed"]}
    for l, layer in enumerate(hf.model.layers):
        norm = layer.post_attention_layernorm
        scale = torch.rsqrt(scales[("sum", l)].pow(2).mean(-1, keepdim=True) + norm.eps)
        for h in range(hf.config.num_attention_heads):
            share = record[("z", l)][..., h * d_head:(h + 1) * d_head] @ \
                layer.self_attn.o_proj.weight[:, h * d_head:(h + 1) * d_head].T
            writes[f"head.{l}.{h}"] = share * scale * (1 + norm.weight)
        writes[f"mlp_out.{l}"] = record[("mlp", l)]
    return writes


def gemma_reference(hf, clean_ids, corrupt_ids, edges):
    """Clean last-position logits with each edge `(writer, reader)` carrying corrupt's write,
    the heads' at the patched run's own scale: the run is repeated until it agrees with the
    writes it is patched with (each pass settles one more layer)."""
    _, corrupt = gemma_record(hf, corrupt_ids)
    deltas = {}
    for _ in range(len(hf.model.layers) + 1):
        _, patched = gemma_record(hf, clean_ids, deltas)
        mine, theirs = gemma_writes(hf, patched, patched), gemma_writes(hf, corrupt, patched)
        deltas = {}
        for writer, reader in edges:
            deltas[reader] = deltas.get(reader, 0) + mine[writer] - theirs[writer]
    return gemma_record(hf, clean_ids, deltas)[0]


@pytest.mark.parametrize("name", GEMMAS)
def test_gemma_heads_writes_add_up_to_the_post_attention_norms_output(tiny_factory, name):
    from mechnb.core.batch import Batch

    model = strong(tiny_factory(name))
    graph = Graph.of(model)
    batch = Batch.of(model.tokenizer, CLEAN)
    writers = engine.writer_outputs(model, graph, batch)
    outputs = {}
    hooks = [layer.post_attention_layernorm.register_forward_hook(
        lambda module, args, output, l=l: outputs.__setitem__(l, output)) for l, layer in enumerate(model.hf.model.layers)]
    try:
        with torch.no_grad():
            model.hf(**batch.inputs("cpu"))
    finally:
        for hook in hooks:
            hook.remove()
    for layer in range(graph.n_layers):
        first = graph.head(layer, 0)
        heads = writers.outputs[first:first + graph.n_heads] * writers.scales[layer][None, :, :, None]
        assert torch.allclose(heads.sum(0), outputs[layer], atol=1e-5), layer
    assert not torch.allclose(writers.scales, torch.ones_like(writers.scales), atol=0.1)


@pytest.mark.parametrize("name", GEMMAS)
@pytest.mark.parametrize("edges", [
    [("head.0.1", "head.1.2:k")], [("embed", "head.1.3:v")], [("mlp_out.0", "head.1.0:q")],
    [("head.1.3", "mlp_out.1")], [("head.2.0", "logits")],
    # head.1.2's query moves layer 1's scale: head.1.0's corrupt write is seen through it
    [("head.0.1", "head.1.2:q"), ("head.1.2", "logits"), ("head.1.0", "logits"), ("head.1.0", "mlp_out.2")],
], ids=lambda edges: "+".join(f"{u}>{v}" for u, v in edges))
def test_patching_gemma_edges_equals_the_reference_at_the_patched_runs_scale(tokenizer, name, edges):
    from mechnb.core.batch import Batch

    model = gemma_apart(name, tokenizer)
    graph = Graph.of(model)
    clean, corrupt = Batch.of(model.tokenizer, CLEAN[0]), Batch.of(model.tokenizer, CORRUPT[0])
    removed = torch.zeros_like(graph.valid)
    for upstream, reader in edges:
        removed[graph.upstream.index(upstream), graph.downstream.index(reader)] = True
    patched = engine.patched_logits(model, graph, clean, engine.writer_outputs(model, graph, corrupt), removed)[0]
    expected = gemma_reference(model.hf, clean.input_ids, corrupt.input_ids, edges)
    unpatched, _ = gemma_record(model.hf, clean.input_ids)
    effect = (expected - unpatched).abs().max().item()
    assert effect > 1e-3  # the edges matter
    assert torch.allclose(patched - unpatched, expected - unpatched, atol=0.01 * effect)


@pytest.mark.parametrize("name", GEMMAS)
def test_gemma_eap_scores_are_the_gradient_times_the_difference_at_the_clean_scale(tiny_factory, name):
    from mechnb.core.batch import Batch

    model = strong(tiny_factory(name))
    circuit = model.circuit(CLEAN[:1], CORRUPT[:1], ANSWERS[0], WRONGS[0], method="eap")
    clean, corrupt = Batch.of(model.tokenizer, CLEAN[0]), Batch.of(model.tokenizer, CORRUPT[0])
    hf = model.hf
    _, clean_record = gemma_record(hf, clean.input_ids)
    _, corrupt_record = gemma_record(hf, corrupt.input_ids)
    mine, theirs = gemma_writes(hf, clean_record, clean_record), gemma_writes(hf, corrupt_record, clean_record)
    mary, john = (model.tokenizer.encode(t, add_special_tokens=False)[0] for t in (ANSWERS[0], WRONGS[0]))
    graph = circuit.graph
    for writer, reader, norm in (("head.0.3", "mlp_out.1", hf.model.layers[1].pre_feedforward_layernorm),
                                 ("head.1.2", "logits", hf.model.norm)):
        offset = torch.zeros(1, clean.input_ids.shape[1], model.d_model, requires_grad=True)
        hook = norm.register_forward_pre_hook(lambda module, args: (args[0] + offset,))
        try:
            logits = hf(input_ids=clean.input_ids).logits[0, -1]
        finally:
            hook.remove()
        (logits[mary] - logits[john]).backward()
        expected = ((mine[writer] - theirs[writer]) * offset.grad).sum()
        got = circuit.scores[graph.upstream.index(writer), graph.downstream.index(reader)]
        assert abs(expected) > 1e-4
        assert torch.isclose(got, expected, atol=1e-5, rtol=1e-4), reader


def test_a_norm_of_the_heads_circuits_cannot_freeze_is_a_clear_error(tiny_factory):
    from mechnb.core.batch import Batch

    model = tiny_factory("gemma2")
    for layer in model.hf.model.layers:
        layer.post_attention_layernorm = torch.nn.LayerNorm(model.d_model)
    with torch.no_grad():
        before = model.hf(**Batch.of(model.tokenizer, PROMPT).inputs("cpu")).logits
    with pytest.raises(ModelError, match="post_attention_layernorm by freezing a Gemma RMSNorm's scale.*LayerNorm"):
        model.circuit(CLEAN, CORRUPT, ANSWERS, WRONGS, method="eap")
    _clean_state(model, before)


def test_eap_scores_are_gradient_times_output_difference(llama):
    circuit = llama.circuit(CLEAN[:1], CORRUPT[:1], ANSWERS[0], WRONGS[0], method="eap")
    from mechnb.core.batch import Batch

    clean, corrupt = Batch.of(llama.tokenizer, CLEAN[0]), Batch.of(llama.tokenizer, CORRUPT[0])
    with torch.no_grad():
        clean_record, corrupt_record = {}, {}
        hand_llama(llama.hf, clean.input_ids, record=clean_record)
        hand_llama(llama.hf, corrupt.input_ids, record=corrupt_record)
    mary, john = (llama.tokenizer.encode(t, add_special_tokens=False)[0] for t in (ANSWERS[0], WRONGS[0]))
    offset = torch.zeros(1, clean.input_ids.shape[1], llama.d_model, requires_grad=True)
    logits = hand_llama(llama.hf, clean.input_ids, lambda name, x: x + offset if name == "head.2.1:q" else x)
    (logits[mary] - logits[john]).backward()
    expected = ((clean_record["head.0.3"] - corrupt_record["head.0.3"]) * offset.grad).sum()
    graph = circuit.graph
    got = circuit.scores[graph.upstream.index("head.0.3"), graph.downstream.index("head.2.1:q")]
    assert torch.isclose(got, expected, atol=1e-5, rtol=1e-4)


def test_eap_ig_and_gim_differ_from_eap_and_node_scores_sum_edges(llama):
    eap = llama.circuit(CLEAN, CORRUPT, ANSWERS, WRONGS, method="eap")
    ig = llama.circuit(CLEAN, CORRUPT, ANSWERS, WRONGS, method="eap-ig", steps=3)
    gim = llama.circuit(CLEAN, CORRUPT, ANSWERS, WRONGS, method="gim")
    valid = eap.graph.valid
    assert not torch.allclose(eap.scores[valid], ig.scores[valid])
    assert not torch.allclose(eap.scores[valid], gim.scores[valid])
    nodes = llama.circuit(CLEAN, CORRUPT, ANSWERS, WRONGS, method="eap", level="node")
    assert torch.allclose(nodes.scores, eap.scores.nan_to_num().sum(1), atol=1e-5)
    assert list(nodes.df.columns) == ["node", "score"]


@pytest.mark.parametrize("name", ["llama"] + GEMMAS)
def test_eap_ig_adds_up_to_the_total_effect_as_its_steps_grow(tiny_factory, name):
    # Integrated gradients along the input path (completeness): the embeddings' edges,
    # which carry the integration variable to every reader, add up to
    # metric(clean) - metric(corrupt) as the steps grow. The sum over the points k/steps
    # is off by about c/steps, so twice the 32-step total minus the 16-step one removes
    # that term (Richardson): within 2 % where 64 steps alone miss by 4 % on Gemma 3.
    model = strong(tiny_factory(name))
    circuits = [model.circuit(CLEAN[0], CORRUPT[0], ANSWERS[0], WRONGS[0], method="eap-ig", steps=steps)
                for steps in (16, 32)]
    coarse, fine = (circuit.scores[0].nansum().item() for circuit in circuits)
    task = circuits[0].task
    effect = task.clean_metric - task.corrupt_metric
    assert abs(effect) > 1e-3
    assert abs(2 * fine - coarse - effect) < 0.02 * abs(effect)


@pytest.mark.parametrize("name", ["llama"] + GEMMAS)
def test_exact_node_scores_are_the_drop_when_one_node_is_corrupted(tiny_factory, name):
    # On Gemma too: a node patch recomputes the heads' norm, nothing is frozen.
    model = strong(tiny_factory(name))
    circuit = model.circuit(CLEAN[0], CORRUPT[0], ANSWERS[0], WRONGS[0], method="exact", level="node")
    graph = circuit.graph
    mary, john = (model.tokenizer.encode(t, add_special_tokens=False)[0] for t in (ANSWERS[0], WRONGS[0]))
    for node, site in ((graph.head(1, 2), "head.1.2"), (graph.mlp(0), "mlp_out.0")):
        with model.trace(CORRUPT[0]):
            corrupt_value = model[site].save()
        with model.trace(CLEAN[0]):
            model[site] = corrupt_value
            logits = model["logits@-1"].save()
        expected = circuit.task.clean_metric - (logits[0, mary] - logits[0, john]).item()
        assert abs(expected) > 1e-4, site
        assert abs(circuit.scores[node].item() - expected) < 1e-4, site


def test_top_df_plot_save_and_load(llama, tmp_path):
    import matplotlib.pyplot as plt

    circuit = llama.circuit(CLEAN, CORRUPT, ANSWERS, WRONGS, method="eap")
    top = circuit.top("10%")
    assert 0 < top.n_kept <= int(0.1 * circuit.n_items)
    df = top.df
    assert list(df.columns) == ["edge", "upstream", "downstream", "input", "score"]
    assert df["score"].abs().is_monotonic_decreasing and len(df) == top.n_kept
    assert set(df["input"].dropna()) <= {"q", "k", "v"}
    assert circuit.top(5).n_kept <= 5 and circuit.top(0.0).n_kept == 0
    figure = top.plot()
    assert figure.axes[0].lines
    plt.close(figure)
    bundle = top._repr_mimebundle_()
    assert "image/png" in bundle["text/html"] and "edges kept" in bundle["text/plain"]

    path = top.save(tmp_path / "circuit.json")
    loaded = Circuit.load(path, llama)
    assert torch.equal(loaded.kept, top.kept)
    assert torch.allclose(loaded.scores.nan_to_num(), circuit.scores.nan_to_num())
    assert loaded.df.equals(top.df)
    first = top.faithfulness(fractions=(0.1, 1.0), progress=False).values
    assert torch.allclose(loaded.faithfulness(fractions=(0.1, 1.0), progress=False).values, first, atol=1e-5)
    with pytest.raises(CircuitError, match="no model"):
        Circuit.load(path).faithfulness()


def test_random_ranking_and_cpr_cmd_follow_the_trapezoid_rule(llama):
    circuit = llama.circuit(CLEAN, CORRUPT, ANSWERS, WRONGS, method="eap")
    curve = circuit.randomized(seed=1).faithfulness(fractions=(0.1, 0.5, 1.0), progress=False)
    x, f = curve.meta["x"], curve.values.tolist()
    cpr = sum((x[i + 1] - x[i]) * (f[i] + f[i + 1]) / 2 for i in range(2))
    cmd = sum((x[i + 1] - x[i]) * (abs(1 - f[i]) + abs(1 - f[i + 1])) / 2 for i in range(2))
    assert abs(curve.meta["cpr"] - cpr) < 1e-6 and abs(curve.meta["cmd"] - cmd) < 1e-6
    assert curve.meta["method"] == "random"


def _clean_state(model, before):
    from mechnb.core.batch import Batch

    batch = Batch.of(model.tokenizer, PROMPT)
    with torch.no_grad():
        after = model.hf(**batch.inputs("cpu")).logits
    assert torch.equal(after, before)
    assert hooks_left(model) == 0
    for module in model.hf.modules():
        assert not hasattr(module, "mechnb_split") and not hasattr(module, "mechnb_capture")


@pytest.mark.parametrize("call, message", [
    (lambda m: m.circuit(PROMPT, "When Mary went", " Mary", " John"), "different lengths"),
    (lambda m: m.circuit(CLEAN, CORRUPT, " Mary Ann", " John"), "2 tokens"),
    (lambda m: m.circuit(CLEAN, CORRUPT, ANSWERS, WRONGS, method="acdc"), "unknown circuit method"),
    (lambda m: m.circuit(CLEAN, CORRUPT, ANSWERS, WRONGS, method="exact"), "level='node'"),
    (lambda m: m.circuit(CLEAN, CORRUPT, ANSWERS, WRONGS, steps=0), "steps"),
    (lambda m: m.circuit(CLEAN, CORRUPT, ANSWERS[:1] * 3, WRONGS), "3 answers for 2"),
    (lambda m: m.circuit(CLEAN, CORRUPT, ANSWERS, None), "needs a wrong token"),
    (lambda m: m.circuit(CLEAN, CORRUPT, ANSWERS, WRONGS, method="eap").top("two%"), "percentage"),
    (lambda m: m.circuit(CLEAN, CORRUPT, ANSWERS, WRONGS, method="eap").top(1.5), "top()"),
    (lambda m: m.circuit(CLEAN, CORRUPT, ANSWERS, WRONGS, method="eap").faithfulness((0.5, 0.1)),
     "fractions must increase"),
    (lambda m: m.circuit(CLEAN, CORRUPT, ANSWERS, WRONGS, method="eap",
                         metric=lambda logits: logits[:, 0] * 0).faithfulness((0.5, 1.0), progress=False),
     "divides by their difference"),
])
def test_bad_input_gets_a_clear_error_and_leaves_the_model_clean(llama, call, message):
    from mechnb.core.batch import Batch

    with torch.no_grad():
        before = llama.hf(**Batch.of(llama.tokenizer, PROMPT).inputs("cpu")).logits
    with pytest.raises(CircuitError, match=message):
        call(llama)
    _clean_state(llama, before)


@pytest.mark.parametrize("name", ["llama"] + GEMMAS)
def test_an_exception_inside_a_patched_run_leaves_the_model_clean(tiny_factory, name):
    from mechnb.core.batch import Batch

    model = strong(tiny_factory(name))
    with torch.no_grad():
        before = model.hf(**Batch.of(model.tokenizer, PROMPT).inputs("cpu")).logits
    circuit = model.circuit(CLEAN, CORRUPT, ANSWERS, WRONGS, method="eap")
    calls = []

    def failing(logits):
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return logits[:, 0]

    circuit.task.metrics[0].fn = failing
    with pytest.raises(KeyboardInterrupt):
        circuit.faithfulness(fractions=(0.1, 0.5), progress=False)
    _clean_state(model, before)


def test_greater_than_pairs_differ_only_in_the_start_year(tokenizer):
    from mechnb.datasets import greater_than

    pairs = greater_than(12, tokenizer, seed=3)
    for pair in pairs:
        clean, corrupt = tokenizer.encode(pair["clean"]), tokenizer.encode(pair["corrupt"])
        assert len(clean) == len(corrupt)
        differing = [i for i, (a, b) in enumerate(zip(clean, corrupt)) if a != b]
        assert differing and all(tokenizer.decode([clean[i]]).strip().isdigit() for i in differing)
        tens = pair["year"] // 10
        assert pair["answer"] == {str(d) for d in range(tens + 1, 10)}
        assert pair["wrong"] == {str(d) for d in range(tens)}


@pytest.mark.slow
def test_embedded_model_prefers_later_years_in_greater_than(real):
    from mechnb.datasets import greater_than
    from mechnb.circuits import Task

    pairs = greater_than(16, real.tokenizer, seed=0)
    task = Task(real, [p["clean"] for p in pairs], [p["corrupt"] for p in pairs],
                [p["answer"] for p in pairs], [p["wrong"] for p in pairs], "prob_diff")
    clean = task.metric(task.clean_logits)
    assert (clean > 0).sum() >= 12
    assert task.corrupt_metric < 0 < task.clean_metric


def test_stability_is_one_for_a_resample_of_one_pair_and_varies_with_steps(llama):
    circuit = llama.circuit(CLEAN[0], CORRUPT[0], ANSWERS[0], WRONGS[0], method="eap-ig", steps=2)
    result = circuit.stability(n_resamples=2, top=20)
    assert result.df.variation.tolist() == ["resample 0", "resample 1", "steps 1", "steps 4"]
    assert result.meta["resample_mean"] == 1.0  # one pair resampled is the same pair
    assert 0 <= result.meta["steps_mean"] <= 1
    both = llama.circuit(CLEAN, CORRUPT, ANSWERS, WRONGS, method="eap")
    table = both.quality(fractions=(0.1, 1.0), n_resamples=2)
    assert list(table.columns) == ["method", "level", "pairs", "CPR", "CMD", "f at 0.1", "f at 1",
                                   "stability (resamples)", "stability (steps)"]
    assert 0 <= table["stability (resamples)"][0] <= 1 and table["f at 1"][0] == pytest.approx(1, abs=1e-4)
    with pytest.raises(CircuitError, match="random ranking"):
        both.randomized().stability()
