"""Metrics of a run, read off the logits at the last position: what patching measures.

    logit_diff   logit of the answer minus logit of the wrong token (needs both)
    prob         probability of the answer
    logprob      log-probability of the answer
    prob_diff    probability of the answer minus probability of the wrong token
    kl           KL divergence from the clean run's next-token distribution, KL(clean || run)
    a callable   f(logits) -> one number per row, for logits `batch vocab`

An answer is a string (its first token is used, and `Metric.notes` says so when it
has several), a token id, or a set of them; for an image classifier, whose logits are
`batch class`, a class name (`"7"`, from `model.classes`) or a class index: a set counts as one answer whose logit is
the mean of its tokens' logits and whose probability is the sum of theirs (the
greater-than task's "any later year").

Example:
    >>> metric = make(model, "logit_diff", " Mary", " John")
    >>> metric(logits_last)          # batch vocab -> batch
"""

from __future__ import annotations

from typing import Callable

import torch

from .errors import MetricError

METRICS = ("logit_diff", "prob", "logprob", "prob_diff", "kl")


def token_id(model, answer, role: str = "answer") -> tuple[int, str | None]:
    """The token id of an answer (a classifier's class index), and a note if only its first
    token is used."""
    if getattr(model, "n_classes", None):
        return _class_id(model, answer, role), None
    if isinstance(answer, int) and not isinstance(answer, bool):
        if not 0 <= answer < model.vocab_size:
            raise MetricError(f"{role} token id {answer} out of range: the vocabulary has "
                              f"ids 0-{model.vocab_size - 1}")
        return answer, None
    if not isinstance(answer, str) or not answer:
        raise MetricError(f"{role} must be a non-empty string or a token id, got {answer!r}")
    ids = model.tokenizer.encode(answer, add_special_tokens=False)
    if not ids:
        raise MetricError(f"{role} {answer!r} has no tokens")
    note = None
    if len(ids) > 1:
        pieces = [model.tokenizer.decode([i]) for i in ids]
        note = f"{role} {answer!r} is {len(ids)} tokens {pieces}: only the first, {pieces[0]!r}, is used"
    return ids[0], note


def _class_id(model, answer, role: str) -> int:
    """The index of a classifier's class, given by name or by index."""
    classes = model.classes
    shown = ", ".join(map(repr, classes[:12])) + (" ..." if len(classes) > 12 else "")
    if isinstance(answer, int) and not isinstance(answer, bool):
        if not 0 <= answer < len(classes):
            raise MetricError(f"{role} class {answer} out of range: {model.name} has classes 0-{len(classes) - 1} "
                              f"({shown})")
        return answer
    if isinstance(answer, str) and answer in classes:
        return classes.index(answer)
    raise MetricError(f"{role} {answer!r} is not a class of {model.name}: give a class name ({shown}) or an "
                      f"index 0-{len(classes) - 1}")


def token_ids(model, answer, role: str = "answer") -> tuple[list[int], list[str]]:
    """The token ids of an answer or a set of answers, and notes on multi-token ones."""
    if isinstance(answer, (set, frozenset)):
        if not answer:
            raise MetricError(f"{role} is an empty set: give at least one token")
        found = [token_id(model, a, role) for a in sorted(answer, key=str)]
        return sorted({i for i, _ in found}), [n for _, n in found if n]
    found, note = token_id(model, answer, role)
    return [found], [note] if note else []


class Metric:
    """A metric of last-position logits (`batch vocab` -> `batch`), with its description."""

    def __init__(self, name: str, fn: Callable, notes: list[str]):
        self.name, self.fn, self.notes = name, fn, notes

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        value = self.fn(logits)
        if not torch.is_tensor(value):
            value = torch.as_tensor(value, dtype=torch.float32)
        if value.dim() == 0:
            value = value.expand(logits.shape[0])
        if value.shape != (logits.shape[0],):
            raise MetricError(f"the metric returned shape {tuple(value.shape)}; it must give one "
                              f"number per row, shape ({logits.shape[0]},), for logits batch vocab")
        return value.float()


def make(model, metric, answer=None, wrong=None, clean_logits: torch.Tensor | None = None) -> Metric:
    """A `Metric` by name or from a callable (see the module docstring)."""
    notes = []
    if callable(metric):
        return Metric(getattr(metric, "__name__", "custom"), metric, notes)
    if metric not in METRICS:
        raise MetricError(f"unknown metric {metric!r}: use one of {', '.join(METRICS)} or a "
                          "function of the last position's logits (batch vocab -> batch)")
    if metric == "kl":
        if clean_logits is None:
            raise MetricError("the kl metric needs the clean run's logits")
        reference = torch.log_softmax(clean_logits.float(), -1)

        def kl(logits):
            logprobs = torch.log_softmax(logits.float(), -1)
            clean = reference.to(logprobs.device)  # a device_map computes logits elsewhere
            return (clean.exp() * (clean - logprobs)).sum(-1)

        return Metric("kl", kl, notes)
    if answer is None:
        raise MetricError(f"the {metric} metric needs an answer token, e.g. answer=' Mary'")
    answer_ids, found = token_ids(model, answer)
    notes += found
    if metric in ("logit_diff", "prob_diff"):
        if wrong is None:
            raise MetricError(f"the {metric} metric needs a wrong token too, e.g. wrong=' John' "
                              "(or use metric='logprob')")
        wrong_ids, found = token_ids(model, wrong, "wrong")
        notes += found
        if metric == "logit_diff":
            return Metric("logit_diff", lambda l: l[:, answer_ids].mean(-1) - l[:, wrong_ids].mean(-1), notes)
        return Metric("prob_diff", lambda l: _probs(l, answer_ids) - _probs(l, wrong_ids), notes)
    if metric == "prob":
        return Metric("prob", lambda l: _probs(l, answer_ids), notes)
    return Metric("logprob", lambda l: torch.logsumexp(torch.log_softmax(l.float(), -1)[:, answer_ids], -1), notes)


def _probs(logits: torch.Tensor, ids: list[int]) -> torch.Tensor:
    return torch.softmax(logits.float(), -1)[:, ids].sum(-1)
