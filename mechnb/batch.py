"""Prompts into one padded batch whose rows know their real tokens.

Every trace runs on a `Batch`. Prompts of different lengths are padded on the
right, and the attention mask hides the padding: with causal attention a real
token never sees a pad to its right, and position ids stay `0..n-1`, so each row
computes exactly what it would alone, for every architecture (left padding would
shift GPT-2's absolute positions). Position `p` of a prompt is column `p` of its
row; `@-1` is column `length - 1` (see `mechnb.sites.Positions`).

Example:
    >>> batch = Batch.of(tokenizer, ["Hello world", "Hi"])
    >>> batch.lengths
    [2, 1]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import TraceError


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

        A `batch pos` tensor of token ids is taken as it is (no padding).
        """
        if isinstance(prompts, Batch):
            return prompts
        if hasattr(prompts, "dim") and prompts.dim() == 2:
            ids = prompts.long().cpu()
            tokens = [[tokenizer.decode([t]) for t in row.tolist()] for row in ids]
            return cls(["".join(row) for row in tokens], ids, ids.new_ones(ids.shape), tokens)
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts) if prompts is not None else []
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise TraceError(
                "prompts must be a string or a non-empty list of strings, got "
                f"{type(prompts).__name__}"
            )
        if any(not p for p in prompts):
            raise TraceError("an empty prompt has no tokens to run on: give every prompt some text")
        encoded = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="right")
        ids, mask = encoded["input_ids"], encoded["attention_mask"]
        tokens = [
            [tokenizer.decode([t]) for t in row[: int(m.sum())].tolist()]
            for row, m in zip(ids, mask)
        ]
        return cls(prompts, ids, mask, tokens)

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

    def inputs(self, device) -> dict[str, torch.Tensor]:
        """Model keyword inputs on `device`."""
        return {
            "input_ids": self.input_ids.to(device),
            "attention_mask": self.attention_mask.to(device),
        }
