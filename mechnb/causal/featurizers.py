"""Featurizers: the coordinates an interchange swaps, one contract for all of them.

A hypothesis "the model keeps the subject's gender in layer 4" must say in which part of the
layer's vector. A featurizer names that part: it maps a site's value to features and an
error term, `featurize(x) -> (features, error)`, and back, `inverse(features, error) -> x`,
exactly when nothing is swapped. An interchange featurizes the base's value and the
source's, puts the source's features where the featurizer's gate says (all of them, a
subset, or a soft mask while training), and maps back with the base's error term:

    x' = inverse(g * f(source) + (1 - g) * f(base), error(base))

The kinds:
- `Identity`: the full vector (features = x, no error); with `features=` a subset of its
  units (neurons).
- `Subspace`: an orthonormal basis `d k` (features = x @ B, error = x - x @ B @ B.T). Made
  by `PCA.fit` (the top principal components of the site's values) or trained by DAS
  (`Rotation`, its basis a QR-orthonormalised parameter).
- `SAEFeatures`: a sparse autoencoder's features; the error term (what the SAE does not
  reconstruct) stays the base's, never swapped.
- `Boundless`: a full rotation and a learned boundary: the first `b * d` rotated
  coordinates swap, through a sigmoid of temperature T while training (Boundless DAS, Wu
  et al. 2023); hard at evaluation.
- `Mask`: a differentiable binary mask over another featurizer's features (DBM: neurons
  or SAE features), `sigmoid(logit / T)` while training, `logit > 0` at evaluation.

    >>> das = Rotation(576, k=1)                   # trained by mechnb.causal.das
    >>> f, e = das.featurize(x)                    # batch 1, batch 576
    >>> torch.allclose(das.inverse(f, e), x)       # exact when nothing is swapped
    True

Every featurizer is a `torch.nn.Module`; trained ones know their site, variable and model
(`site`, `variable`, `model_name`), save as safetensors with a JSON description (`save`;
`mechnb.causal.load`), a subspace as its `k` columns only.

Gotchas: a gate that is None swaps every feature. `Boundless` and `Mask` are soft only in
training mode (`.train()`); the trainer leaves them in evaluation mode, where the gate is
0 or 1, and an interchange then equals the hard subspace or subset it saves as.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..core.errors import CausalError

FORMAT = "mechnb causal featurizer"


class Featurizer(torch.nn.Module):
    """The contract (see the module docstring): `featurize`, `inverse`, `gate`, `interchange`.

    Args:
        width: the size of the site's value at one position (`d_model`, `d_head`, ...).
    """

    kind = "featurizer"

    def __init__(self, width: int):
        super().__init__()
        self.width = int(width)
        self.site: str | None = None
        self.variable = None
        self.model_name: str | None = None
        self.meta: dict = {}

    def featurize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(features ... n_features, error ... width)` of values `... width`."""
        raise NotImplementedError

    def inverse(self, features: torch.Tensor, error: torch.Tensor) -> torch.Tensor:
        """The values `... width` of features and an error term."""
        raise NotImplementedError

    @property
    def n_features(self) -> int:
        return self.width

    def gate(self) -> torch.Tensor | None:
        """Which features an interchange takes from the source (`n_features`, 0-1), or None: all."""
        return None

    def penalty(self) -> torch.Tensor:
        """The regulariser a trainer adds to the loss (a learned boundary's width, a mask's size)."""
        return torch.zeros(())

    def interchange(self, base: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """The base's values with the gated features taken from the source's (`... width` each)."""
        features, error = self.featurize(base)
        other, _ = self.featurize(source)
        gate = self.gate()
        if gate is not None:
            gate = gate.to(features)
            if gate.requires_grad or not bool(((gate == 0) | (gate == 1)).all()):
                other = features + gate * (other - features)
            else:  # a hard gate: each feature is exactly the base's or the source's
                other = torch.where(gate.bool(), other, features)
        return self.inverse(other, error)

    def describe(self) -> str:
        """One line: the kind and its size."""
        return f"{self.kind} ({self.n_features} of {self.width})"

    def __repr__(self) -> str:
        where = f" at {self.site}" if self.site else ""
        variable = f" for {self.variable}" if self.variable else ""
        iia = f", held-out IIA {self.meta['iia']:.3f}" if isinstance(self.meta.get("iia"), float) else ""
        return f"<mechnb.causal.{type(self).__name__}: {self.describe()}{where}{variable}{iia}>"

    # -- saving -------------------------------------------------------------------------

    def tensors(self) -> dict[str, torch.Tensor]:
        """What `save` writes as safetensors (the hard form: a basis, indices)."""
        return {}

    def description(self) -> dict:
        """What `save` writes as JSON."""
        return {"format": FORMAT, "kind": self.kind, "width": self.width, "site": self.site,
                "variable": self.variable, "model": self.model_name, "n_features": self.n_features,
                "sae": getattr(self, "sae", None) is not None, "meta": _jsonable(self.meta)}

    def save(self, directory) -> Path:
        """Write `featurizer.safetensors` and `featurizer.json` to `directory` (made if needed);
        a featurizer over an SAE also writes the SAE to `directory/sae`. Returns the path."""
        from safetensors.torch import save_file

        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {name: value.detach().cpu().contiguous() for name, value in self.tensors().items()}
        save_file(tensors or {"width": torch.tensor([self.width])}, str(path / "featurizer.safetensors"))
        (path / "featurizer.json").write_text(json.dumps(self.description(), indent=1))
        sae = getattr(self, "sae", None)
        if sae is not None:
            sae.save(path / "sae")
        return path

    def plot(self, ax=None):
        """The training curve of a trained featurizer: loss per step, held-out IIA per epoch."""
        from .views import training_curve

        return training_curve(self, ax=ax)


class Identity(Featurizer):
    """The full vector (features = x, no error), or with `features` a subset of its units."""

    kind = "full"

    def __init__(self, width: int, features=None):
        super().__init__(width)
        self.features = None if features is None else _indices(features, width, "unit")
        if self.features is not None:
            self.kind = "units"

    def featurize(self, x):
        return x, torch.zeros_like(x)

    def inverse(self, features, error):
        return features + error

    @property
    def n_features(self) -> int:
        return self.width if self.features is None else len(self.features)

    def gate(self):
        if self.features is None:
            return None
        return _hard(self.features, self.width)

    def tensors(self):
        return {} if self.features is None else {"indices": torch.tensor(self.features)}


class Orthonormal(Featurizer):
    """Coordinates in the orthonormal columns of `basis` (`width k`); the rest is the error."""

    @property
    def basis(self) -> torch.Tensor:
        raise NotImplementedError

    @property
    def n_features(self) -> int:
        return self.basis.shape[1]

    def featurize(self, x):
        basis = self.basis.to(x)
        features = x @ basis
        return features, x - features @ basis.T

    def inverse(self, features, error):
        return features @ self.basis.to(features).T + error

    def tensors(self):
        return {"basis": self.basis.detach()}


class Subspace(Orthonormal):
    """A fixed orthonormal basis `width k` (from PCA, or a trained featurizer saved)."""

    kind = "subspace"

    def __init__(self, basis: torch.Tensor, kind: str | None = None):
        basis = torch.as_tensor(basis, dtype=torch.float32)
        if basis.dim() != 2 or not 0 < basis.shape[1] <= basis.shape[0]:
            raise CausalError(f"a subspace's basis is width x k with 0 < k <= width, got shape {tuple(basis.shape)}")
        super().__init__(basis.shape[0])
        self.register_buffer("fixed", basis)
        if kind:
            self.kind = kind

    @property
    def basis(self) -> torch.Tensor:
        return self.fixed


class Rotation(Orthonormal):
    """A trainable rank-k subspace (DAS): `basis` is the QR orthonormalisation of a parameter,
    orthonormal at every step of training."""

    kind = "das"

    def __init__(self, width: int, k: int = 1, seed: int = 0):
        super().__init__(width)
        generator = torch.Generator().manual_seed(seed)
        self.weight = torch.nn.Parameter(torch.linalg.qr(torch.randn(width, k, generator=generator))[0])

    @property
    def basis(self) -> torch.Tensor:
        return orthonormal(self.weight)


class Boundless(Orthonormal):
    """A full learned rotation whose first `boundary * width` coordinates swap (Boundless DAS)."""

    kind = "boundless"

    def __init__(self, width: int, seed: int = 0, boundary: float = 0.5):
        super().__init__(width)
        generator = torch.Generator().manual_seed(seed)
        self.weight = torch.nn.Parameter(torch.linalg.qr(torch.randn(width, width, generator=generator))[0])
        self.boundary = torch.nn.Parameter(torch.tensor(float(boundary)))
        self.temperature = 1.0

    @property
    def basis(self) -> torch.Tensor:
        """The whole rotation, `width width`: its first `k` columns swap at evaluation."""
        return orthonormal(self.weight)

    @property
    def k(self) -> int:
        """The coordinates that swap at evaluation (at least one)."""
        return max(1, min(self.width, round(float(self.boundary.detach().clamp(0, 1)) * self.width)))

    @property
    def n_features(self) -> int:
        return self.k

    def gate(self):
        index = torch.arange(self.width, dtype=torch.float32, device=self.weight.device)
        if not self.training:
            return (index < self.k).float()
        edge = self.boundary.clamp(1.0 / self.width, 1.0) * self.width
        return torch.sigmoid((edge - index - 0.5) / self.temperature)

    def penalty(self):
        return self.boundary.clamp(1.0 / self.width, 1.0)

    def tensors(self):
        return {"basis": self.basis[:, :self.k].detach()}


class SAEFeatures(Featurizer):
    """A sparse autoencoder's features (all, or `features`); the base's error term is kept."""

    kind = "sae"

    def __init__(self, sae, features=None):
        super().__init__(sae.d_in)
        self.sae = sae
        self.features = None if features is None else _indices(features, sae.d_sae, "feature")

    @property
    def n_features(self) -> int:
        return self.sae.d_sae if self.features is None else len(self.features)

    def featurize(self, x):
        features = self.sae.encode(x.to(self.sae.W_dec.dtype))
        return features, x - self.sae.decode(features).to(x)

    def inverse(self, features, error):
        return self.sae.decode(features).to(error) + error

    def gate(self):
        return None if self.features is None else _hard(self.features, self.sae.d_sae)

    def describe(self) -> str:
        return f"sae {self.sae.name} ({self.n_features} of {self.sae.d_sae} features)"

    def tensors(self):
        return {} if self.features is None else {"indices": torch.tensor(self.features)}


class Mask(Featurizer):
    """A differentiable binary mask (DBM) over the features of `over` (`Identity` for neurons,
    `SAEFeatures` for an SAE's)."""

    kind = "dbm"

    def __init__(self, over: Featurizer):
        super().__init__(over.width)
        self.over = over
        self.logits = torch.nn.Parameter(torch.zeros(over.n_features))
        self.temperature = 1.0

    @property
    def sae(self):
        return getattr(self.over, "sae", None)

    def featurize(self, x):
        return self.over.featurize(x)

    def inverse(self, features, error):
        return self.over.inverse(features, error)

    @property
    def selected(self) -> list[int]:
        """The features the hard mask swaps."""
        return (self.logits > 0).nonzero().flatten().tolist()

    @property
    def n_features(self) -> int:
        return len(self.selected)

    def gate(self):
        if not self.training:
            return (self.logits > 0).float()
        return torch.sigmoid(self.logits / self.temperature)

    def penalty(self):
        return torch.sigmoid(self.logits / self.temperature).sum()

    def describe(self) -> str:
        return f"dbm over {self.over.describe()}: {self.n_features} selected"

    def tensors(self):
        return {"indices": torch.tensor(self.selected, dtype=torch.long)}

    def description(self) -> dict:
        return {**super().description(), "over": self.over.kind}


class PCA:
    """Principal components of a site's values, as a `Subspace` featurizer."""

    @staticmethod
    def fit(values: torch.Tensor, k: int) -> Subspace:
        """The top `k` principal directions of `values` (`n width`, centred first)."""
        values = values.float().reshape(-1, values.shape[-1])
        centred = values - values.mean(0)
        _, _, right = torch.linalg.svd(centred, full_matrices=False)
        return Subspace(right[:k].T.contiguous(), kind="pca")


def orthonormal(weight: torch.Tensor) -> torch.Tensor:
    """The orthonormal columns QR makes of `weight` (`width k`), signs fixed so that the map is
    smooth where R's diagonal is positive."""
    q, r = torch.linalg.qr(weight)
    signs = torch.sign(torch.diagonal(r))
    return q * torch.where(signs == 0, torch.ones_like(signs), signs)


def _hard(indices: list[int], size: int) -> torch.Tensor:
    gate = torch.zeros(size)
    gate[indices] = 1
    return gate


def _indices(features, size: int, what: str) -> list[int]:
    from ..core.checks import is_int

    listed = [features] if is_int(features) else list(features) if hasattr(features, "__iter__") else None
    if listed is None or not all(isinstance(f, int) or (torch.is_tensor(f) and f.dim() == 0) for f in listed) \
            or not all(0 <= int(f) < size for f in listed):
        raise CausalError(f"features must be {what} indices 0-{size - 1} (an int or a list), got {features!r:.60}")
    return sorted({int(f) for f in listed})


def _jsonable(meta: dict) -> dict:
    """`meta` with only the JSON-friendly entries (numbers, strings, lists of them)."""
    return {key: value for key, value in meta.items()
            if isinstance(value, (str, int, float, bool, type(None))) or
            (isinstance(value, list) and all(isinstance(v, (str, int, float, bool)) for v in value))}


def load(directory, sae=None) -> Featurizer:
    """A featurizer written by `save` (safetensors, no pickle): its site, variable and model
    come back with it; a featurizer over an SAE reads it from `directory/sae`, or takes `sae`.

    Example: `das = mechnb.causal.load("gender-das"); model.interchange(data, das)`.
    """
    from safetensors.torch import load_file

    path = Path(directory)
    if not (path / "featurizer.json").is_file() or not (path / "featurizer.safetensors").is_file():
        raise CausalError(f"{path} holds no saved featurizer (featurizer.json and featurizer.safetensors): "
                          "give the directory featurizer.save(...) wrote")
    described = json.loads((path / "featurizer.json").read_text())
    if described.get("format") != FORMAT:
        raise CausalError(f"{path / 'featurizer.json'} is not a mechnb featurizer (no format {FORMAT!r})")
    tensors = load_file(str(path / "featurizer.safetensors"))
    kind, width = described["kind"], described["width"]
    indices = tensors["indices"].tolist() if "indices" in tensors else None
    if "basis" in tensors:
        made = Subspace(tensors["basis"], kind=kind)
    elif described.get("sae"):
        if sae is None and not (path / "sae").is_dir():
            raise CausalError(f"{path} is a featurizer over SAE features, and neither {path / 'sae'} nor sae= "
                              "gives the SAE: pass load(directory, sae=the_sae)")
        if sae is None:
            from ..sae.files import load as load_sae

            sae = load_sae(path / "sae")
        made = SAEFeatures(sae, indices)
    else:
        made = Identity(width, indices)
    made.kind = kind
    made.site, made.variable, made.model_name = described.get("site"), described.get("variable"), described.get("model")
    made.meta = dict(described.get("meta") or {})
    return made.eval()
