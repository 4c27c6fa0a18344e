"""Sparse autoencoders: collection, training, evaluation, files, and features as sites."""

import json
import warnings

import pytest
import torch

from conftest import PROMPT, clean_logits
from mechnb.core.arch import submodule
from mechnb import MechnbError, StoreError
from mechnb.sae import SAE, ActivationStore, load, train
from mechnb.sae.store import open_store

DOCS = [f"Document {i}: the quick brown fox jumps over the lazy dog, and the cat sat on mat {i}."
        for i in range(40)]


def sparse_data(n=20_000, d=32, n_features=64, active=3, seed=0):
    """Activations made of a few of many ground-truth directions: what an SAE should find."""
    g = torch.Generator().manual_seed(seed)
    directions = torch.nn.functional.normalize(torch.randn(n_features, d, generator=g), dim=-1)
    codes = torch.zeros(n, n_features)
    picks = torch.stack([torch.randperm(n_features, generator=g)[:active] for _ in range(n)])
    codes.scatter_(1, picks, torch.rand(n, active, generator=g) * 2 + 0.5)
    return codes @ directions * 3


@pytest.mark.parametrize("kind,kwargs", [("topk", dict(k=3)), ("batchtopk", dict(k=3)),
                                         ("relu", dict(l1=1.5)), ("jumprelu", dict(l1=0.1))])
def test_every_kind_learns_sparse_structure(kind, kwargs):
    data = sparse_data()
    sae = train(data, kind=kind, d_sae=128, batch_size=256, epochs=6, lr=3e-3, progress=False, **kwargs)
    x = data[:2000]
    features = sae.encode(x)
    fvu = ((sae.decode(features) - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item()
    l0 = (features > 0).float().sum(-1).mean().item()
    assert fvu < 0.25, (kind, fvu)
    assert l0 < 20, (kind, l0)
    if kind == "topk":
        assert ((features > 0).sum(-1) <= 3).all()
    assert list(sae.history.columns) == ["step", "tokens", "loss", "mse", "aux", "l0", "fvu", "dead",
                                         "lr", "seconds"]


def test_training_is_reproducible_with_a_seed():
    data = sparse_data(n=4000)
    one = train(data, kind="topk", d_sae=64, k=3, batch_size=256, seed=7, progress=False)
    two = train(data, kind="topk", d_sae=64, k=3, batch_size=256, seed=7, progress=False)
    three = train(data, kind="topk", d_sae=64, k=3, batch_size=256, seed=8, progress=False)
    assert torch.equal(one.W_enc, two.W_enc) and not torch.equal(one.W_enc, three.W_enc)


def test_decoder_rows_stay_unit_norm_in_training_units():
    data = sparse_data(n=4000)
    sae = train(data, kind="topk", d_sae=64, k=3, batch_size=256, progress=False)
    norms = sae.W_dec.norm(dim=-1) * sae.meta["scale"]  # the folded scale is uniform
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-4)


def test_interrupting_training_keeps_the_best_so_far():
    data = sparse_data(n=8000)

    class Interrupting(ActivationStore):
        def batches(self, batch_size, seed=0, buffer=0):
            for i, batch in enumerate(super().batches(batch_size, seed)):
                if i == 20:
                    raise KeyboardInterrupt
                yield batch

    store = Interrupting(data, len(data))
    sae = train(store, kind="topk", d_sae=64, k=3, batch_size=128, steps=100, progress=False)
    assert sae.meta["interrupted"] and sae.meta["steps"] == 20
    assert len(sae.history) == 2
    x = data[:1000]
    fvu = ((sae(x) - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item()
    assert abs(fvu - sae.history["fvu"].min()) < 0.2


def test_bad_data_and_arguments_are_clear():
    data = sparse_data(n=1000)
    data[5, 3] = float("nan")
    with pytest.raises(StoreError, match="NaN"):
        train(data, kind="topk", d_sae=16, k=2, progress=False)
    with pytest.raises(MechnbError, match="needs k"):
        train(sparse_data(n=100), kind="topk", d_sae=16, progress=False)
    with pytest.raises(MechnbError, match="unknown SAE kind"):
        train(sparse_data(n=100), kind="gated", d_sae=16, progress=False)
    sae = SAE(32, 64, kind="relu")
    with pytest.raises(MechnbError, match="reads 32-wide activations, got width 7"):
        sae.encode(torch.zeros(3, 7))


def test_save_and_load_round_trip(tmp_path):
    sae = train(sparse_data(n=2000), kind="jumprelu", d_sae=64, batch_size=256, progress=False)
    sae.site = "resid_post.1"
    loaded = load(sae.save(tmp_path / "sae"))
    x = sparse_data(n=100)
    assert torch.equal(loaded.encode(x), sae.encode(x)) and loaded.kind == "jumprelu"
    assert json.loads((tmp_path / "sae" / "cfg.json").read_text())["architecture"] == "jumprelu"
    assert loaded.history is not None


def test_load_a_directory_in_the_saelens_layout(tmp_path):
    from safetensors.torch import save_file

    d_in, d_sae = 32, 48
    tensors = {"W_enc": torch.randn(d_in, d_sae), "W_dec": torch.randn(d_sae, d_in),
               "b_enc": torch.randn(d_sae), "b_dec": torch.randn(d_in), "threshold": torch.rand(d_sae)}
    save_file(tensors, str(tmp_path / "sae_weights.safetensors"))
    (tmp_path / "cfg.json").write_text(json.dumps({
        "architecture": "jumprelu", "d_in": d_in, "d_sae": d_sae, "hook_name": "blocks.1.hook_resid_post",
        "hook_layer": 1, "dtype": "float32", "model_name": "tiny"}))
    sae = load(tmp_path)
    assert sae.site == "resid_post.1" and sae.kind == "jumprelu"
    x = torch.randn(5, d_in)
    pre = (x - tensors["b_dec"]) @ tensors["W_enc"] + tensors["b_enc"]
    assert torch.allclose(sae.encode(x), pre * (pre > tensors["threshold"]))
    with pytest.raises(MechnbError, match="not an SAE directory"):
        load(tmp_path / "missing")


def test_collect_keeps_real_tokens_and_stops_at_the_site(tiny_factory):
    model = tiny_factory("llama")
    calls = []
    handle = submodule(model.hf, model.arch.layers)[2].register_forward_hook(lambda *a: calls.append(1))
    try:
        store = model.collect("resid_post.1", DOCS[:4], n_tokens=10_000, progress=False, batch_size=2)
    finally:
        handle.remove()
    assert calls == []  # never ran past the site's layer
    lengths = [len(model.tokenizer(d, add_special_tokens=False)["input_ids"]) for d in DOCS[:4]]
    stream = sum(n + 1 for n in lengths)  # documents packed, EOS between them
    windows = -(-stream // 128)
    assert len(store) == stream - windows  # the first position of each window is dropped
    cache = model.cache(DOCS[0], "resid_post.1")
    assert torch.allclose(store.rows(0, lengths[0] - 1), cache["resid_post.1"][0, 1:], atol=1e-5)


def test_collect_to_disk_resumes_where_it_stopped(tiny_factory, tmp_path):
    model = tiny_factory("llama")

    def interrupted():
        for i, doc in enumerate(DOCS):
            if i == 20:
                raise KeyboardInterrupt
            yield doc

    with pytest.raises(KeyboardInterrupt):
        model.collect("resid_post.1", interrupted(), n_tokens=600, store=tmp_path, batch_size=1, progress=False)
    partial = open_store(tmp_path)
    assert 0 < len(partial) < 600
    store = model.collect("resid_post.1", DOCS, n_tokens=600, store=tmp_path, batch_size=1, progress=False)
    straight = model.collect("resid_post.1", DOCS, n_tokens=600, batch_size=1, progress=False)
    assert len(store) == 600
    assert torch.allclose(store.rows(0, 600), straight.rows(0, 600), atol=1e-5)
    with pytest.raises(StoreError, match="holds a store of resid_post.1"):
        model.collect("resid_post.2", DOCS, n_tokens=600, store=tmp_path, progress=False)


def test_collect_warns_when_the_texts_run_out(tiny_factory):
    model = tiny_factory("llama")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        store = model.collect("mlp_out.0", DOCS[:2], n_tokens=10_000, progress=False)
    assert len(store) < 10_000 and any("fewer than n_tokens" in str(w.message) for w in caught)
    with pytest.raises(MechnbError, match="one site"):
        model.collect("resid_post.*", DOCS, n_tokens=10, progress=False)


@pytest.fixture
def attached(tiny_factory):
    model = tiny_factory("llama")
    store = model.collect("resid_post.1", DOCS, n_tokens=800, progress=False)
    sae = train(store, kind="topk", d_sae=64, k=4, batch_size=128, epochs=2, progress=False)
    return model, sae


def test_an_attached_sae_leaves_the_output_unchanged(attached):
    model, sae = attached
    clean = clean_logits(model)
    model.attach(sae)
    assert model.saes == [sae]
    assert torch.allclose(clean_logits(model), clean, atol=1e-4)
    cache = model.cache(PROMPT, ["sae.1", "logits"])
    assert cache["sae.1"].shape == (1, 14, 64)
    assert torch.allclose(cache["sae.1.3"], cache["sae.1"][..., 3])
    assert ((cache["sae.1"] > 0).sum(-1) <= 4).all()
    model.detach(sae)
    assert model.saes == [] and torch.equal(clean_logits(model), clean)


def test_features_are_sites_for_traces_ablation_and_patching(attached):
    model, sae = attached
    model.attach(sae)
    cache = model.cache(PROMPT, "sae.1")
    feature = int(cache["sae.1"][0].sum(0).argmax())
    found = []
    with model.trace(PROMPT):
        found.append(model[f"sae.1.{feature}"].save())
        model[f"sae.1.{feature}"] = 0
        found.append(model["logits"].save())
    assert torch.allclose(found[0], cache[f"sae.1.{feature}"])
    intact = clean_logits(model)  # the SAE spliced in, the feature as it is
    model.ablate(f"sae.1.{feature}")
    assert torch.allclose(clean_logits(model), found[1], atol=1e-4)
    # Zeroing the feature moved the output: the check above compares with a changed forward.
    assert (intact - found[1]).abs().max() > 1e-3
    model.clear()  # removes the splice too
    model.attach(sae, name="first")
    corrupt = "When Mary and John went to the store, Mary gave a drink to"
    result = model.patch(PROMPT, corrupt, f"sae.first.{feature}", answer=" Mary", wrong=" John",
                         per_position=True)
    value = model.cache(PROMPT, "sae.1")[f"sae.1.{feature}@9"]
    with model.trace(corrupt):
        model[f"sae.1.{feature}@9"] = value
        logits = model["logits@-1"].save()
    mary, john = model.tokenizer.encode(" Mary")[0], model.tokenizer.encode(" John")[0]
    assert abs(result.values[0, 0, 9].item() - (logits[0, mary] - logits[0, john]).item()) < 1e-4


def test_attaching_checks_width_and_names(attached, tiny_factory):
    model, sae = attached
    with pytest.raises(MechnbError, match="64-wide|32-wide|wide"):
        model.attach(sae, site="neuron.1")
    model.attach(sae)
    with pytest.raises(MechnbError, match="already attached"):
        model.attach(sae)
    with pytest.raises(MechnbError, match="no attached SAE matches"):
        model.cache(PROMPT, "sae.2.0")


def test_evaluate_dashboard_and_features(attached):
    model, sae = attached
    table = sae.evaluate(model, DOCS, n_tokens=300)
    metrics = dict(zip(table["metric"], table["value"]))
    assert set(metrics) >= {"l0", "fvu", "cosine", "dead", "dense", "loss_clean", "loss_spliced",
                            "loss_zero", "loss_recovered"}
    assert metrics["l0"] <= 4 and metrics["loss_zero"] != metrics["loss_clean"]
    expected = (metrics["loss_zero"] - metrics["loss_spliced"]) / (metrics["loss_zero"] - metrics["loss_clean"])
    assert abs(metrics["loss_recovered"] - expected) < 1e-9
    from mechnb.sae.store import take_documents as _take_documents, windows as _windows

    windows = _windows(model, list(_take_documents(iter(DOCS), 300, model)), 128, int(metrics["tokens"]))
    with torch.no_grad():  # the model's own loss, window by window, weighted by predicted tokens
        own = sum(model.hf(input_ids=torch.tensor([w]), labels=torch.tensor([w])).loss.item() * (len(w) - 1)
                  for w in windows) / sum(len(w) - 1 for w in windows)
    assert abs(metrics["loss_clean"] - own) < 1e-4
    feature = int(sae.encode(model.collect("resid_post.1", DOCS[:3], n_tokens=100, progress=False)
                             .rows(0, 100)).sum(0).argmax())
    board = sae.dashboard(feature, model, DOCS + ["<script>alert(1)</script> is here"], n_tokens=400)
    assert board.meta["frequency"] > 0 and len(board.meta["promoted"]) == 10
    assert "<script>alert(1)</script>" not in board.html()
    listed = model.features("The quick <b>brown</b> fox", sae)
    assert set(listed.df.columns) >= {"pos", "token", "feature", "activation", "promotes"}
    assert "<b>brown</b>" not in listed.html()


@pytest.mark.parametrize("arch,site", [("llama", "resid_post.1"), ("llama", "mlp_out.0"),
                                       ("llama", "resid_pre.1"), ("gpt2", "attn_out.1")])
def test_evaluate_equals_whole_forwards_of_each_window(tiny_factory, arch, site):
    """The spliced and zero-ablated runs start at the site's layer: their losses, and the SAE's
    metrics, equal those of whole forwards of every window, one at a time."""
    from mechnb.core.engine import run
    from mechnb.core.sites import parse
    from mechnb.sae.store import take_documents, windows as windows_of

    model = tiny_factory(arch)
    generator = torch.Generator().manual_seed(0)
    sae = SAE(model.d_model, 32, kind="relu", site=site)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(model.d_model, 32, generator=generator) * 0.3)
        sae.W_dec.copy_(torch.randn(32, model.d_model, generator=generator) * 0.3)
    n_tokens = 150
    metrics = dict(sae.evaluate(model, DOCS, n_tokens=n_tokens, context=16, batch_size=3).values)
    windows = windows_of(model, list(take_documents(iter(DOCS), n_tokens, model)), 16, n_tokens)
    losses, values = [], []
    for replace in (None, lambda part: sae(part), torch.zeros_like):
        total = 0.0
        for window in windows:
            ids = torch.tensor([window])
            with run(model, [[""] * len(window)]) as forward:
                if replace is None:
                    forward.hook_site(parse(site), lambda value: values.append(value[0, 1:].detach()))
                    loss = model.hf(input_ids=ids, labels=ids).loss
                else:
                    with model.hooked(f"{site}@1:", replace):
                        loss = model.hf(input_ids=ids, labels=ids).loss
            total += loss.item() * (len(window) - 1)
        losses.append(total / sum(len(w) - 1 for w in windows))
    assert losses[1] != losses[0] != losses[2]
    for name, expected in zip(("loss_clean", "loss_spliced", "loss_zero"), losses):
        assert abs(metrics[name] - expected) < 1e-4 * max(1, abs(expected)), name
    x = torch.cat(values)[:n_tokens]
    with torch.no_grad():
        x_hat = sae(x)
    fvu = ((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item()
    assert metrics["tokens"] == n_tokens and abs(metrics["fvu"] - fvu) < 1e-4


def test_windows_stop_at_the_token_count_inside_a_long_document(tiny_factory):
    from mechnb.sae.store import windows

    long = " ".join(f"word{i}" for i in range(2000))  # one document of thousands of tokens
    cut = windows(tiny_factory("llama"), [long, "never reached"], 32, 100)
    kept = sum(len(w) - 1 for w in cut)
    assert 100 <= kept < 100 + 32 and all(len(w) <= 32 for w in cut)


def test_the_host_site_and_the_features_of_an_attached_sae_read_in_one_cache(tiny_factory):
    """A read of the host inside a trace replays the splice without calling the features' module
    (nnsight counts its calls), applying feature edits by hand: the host shows what the model sees."""
    import mechnb

    model = tiny_factory("llama")
    sae = mechnb.sae.SAE(32, 64, kind="relu", site="resid_post.1")
    torch.manual_seed(0)
    for p in (sae.W_enc, sae.W_dec):
        torch.nn.init.normal_(p, std=0.3)
    model.attach(sae)
    try:
        both = model.cache(PROMPT, ["resid_post.1", "sae.1"])
        assert torch.equal(both["sae.1"], model.cache(PROMPT, "sae.1")["sae.1"])
        assert torch.allclose(both["resid_post.1"], model.cache(PROMPT, "resid_post.1")["resid_post.1"])
        feature = int(both["sae.1"][0, -1].argmax())
        with model.ablated(f"sae.1.{feature}@-1"):
            edited = model.cache(PROMPT, ["resid_post.1", "sae.1", "resid_post.2"])
            downstream = model.cache(PROMPT, "resid_pre.2")["resid_pre.2"]
        # The host read shows the edited stream, which is what layer 2 reads.
        assert torch.allclose(edited["resid_post.1"], downstream, atol=1e-5)
        moved = both["resid_post.1"][0, -1] - edited["resid_post.1"][0, -1]
        expected = both["sae.1"][0, -1, feature] * sae.W_dec[feature]
        assert torch.allclose(moved, expected, atol=1e-4)
    finally:
        model.detach(sae)
