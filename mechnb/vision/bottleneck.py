"""A concept bottleneck: a sparse linear classifier that sees only concept activations.

    >>> head = mechnb.vision.bottleneck(model, sae, (digits("train"), digits("test")))
    >>> head.report()                 # its accuracy against the model's own, the cost in points
    >>> head.concepts_of(7)           # the concepts class 7 uses, by weight (named if labelled)
    >>> head.intervene(concepts, 12, "off")   # predictions with concept 12 switched off

The classifier is multinomial logistic regression on the concepts, each scaled by its
largest training activation (so the L1 penalty weighs concepts alike and a weight reads as
"logit per full activation"), trained full batch by FISTA: the L1 penalty's proximal step
leaves weights at exactly zero, so each class uses few concepts. Because it is
linear, switching a concept changes class c's logit by exactly `weight[c, concept] x
(new - old) / scale`: a test-time intervention is predictable from the weights, which is
what makes a bottleneck an explanation.

The concepts come from an SAE (`mechnb.sae`) on a site of the model, read at one position
(`position=0`, the [CLS] token of a vision transformer), or are given as a matrix.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..core.errors import BottleneckError

@dataclass
class Bottleneck:
    """A trained concept bottleneck (see the module docstring).

    Attributes:
        weight: `classes concepts`, zero where a class does not use a concept.
        bias: `classes`.
        scale: each concept's largest training activation (inputs are divided by it).
        classes: the class names.
        names: concept index -> name, where the SAE's features are labelled.
        accuracy: on the test concepts; `black_box`: the model's own test accuracy (if known).
    """

    weight: torch.Tensor
    bias: torch.Tensor
    scale: torch.Tensor
    classes: list
    names: dict = field(default_factory=dict)
    accuracy: float | None = None
    black_box: float | None = None
    history: list = field(default_factory=list)

    def logits(self, concepts: torch.Tensor) -> torch.Tensor:
        """Class logits `n classes` of concept activations `n concepts`."""
        concepts = _matrix(concepts, self.weight.shape[1], "concepts")
        return (concepts / self.scale) @ self.weight.T + self.bias

    def predict(self, concepts: torch.Tensor) -> torch.Tensor:
        """The predicted class index of each row."""
        return self.logits(concepts).argmax(-1)

    def score(self, concepts: torch.Tensor, labels: torch.Tensor) -> float:
        """Accuracy on `concepts` against `labels`."""
        labels = torch.as_tensor(labels)
        return float((self.predict(concepts) == labels.to(self.weight.device)).float().mean())

    @property
    def used(self) -> list[int]:
        """The concepts some class uses (a nonzero weight)."""
        return sorted(int(i) for i in (self.weight != 0).any(0).nonzero()[:, 0])

    def concepts_of(self, cls, k: int = 5):
        """A DataFrame of the `k` concepts with the largest positive weight for class `cls` (a
        class name or index): concept, name, weight."""
        import pandas as pd

        row = self._class_index(cls)
        weights = self.weight[row]
        order = weights.argsort(descending=True)[:k]
        rows = [{"concept": int(i), "name": self.names.get(int(i), ""), "weight": float(weights[i])}
                for i in order if weights[i] > 0]
        return pd.DataFrame(rows, columns=["concept", "name", "weight"])

    def intervene(self, concepts: torch.Tensor, concept: int, value="off") -> torch.Tensor:
        """Predictions with `concept` set to `value` in every row: "off" (0), "on" (its largest
        training activation) or a number. The logit of class c moves by exactly
        `weight[c, concept] x (value - old) / scale[concept]`."""
        concepts = _matrix(concepts, self.weight.shape[1], "concepts").clone()
        if not isinstance(concept, int) or not 0 <= concept < self.weight.shape[1]:
            raise BottleneckError(f"concept must be an index 0..{self.weight.shape[1] - 1}, got {concept!r}")
        if value == "off":
            value = 0.0
        elif value == "on":
            value = float(self.scale[concept])
        elif not isinstance(value, (int, float)) or isinstance(value, bool):
            raise BottleneckError(f"value is 'off', 'on' or a number, got {value!r}")
        concepts[:, concept] = value
        return self.predict(concepts)

    def report(self):
        """One row: the bottleneck's accuracy, the model's own, the cost in points, concepts used."""
        import pandas as pd

        cost = None if self.accuracy is None or self.black_box is None else 100 * (self.black_box - self.accuracy)
        per_class = (self.weight > 0).sum(1).float()
        return pd.DataFrame([{"bottleneck_accuracy": self.accuracy, "model_accuracy": self.black_box,
                              "cost_points": cost, "concepts_used": len(self.used),
                              "concepts_per_class": float(per_class.mean())}])

    def _class_index(self, cls) -> int:
        if isinstance(cls, int) and not isinstance(cls, bool) and 0 <= cls < len(self.classes):
            return cls
        if cls in self.classes:
            return self.classes.index(cls)
        raise BottleneckError(f"unknown class {cls!r}: the classes are {self.classes}")

    def _repr_html_(self) -> str:
        return (f"<b>concept bottleneck</b>: {len(self.classes)} classes, {len(self.used)} of "
                f"{self.weight.shape[1]} concepts used<br>" + self.report().to_html(index=False))


def fit(train_concepts, train_labels, classes=None, l1: float = 0.01, steps: int = 300) -> Bottleneck:
    """A `Bottleneck` trained on concept activations `n concepts` and class labels `n`.

    Multinomial logistic regression with an L1 penalty on the weights (not the biases),
    minimised by FISTA (proximal gradient with momentum, step 1/L from the data's largest
    singular value): deterministic, and weights the penalty outweighs are exactly zero.

    Args:
        l1: the L1 penalty (larger: fewer concepts per class; 0: a plain linear probe).
        steps: proximal gradient steps.
        classes: class names (default 0..C-1).
    """
    concepts = _matrix(train_concepts, None, "train_concepts").float()
    labels = torch.as_tensor(train_labels).long().to(concepts.device)
    if labels.shape != (concepts.shape[0],):
        raise BottleneckError(f"{concepts.shape[0]} rows of concepts but labels of shape {tuple(labels.shape)}")
    n_classes = int(labels.max()) + 1 if classes is None else len(classes)
    if labels.min() < 0 or labels.max() >= n_classes:
        raise BottleneckError(f"labels must be class indices 0..{n_classes - 1}")
    if not isinstance(l1, (int, float)) or isinstance(l1, bool) or l1 < 0:
        raise BottleneckError(f"l1 must be a number >= 0, got {l1!r}")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise BottleneckError(f"steps must be a positive integer, got {steps!r}")
    n = concepts.shape[0]
    scale = concepts.abs().amax(0).clamp(min=1e-6)
    x = torch.cat([concepts / scale, torch.ones(n, 1, device=concepts.device)], 1)  # the bias's column
    target = torch.nn.functional.one_hot(labels, n_classes).float()
    lipschitz = 0.5 * float(torch.linalg.matrix_norm(x, ord=2)) ** 2 / n
    step_size = 1.0 / max(lipschitz, 1e-12)
    weights = torch.zeros(n_classes, x.shape[1], device=x.device)
    ahead, momentum, history = weights.clone(), 1.0, []
    for step in range(steps):
        probabilities = torch.softmax(ahead @ x.T, 0)  # classes n
        gradient = (probabilities - target.T) @ x / n
        new = ahead - step_size * gradient
        new[:, :-1] = new[:, :-1].sign() * (new[:, :-1].abs() - step_size * l1).clamp(min=0)
        next_momentum = (1 + (1 + 4 * momentum ** 2) ** 0.5) / 2
        ahead = new + (momentum - 1) / next_momentum * (new - weights)
        weights, momentum = new, next_momentum
        if step % 50 == 0 or step == steps - 1:
            loss = torch.nn.functional.cross_entropy(x @ weights.T, labels)
            history.append({"step": step, "loss": float(loss) + l1 * float(weights[:, :-1].abs().sum()),
                            "nonzero": int((weights[:, :-1] != 0).sum())})
    return Bottleneck(weights[:, :-1].contiguous(), weights[:, -1].contiguous(), scale,
                      list(classes) if classes is not None else list(range(n_classes)), history=history)


def _matrix(value, width: int | None, what: str) -> torch.Tensor:
    if not torch.is_tensor(value):
        try:
            value = torch.as_tensor(value, dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError):
            raise BottleneckError(f"{what} must be a tensor `n concepts`, got {type(value).__name__}") from None
    if value.dim() != 2 or (width is not None and value.shape[1] != width):
        want = f"n x {width}" if width is not None else "n x concepts"
        raise BottleneckError(f"{what} must be a matrix {want}, got shape {tuple(value.shape)}")
    if not torch.isfinite(value).all():
        raise BottleneckError(f"{what} holds NaN or infinite values")
    return value.float()


def bottleneck(model_or_concepts, sae=None, data=None, position: int = 0, l1: float = 0.01, steps: int = 300,
               batch_size: int = 256) -> Bottleneck:
    """Train a concept bottleneck on an SAE's concepts of a model's inputs (or on given concepts).

    Args:
        model_or_concepts: a mechnb `Model`; or a train concept matrix (then `data` is
            `(train_labels, test_concepts, test_labels)` and `sae` is unused).
        sae: the SAE whose features are the concepts (read at `sae.site`, `@position`).
        data: `(train, test)` (or `{"train": ..., "test": ...}`), each with `.images` and
            `.labels` (`mechnb.datasets.digits(split)`).
        position: which position of the site feeds the concepts (0: [CLS]).
        l1, steps: see `fit`.

    Returns:
        The `Bottleneck`, with its test `accuracy`, the model's own (`black_box`), and the
        SAE's feature labels as concept `names` where it has them.
    """
    if torch.is_tensor(model_or_concepts):
        if not isinstance(data, (tuple, list)) or len(data) != 3:
            raise BottleneckError("with a concept matrix, data is (train_labels, test_concepts, test_labels)")
        train_labels, test_concepts, test_labels = data
        head = fit(model_or_concepts, train_labels, l1=l1, steps=steps)
        head.accuracy = head.score(test_concepts, test_labels)
        return head
    model = model_or_concepts
    train, test = _splits(data)
    if sae is None or getattr(sae, "site", None) is None:
        raise BottleneckError("bottleneck needs an SAE that knows its site (mechnb.sae.train on the model's "
                              "activations, or sae.site = 'resid_post.3')")
    train_concepts = concepts_of(model, sae, train.images, position, batch_size)
    test_concepts = concepts_of(model, sae, test.images, position, batch_size)
    classes = list(getattr(train, "classes", None) or range(int(torch.as_tensor(train.labels).max()) + 1))
    head = fit(train_concepts, train.labels, classes=classes, l1=l1, steps=steps)
    head.accuracy = head.score(test_concepts, test.labels)
    head.black_box = model_accuracy(model, test.images, test.labels, batch_size)
    head.names = {int(f): str(name) for f, name in (getattr(sae, "labels", None) or {}).items()}
    return head


def _splits(data):
    if isinstance(data, dict) and {"train", "test"} <= set(data):
        return data["train"], data["test"]
    if isinstance(data, (tuple, list)) and len(data) == 2:
        return data[0], data[1]
    raise BottleneckError("data is (train, test) or {'train': ..., 'test': ...}, each with .images and .labels "
                          "(mechnb.datasets.digits('train'))")


def concepts_of(model, sae, images, position: int = 0, batch_size: int = 256) -> torch.Tensor:
    """The SAE's feature activations `n d_sae` at `sae.site@position` for each input."""
    site = f"{sae.site}@{position}"
    values = model.cache(images, site, batch_size=batch_size)[site]
    with torch.no_grad():
        return sae.encode(values.to(sae.W_enc.device, sae.W_enc.dtype)).float().cpu()


def model_accuracy(model, images, labels, batch_size: int = 256) -> float:
    """The model's own accuracy: its top class against `labels`."""
    logits = model.cache(images, "logits", batch_size=batch_size)["logits"]
    if logits.dim() == 3:  # a position axis: the classifier's answer is at the last
        logits = logits[:, -1]
    return float((logits.argmax(-1).cpu() == torch.as_tensor(labels)).float().mean())


def concept_ablation(model, sae, head: Bottleneck, images, labels, cls, n: int = 3, trials: int = 5,
                     position: int = 0, seed: int = 0, batch_size: int = 256):
    """Causality in the real model: the accuracy on class `cls`'s images with no concept
    ablated, with the `n` concepts the bottleneck weighs most for `cls` ablated (in the model,
    at `sae.site@position`, through the attached SAE), and with `n` random firing concepts
    ablated (concepts that fire on those images; the mean over `trials` draws). If the bottleneck's concepts are the model's, the
    first ablation costs more than the random ones.

    Returns a DataFrame: `ablated` (none / class concepts / random concepts), `concepts`,
    `accuracy`.
    """
    import pandas as pd

    from ..sae.attach import detach

    row = head._class_index(cls)
    labels = torch.as_tensor(labels)
    mine = labels == row
    if not mine.any():
        raise BottleneckError(f"no image of class {head.classes[row]!r} among the {len(labels)} given")
    chosen = [int(c) for c in head.weight[row].argsort(descending=True)[:n] if head.weight[row, c] > 0]
    if not isinstance(n, int) or n < 1 or not chosen:
        raise BottleneckError(f"class {head.classes[row]!r} uses no concept with a positive weight (n={n!r})")
    subset = images[mine] if torch.is_tensor(images) else [image for image, m in zip(images, mine) if m]
    attached = sae in model.saes
    if not attached:
        model.attach(sae)
    layer = int(sae.site.split(".")[-1])

    def accuracy(concepts) -> float:
        sites = [f"sae.{layer}.{c}@{position}" for c in concepts]
        if not sites:
            return model_accuracy(model, subset, labels[mine], batch_size)
        with model.ablated(sites):
            return model_accuracy(model, subset, labels[mine], batch_size)

    try:
        active = concepts_of(model, sae, subset, position, batch_size).gt(0).float().mean(0)
        firing = [c for c in active.argsort(descending=True).tolist() if active[c] > 0 and c not in chosen]
        if len(firing) < len(chosen):
            raise BottleneckError(f"fewer than {len(chosen)} other concepts fire on class {head.classes[row]!r}'s "
                                  "images: no random baseline to compare with")
        generator = torch.Generator().manual_seed(seed)
        draws = [[firing[i] for i in torch.randperm(len(firing), generator=generator)[:len(chosen)]]
                 for _ in range(trials)]
        rows = [{"ablated": "none", "concepts": [], "accuracy": accuracy([])},
                {"ablated": "class concepts", "concepts": chosen, "accuracy": accuracy(chosen)},
                {"ablated": "random concepts", "concepts": draws,
                 "accuracy": sum(accuracy(draw) for draw in draws) / trials}]
    finally:
        if not attached:
            detach(model, sae)
    return pd.DataFrame(rows)
