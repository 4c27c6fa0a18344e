"""Featurizers (`mechnb.causal.featurizers`): one contract, exact when nothing is swapped; each
kind's interchange against its definition written out with plain tensors; saving and loading."""

import pytest
import torch

from mechnb import CausalError
from mechnb.causal import PCA, Boundless, Identity, Mask, Rotation, SAEFeatures, Subspace, load
from mechnb.sae import SAE

WIDTH = 12


def sae_of(seed=0, kind="topk"):
    torch.manual_seed(seed)
    sae = SAE(WIDTH, 40, kind=kind, k=6, site="resid_post.1")
    with torch.no_grad():
        sae.W_enc.normal_(0, 0.5), sae.W_dec.normal_(0, 0.3), sae.b_dec.normal_(0, 0.1)
    return sae


def every_kind():
    generator = torch.Generator().manual_seed(1)
    basis = torch.linalg.qr(torch.randn(WIDTH, 3, generator=generator))[0]
    return [Identity(WIDTH), Identity(WIDTH, features=[1, 4]), Subspace(basis),
            PCA.fit(torch.randn(50, WIDTH, generator=generator), 4), Rotation(WIDTH, 2, seed=3),
            Boundless(WIDTH, seed=2), SAEFeatures(sae_of()), SAEFeatures(sae_of(), features=[0, 5, 7]),
            Mask(Identity(WIDTH)), Mask(SAEFeatures(sae_of(1)))]


@pytest.mark.parametrize("featurizer", every_kind(), ids=lambda f: f.describe())
def test_featurize_then_inverse_is_exact(featurizer):
    x = torch.randn(7, 2, WIDTH)
    features, error = featurizer.featurize(x)
    assert torch.allclose(featurizer.inverse(features, error), x, atol=1e-5)
    assert torch.allclose(featurizer.interchange(x, x), x, atol=1e-5)  # a source equal to the base changes nothing


def test_each_kind_swaps_what_its_definition_says():
    base, source = torch.randn(5, WIDTH), torch.randn(5, WIDTH)
    assert torch.equal(Identity(WIDTH).interchange(base, source), source)
    units = Identity(WIDTH, features=[1, 4]).interchange(base, source)
    expected = base.clone()
    expected[:, [1, 4]] = source[:, [1, 4]]
    assert torch.equal(units, expected)
    rotation = Rotation(WIDTH, 3, seed=0)
    b = rotation.basis.detach()
    assert torch.allclose(b.T @ b, torch.eye(3), atol=1e-5)
    assert torch.allclose(rotation.interchange(base, source), base + (source - base) @ b @ b.T, atol=1e-5)
    sae = sae_of()
    full = SAEFeatures(sae).interchange(base, source)
    assert torch.allclose(full, sae.decode(sae.encode(source)) + base - sae.decode(sae.encode(base)), atol=1e-5)
    some = SAEFeatures(sae, features=[0, 5]).interchange(base, source)
    mixed = sae.encode(base)
    mixed[:, [0, 5]] = sae.encode(source)[:, [0, 5]]
    assert torch.allclose(some, sae.decode(mixed) + base - sae.decode(sae.encode(base)), atol=1e-5)


def test_pca_keeps_the_top_directions_of_the_values():
    generator = torch.Generator().manual_seed(0)
    direction = torch.nn.functional.normalize(torch.randn(WIDTH, generator=generator), dim=0)
    values = torch.randn(400, 1, generator=generator) * 5 * direction + 0.1 * torch.randn(400, WIDTH, generator=generator)
    basis = PCA.fit(values, 1).basis[:, 0]
    assert abs(float(basis @ direction)) > 0.99


def test_soft_gates_train_and_hard_gates_evaluate():
    boundless = Boundless(WIDTH, seed=0, boundary=0.25)
    boundless.temperature = 0.05
    soft = boundless.train().gate()
    assert soft.requires_grad and torch.allclose(soft.detach(), (torch.arange(WIDTH) < 3).float(), atol=1e-3)
    boundless.eval()
    assert boundless.k == 3 and torch.equal(boundless.gate(), (torch.arange(WIDTH) < 3).float())
    base, source = torch.randn(4, WIDTH), torch.randn(4, WIDTH)
    hard = Subspace(boundless.tensors()["basis"])
    assert torch.allclose(boundless.interchange(base, source), hard.interchange(base, source), atol=1e-5)
    mask = Mask(Identity(WIDTH))
    with torch.no_grad():
        mask.logits[[2, 9]] = 3.0
    assert mask.eval().selected == [2, 9]
    expected = base.clone()
    expected[:, [2, 9]] = source[:, [2, 9]]
    assert torch.equal(mask.interchange(base, source), expected)
    loss = mask.train().interchange(base, source).sum() + mask.penalty()
    loss.backward()
    assert mask.logits.grad.abs().sum() > 0


@pytest.mark.parametrize("featurizer", [f for f in every_kind() if f.kind not in ("full",)], ids=lambda f: f.kind)
def test_a_saved_featurizer_loads_as_its_hard_form(tmp_path, featurizer):
    featurizer.eval()
    featurizer.site, featurizer.variable, featurizer.model_name = "resid_post.1@-1", "gender", "tiny-llama"
    featurizer.meta = {"iia": 0.9, "not json": object()}
    path = featurizer.save(tmp_path / "f")
    back = load(path)
    base, source = torch.randn(6, WIDTH), torch.randn(6, WIDTH)
    assert torch.allclose(back.interchange(base, source), featurizer.interchange(base, source), atol=1e-5)
    assert (back.site, back.variable, back.model_name, back.kind) == ("resid_post.1@-1", "gender", "tiny-llama",
                                                                      featurizer.kind)
    assert back.meta == {"iia": 0.9}
    basis = featurizer.tensors().get("basis")
    if basis is not None:  # a subspace saves its k columns only
        from safetensors.torch import load_file

        saved = load_file(str(path / "featurizer.safetensors"))
        assert saved["basis"].shape == (WIDTH, featurizer.n_features) and set(saved) == {"basis"}


def test_bad_featurizers_are_one_line_errors(tmp_path):
    for words, call in [("a subspace's basis is width x k", lambda: Subspace(torch.zeros(3, 5))),
                        ("features must be unit indices 0-11", lambda: Identity(WIDTH, features=[12])),
                        ("holds no saved featurizer", lambda: load(tmp_path))]:
        with pytest.raises(CausalError) as raised:
            call()
        assert words in str(raised.value) and "\n" not in str(raised.value)
