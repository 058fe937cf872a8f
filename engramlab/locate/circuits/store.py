"""Reading and writing circuit results (every file atomically).

=======================  ===========================================================================
file                     content
=======================  ===========================================================================
``scores.safetensors``   ``scores`` (n_writers, n_readers) float32, ``valid`` and ``kept`` (uint8);
                         metadata ``graph`` (the sizes, JSON)
``circuit.json``         graph sizes, node names in the circuit, kept edges with scores (best first)
``circuit_eapig.json``   (``write_eapig``) every edge in the EAP-IG JSON layout:
                         ``{"cfg": ..., "nodes": {name: {"in_graph"}}, "edges": {name: {"score", "in_graph"}}}``
                         with EAP-IG's sign: scores of -metric (EAP-IG attributes a loss,
                         -logit_diff), i.e. -1 times ``scores``
``config.json`` ...      the shared files (``engramlab.locate.base``): config, model, stats; one row per fact
``evaluation.json``      held-out metrics and the faithfulness-vs-N curve
``components.json``      head roles and logit lens
``mib.json``             MIB CPR, CMD, the ranking and the sweep (``mib.mib_scores``): fraction, N,
                         edges kept after the cleanup, held-out faithfulness per point
``pairs.json``           discovery and evaluation pairs; ``skipped.jsonl``: facts left out and why
=======================  ===========================================================================
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from engramlab.errors import EngramError
from engramlab.locate.base import read_result, split_model_keys, write_result
from engramlab.locate.circuits.graph import CircuitGraph
from engramlab.locate.circuits.prune import circuit_nodes
from engramlab.runs import atomic_write_bytes, atomic_write_json, atomic_write_jsonl, load_json, read_jsonl


def save_scores(path: Path, graph: CircuitGraph, scores: torch.Tensor, kept: torch.Tensor) -> None:
    from safetensors.torch import save

    data = save({"scores": scores.float().contiguous().cpu(), "valid": graph.valid.to(torch.uint8),
                 "kept": kept.to(torch.uint8).cpu()}, metadata={"graph": json.dumps(graph.to_dict())})
    atomic_write_bytes(path, data)


def load_scores(path: Path) -> tuple[CircuitGraph, torch.Tensor, torch.Tensor]:
    from safetensors import safe_open

    if not path.is_file():
        raise EngramError(f"{path}: circuit scores not found; run `engram circuit ... --out DIR` first")
    with safe_open(str(path), "pt") as f:
        graph = CircuitGraph.from_dict(json.loads(f.metadata()["graph"]))
        return graph, f.get_tensor("scores"), f.get_tensor("kept").bool()


def circuit_json(result) -> dict:
    names = result.graph.node_names()
    nodes = circuit_nodes(result.kept, result.graph)
    return {"graph": result.graph.to_dict(), "n_edges_total": result.graph.n_edges,
            "nodes": [names[i] for i in nodes.nonzero().flatten().tolist()], "edges": result.edges()}


def write_eapig(path: Path, result) -> None:
    """``result``'s edges in the EAP-IG layout (``eapig_json``), written atomically to ``path``."""
    doc = eapig_json(result.graph, result.scores, result.kept, result.model.get("d_model"))
    atomic_write_bytes(Path(path), json.dumps(doc).encode("utf-8"))


def eapig_json(graph: CircuitGraph, scores: torch.Tensor, kept: torch.Tensor, d_model: int | None = None) -> dict:
    """Every edge in the EAP-IG graph JSON layout (``Graph.to_json``/``from_json`` of
    hannamw/EAP-IG), for tools that read EAP-IG circuits.

    Scores are written as -``scores``: engramlab attributes +metric (e.g. +logit_diff), EAP-IG a
    loss (``logit_diff(..., loss=True)`` = -logit_diff), so only the negated scores keep their meaning
    where the sign is used (``absolute=False`` pruning). With grouped-query attention the key/value
    edges are per key/value head (``a{l}.h{j}<k>`` is kv head j), not EAP-IG's per-query-head
    ungrouped ones, so such a file does not map onto an ungrouped EAP-IG graph edge for edge."""
    w_names, r_names = graph.writer_names(), graph.reader_names()
    nodes = circuit_nodes(kept, graph)
    edges = {}
    for w, r in graph.valid.nonzero().tolist():
        edges[f"{w_names[w]}->{r_names[r]}"] = {"score": -float(scores[w, r]), "in_graph": bool(kept[w, r])}
    doc = {"cfg": {"n_layers": graph.n_layers, "n_heads": graph.n_heads, "n_kv_heads": graph.n_kv_heads,
                   "parallel_attn_mlp": graph.parallel_residual, "d_model": d_model},
           "nodes": {name: {"in_graph": bool(nodes[i])} for i, name in enumerate(graph.node_names())},
           "edges": edges}
    return doc


def save_result(result, d: Path) -> None:
    write_result(d, "circuit", result)
    save_scores(d / "scores.safetensors", result.graph, result.scores, result.kept)
    atomic_write_json(d / "circuit.json", circuit_json(result))
    atomic_write_json(d / "evaluation.json", {"metrics": result.metrics, "curve": result.curve})
    atomic_write_json(d / "components.json", {"heads": result.heads, "logit_lens": result.lens})
    atomic_write_json(d / "mib.json", result.mib)
    atomic_write_json(d / "pairs.json", result.pairs)
    atomic_write_jsonl(d / "skipped.jsonl", result.skipped)


def load_result(cls, d: Path):
    got = read_result(d, "circuit", records_required=False) if (d / "config.json").is_file() else None
    graph, scores, kept = load_scores(d / "scores.safetensors")
    ev = load_json(d / "evaluation.json", "circuit evaluation")
    comp = load_json(d / "components.json", "circuit components") if (d / "components.json").exists() else {}
    pairs = load_json(d / "pairs.json", "circuit pairs") if (d / "pairs.json").exists() else {}
    skipped = read_jsonl(d / "skipped.jsonl") if (d / "skipped.jsonl").exists() else []
    mib = load_json(d / "mib.json", "circuit MIB scores") if (d / "mib.json").exists() else {}
    if got is not None:
        config, model, stats = got.config, got.model, got.stats
    else:  # before the contract the config (merged with model facts) and stats were in evaluation.json
        config, model = split_model_keys(ev.get("config", {}))
        stats = ev.get("stats", {})
    return cls(graph, scores, kept, config, ev["metrics"], ev.get("curve", []), comp.get("heads", []),
               comp.get("logit_lens", []), pairs, skipped, stats, model, mib)
