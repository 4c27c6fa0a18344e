"""Causal models of tasks with known answers: the pronoun task, IOI's two variables, and
hierarchical equality on a small MLP built in code.

- `pronouns()`: name -> gender -> pronoun, rendered `<|endoftext|>{name} walked because`
  (pyvene's gender tutorial; the special token first, without which SmolLM2 gets many
  female names wrong). Most female names are two tokens, so `@'{name}'` is the name's last.
- `ioi()`: indirect-object identification with two variables, MIB's IOI pair: the position
  of the indirect object among the two names (`position`, first or second) and its token
  (`token`, the name said). `When {a} and {b} went to the {place}, {subject} gave a drink to`
  is answered with the name not repeated.
- `hierarchical_equality()`: four entities w, x, y, z (random vectors); `wx = (w == x)`,
  `yz = (y == z)`, output `wx == yz` (pyvene's DAS tutorial). Its input is a tensor, the
  four vectors side by side, for a plain torch module; `equality_network()` builds an MLP
  that computes `wx` and `yz` in two known neurons, so that the right alignment has IIA 1.

    >>> cm = mechnb.causal.tasks.pronouns()
    >>> data = cm.counterfactuals(256, intervene="gender").filter(model)
"""

from __future__ import annotations

from ..datasets import FEMALE_NAMES, IOI_NAMES, IOI_PLACES, MALE_NAMES
from .model import CausalModel

PRONOUN_TEMPLATE = "<|endoftext|>{name} walked because"
IOI_TEMPLATE = "When {a} and {b} went to the {place}, {subject} gave a drink to"


def pronouns(female=FEMALE_NAMES, male=MALE_NAMES, template: str = PRONOUN_TEMPLATE) -> CausalModel:
    """name -> gender -> pronoun (`" he"`, `" she"`), names from `mechnb.datasets`."""
    gender = {**{name: "f" for name in female}, **{name: "m" for name in male}}
    return CausalModel(
        variables={"name": list(gender), "gender": ["m", "f"], "pronoun": [" he", " she"]},
        parents={"gender": ["name"], "pronoun": ["gender"]},
        mechanisms={"gender": lambda name: gender[name], "pronoun": lambda g: {"m": " he", "f": " she"}[g]},
        template=template)


def ioi(names=IOI_NAMES, places=IOI_PLACES[:4], template: str = IOI_TEMPLATE) -> CausalModel:
    """IOI with the indirect object's `position` (`"first"`, `"second"`: which of a, b it is)
    and its `token` (the answer, `" Mary"`), from inputs a, b (two names), which of them is
    repeated (`repeated`: `"a"` or `"b"`) and the place. Pairs with a == b are invalid inputs
    (the mechanism of `token` refuses them), so counterfactuals draw distinct names."""
    names = list(names)

    def subject(a, b, repeated):
        return a if repeated == "a" else b

    def position(repeated):
        return "second" if repeated == "a" else "first"

    def token(a, b, where):
        return " " + (a if where == "first" else b)

    return CausalModel(
        variables={"a": names, "b": names, "repeated": ["a", "b"], "place": list(places), "subject": names,
                   "position": ["first", "second"], "token": [" " + name for name in names]},
        parents={"subject": ["a", "b", "repeated"], "position": ["repeated"], "token": ["a", "b", "position"]},
        mechanisms={"subject": subject, "position": position, "token": token},
        template=template, output="token")


def hierarchical_equality(entities: int = 20, dim: int = 4, seed: int = 0, spread: float = 1.0):
    """`(causal model, embeddings)`: entities 0..n-1 with random vectors (`entities dim`,
    uniform in [-spread, spread], seeded); the input renders as the four vectors concatenated
    (`4 * dim`); output `equal` is True when `(w == x) == (y == z)`."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    embeddings = (torch.rand(entities, dim, generator=generator) * 2 - 1) * spread
    ids = list(range(entities))

    def render(values):
        return torch.cat([embeddings[values[name]] for name in ("w", "x", "y", "z")])

    model = CausalModel(
        variables={"w": ids, "x": ids, "y": ids, "z": ids, "wx": [False, True], "yz": [False, True],
                   "equal": [False, True]},
        parents={"wx": ["w", "x"], "yz": ["y", "z"], "equal": ["wx", "yz"]},
        mechanisms={"wx": lambda w, x: w == x, "yz": lambda y, z: y == z, "equal": lambda a, b: a == b},
        template=render)
    return model, embeddings


def equality_network(embeddings, sharpness: float | None = None):
    """An MLP (`torch.nn.Sequential`) that computes hierarchical equality exactly, with `wx` in
    unit 0 and `yz` in unit 1 of module `3` (a ReLU's output, 1 when the pair is equal and 0
    when not). Its output is two logits, `[not equal, equal]`.

    Layers: `0` takes |w - x| and |y - z| apart into positive and negative parts per
    coordinate; `2` sums each pair's L1 distance d and computes 1 - d * sharpness, which `3`
    clips at 0 (with sharpness past 1 / the smallest distance between two entities, exactly
    0 for distinct entities); `4`-`5` compute |wx - yz|; `6` reads it as the two logits.
    """
    import torch

    count, dim = embeddings.shape
    if sharpness is None:
        distances = torch.cdist(embeddings, embeddings, p=1) + torch.eye(count) * 1e9
        sharpness = 2.0 / float(distances.min())
    width = 4 * dim
    first = torch.nn.Linear(width, 2 * width)
    second = torch.nn.Linear(2 * width, 2)
    third = torch.nn.Linear(2, 2)
    out = torch.nn.Linear(2, 2)
    with torch.no_grad():
        first.weight.zero_(), first.bias.zero_(), second.weight.zero_()
        for pair, (left, right) in enumerate(((0, 1), (2, 3))):
            for i in range(dim):
                a, b = left * dim + i, right * dim + i
                row = pair * 2 * dim + 2 * i
                first.weight[row, a], first.weight[row, b] = 1.0, -1.0        # relu(a - b)
                first.weight[row + 1, a], first.weight[row + 1, b] = -1.0, 1.0  # relu(b - a)
                second.weight[pair, row] = second.weight[pair, row + 1] = -sharpness
        second.bias.fill_(1.0)
        third.weight.copy_(torch.tensor([[1.0, -1.0], [-1.0, 1.0]]))
        third.bias.zero_()
        out.weight.copy_(torch.tensor([[1.0, 1.0], [-1.0, -1.0]]))   # [not equal, equal]: |wx - yz|, 1 - |wx - yz|
        out.bias.copy_(torch.tensor([0.0, 1.0]))
    return torch.nn.Sequential(first, torch.nn.ReLU(), second, torch.nn.ReLU(), third, torch.nn.ReLU(), out)
