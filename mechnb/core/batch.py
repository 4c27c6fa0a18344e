"""Prompts into one padded batch whose rows know their real tokens.

Every trace runs on a `Batch`. Prompts of different lengths are padded on the
right, and the attention mask hides the padding: with causal attention a real
token never sees a pad to its right, and position ids stay `0..n-1`, so each row
computes exactly what it would alone, for every architecture (left padding would
shift GPT-2's absolute positions). Position `p` of a prompt is column `p` of its
row; `@-1` is column `length - 1` (see `mechnb.core.sites.Positions`).

Example:
    >>> batch = Batch.of(tokenizer, ["Hello world", "Hi"])
    >>> batch.lengths
    [2, 1]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .checks import as_list
from .errors import PromptError


@dataclass
class Batch:
    """Tokenized prompts: `input_ids` and `attention_mask` are `batch pos`, right-padded."""

    prompts: list[str]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    tokens: list[list[str]]

    @classmethod
    def of(cls, tokenizer, prompts) -> "Batch":
        """Tokenize a prompt or a list of prompts (strings), padding on the right.

        A `batch pos` tensor of token ids is taken as it is (no padding). A vision model's
        reader (`mechnb.core.images.ImageReader`) makes an `ImageBatch` of images instead.
        """
        if isinstance(prompts, Batch):
            return prompts
        if getattr(tokenizer, "reads_images", False):
            return tokenizer.batch(prompts)
        if torch.is_tensor(prompts):
            return cls._of_ids(tokenizer, prompts)
        listed = as_list(prompts)
        if not listed or not all(isinstance(p, str) for p in listed):
            raise PromptError("prompts must be a string or a non-empty list of strings, got "
                             f"{_given(prompts if listed is None else listed)}")
        prompts = listed
        if any(not p for p in prompts):
            raise PromptError("an empty prompt has no tokens to run on: give every prompt some text")
        encoded = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="right")
        ids, mask = encoded["input_ids"], encoded["attention_mask"]
        tokens = [
            [tokenizer.decode([t]) for t in row[: int(m.sum())].tolist()]
            for row, m in zip(ids, mask)
        ]
        return cls(prompts, ids, mask, tokens)

    @classmethod
    def _of_ids(cls, tokenizer, ids: torch.Tensor) -> "Batch":
        """A `batch pos` tensor of token ids, checked, as a batch (no padding)."""
        if ids.dim() != 2 or ids.numel() == 0:
            raise PromptError(f"token ids must be a non-empty batch x pos tensor, got shape "
                             f"{tuple(ids.shape)}: for one prompt use ids[None]")
        ids = ids.long().cpu()
        if ids.min() < 0:
            raise PromptError(f"token id {int(ids.min())} out of range: token ids are 0 or more")
        tokens = [[tokenizer.decode([t]) for t in row.tolist()] for row in ids]
        return cls(["".join(row) for row in tokens], ids, ids.new_ones(ids.shape), tokens)

    @classmethod
    def of_ids(cls, tokenizer, sequences: list[list[int]]) -> "Batch":
        """Lists of token ids (of any lengths) as a batch, padded on the right."""
        if not sequences or not all(sequences):
            raise PromptError("token id lists must be a non-empty list of non-empty lists")
        width = max(len(s) for s in sequences)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(sequences), width), pad, dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for i, sequence in enumerate(sequences):
            ids[i, :len(sequence)] = torch.tensor(sequence)
            mask[i, :len(sequence)] = 1
        tokens = [[tokenizer.decode([t]) for t in s] for s in sequences]
        return cls(["".join(t) for t in tokens], ids, mask, tokens)

    @property
    def lengths(self) -> list[int]:
        """Each prompt's number of real tokens."""
        return [len(t) for t in self.tokens]

    @property
    def last(self) -> torch.Tensor:
        """Index of each prompt's last real token, `batch`."""
        return torch.tensor(self.lengths) - 1

    def __len__(self) -> int:
        return len(self.prompts)

    def select(self, rows) -> "Batch":
        """The prompts at `rows` (a range or a list of indices), padded as long as in this batch."""
        rows = list(rows)
        return Batch([self.prompts[r] for r in rows], self.input_ids[rows], self.attention_mask[rows],
                     [self.tokens[r] for r in rows])

    def inputs(self, device) -> dict[str, torch.Tensor]:
        """Model keyword inputs on `device`."""
        return {
            "input_ids": self.input_ids.to(device),
            "attention_mask": self.attention_mask.to(device),
        }


def _given(prompts) -> str:
    """What was passed in place of prompts, in words, for an error message."""
    if isinstance(prompts, list):
        if not prompts:
            return "an empty list"
        odd = next(p for p in prompts if not isinstance(p, str))
        return f"a list holding {type(odd).__name__} {odd!r:.40}"
    return f"{type(prompts).__name__} {prompts!r:.40}"


def check_ids(model, batch: "Batch") -> None:
    """A `TraceError` for token ids past the model's vocabulary (its embedding has no row)."""
    if getattr(batch, "pixel_values", None) is not None:
        return  # images: checked by their reader
    largest = int(batch.input_ids.max())
    if largest >= model.vocab_size:
        raise PromptError(f"token id {largest} out of range: {model.name} has ids 0-{model.vocab_size - 1}")


def check_length(model, n: int, what: str = "the prompt") -> None:
    """A `TraceError` when `n` positions are more than the model takes (its config's
    `max_position_embeddings`): past them GPT-2's position table has no row."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if isinstance(limit, int) and n > limit:
        raise PromptError(f"{what} is {n} tokens, more than the {limit} positions {model.name} takes: "
                         "shorten it, or split the text")


@dataclass
class Pair:
    """A clean and a corrupt prompt of one length, with their token strings; or two images
    (`1 channel height width` each), whose tokens are the same position labels."""

    clean: str
    corrupt: str
    clean_tokens: list[str]
    corrupt_tokens: list[str]

    @property
    def first_difference(self) -> int:
        """The first position whose tokens differ (the length if none does): before it,
        the two runs compute the same values, as attention is causal. 0 for images: their
        attention is bidirectional, and equal labels say nothing of the pixels."""
        if torch.is_tensor(self.clean):
            return 0
        return first_difference(self.clean_tokens, self.corrupt_tokens)

    @property
    def names(self) -> tuple[str, str]:
        """The clean and corrupt prompts, or `image` for images: what a result's meta records."""
        if torch.is_tensor(self.clean):
            return "image", "image"
        return self.clean, self.corrupt


def prompt_pairs(model, clean, corrupt, one_length: bool = False, error: type = PromptError) -> list[Pair]:
    """Clean and corrupt prompts (a string each, or two lists) as checked `Pair`s; for a
    vision model, images (`image_pairs`).

    A pair must tokenize to one length, so positions line up; `one_length` asks every
    pair for the same length (a sweep over positions). Problems raise `error`, the
    calling method's own class (`PatchError`, `CircuitError`). Example:
    `prompt_pairs(model, clean, corrupt)[0].first_difference`.
    """
    if getattr(model.tokenizer, "reads_images", False):
        return image_pairs(model, clean, corrupt, error)
    cleans, corrupts = _prompt_list(clean, "clean", error), _prompt_list(corrupt, "corrupt", error)
    if not cleans or not corrupts:
        raise error("patching and circuits need a clean and a corrupt prompt (or two lists of them)")
    if len(cleans) != len(corrupts):
        raise error(f"{len(cleans)} clean prompts but {len(corrupts)} corrupt ones: give pairs")
    pairs = []
    for clean_prompt, corrupt_prompt in zip(cleans, corrupts):
        if not isinstance(clean_prompt, str) or not isinstance(corrupt_prompt, str) or not clean_prompt \
                or not corrupt_prompt:
            raise error(f"prompts must be non-empty strings, got the pair {clean_prompt!r:.40} and "
                        f"{corrupt_prompt!r:.40}")
        clean_tokens, corrupt_tokens = Batch.of(model.tokenizer, clean_prompt).tokens[0], \
            Batch.of(model.tokenizer, corrupt_prompt).tokens[0]
        if len(clean_tokens) != len(corrupt_tokens):
            raise error(
                f"the clean and corrupt prompts tokenize to different lengths ({len(clean_tokens)} "
                f"and {len(corrupt_tokens)}), so positions do not line up: clean {clean_tokens}, "
                f"corrupt {corrupt_tokens}. Reword one so that both have the same number of tokens")
        pairs.append(Pair(clean_prompt, corrupt_prompt, clean_tokens, corrupt_tokens))
    if one_length and len({len(p.clean_tokens) for p in pairs}) > 1:
        raise error(f"per-position patching over several pairs needs one length, got lengths "
                    f"{[len(p.clean_tokens) for p in pairs]}: use per_position=False or pairs of one length")
    return pairs


def image_pairs(model, clean, corrupt, error: type = PromptError) -> list[Pair]:
    """Clean and corrupt images (a tensor `batch channel height width`, or PIL images, as
    the model's reader takes them) as `Pair`s of one image each: the i-th clean image with
    the i-th corrupt one. Both must have one shape, the model's."""
    if clean is None or corrupt is None:
        raise error("patching an image model needs clean and corrupt images (tensors batch x channel x "
                    "height x width, or PIL images)")
    pixels = []
    for role, images in (("clean", clean), ("corrupt", corrupt)):
        try:
            pixels.append(model.tokenizer.pixels(images))
        except PromptError as problem:
            raise error(f"the {role} images: {problem}") from None
    cleans, corrupts = pixels
    if cleans.shape[1:] != corrupts.shape[1:]:
        raise error(f"the clean images are {'x'.join(map(str, cleans.shape[1:]))} but the corrupt ones "
                    f"{'x'.join(map(str, corrupts.shape[1:]))}: positions line up only between images of one shape")
    if len(cleans) != len(corrupts):
        raise error(f"{len(cleans)} clean images but {len(corrupts)} corrupt ones: give pairs")
    labels = model.tokenizer.labels
    return [Pair(a[None], b[None], list(labels), list(labels)) for a, b in zip(cleans, corrupts)]


def per_pair(value, n: int, what: str, error: type = PromptError) -> list:
    """`value` for each of `n` prompt pairs: a list of `n`, or one value for all."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise error(f"{len(value)} {what}s for {n} prompt pairs: give one per pair or one for all")
        return list(value)
    return [value] * n


def first_difference(tokens: list[str], others: list[str]) -> int:
    """The first position at which two prompts' tokens differ (the shorter length if none does)."""
    return next((i for i, (a, b) in enumerate(zip(tokens, others)) if a != b), min(len(tokens), len(others)))


def _prompt_list(value, role: str, error: type) -> list:
    """The clean or corrupt prompts as a list (a string is one prompt)."""
    if value is None:
        return []
    listed = as_list(value)  # any sequence of prompts (a list, a tuple, a pandas Series)
    if listed is not None:
        return listed
    raise error(f"the {role} prompts must be a string or a list of strings, got "
                f"{type(value).__name__} {value!r:.40}")
