"""PCA and correlation clusters of a site's activations."""

import pytest
import torch

from conftest import PARIS, PROMPT
from mechnb import CoactivationError, SiteError

TEXTS = [PROMPT, PARIS, "def add(a, b):\n    return a + b", "The quick brown fox jumps over the lazy dog."]


def test_pca_explained_variance_sums_to_one_and_matches_numpy(tiny_factory):
    import numpy as np

    model = tiny_factory("llama")
    result = model.coactivation("mlp_out.1", TEXTS, components=4)
    assert sum(result.meta["explained_variance"]) == pytest.approx(1.0, abs=1e-5)
    assert result.values.shape == (4,) and (result.values[:-1] >= result.values[1:]).all()
    values = torch.cat([model.cache(t, "mlp_out.1")["mlp_out.1"][0] for t in TEXTS]).detach().numpy()
    centred = values - values.mean(0)
    eig = np.sort(np.linalg.eigvalsh(centred.T @ centred))[::-1]
    assert np.allclose(result.values.numpy(), (eig / eig.sum())[:4], atol=1e-4)
    assert set(result.df.component) == {0, 1, 2, 3} and (result.df.groupby("component").size() == 5).all()
    assert "ColoredTokens" in result._repr_mimebundle_()["text/html"]


def test_kmeans_groups_units_by_correlation(tiny_factory):
    model = tiny_factory("llama")
    result = model.coactivation("neuron.0", TEXTS, components=3, method="kmeans")
    assert result.values.shape == (model.d_mlp, model.d_mlp)
    assert torch.allclose(result.values.diagonal(), torch.ones(model.d_mlp), atol=1e-4)
    assert set(result.df.cluster) <= {0, 1, 2} and len(result.df) == model.d_mlp
    within = result.meta["mean_correlation_within"]
    overall = (result.values.sum() - model.d_mlp) / (model.d_mlp * (model.d_mlp - 1))
    assert max(within) > overall  # clusters hold units that fire together more than average


@pytest.mark.parametrize("args, error, message", [(("pattern.1", TEXTS), SiteError, "per-token vector"),
                                                  (("mlp_out.1", []), CoactivationError, "non-empty"),
                                                  (("mlp_out.1", TEXTS, 0), CoactivationError, "components"),
                                                  (("mlp_out.1", TEXTS, 3, "ica"), CoactivationError,
                                                   "unknown method")])
def test_bad_coactivation_input_gets_a_clear_error(tiny_factory, args, error, message):
    with pytest.raises(error, match=message):
        tiny_factory("llama").coactivation(*args)
