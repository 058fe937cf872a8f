"""How well a circuit reproduces the model: faithfulness, Hit@10, faithfulness versus N.

A circuit is run by *ablating every edge outside it*, in one forward pass on the clean prompt:
each reader sees

    x_v = x (this run's residual) + sum_{u -> v not kept} (a_u(ablated) - a_u(this run))

so kept edges carry this run's values and the others carry the ablated value. The ablation is
named and the same for every reported number:

* ``corrupted``: a_u from the corrupted prompt (the default);
* ``zero``: 0;
* ``mean``: a_u averaged over every real token of the prompts being evaluated
  (``hooks.ablated_values``; scoring under ``mean`` takes its means the same way, on the
  discovery prompts).

The input node is resid_pre of layer 0, token *and* position embeddings (EAP-IG's input node is
``hook_embed``, the token embedding only): the same under ``corrupted`` (positions line up), but
``zero``/``mean`` also ablate a learned position embedding (GPT-2) here.

A head's q/k/v inputs differ per head once edges are ablated, so inside this pass the per-head
input (b, pos, n_readers, d_model) is formed and projected by that head's own weights; for
evaluation (no backward) that is fine. The projections are patched as
q_h + (N(x_h) - N(x)) W_Q[h], which keeps every bias without having to know where it lives.

faithfulness = (m(circuit) - m(empty)) / (m(clean) - m(empty)), means over examples, where
m(empty) is the metric with every edge ablated: the corrupted run for ``corrupted``.
Hit@10 is the share of examples whose clean answer is among the 10 most likely first tokens.
"""

from __future__ import annotations

from contextlib import ExitStack

import torch

from engramlab.errors import EngramError
from engramlab.locate.circuits.attribute import ABLATIONS, metric_values
from engramlab.locate.circuits.data import PairBatch
from engramlab.locate.circuits.graph import CircuitGraph
from engramlab.locate.circuits.hooks import (ablated_values, answer_logits, qkv_weights, writer_activations,
                                             writer_hooks)
from engramlab.models.hooks import site_name
from engramlab.models.scoring import answer_ranks

CACHE_BYTES = 2**30


@torch.no_grad()
def patched_logits(lm, graph: CircuitGraph, batch: PairBatch, ablated_edges: torch.Tensor,
                   ablated: torch.Tensor) -> torch.Tensor:
    """Logits at the last tokens (b, vocab) of the clean prompts with the edges in ``ablated_edges``
    ((n_writers, n_readers) bool) carrying ``ablated`` (broadcastable to (b, pos, n_writers, d))."""
    a = lm.adapter
    b, pos = batch.clean_ids.shape
    missing = (ablated_edges & graph.valid.to(ablated_edges.device)).float().to(lm.device)
    current = torch.zeros(b, pos, graph.n_writers, a.d_model, device=lm.device)

    def store(first: int, acts: torch.Tensor) -> None:
        current[:, :, first: first + acts.shape[2]] = acts.float()

    def shift(up_to: int, readers) -> torch.Tensor:
        """sum over ablated writers u < up_to of (ablated - current) -> (b, pos, [R,] d_model)."""
        diff = ablated[:, :, :up_to] - current[:, :, :up_to]
        cols = missing[:up_to, readers]
        return torch.einsum("bpnd,nr->bprd" if cols.dim() == 2 else "bpnd,n->bpd", diff, cols)

    def residual_reader(reader: int, up_to: int):
        def fn(x):
            if not bool(missing[:up_to, reader].any()):
                return None
            return x + shift(up_to, reader).to(x.dtype)
        return fn

    with ExitStack() as stack:
        stack.enter_context(writer_hooks(lm, graph, store))
        for l in range(graph.n_layers):
            per_head: dict[str, torch.Tensor] = {}
            stack.enter_context(lm.hooks.hook(site_name("attn.in", l),
                                              _attention_inputs(l, graph, missing, shift, per_head)))
            for i, kind in enumerate(("q", "k", "v")):
                stack.enter_context(lm.hooks.hook(site_name(f"attn.{kind}", l),
                                                  _project(lm, l, i, graph, per_head)))
            stack.enter_context(lm.hooks.hook(site_name("mlp.in", l), residual_reader(graph.mlp_reader(l),
                                                                                     graph.mlp_reads_up_to(l))))
        stack.enter_context(lm.hooks.hook("ln_final.in", residual_reader(graph.logits_reader, graph.n_writers)))
        return answer_logits(lm, batch.clean_ids, batch.mask, batch.last)


def _attention_inputs(layer: int, graph: CircuitGraph, missing: torch.Tensor, shift, per_head: dict):
    """Attention-norm pre-hook: form each q/k/v reader's own input x + shift_r (b, pos, R, d)."""
    readers = graph.attn_readers(layer)
    up = graph.writers_before(layer)

    def fn(x):
        per_head.clear()
        if bool(missing[:up, readers].any()):
            per_head["x"] = x
            per_head["inputs"] = x.unsqueeze(2) + shift(up, readers).to(x.dtype)
        return None

    return fn


def _project(lm, layer: int, which: int, graph: CircuitGraph, per_head: dict):
    """q/k/v site hook: t + (N(x_r) - N(x)) W[r] for this projection's readers."""
    nq, nkv = graph.n_heads, graph.n_kv_heads
    sl = [slice(0, nq), slice(nq, nq + nkv), slice(nq + nkv, nq + 2 * nkv)][which]

    def fn(t):  # (b, pos, n, d_head)
        if "inputs" not in per_head:
            return None
        norm = lm.adapter.attn_norm(layer)
        x = per_head["x"]
        change = norm.forward(per_head["inputs"][:, :, sl]) - norm.forward(x).unsqueeze(2)
        return t + torch.einsum("bpnd,nde->bpne", change, qkv_weights(lm, layer)[which])

    return fn


def _ranks(logits: torch.Tensor, batch: PairBatch) -> torch.Tensor:
    """Rank (1 = top) of the clean answer in last-token logits (b, vocab)."""
    return answer_ranks(logits, batch.clean_answer)


class CircuitEvaluator:
    """Evaluates many circuits on one set of pairs: clean and ablated runs are computed once."""

    def __init__(self, lm, graph: CircuitGraph, batch: PairBatch, ablation: str = "corrupted",
                 metric: str = "logit_diff", batch_size: int = 8):
        if ablation not in ABLATIONS:
            raise EngramError(f"ablation {ablation!r}: choose one of {', '.join(ABLATIONS)}")
        self.lm, self.graph, self.metric, self.ablation = lm, graph, metric, ablation
        self.chunks = list(batch.chunks(batch_size))
        self.n = len(batch)
        # Corrupted activations are kept between evaluations unless they would take more than
        # CACHE_BYTES; then each evaluation recomputes them (one more forward per chunk).
        size = sum(c.clean_ids.numel() for c in self.chunks) * graph.n_writers * lm.adapter.d_model * 4
        self.cache = size <= CACHE_BYTES
        clean_m, clean_r, corrupt_m, self.ablated = [], [], [], []
        for chunk in self.chunks:
            with torch.no_grad():
                logits = answer_logits(lm, chunk.clean_ids, chunk.mask, chunk.last)
            clean_m.append(metric_values(logits, chunk, metric))
            clean_r.append(_ranks(logits, chunk))
            if ablation == "corrupted":
                acts, bad = writer_activations(lm, graph, chunk, corrupted=True)
                self.ablated.append(acts if self.cache else None)
                corrupt_m.append(metric_values(bad, chunk, metric))
        if ablation != "corrupted":  # one value per writer for every position and example
            self.ablated = [ablated_values(lm, graph, self.chunks, ablation)[None, None]] * len(self.chunks)
        self.m_clean = torch.cat(clean_m).cpu()
        self.rank_clean = torch.cat(clean_r).cpu()
        # m(empty): for "corrupted" the corrupted run itself, otherwise every edge ablated.
        self.m_empty = torch.cat(corrupt_m).cpu() if corrupt_m else self.run(torch.zeros_like(graph.valid))[0]

    def run(self, kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(metric, clean-answer rank) per example, (n,) each, with the circuit ``kept``."""
        metrics, ranks = [], []
        for chunk, ablated in zip(self.chunks, self.ablated):
            if ablated is None:
                ablated = writer_activations(self.lm, self.graph, chunk, corrupted=True)[0]
            logits = patched_logits(self.lm, self.graph, chunk, ~kept.bool(), ablated)
            metrics.append(metric_values(logits, chunk, self.metric))
            ranks.append(_ranks(logits, chunk))
        return torch.cat(metrics).cpu(), torch.cat(ranks).cpu()

    def evaluate(self, kept: torch.Tensor) -> dict:
        """faithfulness, Hit@10 of model and circuit, and the mean metrics behind them."""
        m_circuit, rank = self.run(kept)
        clean, empty, circ = float(self.m_clean.mean()), float(self.m_empty.mean()), float(m_circuit.mean())
        gap = clean - empty
        return {
            "faithfulness": (circ - empty) / gap if abs(gap) > 1e-12 else float("nan"),
            "hit_at_10_model": float((self.rank_clean <= 10).float().mean()),
            "hit_at_10_circuit": float((rank <= 10).float().mean()),
            "metric_clean": clean, "metric_empty": empty, "metric_circuit": circ,
            "n_examples": self.n, "ablation": self.ablation,
        }


def faithfulness_curve(evaluator: CircuitEvaluator, scores: torch.Tensor, graph: CircuitGraph,
                       sizes: list[int], rule: str = "topn") -> list[dict]:
    """Faithfulness of the top-N circuit (after cleanup) for each N in ``sizes``.

    One record per distinct N: ``n`` (requested), ``n_kept`` (edges left after the unreachable-edge
    cleanup: the circuit that was evaluated), ``edge_fraction`` = n_kept / n_edges and
    ``requested_fraction`` = n / n_edges, ``faithfulness``, ``hit_at_10_circuit``."""
    from engramlab.locate.circuits.prune import prune

    out = []
    for n in sorted({int(s) for s in sizes}):
        kept = prune(scores, graph, rule, n=n)
        result = evaluator.evaluate(kept)
        n_kept = int(kept.sum())
        out.append({"n": n, "n_kept": n_kept, "edge_fraction": n_kept / graph.n_edges,
                    "requested_fraction": n / graph.n_edges, "faithfulness": result["faithfulness"],
                    "hit_at_10_circuit": result["hit_at_10_circuit"]})
    return out
