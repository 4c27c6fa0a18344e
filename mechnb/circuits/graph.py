"""The computational graph of a transformer as circuit discovery sees it: nodes and edges.

The residual stream is a sum: the embeddings, every attention head's output and every
MLP's output are added into it, and every later component reads that sum. So each
reader's input splits into one term per earlier writer, and "the edge u -> v" is the
term `u` contributes to the input of `v`. Nodes:

- upstream (writers): `embed`, `head.L.H` (the head's output through its share of the
  output projection; on Gemma 2 and 3, which normalise the heads' sum before adding it,
  also through that norm with its scale frozen, see `mechnb.circuits.engine`),
  `mlp_out.L`;
- downstream (readers): each head's three inputs `head.L.H:q`, `head.L.H:k`,
  `head.L.H:v` (one head's query may read a different mix than its key), `mlp_out.L`
  (the MLP's input) and `logits` (the final norm's input).

A head at layer L reads writers of layers < L; an MLP also reads its own layer's heads
unless attention and MLP run in parallel (GPT-NeoX). On the embedded SmolLM2 (30
layers, 9 heads) that is 301 writers, 841 readers and 123,211 edges.

    >>> graph = Graph.of(model)
    >>> graph.n_edges, graph.edge_name(0, graph.downstream.index("head.1.0:q"))
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch


KINDS = ("q", "k", "v")


@dataclass(frozen=True)
class Graph:
    """Writers, readers and which writer can reach which reader (see the module doc)."""

    n_layers: int
    n_heads: int
    parallel: bool

    @classmethod
    def of(cls, model) -> "Graph":
        return cls(model.n_layers, model.n_heads, model.parallel_attn_mlp)

    # Writers: embed, then per layer its heads and its MLP.
    def head(self, layer: int, head: int) -> int:
        return 1 + layer * (self.n_heads + 1) + head

    def mlp(self, layer: int) -> int:
        return 1 + layer * (self.n_heads + 1) + self.n_heads

    @property
    def n_upstream(self) -> int:
        return 1 + self.n_layers * (self.n_heads + 1)

    @cached_property
    def upstream(self) -> list[str]:
        names = ["embed"]
        for layer in range(self.n_layers):
            names += [f"head.{layer}.{h}" for h in range(self.n_heads)] + [f"mlp_out.{layer}"]
        return names

    # Readers: per layer the q, k, v inputs of each head and the MLP, then the logits.
    def head_input(self, layer: int, kind: str, head: int) -> int:
        return layer * (3 * self.n_heads + 1) + KINDS.index(kind) * self.n_heads + head

    def mlp_input(self, layer: int) -> int:
        return layer * (3 * self.n_heads + 1) + 3 * self.n_heads

    @property
    def logits_input(self) -> int:
        return self.n_layers * (3 * self.n_heads + 1)

    @property
    def n_downstream(self) -> int:
        return self.logits_input + 1

    @cached_property
    def downstream(self) -> list[str]:
        names = []
        for layer in range(self.n_layers):
            names += [f"head.{layer}.{h}:{kind}" for kind in KINDS for h in range(self.n_heads)]
            names.append(f"mlp_out.{layer}")
        return names + ["logits"]

    def attention_inputs(self, layer: int) -> slice:
        """The readers of one layer's attention, in `kind head` order."""
        start = self.head_input(layer, "q", 0)
        return slice(start, start + 3 * self.n_heads)

    def reads(self, column: int) -> int:
        """How many writers (a prefix of the upstream order) reader `column` can read."""
        if column == self.logits_input:
            return self.n_upstream
        layer, within = divmod(column, 3 * self.n_heads + 1)
        before = 1 + layer * (self.n_heads + 1)
        if within == 3 * self.n_heads and not self.parallel:
            return before + self.n_heads  # the MLP reads its own layer's heads
        return before

    @cached_property
    def valid(self) -> torch.Tensor:
        """`upstream downstream` bool: which edges exist."""
        counts = torch.tensor([self.reads(c) for c in range(self.n_downstream)])
        return torch.arange(self.n_upstream)[:, None] < counts[None, :]

    @property
    def n_edges(self) -> int:
        return int(self.valid.sum())

    def edge_name(self, u: int, v: int) -> str:
        return f"{self.upstream[u]} -> {self.downstream[v]}"

    def reader_node(self, column: int) -> int | None:
        """The writer index of the node a reader belongs to (None for the logits)."""
        if column == self.logits_input:
            return None
        layer, within = divmod(column, 3 * self.n_heads + 1)
        if within == 3 * self.n_heads:
            return self.mlp(layer)
        return self.head(layer, within % self.n_heads)

    def prune(self, kept: torch.Tensor) -> torch.Tensor:
        """Kept edges that lie on a path from the embeddings to the logits.

        An edge out of a writer no kept edge reaches carries nothing (that writer
        computes its corrupt output), and an edge into a node whose outputs are all
        removed changes nothing: dropping both leaves the circuit's behaviour as it
        is and its size honest.
        """
        kept = kept & self.valid
        owner = self.owners
        reached = torch.zeros(self.n_upstream, dtype=torch.bool)
        reached[0] = True
        for node in range(1, self.n_upstream):  # writers come in the order they run
            reached[node] = bool((kept[:, owner == node] & reached[:, None]).any())
        alive = torch.zeros(self.n_upstream, dtype=torch.bool)
        for node in range(self.n_upstream - 1, -1, -1):
            alive[node] = bool((kept[node] & self._readers_alive(alive)).any())
        return kept & reached[:, None] & self._readers_alive(alive)[None, :]

    @cached_property
    def owners(self) -> torch.Tensor:
        """`downstream`: the writer index of each reader's node (-1 for the logits)."""
        return torch.tensor([-1 if (n := self.reader_node(c)) is None else n for c in range(self.n_downstream)])

    def _readers_alive(self, alive: torch.Tensor) -> torch.Tensor:
        owner = self.owners
        return torch.where(owner < 0, torch.ones_like(alive[owner.clamp(min=0)]), alive[owner.clamp(min=0)])
