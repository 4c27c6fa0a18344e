"""Published SAEs and transcoders by name: each format read from a laid-out Hugging Face cache,
offline, against a hand-written reference of that format's own arithmetic."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mechnb
from conftest import PROMPT, clean_logits
from hubcache import lay_out
from mechnb import SAEError, TranscoderError


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A Hugging Face cache in tmp_path, offline: `hub(repo, {path: content})` lays out files."""
    from huggingface_hub import constants

    cache = tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return lambda repo, files: lay_out(cache, repo, files)


def weights(d_in=32, d_sae=64, seed=0, threshold=True):
    g = torch.Generator().manual_seed(seed)
    made = {"W_enc": torch.randn(d_in, d_sae, generator=g) / d_in ** 0.5,
            "W_dec": torch.randn(d_sae, d_in, generator=g) / d_sae ** 0.5,
            "b_enc": torch.randn(d_sae, generator=g) * 0.1, "b_dec": torch.randn(d_in, generator=g) * 0.1}
    if threshold:
        made["threshold"] = torch.rand(d_sae, generator=g) * 0.2
    return made


def jumprelu(pre, threshold):
    return torch.relu(pre) * (pre > threshold)


X = torch.randn(5, 32, generator=torch.Generator().manual_seed(1))


def test_a_gemma_scope_release_loads_by_name_offline_and_knows_its_site_and_model(hub, tiny_factory):
    w = weights()
    hub("google/gemma-scope-2b-pt-res", {"layer_1/width_16k/average_l0_71/params.npz": w})
    sae = mechnb.sae.load("gemma-scope-2b-pt-res", "layer_1/width_16k/average_l0_71")
    assert (sae.site, sae.model, sae.kind) == ("resid_post.1", "google/gemma-2-2b", "jumprelu")
    expected = jumprelu(X @ w["W_enc"] + w["b_enc"], w["threshold"])  # Gemma Scope does not subtract b_dec
    assert torch.allclose(sae.encode(X), expected, atol=1e-5)
    assert torch.allclose(sae.decode(expected), expected @ w["W_dec"] + w["b_dec"], atol=1e-5)
    again = mechnb.sae.load("google/gemma-scope-2b-pt-res", "layer_1/width_16k/average_l0_71")
    assert torch.equal(again.W_enc, sae.W_enc) and again.site == "resid_post.1"

    model = tiny_factory("gemma2")
    with pytest.raises(SAEError, match="trained on google/gemma-2-2b, not tiny-gemma2.*sae.model = None"):
        model.attach(sae)
    assert model.interventions == []
    sae.model = None
    clean = clean_logits(model)
    model.attach(sae)
    assert torch.allclose(clean_logits(model), clean, atol=1e-4)
    features = model.cache(PROMPT, "sae.1")["sae.1"]
    resid = model.cache(PROMPT, "resid_post.1")["resid_post.1"]
    assert torch.allclose(features, jumprelu(resid @ w["W_enc"] + w["b_enc"], w["threshold"]), atol=1e-4)
    model.detach(sae)


def test_gemma_scope_2_attention_sae_attaches_to_every_heads_z(hub, tiny_factory):
    w = weights()
    folder = "attn_out/layer_1_width_16k_l0_small"
    hub("google/gemma-scope-2-1b-pt", {f"{folder}/params.safetensors": {k.lower(): v for k, v in w.items()},
                                        f"{folder}/config.json": {
                                            "architecture": "jump_relu", "model_name": "tiny-gemma3_text",
                                            "hf_hook_point_in": "model.layers.1.self_attn.o_proj.input"}})
    sae = mechnb.sae.load("gemma-scope-2-1b-pt-att", "layer_1_width_16k_l0_small")
    assert (sae.site, sae.model) == ("head.1", "tiny-gemma3_text")
    model = tiny_factory("gemma3_text")
    clean = clean_logits(model)
    model.attach(sae)
    try:
        assert torch.allclose(clean_logits(model), clean, atol=1e-4)
        z = model.cache(PROMPT, "head.1")["head.1"].flatten(-2)
        features = model.cache(PROMPT, "sae.1")["sae.1"]
        assert torch.allclose(features, jumprelu(z @ w["W_enc"] + w["b_enc"], w["threshold"]), atol=1e-4)
        active = int(features[0, -1].argmax())
        with model.ablated(f"sae.1.{active}@-1"):
            assert (clean_logits(model) - clean).abs().max() > 1e-3
    finally:
        model.detach(sae)
    assert torch.equal(clean_logits(model), clean)


@pytest.mark.parametrize("layout", ["6.x", "old"])
def test_saelens_cfg_old_and_6x_place_the_sae_by_itself(hub, tiny_factory, layout):
    w = weights(threshold=False)
    hook = {"hook_name": "blocks.2.hook_resid_pre", "model_name": "tiny-llama"}
    cfg = {"architecture": "topk", "d_in": 32, "d_sae": 64, "k": 4, "apply_b_dec_to_input": True,
           "normalize_activations": "none"}
    cfg = {**cfg, "metadata": {**hook, "sae_lens_version": "6.5.0"}} if layout == "6.x" else {**cfg, **hook}
    hub("someone/tiny-saes", {"blocks.2/cfg.json": cfg, "blocks.2/sae_weights.safetensors": w})
    sae = mechnb.sae.load("someone/tiny-saes", "blocks.2")
    assert (sae.site, sae.model, sae.kind, sae.k) == ("resid_pre.2", "tiny-llama", "topk", 4)
    pre = (X - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    top = pre.topk(4, -1)
    assert torch.allclose(sae.encode(X), torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu()), atol=1e-5)
    model = tiny_factory("llama")
    model.attach(sae)
    assert [str(s) for s in mechnb.parse_site("sae.2.3").expand(model)] == ["sae.2.3"]
    model.detach(sae)


def test_gpt2_jb_release_folds_transformerlens_centring_into_the_encoder(hub):
    w = weights(threshold=False)
    cfg = {"d_in": 32, "d_sae": 64, "hook_point": "blocks.0.hook_resid_pre", "model_name": "gpt2-small",
           "apply_b_dec_to_input": True}  # an old SAELens file: no architecture, hook_point
    hub("jbloom/GPT2-Small-SAEs-Reformatted", {"blocks.0.hook_resid_pre/cfg.json": cfg,
                                               "blocks.0.hook_resid_pre/sae_weights.safetensors": w})
    sae = mechnb.sae.load("gpt2-small-res-jb", "blocks.0.hook_resid_pre")
    assert (sae.site, sae.kind) == ("resid_pre.0", "relu")
    centred = X - X.mean(-1, keepdim=True)
    expected = torch.relu((centred - w["b_dec"]) @ w["W_enc"] + w["b_enc"])
    assert torch.allclose(sae.encode(X), expected, atol=1e-5)
    from mechnb.core.hub import same_model

    assert same_model(sae.model, "openai-community/gpt2") and not same_model(sae.model, "gpt2-medium")


def test_sparsify_sae_reads_its_folder_and_run_settings(hub):
    g = torch.Generator().manual_seed(2)
    enc, bias = torch.randn(64, 32, generator=g) / 6, torch.randn(64, generator=g) * 0.1
    dec, b_dec = torch.randn(64, 32, generator=g) / 8, torch.randn(32, generator=g) * 0.1
    hub("EleutherAI/sae-tiny-llama", {
        "config.json": {"model": "tiny-llama", "layers": [1]},
        "layers.1/cfg.json": {"expansion_factor": 2, "normalize_decoder": True, "num_latents": 64, "k": 3, "d_in": 32},
        "layers.1/sae.safetensors": {"encoder.weight": enc, "encoder.bias": bias, "W_dec": dec, "b_dec": b_dec}})
    sae = mechnb.sae.load("EleutherAI/sae-tiny-llama", "layers.1")
    assert (sae.site, sae.model, sae.kind, sae.k) == ("resid_post.1", "tiny-llama", "topk", 3)
    pre = torch.relu((X - b_dec) @ enc.T + bias)
    top = pre.topk(3, -1)
    expected = torch.zeros_like(pre).scatter(-1, top.indices, top.values)
    assert torch.allclose(sae.encode(X), expected, atol=1e-5)
    assert torch.allclose(sae.decode(expected), expected @ dec + b_dec, atol=1e-5)


def test_llama_scope_folds_its_input_and_output_norms(hub):
    g = torch.Generator().manual_seed(3)
    enc, bias = torch.randn(64, 32, generator=g) / 6, torch.randn(64, generator=g) * 0.1
    dec, b_dec = torch.randn(32, 64, generator=g) / 8, torch.randn(32, generator=g) * 0.1
    folder = "Llama3_1-8B-Base-L1R-8x"
    hub("fnlp/Llama3_1-8B-Base-LXR-8x", {
        f"{folder}/hyperparams.json": {"d_model": 32, "d_sae": 64, "hook_point_in": "blocks.1.hook_resid_post",
                                       "hook_point_out": "blocks.1.hook_resid_post", "act_fn": "jumprelu",
                                       "jump_relu_threshold": 0.05, "norm_activation": "dataset-wise",
                                       "dataset_average_activation_norm": {"in": 3.0, "out": 2.0}},
        f"{folder}/checkpoints/final.safetensors": {"encoder.weight": enc, "encoder.bias": bias,
                                                   "decoder.weight": dec, "decoder.bias": b_dec}})
    sae = mechnb.sae.load("llama_scope_lxr_8x", "l1r_8x")
    assert (sae.site, sae.model) == ("resid_post.1", "meta-llama/Llama-3.1-8B")
    s_in, s_out = 32 ** 0.5 / 3.0, 32 ** 0.5 / 2.0
    pre = (s_in * X) @ enc.T + bias
    expected = jumprelu(pre, 0.05 * s_in)  # the threshold scaled as SAELens scales it
    assert torch.allclose(sae.encode(X), expected, atol=1e-5)
    assert torch.allclose(sae.decode(expected), (expected @ dec.T + b_dec) / s_out, atol=1e-5)


def test_missing_files_offline_and_bad_names_are_one_line_errors(hub):
    hub("google/gemma-scope-2b-pt-res", {"layer_1/width_16k/average_l0_71/params.npz": weights()})
    cases = [
        (("gemma-scope-2b-pt-res", "layer_3/width_16k/average_l0_9"),
         "no SAE or transcoder files in google/gemma-scope-2b-pt-res/layer_3/width_16k/average_l0_9 in the "
         "Hugging Face cache (offline)"),
        (("gemma-scope-2b-pt-res",), "name one of gemma-scope-2b-pt-res's saes: sae_id such as"),
        (("gemma-scope-2b-pt-transcoders", "layer_1/width_16k/average_l0_8"), "load them with mechnb.transcoders.load"),
        (("not-a-release",), "is not an SAE directory, a release mechnb knows"),
        (("google/gemma-scope-2b-pt-res", 3), "sae_id is the SAE's folder"),
    ]
    for args, message in cases:
        with pytest.raises(SAEError) as error:
            mechnb.sae.load(*args)
        assert message in str(error.value) and "\n" not in str(error.value), str(error.value)
    from mechnb.core.hub import fetch

    with pytest.raises(SAEError, match=r"^google/gemma-scope-2b-pt-res/nothing.npz is not in the Hugging Face "
                                       r"cache .* and the hub cannot be reached"):
        fetch("google/gemma-scope-2b-pt-res", "nothing.npz", SAEError)


def test_gemma_scope_2_transcoders_with_affine_skip_load_as_a_set(hub, tiny_factory):
    files, made = {}, {}
    for layer in (0, 2):
        w = weights(seed=layer)
        w["affine_skip_connection"] = torch.randn(32, 32, generator=torch.Generator().manual_seed(9)) / 6
        made[layer] = w
        folder = f"transcoder/layer_{layer}_width_16k_l0_big_affine"
        files[f"{folder}/params.safetensors"] = {k.lower() if k.startswith("W") else k: v for k, v in w.items()}
        files[f"{folder}/config.json"] = {
            "architecture": "jump_relu", "model_name": "tiny-gemma3_text",
            "hf_hook_point_in": f"model.layers.{layer}.pre_feedforward_layernorm.output",
            "hf_hook_point_out": f"model.layers.{layer}.post_feedforward_layernorm.output", "affine_connection": True}
    hub("google/gemma-scope-2-1b-pt", files)
    tcs = mechnb.transcoders.load("gemma-scope-2-1b-pt-transcoders",
                                  ["layer_0_width_16k_l0_big_affine", "transcoder/layer_2_width_16k_l0_big_affine"])
    assert tcs.layers == [0, 2] and tcs.reads == "mlp_in" and tcs.model["name"] == "tiny-gemma3_text"
    w = made[2]
    features = jumprelu(X @ w["W_enc"] + w["b_enc"], w["threshold"])
    assert torch.allclose(tcs[2].encode(X), features, atol=1e-5)
    expected = features @ w["W_dec"] + w["b_dec"] + X @ w["affine_skip_connection"]
    assert torch.allclose(tcs[2].decode(features, X), expected, atol=1e-5)
    model = tiny_factory("gemma3_text")
    model.attach(tcs)
    assert len(mechnb.parse_site("tc.2.*").expand(model)) == 64
    model.detach(tcs)
    with pytest.raises(TranscoderError, match="holds saes: load them with mechnb.sae.load"):
        mechnb.transcoders.load("gemma-scope-2-1b-pt-res", "layer_0_width_16k_l0_big")


def test_gemma_scope_and_sparsify_transcoders(hub):
    w = weights()
    hub("google/gemma-scope-2b-pt-transcoders", {"layer_1/width_16k/average_l0_8/params.npz": w})
    tcs = mechnb.transcoders.load("gemma-scope-2b-pt-transcoders", {1: "layer_1/width_16k/average_l0_8"})
    assert tcs.layers == [1] and tcs.model["name"] == "google/gemma-2-2b" and tcs[1].kind == "jumprelu"
    assert torch.allclose(tcs[1].encode(X), jumprelu(X @ w["W_enc"] + w["b_enc"], w["threshold"]), atol=1e-5)

    g = torch.Generator().manual_seed(4)
    enc, skip = torch.randn(64, 32, generator=g) / 6, torch.randn(32, 32, generator=g) / 6
    hub("EleutherAI/skip-transcoder-tiny", {
        "config.json": {"model": "tiny-llama"},
        "layers.1.mlp/cfg.json": {"k": 3, "transcode": True, "d_in": 32, "num_latents": 64},
        "layers.1.mlp/sae.safetensors": {"encoder.weight": enc, "encoder.bias": torch.zeros(64),
                                         "W_dec": torch.randn(64, 32, generator=g), "b_dec": torch.zeros(32),
                                         "W_skip": skip}})
    tcs = mechnb.transcoders.load("EleutherAI/skip-transcoder-tiny", "layers.1.mlp")
    assert tcs.layers == [1] and tcs[1].kind == "topk" and tcs[1].k == 3 and tcs.model["name"] == "tiny-llama"
    assert torch.equal(tcs[1].W_skip, skip)
    with pytest.raises(SAEError, match="sparsify transcoder.*mechnb.transcoders.load"):
        mechnb.sae.load("EleutherAI/skip-transcoder-tiny", "layers.1.mlp")


def test_releases_table_names_repos_models_and_sites():
    table = mechnb.sae.releases()
    assert {"gemma-scope-2b-pt-res", "gemma-scope-2-1b-pt-res-all", "llama_scope_lxr_8x", "gpt2-small-res-jb",
            "gemma-scope-2b-pt-transcoders"} <= set(table.name)
    row = table.set_index("name").loc["gemma-scope-9b-pt-att"]
    assert (row.repo, row.model, row.reads) == ("google/gemma-scope-9b-pt-att", "google/gemma-2-9b", "head")
    from mechnb.sae.releases import find_release

    assert find_release("gemma-scope-2-4b-it-res").folder("layer_9_width_16k_l0_medium") == \
        "resid_post/layer_9_width_16k_l0_medium"
    assert find_release("llama-scope-lxm-32x").site("Llama3_1-8B-Base-L7M-32x") == "mlp_out.7"


def test_every_public_subpackage_is_reachable_from_import_mechnb_alone():
    root = Path(mechnb.__file__).parent
    packages = {p.name for p in root.iterdir() if (p / "__init__.py").is_file()} - {"core", "display", "methods",
                                                                                   "notebook"}
    assert packages <= set(mechnb._SUBPACKAGES) and "datasets" in mechnb._SUBPACKAGES
    code = ("import sys, mechnb\nlight = 'torch' not in sys.modules\n"
            f"names = [getattr(mechnb, n).__name__ for n in {sorted(mechnb._SUBPACKAGES)!r}]\n"
            "print(light, callable(mechnb.sae.load), callable(mechnb.sae.releases), len(names))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "True", "True", str(len(mechnb._SUBPACKAGES))]


@pytest.mark.parametrize("kind", ["relu", "topk", "batchtopk", "jumprelu"])
def test_saes_saved_by_mechnb_load_in_saelens_6(tmp_path, kind):
    sae_lens = pytest.importorskip("sae_lens", reason="SAELens 6 is a test dependency (pyproject's dev extra)")
    from mechnb.sae import SAE

    sae = SAE(32, 64, kind=kind, k=4 if kind in ("topk", "batchtopk") else None, site="resid_post.1",
              model="tiny-llama")
    with torch.no_grad():
        for key, value in weights().items():
            getattr(sae, key).copy_(value)
    sae.save(tmp_path)
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path))
    assert theirs.cfg.architecture() == {"relu": "standard", "batchtopk": "jumprelu"}.get(kind, kind)
    assert theirs.cfg.metadata.hook_name == "blocks.1.hook_resid_post"
    assert theirs.cfg.metadata.model_name == "tiny-llama"
    assert torch.allclose(theirs.encode(X), sae.encode(X), atol=1e-5)
    ours = mechnb.sae.load(tmp_path)
    assert (ours.kind, ours.k, ours.site, ours.model) == (kind, sae.k, "resid_post.1", "tiny-llama")
    assert torch.equal(ours.encode(X), sae.encode(X))


def test_local_only_never_asks_the_hub(hub, monkeypatch):
    from huggingface_hub import constants

    hub("google/gemma-scope-2b-pt-res", {"layer_1/width_16k/average_l0_71/params.npz": weights()})
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # online, but told to stay local
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # a request would fail loudly, not hang
    assert mechnb.sae.load("gemma-scope-2b-pt-res", "layer_1/width_16k/average_l0_71", local_only=True).site == \
        "resid_post.1"
    with pytest.raises(SAEError, match=r"no SAE or transcoder files in .*layer_2.* \(local_only=True\)"):
        mechnb.sae.load("gemma-scope-2b-pt-res", "layer_2/width_16k/average_l0_71", local_only=True)
