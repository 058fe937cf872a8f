"""The computational graph a circuit lives in: writer nodes, reader slots, and the edges between.

Nodes are the token embeddings (``input``), every attention head, every MLP, and the ``logits``.
An edge joins a node that *writes* the residual stream to a later *reader* of it. A head reads the
residual three times (its query, key and value inputs), so the reader side is finer than the node
side; with grouped-query attention the key and value readers are per key/value head, shared by the
query heads of the group.

Everything is indexed so that a graph is a pair of tensors (the EAP-IG v2 layout)::

    scores  (n_writers, n_readers)  float   score of edge writer -> reader
    valid   (n_writers, n_readers)  bool    which entries are edges at all (causal order)

Writer index (``n_writers = 1 + n_layers * (n_heads + 1)``)::

    0                               input
    1 + l*(n_heads+1) + h           head h of layer l        ("a{l}.h{h}")
    1 + l*(n_heads+1) + n_heads     MLP of layer l           ("m{l}")

Reader index (``n_readers = n_layers * (n_heads + 2*n_kv_heads + 1) + 1``), per layer l in order::

    q of heads 0..n_heads-1, k of kv heads 0..n_kv_heads-1, v of kv heads, then the MLP input;
    the last reader is the logits.

Who reads what: a head of layer l reads every writer of earlier layers (and the input); an MLP also
reads the heads of its own layer, except with a parallel residual (GPT-NeoX/Pythia), where it reads
the same residual as its layer's heads; the logits read everything. GPT-2 small (12 x 12) gives
158 nodes and 32,491 edges, the usual count.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import cached_property

import torch

READER_KINDS = ("q", "k", "v", "mlp", "logits")


@dataclass(frozen=True)
class CircuitGraph:
    """Sizes and index maps of the head/MLP graph of one model (no per-edge objects)."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    parallel_residual: bool = False

    @classmethod
    def from_model(cls, lm) -> "CircuitGraph":
        a = lm.adapter
        return cls(a.n_layers, a.n_heads, a.n_kv_heads, a.parallel_residual)

    @classmethod
    def from_dict(cls, d: dict) -> "CircuitGraph":
        return cls(int(d["n_layers"]), int(d["n_heads"]), int(d["n_kv_heads"]), bool(d["parallel_residual"]))

    def to_dict(self) -> dict:
        return asdict(self)

    # -- sizes ------------------------------------------------------------------------------
    @property
    def group(self) -> int:
        """Query heads per key/value head."""
        return self.n_heads // self.n_kv_heads

    @property
    def readers_per_layer(self) -> int:
        return self.n_heads + 2 * self.n_kv_heads + 1

    @property
    def n_writers(self) -> int:
        return 1 + self.n_layers * (self.n_heads + 1)

    @property
    def n_readers(self) -> int:
        return self.n_layers * self.readers_per_layer + 1

    @property
    def n_nodes(self) -> int:
        """input + heads + MLPs + logits."""
        return self.n_writers + 1

    @property
    def n_edges(self) -> int:
        return int(self.valid.sum())

    # -- writer indices -----------------------------------------------------------------------
    def head_writer(self, layer: int, head: int = 0) -> int:
        return 1 + layer * (self.n_heads + 1) + head

    def mlp_writer(self, layer: int) -> int:
        return 1 + layer * (self.n_heads + 1) + self.n_heads

    def writers_before(self, layer: int) -> int:
        """Writers a layer's heads read: indices [0, writers_before(layer))."""
        return self.head_writer(layer)

    def mlp_reads_up_to(self, layer: int) -> int:
        """Writers layer ``layer``'s MLP reads: indices [0, mlp_reads_up_to(layer))."""
        return self.head_writer(layer) if self.parallel_residual else self.mlp_writer(layer)

    # -- reader indices -----------------------------------------------------------------------
    def q_reader(self, layer: int, head: int = 0) -> int:
        return layer * self.readers_per_layer + head

    def k_reader(self, layer: int, kv_head: int = 0) -> int:
        return layer * self.readers_per_layer + self.n_heads + kv_head

    def v_reader(self, layer: int, kv_head: int = 0) -> int:
        return layer * self.readers_per_layer + self.n_heads + self.n_kv_heads + kv_head

    def attn_readers(self, layer: int) -> slice:
        """The q, k and v readers of one layer, contiguous: n_heads + 2*n_kv_heads of them."""
        start = layer * self.readers_per_layer
        return slice(start, start + self.n_heads + 2 * self.n_kv_heads)

    def mlp_reader(self, layer: int) -> int:
        return layer * self.readers_per_layer + self.n_heads + 2 * self.n_kv_heads

    @property
    def logits_reader(self) -> int:
        return self.n_readers - 1

    # -- masks and maps (tensors, cached) -----------------------------------------------------
    @cached_property
    def valid(self) -> torch.Tensor:
        """(n_writers, n_readers) bool: True where writer -> reader is an edge."""
        v = torch.zeros(self.n_writers, self.n_readers, dtype=torch.bool)
        for l in range(self.n_layers):
            v[: self.writers_before(l), self.attn_readers(l)] = True
            v[: self.mlp_reads_up_to(l), self.mlp_reader(l)] = True
        v[:, self.logits_reader] = True
        return v

    @cached_property
    def reader_kind(self) -> torch.Tensor:
        """(n_readers,) long: index into READER_KINDS."""
        kind = torch.empty(self.n_readers, dtype=torch.long)
        for l in range(self.n_layers):
            kind[self.q_reader(l): self.k_reader(l)] = 0
            kind[self.k_reader(l): self.v_reader(l)] = 1
            kind[self.v_reader(l): self.mlp_reader(l)] = 2
            kind[self.mlp_reader(l)] = 3
        kind[self.logits_reader] = 4
        return kind

    @cached_property
    def reader_nodes(self) -> torch.Tensor:
        """(n_readers, n_nodes) bool: the node(s) each reader feeds.

        Node ids are writer indices, plus ``n_writers`` for the logits. A key/value reader feeds
        every query head of its group (grouped-query attention shares it)."""
        m = torch.zeros(self.n_readers, self.n_nodes, dtype=torch.bool)
        for l in range(self.n_layers):
            for h in range(self.n_heads):
                node, kv = self.head_writer(l, h), h // self.group
                m[self.q_reader(l, h), node] = True
                m[self.k_reader(l, kv), node] = True
                m[self.v_reader(l, kv), node] = True
            m[self.mlp_reader(l), self.mlp_writer(l)] = True
        m[self.logits_reader, self.n_writers] = True
        return m

    @cached_property
    def layer_of_writer(self) -> torch.Tensor:
        """(n_writers,) long: the layer of each writer; -1 for the input."""
        return torch.tensor([-1] + [l for l in range(self.n_layers) for _ in range(self.n_heads + 1)])

    # -- names (EAP-IG naming, so circuit files read alike) ------------------------------------
    def writer_names(self) -> list[str]:
        names = ["input"]
        for l in range(self.n_layers):
            names += [f"a{l}.h{h}" for h in range(self.n_heads)] + [f"m{l}"]
        return names

    def node_names(self) -> list[str]:
        return self.writer_names() + ["logits"]

    def reader_names(self) -> list[str]:
        """``a{l}.h{h}<q>``; key/value readers name the kv head: ``a{l}.h{j}<k>`` is kv head j
        (the same as EAP-IG's names when there is no grouped-query attention)."""
        names = []
        for l in range(self.n_layers):
            names += [f"a{l}.h{h}<q>" for h in range(self.n_heads)]
            names += [f"a{l}.h{j}<k>" for j in range(self.n_kv_heads)]
            names += [f"a{l}.h{j}<v>" for j in range(self.n_kv_heads)]
            names.append(f"m{l}")
        return names + ["logits"]

    def edge_name(self, writer: int, reader: int, writer_names=None, reader_names=None) -> str:
        w = (writer_names or self.writer_names())[writer]
        return f"{w}->{(reader_names or self.reader_names())[reader]}"


def edge_count(n_layers: int, n_heads: int, n_kv_heads: int | None = None, parallel_residual: bool = False) -> int:
    """Closed-form edge count (checks ``CircuitGraph.valid`` and needs no model).

    Layer l's attention readers see 1 + l*(H+1) writers; its MLP also sees the layer's H heads
    unless the residual is parallel; the logits see all 1 + L*(H+1)."""
    kv = n_kv_heads or n_heads
    total = 0
    for l in range(n_layers):
        upstream = 1 + l * (n_heads + 1)
        total += (n_heads + 2 * kv) * upstream + upstream + (0 if parallel_residual else n_heads)
    return total + 1 + n_layers * (n_heads + 1)
