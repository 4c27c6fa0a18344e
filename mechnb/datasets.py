"""Data that ships with Python and its packages: text corpora, prompt tasks and digit images.

The 8x8 handwritten digits of scikit-learn (1,797 images inside the package, no download)
are the vision data: `digits(split)` gives a fixed, seeded, stratified 80/20 split as
`batch 1 8 8` float images already normalised for the embedded ViT
(`mechnb.vision.tiny_vit`), by `digit_pixels`, the one place that scaling lives.

    >>> train = digits("train")
    >>> train.images.shape, train.labels[:3]
    (torch.Size([1437, 1, 8, 8]), tensor([...]))

Two sources, both real English prose present on every machine with Python:

- `pydoc_data.topics`: the language reference sections behind `help()` (about 113k
  tokens with the SmolLM2 tokenizer);
- the docstrings of the standard library (modules, classes, functions; test
  packages left out), read with `ast` without importing anything (about 450k).

`python_docs()` yields documents in a fixed order; `split="train"` / `"eval"` keeps a
fixed 5 % of documents (every 20th) out for evaluation.

    >>> docs = list(python_docs(split="eval"))
    >>> len(docs) > 100
    True
"""

from __future__ import annotations

import ast
import functools
import os
import sysconfig
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:  # torch and scikit-learn load on first use: `import mechnb.datasets` stays light
    import torch

SOURCES = ("topics", "docstrings")
_HELD_OUT_EVERY = 20


def python_docs(split: str = "train", sources=SOURCES, min_chars: int = 200) -> Iterator[str]:
    """Documents of Python's own documentation, for `split` "train", "eval" or "all"."""
    if split not in ("train", "eval", "all"):
        raise ValueError(f"split must be 'train', 'eval' or 'all', got {split!r}")
    index = 0
    for source in sources:
        for document in _documents(source, min_chars):
            held_out = index % _HELD_OUT_EVERY == 0
            index += 1
            if split == "all" or (split == "eval") == held_out:
                yield document


@functools.lru_cache(maxsize=None)
def _documents(source: str, min_chars: int):
    if source == "topics":
        from pydoc_data.topics import topics

        return tuple(text.strip() for _, text in sorted(topics.items()) if len(text.strip()) >= min_chars)
    if source == "docstrings":
        # The same docstring can stand in several files (copies, re-exports): keep the first.
        # Read as far as a reader asks (the held-out split's first documents need a few
        # files, not the whole standard library: 6 s) and kept for the next reader.
        return _Kept(_first_occurrences(_docstrings(min_chars)))
    raise ValueError(f"unknown source {source!r}: use {', '.join(SOURCES)}")


def _first_occurrences(items: Iterator[str]) -> Iterator[str]:
    seen = set()
    for item in items:
        if item not in seen:
            seen.add(item)
            yield item


class _Kept:
    """An iterator's items, read on demand once and kept: any number of readers, each from the start."""

    def __init__(self, items: Iterator[str]):
        self._items, self._kept, self._lock = items, [], threading.Lock()

    def __iter__(self) -> Iterator[str]:
        index = 0
        while True:
            with self._lock:
                if index == len(self._kept):
                    item = next(self._items, _END)
                    if item is _END:
                        return
                    self._kept.append(item)
                item = self._kept[index]
            index += 1
            yield item


_END = object()


def _docstrings(min_chars: int) -> Iterator[str]:
    """Docstrings of the standard library's source files, in a fixed order."""
    root = sysconfig.get_paths()["stdlib"]
    skip = {"test", "tests", "idle_test", "site-packages", "dist-packages", "lib2to3", "__pycache__"}
    for directory, subdirectories, files in os.walk(root):
        subdirectories[:] = sorted(d for d in subdirectories if d not in skip)
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            try:
                with open(os.path.join(directory, name), encoding="utf-8") as handle:
                    tree = ast.parse(handle.read())
            except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    text = ast.get_docstring(node)
                    if text and len(text) >= min_chars:
                        yield text


# Indirect-object identification (Wang et al. 2022): templates with the subject named
# twice; the model should complete with the other name (the indirect object).
IOI_TEMPLATES = (
    "When {IO} and {S} went to the {PLACE}, {S} gave a {OBJECT} to",
    "When {S} and {IO} went to the {PLACE}, {S} gave a {OBJECT} to",
    "Then, {IO} and {S} had a long argument, and afterwards {S} said to",
    "After {IO} and {S} went to the {PLACE}, {S} handed a {OBJECT} to",
    "While {S} and {IO} were working at the {PLACE}, {S} gave a {OBJECT} to",
    "Friends {IO} and {S} found a {OBJECT} at the {PLACE}. {S} gave it to",
)
IOI_NAMES = ("Mary", "John", "Alice", "Bob", "James", "Sarah", "Michael", "Emma", "David", "Anna",
             "Tom", "Lisa", "Paul", "Kate", "Mark", "Laura", "Peter", "Jane", "Robert", "Linda")
IOI_PLACES = ("store", "park", "school", "office", "station", "market", "garden", "hospital")
IOI_OBJECTS = ("drink", "book", "ball", "gift", "letter", "bottle", "ring", "bag")


def ioi(n: int, tokenizer, seed: int = 0) -> list[dict]:
    """`n` IOI prompt pairs for `tokenizer`: `clean`, `corrupt`, `answer`, `wrong`.

    Names, places and objects are kept only where they are one token (with a leading
    space) for this tokenizer, so the clean and corrupt prompts have the same length.
    The corrupt prompt names the indirect object where the clean one repeats the
    subject (`..., Mary gave a drink to`), which flips the right answer: patching
    measures what carries "who was named twice". `answer` is the indirect object
    (` Mary`), `wrong` the subject (` John`).
    """
    import random

    def single(words):
        return [w for w in words if len(tokenizer.encode(" " + w, add_special_tokens=False)) == 1]

    names, places, objects = single(IOI_NAMES), single(IOI_PLACES), single(IOI_OBJECTS)
    if len(names) < 2 or not places or not objects:
        raise ValueError("this tokenizer has too few single-token names, places or objects for IOI")
    rng = random.Random(seed)
    pairs = []
    while len(pairs) < n:
        template = rng.choice(IOI_TEMPLATES)
        io_name, s_name = rng.sample(names, 2)
        fill = dict(IO=io_name, PLACE=rng.choice(places), OBJECT=rng.choice(objects))
        clean = template.format(S=s_name, **fill)
        # Only the subject's second mention changes: everything before it is shared.
        first, _, rest = template.rpartition("{S}")
        corrupt = first.format(S=s_name, **fill) + io_name + rest.format(S=s_name, **fill)
        if len(tokenizer.encode(clean)) != len(tokenizer.encode(corrupt)):
            continue
        pairs.append({"clean": clean, "corrupt": corrupt, "answer": " " + io_name, "wrong": " " + s_name,
                      "template": IOI_TEMPLATES.index(template)})
    return pairs


# Given names by the pronoun an English reader gives them (64 each; common US names), for the
# pronoun task of causal abstraction ("<|endoftext|>Mary walked because" -> " she";
# `mechnb.causal.tasks.pronouns`). Many are two tokens for SmolLM2's tokenizer.
FEMALE_NAMES = ("Mary", "Elizabeth", "Anna", "Emma", "Sarah", "Linda", "Susan", "Karen", "Lisa", "Nancy",
    "Betty", "Sandra", "Ashley", "Emily", "Donna", "Michelle", "Carol", "Amanda", "Melissa", "Deborah",
    "Laura", "Rebecca", "Sharon", "Cynthia", "Kathleen", "Amy", "Angela", "Helen", "Brenda", "Pamela",
    "Nicole", "Samantha", "Katherine", "Christine", "Rachel", "Catherine", "Maria", "Heather", "Diane",
    "Julie", "Victoria", "Olivia", "Sophia", "Isabella", "Grace", "Alice", "Jane", "Ruth", "Julia", "Hannah",
    "Megan", "Jessica", "Jennifer", "Patricia", "Barbara", "Margaret", "Dorothy", "Kimberly", "Stephanie",
    "Lauren", "Natalie", "Chloe", "Lucy", "Ellen")
MALE_NAMES = ("John", "James", "Robert", "Michael", "William", "David", "Richard", "Joseph", "Thomas",
    "Charles", "Christopher", "Daniel", "Matthew", "Anthony", "Mark", "Donald", "Steven", "Paul", "Andrew",
    "Joshua", "Kenneth", "Kevin", "Brian", "George", "Timothy", "Ronald", "Edward", "Jason", "Jeffrey",
    "Ryan", "Jacob", "Gary", "Nicholas", "Eric", "Jonathan", "Stephen", "Larry", "Justin", "Scott",
    "Brandon", "Benjamin", "Samuel", "Frank", "Gregory", "Raymond", "Alexander", "Patrick", "Jack", "Dennis",
    "Jerry", "Tyler", "Aaron", "Henry", "Peter", "Adam", "Harry", "Fred", "Walter", "Arthur", "Carl",
    "Roger", "Bob", "Tom", "Sam")


# Greater-than (Hanna et al. 2023): "The war lasted from the year 1732 to the year 17"
# should continue with a later year; the corrupt prompt starts at "01", which carries no
# threshold.
GREATER_THAN_NOUNS = ("war", "dynasty", "expedition", "drought", "reign", "project", "siege",
                      "journey", "rebellion", "campaign", "pilgrimage", "famine")
GREATER_THAN_TEMPLATE = "The {noun} lasted from the year {century}{year:02d} to the year {century}"


def greater_than(n: int, tokenizer, seed: int = 0) -> list[dict]:
    """`n` greater-than prompt pairs for `tokenizer`: `clean`, `corrupt`, `answer`, `wrong`.

    `answer` and `wrong` are sets of tokens, for the `prob_diff` metric (probability of
    a later year minus probability of an earlier one). Tokenizers that write years as
    two-digit tokens (GPT-2: " 17", "32") get the two-digit years after the start
    (answer) and up to it (wrong), as in the paper; tokenizers that split digits
    (Llama, SmolLM2) continue with the tens digit, so the answer is the tens digits
    above the start's and `wrong` those below it (its own is ambiguous and left out).
    """
    import random

    pieces = [tokenizer.decode([t]) for t in tokenizer.encode("1732", add_special_tokens=False)]
    if pieces == ["1", "7", "3", "2"]:
        digits = True
    elif [p.strip() for p in pieces] == ["17", "32"]:
        digits = False
    else:
        raise ValueError(f"this tokenizer writes 1732 as {pieces}: greater-than needs years split "
                         "into digits or into two-digit tokens")
    rng = random.Random(seed)
    pairs = []
    while len(pairs) < n:
        noun, century, year = rng.choice(GREATER_THAN_NOUNS), rng.randint(11, 17), rng.randint(10, 89)
        clean = GREATER_THAN_TEMPLATE.format(noun=noun, century=century, year=year)
        corrupt = GREATER_THAN_TEMPLATE.format(noun=noun, century=century, year=1)
        if len(tokenizer.encode(clean)) != len(tokenizer.encode(corrupt)):
            continue
        if digits:
            tens = year // 10
            answer = {str(d) for d in range(tens + 1, 10)}
            wrong = {str(d) for d in range(0, tens)}
        else:
            answer = {f"{y:02d}" for y in range(year + 1, 100)}
            wrong = {f"{y:02d}" for y in range(0, year + 1)}
        pairs.append({"clean": clean, "corrupt": corrupt, "answer": answer, "wrong": wrong, "year": year})
    return pairs


DIGIT_SPLITS = ("train", "test", "all")
DIGIT_MAX = 16.0  # scikit-learn's digits count ink in 4x4 blocks: values 0..16
_TEST_FRACTION = 0.2


@dataclass
class Images:
    """Labelled images: `images` `batch channel height width` (float32), `labels` `batch`
    (long), `classes` the name of each label."""

    images: "torch.Tensor"
    labels: "torch.Tensor"
    classes: list[str]

    def __len__(self) -> int:
        return len(self.labels)


def digit_pixels(values) -> "torch.Tensor":
    """Digit intensities (0..16, any shape ending `8 8`) as the embedded ViT reads them:
    float32 in -1..1 (`(v / 16 - 0.5) / 0.5`). Used for training and for every input."""
    import torch

    values = torch.as_tensor(values, dtype=torch.float32)
    return (values / DIGIT_MAX - 0.5) / 0.5


def digits(split: str = "train", seed: int = 0) -> Images:
    """scikit-learn's 8x8 handwritten digits, split 80/20 (stratified by class, seeded).

    Args:
        split: "train" (1,437 images), "test" (360) or "all" (1,797, in the data's order).
        seed: the seed of the split; the same seed gives the same split on every machine.

    Returns:
        `Images`: `images` `batch 1 8 8` float32 normalised by `digit_pixels`, `labels`
        `batch` long (0-9), `classes` `["0", ..., "9"]`.
        Example: `test = mechnb.datasets.digits("test"); test.images.shape` is `(360, 1, 8, 8)`.
    """
    import torch

    if split not in DIGIT_SPLITS:
        raise ValueError(f"split must be one of {', '.join(DIGIT_SPLITS)}, got {split!r}")
    pixels, labels = _digit_arrays()
    if split != "all":
        from sklearn.model_selection import train_test_split

        train, test = train_test_split(range(len(labels)), test_size=_TEST_FRACTION, random_state=seed,
                                       stratify=labels)
        rows = sorted(train if split == "train" else test)
        pixels, labels = pixels[rows], labels[rows]
    return Images(digit_pixels(pixels.reshape(-1, 1, 8, 8)), torch.as_tensor(labels, dtype=torch.long),
                  [str(digit) for digit in range(10)])


@functools.lru_cache(maxsize=1)
def _digit_arrays():
    """The digits' pixels (`1797 64`, 0..16) and labels, read once from scikit-learn's package."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return data.data, data.target
