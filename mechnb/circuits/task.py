"""The task a circuit is found and tested on: prompt pairs, their answers and the metric.

    >>> task = Task(model, clean, corrupt, " Mary", " John", "logit_diff")
    >>> task.clean_metric, task.corrupt_metric      # the metric on each side, averaged
    >>> for rows, values in task.chunks(fn, batch_size=8): ...

The clean and corrupt runs' last-position logits are computed once, here; each pair has
its own metric (answers may differ per pair; `kl` compares with that pair's clean
distribution). Circuit discovery scores against the task, and `Circuit.faithfulness`
and `Circuit.stability` run it again.
"""

from __future__ import annotations

import torch

from ..core.batch import Batch, per_pair, prompt_pairs
from ..core.engine import last_logits, run
from ..core.errors import CircuitError
from ..core.memory import Chunks
from ..core.metrics import make, token_ids


class Task:
    """Prompt pairs, their answers and the metric: what a circuit is found and tested on."""

    def __init__(self, model, clean, corrupt, answer, wrong, metric):
        pairs = prompt_pairs(model, clean, corrupt, error=CircuitError)
        answers = per_pair(answer, len(pairs), "answer", error=CircuitError)
        wrongs = per_pair(wrong, len(pairs), "wrong", error=CircuitError)
        for role, values in (("answer", answers), ("wrong", wrongs)):
            for value in values:
                if value is None:
                    continue
                _, notes = token_ids(model, value, role)
                if notes:
                    raise CircuitError(f"{notes[0].split(': only the first')[0]}: circuits compare single tokens; "
                                       "give a one-token answer (or a set of one-token answers)")
        self.clean = [p.clean for p in pairs]
        self.corrupt = [p.corrupt for p in pairs]
        self.answers, self.wrongs, self.metric_name = answers, wrongs, metric
        self.model = model
        chunks = Chunks(16, "the task's clean and corrupt runs", "prompts",
                        advice="use fewer or shorter prompts")
        self.clean_logits = _plain_logits(model, self.clean, chunks)
        self.corrupt_logits = _plain_logits(model, self.corrupt, chunks)
        self.metrics = [make(model, metric, a, w, self.clean_logits[i:i + 1])
                        for i, (a, w) in enumerate(zip(answers, wrongs))]
        self.notes = sorted({n for m in self.metrics for n in m.notes})
        self.clean_metric = self.metric(self.clean_logits).mean().item()
        self.corrupt_metric = self.metric(self.corrupt_logits).mean().item()

    def __len__(self) -> int:
        return len(self.clean)

    def metric(self, last_logits: torch.Tensor, rows: range | None = None) -> torch.Tensor:
        """Each pair's metric of its last-position logits (`batch vocab` -> `batch`)."""
        rows = rows or range(len(self))
        return torch.cat([self.metrics[r](last_logits[i:i + 1]) for i, r in enumerate(rows)])

    def chunks(self, run, batch_size, what: str = "circuit scoring"):
        """`(rows, run(rows, clean batch, corrupt batch))` per chunk of pairs (`rows` a range).

        `batch_size`: pairs per chunk, or a `mechnb.core.memory.Chunks`; a chunk that runs
        out of memory is halved and `run` called again on its first half.
        """
        tokenizer = self.model.tokenizer
        chunks = batch_size if isinstance(batch_size, Chunks) else Chunks(
            batch_size, what, "prompt pairs", advice="use fewer or shorter prompt pairs")

        def batches(rows):
            return run(rows, Batch.of(tokenizer, [self.clean[r] for r in rows]),
                       Batch.of(tokenizer, [self.corrupt[r] for r in rows]))

        return chunks.run(batches, range(len(self)))

    def describe(self) -> dict:
        """The task as JSON-friendly data (answer sets become sorted lists)."""
        def plain(value):
            return sorted(value, key=str) if isinstance(value, (set, frozenset)) else value

        return {"clean": self.clean, "corrupt": self.corrupt, "answer": [plain(a) for a in self.answers],
                "wrong": [plain(w) for w in self.wrongs],
                "metric": self.metric_name if isinstance(self.metric_name, str) else "custom",
                "clean_metric": self.clean_metric, "corrupt_metric": self.corrupt_metric}


def _plain_logits(model, prompts: list[str], chunks: Chunks) -> torch.Tensor:
    """Last-position logits of each prompt, `batch vocab`, in `chunks`."""

    def logits(chunk):
        batch = Batch.of(model.tokenizer, chunk)
        with run(model, batch.tokens):
            return last_logits(model, batch).float()

    return torch.cat([values for _, values in chunks.run(logits, prompts)])
