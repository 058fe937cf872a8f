"""Parameter regions of a model over named corpora (Zhang et al., ACL 2024): the core region,
its bottom and random controls, language-specific regions, their overlaps, and what zeroing each
does to perplexity.

``find_regions(lm, data, config)``, with ``data`` {name: ``Corpus``} (``load_corpora``) or a
FactSet (then the corpora are its sentences' template and answer tokens, ``regions.facts``):

1. split each corpus's chunks: the *last* ``eval_chunks`` are held out for perplexity, the first
   ``max_chunks`` of the rest are the importance chunks (the two never share a chunk);
2. importance of every region tensor (``region_tensors``) per corpus on its importance chunks
   (``config.method``);
3. regions of ``ratio`` of the entries (per tensor or global, ``scope``): *core* = the top of the
   core score (the per-corpus importances summed, normalised by ``normalize``), *bottom* = its
   bottom, *random* = a seeded random region of the same size, *top_<corpus>* = each corpus's own
   top, *specific_<corpus>* = its top ``specific_q`` minus every other corpus's top ``specific_p``
   (with two corpora or more);
4. the Jaccard overlap of every two of those regions;
5. perplexity of every corpus on its held-out chunks with nothing, the core, the bottom and the
   random region zeroed, and (``zero_tops``) with each corpus's own top region zeroed
   (``perturb.zeroed``: the weights are written back bit-identically on leaving, Ctrl-C included);
6. dimension dependency (corpora, ``dimensions`` > 0; ``regions.dimensions``): the massive
   activations and candidate super weights from one pass over the held-out chunks, then one core
   parameter perturbed at a time on each of the ``dimensions`` most core-dense hidden dimensions,
   against a same-matrix control off those and off the massive dimensions;
7. with facts: every fact scored (``score_recall``, its first template) with nothing and with
   each of those regions zeroed.

With facts there is no held-out split: importance and perplexity both use every fact sentence
(the question is which parameters hold *these* facts and their sentences' language), and
``max_chunks`` / ``eval_chunks`` are not used.

Summary keys: ``<corpus>.ppl_base`` / ``_top`` / ``_bottom`` / ``_random`` and their ratios to
base ``<corpus>.ppl_top_ratio`` / ``_bottom_ratio`` / ``_random_ratio``, ``<corpus>.specific_size``,
``<corpus>.ppl_without_top_<other>`` (and ``_ratio``) with each corpus's top region zeroed,
``<corpus>.ppl_random_ratio_min`` / ``_max`` over ``random_repeats`` random regions (seeds seed,
seed + 1, ...; only the first is saved as a mask) when there are several,
``region_size`` (entries in the core region), ``region_fraction``, ``n_tensors``, ``n_corpora``,
``overlap.<a>.<b>`` for every two regions, ``seconds``; with dimension dependency
``dimensions.top`` / ``dimensions.massive`` (comma-separated dimensions), ``dimensions.jaccard``
(``coincide``), ``dimensions.n_breaking`` (top dimensions where one perturbed parameter raises every
corpus's perplexity at least ``BREAKS`` times), ``dimensions.max_ratio`` (the largest over the top
dimensions of the smallest ratio over the corpora), ``dimensions.max_control_ratio`` (the largest
ratio any control reaches on any corpus) and ``super_weight``
(parameter[index] of the first candidate); with facts also ``n_facts`` and
``accuracy.<region>`` / ``mean_prob.<region>`` (top-1 accuracy and mean probability of the answer's
first token) for ``base`` and each zeroed region. Records: one row per fact with facts (its rank
and probability under each region), else one row per corpus; the corpus rows are ``corpus_rows``
(``corpora.jsonl``) either way.

Run directory (``save``): the shared ``config.json`` / ``records.jsonl`` / ``summary.json``,
``corpora.jsonl``, ``dimensions.json`` (with dimension dependency), the masks ``core.safetensors``, ``bottom.safetensors``, ``random.safetensors``,
``specific_<corpus>.safetensors`` (``masks.save_masks``, bit-packed), ``overlap.json`` (labels and
matrix) and, with ``save_importance``, ``importance_<corpus>.safetensors`` (float32 scores). The
per-corpus top regions are written only for facts (``top_template`` / ``top_value``, which
``engram evolve`` follows over checkpoints); for corpora only their overlaps are (one file the size
of a mask per corpus saved).
"""

from __future__ import annotations

import math
import re
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch

from engramlab.config import to_dict
from engramlab.errors import EngramError
from engramlab.locate.base import model_facts, read_result, short, write_result
from engramlab.locate.regions.config import RegionConfig
from engramlab.locate.regions.facts import fact_corpora, is_fact_set
from engramlab.locate.regions.importance import importance, region_tensors
from engramlab.locate.regions.masks import (bottom_masks, core_scores, load_masks, overlap_matrix, random_masks,
                                            region_size, save_masks, specific_region, top_masks)
from engramlab.locate.regions.perturb import zeroed
from engramlab.models.context import context_length
from engramlab.models.perplexity import perplexity
from engramlab.progress import progress_bar
from engramlab.runs import atomic_write_json, atomic_write_jsonl, load_json, read_jsonl

NAME = "regions"
CONTROLS = ("core", "bottom", "random")  # the regions every corpus's perplexity is measured under
PPL_KEYS = {"core": "top", "bottom": "bottom", "random": "random"}  # region -> summary key suffix
BREAKS = 10.0  # one perturbed parameter "breaks" the model: every corpus's perplexity x10 or more
_CORPUS_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


@dataclass
class RegionResult:
    """What ``find_regions`` found (the Result shape every locator shares).

    ``rows``: one dict per corpus (name, sizes, chunk split, perplexities); ``regions``: the saved
    masks by name (core, bottom, random, specific_<corpus>); ``overlap``: (labels, Jaccard matrix)
    over those and the per-corpus top regions; ``fact_rows``: with facts, one dict per fact (rank
    and probability of its answer under each zeroed region); ``importance``: {corpus: scores},
    kept only with ``save_importance``."""

    rows: list[dict]
    regions: dict[str, dict[str, torch.Tensor]]
    overlap: tuple[list[str], list[list[float]]]
    config: dict = field(default_factory=dict)
    stats: dict = field(default_factory=dict)
    model: dict = field(default_factory=dict)
    importance: dict[str, dict[str, torch.Tensor]] | None = None
    fact_rows: list[dict] | None = None
    dimensions: dict | None = None

    @property
    def corpora(self) -> list[str]:
        return [r["corpus"] for r in self.rows]

    @property
    def core(self) -> dict[str, torch.Tensor]:
        return self.regions["core"]

    @property
    def corpus_rows(self) -> list[dict]:
        return self.rows

    def records(self) -> list[dict]:
        return self.fact_rows if self.fact_rows is not None else self.rows

    def summary(self) -> dict:
        out: dict = {}
        for r in self.rows:
            c = r["corpus"]
            for key in ("ppl_base", "ppl_top", "ppl_bottom", "ppl_random", "ppl_top_ratio", "ppl_bottom_ratio",
                        "ppl_random_ratio", "specific_size"):
                out[f"{c}.{key}"] = r.get(key)
            for key, value in r.items():
                if key.startswith(("ppl_without_top_", "ppl_random_ratio_")):
                    out[f"{c}.{key}"] = value
        out["region_size"] = region_size(self.core)
        out["region_fraction"] = out["region_size"] / max(1, self.stats.get("n_entries", 0))
        out["n_tensors"] = len(self.core)
        out["n_corpora"] = len(self.rows)
        labels, matrix = self.overlap
        for i, a in enumerate(labels):
            for j in range(i + 1, len(labels)):
                out[f"overlap.{a}.{labels[j]}"] = matrix[i][j]
        if self.dimensions is not None:
            out.update(dimension_summary(self.dimensions))
        if self.fact_rows is not None:
            out["n_facts"] = len(self.fact_rows)
            for region in fact_regions(self.fact_rows):
                ranks = [r[f"rank_{region}"] for r in self.fact_rows]
                out[f"accuracy.{region}"] = sum(k == 1 for k in ranks) / len(ranks) if ranks else None
                probs = [r[f"prob_{region}"] for r in self.fact_rows]
                out[f"mean_prob.{region}"] = sum(probs) / len(probs) if probs else None
        out["method"] = self.config.get("method")
        out["seconds"] = self.stats.get("seconds")
        return out

    def save(self, directory: str | Path) -> None:
        d = write_result(directory, NAME, self)
        atomic_write_jsonl(d / "corpora.jsonl", self.rows)
        if self.dimensions is not None:
            atomic_write_json(d / "dimensions.json", self.dimensions)
        for name, masks in self.regions.items():
            save_masks(d / f"{name}.safetensors", masks)
        atomic_write_json(d / "overlap.json", {"labels": self.overlap[0], "matrix": self.overlap[1]})
        if self.importance:
            from safetensors.torch import save_file

            for corpus, scores in self.importance.items():
                save_file({n: s.detach().float().cpu().contiguous() for n, s in scores.items()},
                          str(d / f"importance_{corpus}.safetensors"))

    @classmethod
    def load(cls, directory: str | Path) -> "RegionResult":
        d = Path(directory)
        got = read_result(d, NAME)
        fact_rows = None
        rows = got.records
        if (d / "corpora.jsonl").is_file():  # before 2026-12 records.jsonl held the corpus rows
            rows = read_jsonl(d / "corpora.jsonl")
            fact_rows = got.records if got.records and "corpus" not in got.records[0] else None
        corpora = [r["corpus"] for r in rows]
        names = [*CONTROLS, *(f"{kind}_{c}" for kind in ("specific", "top") for c in corpora
                              if (d / f"{kind}_{c}.safetensors").is_file())]
        regions = {n: load_masks(d / f"{n}.safetensors") for n in names}
        ov = load_json(d / "overlap.json", "regions overlap")
        scores = None
        if all((d / f"importance_{c}.safetensors").is_file() for c in corpora) and got.config.get("save_importance"):
            from safetensors.torch import load_file

            scores = {c: load_file(str(d / f"importance_{c}.safetensors")) for c in corpora}
        dims = load_json(d / "dimensions.json", "regions dimensions") if (d / "dimensions.json").is_file() else None
        return cls(rows, regions, (ov["labels"], ov["matrix"]), got.config, got.stats, got.model, scores, fact_rows,
                   dims)


def fact_regions(fact_rows: list[dict]) -> list[str]:
    """The regions a fact was scored under ("base" first), from a fact row's ``rank_<region>`` keys."""
    return [k[len("rank_"):] for k in (fact_rows[0] if fact_rows else {}) if k.startswith("rank_")]


def split_chunks(chunks: torch.Tensor, eval_chunks: int, max_chunks: int | None, name: str = "corpus"
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(importance chunks, held-out chunks): the last ``eval_chunks`` are held out, the first
    ``max_chunks`` of the rest score importance. Needs at least ``eval_chunks + 1`` chunks."""
    n = int(chunks.shape[0])
    if n < eval_chunks + 1:
        raise EngramError(f"--corpus {name}: {n} chunk(s) of {int(chunks.shape[1])} tokens, but it needs at least "
                          f"{eval_chunks + 1} (one for importance plus --eval-chunks {eval_chunks} held out); add "
                          f"text, lower --seq-len or --eval-chunks")
    rest = chunks[: n - eval_chunks]
    return (rest if max_chunks is None else rest[:max_chunks]), chunks[n - eval_chunks:]


def check_corpus_name(name: str) -> None:
    """A corpus name becomes file names (specific_<name>.safetensors) and summary keys."""
    if not isinstance(name, str) or not _CORPUS_NAME.match(name):
        raise EngramError(f"--corpus {name}: a corpus name becomes file names and summary keys; use letters, "
                          f"digits, _ and - only, starting with a letter or digit (e.g. --corpus de=...)")


@dataclass
class Split:
    """One corpus's importance rows and held-out rows, each (n, seq_len), with their target masks
    (None: every token)."""

    ids: torch.Tensor
    targets: torch.Tensor | None
    held_out: torch.Tensor
    held_out_targets: torch.Tensor | None


def check_inputs(lm, corpora: Mapping, config: RegionConfig, *, hold_out: bool = True) -> dict[str, Split]:
    """Refuse what ``find_regions`` cannot use (one line naming the corpus or option) before any
    work; returns each corpus's ``Split`` (``hold_out=False``: every row for both, as for facts)."""
    if not corpora:
        raise EngramError("regions: no corpora given; pass --corpus NAME=PATH")
    for name, c in corpora.items():
        check_corpus_name(name)
        if not isinstance(c.chunks, torch.Tensor) or c.chunks.dim() != 2:
            raise EngramError(f"--corpus {name}: chunks must be a (n_chunks, seq_len) tensor; load it with "
                              f"load_corpora")
    limit = context_length(lm.model)
    longest = max(int(c.chunks.shape[1]) for c in corpora.values())
    if limit is not None and longest > limit:
        raise EngramError(f"--seq-len {longest}: longer than the model's context of {limit} tokens; lower --seq-len")
    out = {}
    for name, c in corpora.items():
        if not hold_out:
            out[name] = Split(c.chunks, c.targets, c.chunks, c.targets)
            continue
        imp, held = split_chunks(c.chunks, config.eval_chunks, config.max_chunks, name)
        t = c.targets
        out[name] = Split(imp, None if t is None else t[: len(imp)], held, None if t is None else t[len(t) - len(held):])
    return out


def find_regions(lm, data, config: RegionConfig | None = None, *, progress: bool = False) -> RegionResult:
    """Regions of ``lm`` over ``data``: {name: Corpus}, or a FactSet (see the module docstring).
    The model is only read: its weights, ``requires_grad`` flags, ``.grad`` and train/eval mode are
    as they were when this returns or raises."""
    config = config or RegionConfig()
    t0 = time.time()
    facts = data if is_fact_set(data) else None
    corpora = fact_corpora(lm, facts) if facts is not None else data
    splits = check_inputs(lm, corpora, config, hold_out=facts is None)
    params = region_tensors(lm, include_norms=config.include_norms)

    # importance per corpus, kept on the CPU (the masks are selected there)
    per_corpus = {}
    for name, sp in splits.items():
        scores = importance(lm, sp.ids, config.method, config.batch_size, params, progress=progress,
                            targets=sp.targets)
        per_corpus[name] = {n: s.float().cpu() for n, s in scores.items()}
    t_importance = time.time() - t0

    score = core_scores(per_corpus, config.normalize)
    regions = {"core": top_masks(score, config.ratio, config.scope),
               "bottom": bottom_masks(score, config.ratio, config.scope),
               "random": random_masks({n: p.shape for n, p in params.items()}, config.ratio, config.seed,
                                      config.scope)}
    tops = {f"top_{c}": top_masks(s, config.ratio, config.scope) for c, s in per_corpus.items()}
    specific = {}
    if len(per_corpus) > 1:
        specific = {f"specific_{c}": specific_region(per_corpus, c, config.specific_q, config.specific_p,
                                                     config.scope) for c in per_corpus}
    regions.update(specific)
    if facts is not None:  # two small tops (template, value): kept, so evolve can follow them
        regions.update(tops)
    overlap = overlap_matrix({**{k: regions[k] for k in CONTROLS}, **tops, **specific})

    # perplexity (and, with facts, each fact's answer) with nothing and with each region zeroed
    t1 = time.time()
    zeroed_regions = {**{k: regions[k] for k in CONTROLS}, **(tops if config.zero_tops else {})}
    ppl = {name: {} for name in corpora}
    fact_scores = {}
    for region in progress_bar((None, *zeroed_regions), "perplexity, each region zeroed", enabled=progress):
        key = "base" if region is None else PPL_KEYS.get(region, f"without_{region}")
        with zeroed(params, zeroed_regions[region]) if region else nullcontext():
            for name, sp in splits.items():
                ppl[name][key] = perplexity(lm, sp.held_out, config.batch_size, config.ppl_mode, sp.held_out_targets)
            if facts is not None:
                fact_scores[region or "base"] = _recall_rows(lm, facts, config.batch_size)
    for extra in range(1, config.random_repeats):  # more random regions: how much the control varies
        shapes = {n: p.shape for n, p in params.items()}
        with zeroed(params, random_masks(shapes, config.ratio, config.seed + extra, config.scope)):
            for name, sp in splits.items():
                ppl[name][f"random_{extra}"] = perplexity(lm, sp.held_out, config.batch_size, config.ppl_mode,
                                                          sp.held_out_targets)
    t_ppl = time.time() - t1
    dims = None
    if facts is None and config.dimensions:
        dims = dimension_study(lm, params, regions["core"], score, splits, {c: p["base"] for c, p in ppl.items()},
                               config, progress=progress)

    rows = []
    for name, c in corpora.items():
        sp = splits[name]
        p = ppl[name]
        row = {"corpus": name, "path": c.path, "n_tokens": c.n_tokens, "n_documents": c.n_documents,
               "seq_len": int(c.chunks.shape[1]), "n_chunks": int(c.chunks.shape[0]),
               "importance_chunks": int(sp.ids.shape[0]), "eval_chunks": int(sp.held_out.shape[0]),
               **{f"ppl_{k}": p[k] for k in ("base", "top", "bottom", "random")},
               **{f"ppl_{k}_ratio": _ratio(p[k], p["base"]) for k in ("top", "bottom", "random")},
               "specific_size": region_size(specific[f"specific_{name}"]) if specific else None}
        for k in p:
            if k.startswith("without_"):
                row[f"ppl_{k}"], row[f"ppl_{k}_ratio"] = p[k], _ratio(p[k], p["base"])
        if config.random_repeats > 1:
            draws = [_ratio(p[k], p["base"]) for k in p if k == "random" or k.startswith("random_")]
            draws = [d for d in draws if d is not None]
            row["ppl_random_ratio_min"] = min(draws) if draws else None
            row["ppl_random_ratio_max"] = max(draws) if draws else None
        rows.append(row)
    stats = {"n_entries": sum(p.numel() for p in params.values()), "seconds_importance": round(t_importance, 3),
             "seconds_perplexity": round(t_ppl, 3), "seconds": round(time.time() - t0, 3)}
    return RegionResult(rows, regions, overlap, to_dict(config), stats, model_facts(lm),
                        per_corpus if config.save_importance else None,
                        _fact_rows(facts, fact_scores) if facts is not None else None, dims)


def dimension_study(lm, params, core, score, splits: Mapping[str, Split], base: dict, config: RegionConfig,
                    progress: bool = False) -> dict:
    """Massive activations, super-weight candidates and dimension dependency (``regions.dimensions``)
    on the held-out chunks; what ``dimensions.json`` holds."""
    from engramlab.locate.regions.dimensions import (coincide, dimension_counts, dimension_dependency,
                                                     massive_activations, super_weight_candidates)

    sample = torch.cat([sp.held_out for sp in splits.values()])  # (n_corpora * eval_chunks, seq_len)
    massive = massive_activations(lm, sample, config.batch_size, config.massive_ratio)
    supers = super_weight_candidates(lm, sample, top=3, batch_size=config.batch_size)
    held_out = {c: sp.held_out for c, sp in splits.items()}
    dep = dimension_dependency(lm, params, core, score, held_out, top=config.dimensions, op=config.dimension_op,
                               batch_size=config.batch_size, ppl_mode=config.ppl_mode, base_ppl=base,
                               avoid=massive["dims"], progress=progress)
    massive = {k: v for k, v in massive.items() if k != "layer_max"}  # (n_layers, d_model): not kept
    return {"dependency": dep, "massive": massive, "super_weights": supers,
            "coincide": coincide([r["dim"] for r in dep], massive["dims"]),
            "core_counts": dimension_counts(lm, core).tolist()}  # (d_model,): the core entries per dimension


def dimension_summary(dims: dict) -> dict:
    """The ``dimensions.*`` summary keys of a ``dimensions.json`` (see the module docstring)."""
    dep = dims.get("dependency") or []

    def worst(ratios) -> float | None:  # the smallest ratio over the corpora: "breaks every corpus"
        vals = [v for v in (ratios or {}).values() if v is not None]
        return min(vals) if vals else None

    least = [worst(r["ppl_ratio"]) for r in dep]
    # a control's largest move on any corpus: how far a parameter off those dimensions gets
    control = [max((v for v in (r["control_ppl_ratio"] or {}).values() if v is not None), default=None) for r in dep]
    supers = dims.get("super_weights") or []
    first = supers[0] if supers else None
    return {"dimensions.top": ",".join(str(r["dim"]) for r in dep),
            "dimensions.massive": ",".join(str(d) for d in (dims.get("massive") or {}).get("dims", [])),
            "dimensions.jaccard": (dims.get("coincide") or {}).get("jaccard"),
            "dimensions.n_breaking": sum(v is not None and v >= BREAKS for v in least),
            "dimensions.max_ratio": max((v for v in least if v is not None), default=None),
            "dimensions.max_control_ratio": max((v for v in control if v is not None), default=None),
            "super_weight": None if first is None else f"{first['param']}[{','.join(map(str, first['index']))}]"}


def _recall_rows(lm, facts, batch_size: int) -> list[dict]:
    from engramlab.recall import RecallConfig, score_recall

    return score_recall(lm, facts, RecallConfig(batch_size=batch_size)).records()


def _fact_rows(facts, scores: dict[str, list[dict]]) -> list[dict]:
    """One row per fact: relation, subject, object, then rank_<region> / prob_<region>."""
    rows = []
    for i, fact in enumerate(facts):
        row = {"relation": fact.relation, "subject": fact.subject, "object": fact.object}
        for region, recs in scores.items():
            row[f"rank_{region}"] = int(recs[i]["target_rank"])
            row[f"prob_{region}"] = short(float(recs[i]["target_prob"]))
        rows.append(row)
    return rows


def _ratio(x: float, base: float) -> float | None:
    if not (math.isfinite(base) and base > 0):
        return None
    return x / base
