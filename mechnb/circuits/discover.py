"""Score every edge (or node) of the graph from a few forward and backward passes.

    score(u -> v) = sum over prompts and positions of
                    (u's clean output - u's corrupt output) . d metric / d (v's input)

- `eap` (edge attribution patching, Syed et al. 2023): the gradient at the clean run.
  The score estimates how much the metric drops when the edge carries the corrupt
  value instead (positive: the edge helps the clean answer).
- `eap-ig` (Hanna et al. 2024): the gradient averaged over `steps` runs whose input
  embeddings lie on the straight line from the corrupt to the clean prompt (at
  k/steps, k = 1..steps): integrated gradients, so scores add up closer to the real
  effect where the metric saturates.
- `gim`: `eap` under GIM's backward rules (`mechnb.gim`, Edin et al. 2025).
- `exact` (nodes only): each head, MLP and the embeddings patched from the corrupt
  run into the clean one, one node at a time, by the batched patching engine:
  `score = metric(clean) - metric(patched)`.

Node scores of the gradient methods are the sums of the node's outgoing edge
scores (the gradient at a writer's output is the sum of the gradients at every
input that reads it). Costs: `eap` and `gim` one forward and backward per batch of
pairs, `eap-ig` `steps` of them, whatever the number of edges.
"""

from __future__ import annotations

import time
from contextlib import nullcontext

import torch

from ..batch import Batch
from ..errors import MechnbError
from ..memory import Chunks
from ..metrics import MetricError, make, token_ids
from .engine import embeddings, last_logits, reader_gradients, writer_outputs
from .graph import Graph

METHODS = ("eap", "eap-ig", "gim", "exact")
LEVELS = ("edge", "node")


class CircuitError(MechnbError, ValueError):
    """Prompts, answers, metrics or options that circuit discovery cannot use."""


class Task:
    """Prompt pairs, their answers and the metric: what a circuit is found and tested on."""

    def __init__(self, model, clean, corrupt, answer, wrong, metric):
        from ..patching import PatchError, _pairs, _per_pair

        try:
            pairs = _pairs(model, clean, corrupt, per_position=False)
            answers = _per_pair(answer, len(pairs), "answer")
            wrongs = _per_pair(wrong, len(pairs), "wrong")
        except PatchError as error:
            raise CircuitError(str(error)) from None
        for role, values in (("answer", answers), ("wrong", wrongs)):
            for value in values:
                if value is None:
                    continue
                _, notes = token_ids(model, value, role)
                if notes:
                    raise CircuitError(f"{notes[0].split(': only the first')[0]}: circuits compare single tokens; "
                                       "give a one-token answer (or a set of one-token answers)")
        self.clean = [p[0] for p in pairs]
        self.corrupt = [p[1] for p in pairs]
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

        `batch_size`: pairs per chunk, or a `mechnb.memory.Chunks`; a chunk that runs
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
    from ..interventions import Context

    def run(chunk):
        batch = Batch.of(model.tokenizer, chunk)
        model._context = Context(batch.tokens)
        try:
            with torch.no_grad():
                return last_logits(model, batch).float()
        finally:
            model._context = None

    return torch.cat([logits for _, logits in chunks.run(run, prompts)])


def edge_scores(model, graph: Graph, task: Task, method: str, steps: int, batch_size: int) -> torch.Tensor:
    """`upstream downstream` scores (NaN where no edge), averaged over the task's pairs."""
    scores = torch.zeros(graph.n_upstream, graph.n_downstream, device=model.device)
    alphas = [k / steps for k in range(1, steps + 1)] if method == "eap-ig" else [1.0]

    def chunk_scores(rows, clean, corrupt):
        clean_embeds, corrupt_embeds = embeddings(model, clean), embeddings(model, corrupt)
        # Before the first token where a pair differs, every writer's clean and corrupt
        # outputs are equal (attention is causal): those positions add nothing to a score,
        # so the readers' gradients are kept from there on only.
        start = _first_difference(clean, corrupt)
        readers = torch.zeros(graph.n_downstream, len(rows), clean_embeds.shape[1] - start, model.d_model,
                              device=model.device)
        for alpha in alphas:
            inputs = corrupt_embeds + alpha * (clean_embeds - corrupt_embeds)
            with model.gim() if method == "gim" else nullcontext():
                reader_gradients(model, graph, clean, lambda l: task.metric(l, rows), inputs, readers, start)
        # After the gradients, and in place: the largest tensors are never held together.
        differences = writer_outputs(model, graph, clean)[:, :, start:]
        differences -= writer_outputs(model, graph, corrupt)[:, :, start:]
        return differences.flatten(1) @ readers.flatten(1).T / len(alphas)

    for _, part in task.chunks(chunk_scores, batch_size, f"{method} edge scores"):
        scores += part
    scores = (scores / len(task)).cpu()
    return scores.masked_fill(~graph.valid, float("nan"))


def _first_difference(clean, corrupt) -> int:
    """The first position at which any pair's clean and corrupt tokens differ."""
    differs = (clean.input_ids != corrupt.input_ids).any(0).nonzero()
    return int(differs[0]) if len(differs) else clean.input_ids.shape[1]


def exact_node_scores(model, graph: Graph, task: Task, batch_size: int | None) -> torch.Tensor:
    """`upstream`: metric(clean) - metric(clean with the node's output from corrupt)."""
    scores = torch.zeros(graph.n_upstream)
    common = dict(answer=task.answers, wrong=task.wrongs, metric=task.metric_name, per_position=False,
                  direction="noising", batch_size=batch_size, progress=False)
    heads = model.patch(task.clean, task.corrupt, "head.*.*", **common)
    mlps = model.patch(task.clean, task.corrupt, "mlp_out.*", **common)
    embed = model.patch(task.clean, task.corrupt, "embed", **common)
    clean = heads.meta["clean_metric"]
    scores[0] = clean - embed.values.reshape(-1)[0]
    for layer in range(graph.n_layers):
        first = graph.head(layer, 0)
        scores[first:first + graph.n_heads] = clean - heads.values[layer]
        scores[graph.mlp(layer)] = clean - mlps.values[layer]
    return scores


def discover(model, clean, corrupt, answer, wrong=None, method: str = "eap-ig", level: str = "edge",
             steps: int = 5, metric="logit_diff", batch_size: int | None = None):
    """Score the graph's edges or nodes; see `Model.circuit` for the arguments."""
    from .circuit import Circuit

    start = time.perf_counter()
    if method not in METHODS:
        raise CircuitError(f"unknown circuit method {method!r}: use one of {', '.join(METHODS)}")
    if level not in LEVELS:
        raise CircuitError(f"unknown level {level!r}: use 'edge' or 'node'")
    if method == "exact" and level != "node":
        raise CircuitError("method='exact' patches nodes one at a time: use level='node' "
                           "(edges are too many to patch one by one; use eap-ig for edges)")
    if not isinstance(steps, int) or steps < 1:
        raise CircuitError(f"steps must be a positive integer, got {steps!r}")
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise CircuitError(f"batch_size must be a positive integer, got {batch_size!r}")
    graph = Graph.of(model)
    try:
        task = Task(model, clean, corrupt, answer, wrong, metric)
    except MetricError as error:
        raise CircuitError(str(error)) from None
    if method == "exact":
        scores = exact_node_scores(model, graph, task, batch_size)
    else:
        scores = edge_scores(model, graph, task, method, steps, batch_size or 8)
        if level == "node":
            scores = scores.nan_to_num().sum(1)
    meta = {"method": method, "level": level, "steps": steps if method == "eap-ig" else None,
            "model": model.name, "n_pairs": len(task), "notes": task.notes,
            "seconds": round(time.perf_counter() - start, 3), **task.describe()}
    return Circuit(graph, scores, meta, model=model, task=task)
