"""Parameter regions of a model over named corpora (Zhang et al., ACL 2024): the core region,
its bottom and random controls, language-specific regions, their overlaps, and what zeroing each
does to perplexity.

``find_regions(lm, corpora, config)``, with ``corpora`` {name: ``Corpus``} (``load_corpora``):

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
   random region zeroed (``perturb.zeroed``: the weights are written back bit-identically on
   leaving, Ctrl-C included).

Summary keys: ``<corpus>.ppl_base`` / ``_top`` / ``_bottom`` / ``_random`` and their ratios to
base ``<corpus>.ppl_top_ratio`` / ``_bottom_ratio`` / ``_random_ratio``, ``<corpus>.specific_size``,
``region_size`` (entries in the core region), ``region_fraction``, ``n_tensors``, ``n_corpora``,
``overlap.<a>.<b>`` for every two regions, ``seconds``. Records: one row per corpus.

Run directory (``save``): the shared ``config.json`` / ``records.jsonl`` / ``summary.json``, the
masks ``core.safetensors``, ``bottom.safetensors``, ``random.safetensors``,
``specific_<corpus>.safetensors`` (``masks.save_masks``, bit-packed), ``overlap.json`` (labels and
matrix) and, with ``save_importance``, ``importance_<corpus>.safetensors`` (float32 scores). The
per-corpus top regions are not written (one more file the size of a mask per corpus); their
overlaps are.
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
from engramlab.locate.base import model_facts, read_result, write_result
from engramlab.locate.regions.config import METHODS, NORMALIZE, PPL_MODES, SCOPES, RegionConfig  # noqa: F401
from engramlab.locate.regions.importance import importance, region_tensors
from engramlab.locate.regions.masks import (bottom_masks, core_scores, load_masks, overlap_matrix, random_masks,
                                            region_size, save_masks, specific_region, top_masks)
from engramlab.locate.regions.perplexity import perplexity
from engramlab.locate.regions.perturb import zeroed
from engramlab.models.context import context_length
from engramlab.runs import atomic_write_json, load_json

NAME = "regions"
CONTROLS = ("core", "bottom", "random")  # the regions every corpus's perplexity is measured under
PPL_KEYS = {"core": "top", "bottom": "bottom", "random": "random"}  # region -> summary key suffix
_CORPUS_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


@dataclass
class RegionResult:
    """What ``find_regions`` found (the Result shape every locator shares).

    ``rows``: one dict per corpus (name, sizes, chunk split, perplexities); ``regions``: the saved
    masks by name (core, bottom, random, specific_<corpus>); ``overlap``: (labels, Jaccard matrix)
    over those and the per-corpus top regions; ``importance``: {corpus: scores}, kept only with
    ``save_importance``."""

    rows: list[dict]
    regions: dict[str, dict[str, torch.Tensor]]
    overlap: tuple[list[str], list[list[float]]]
    config: dict = field(default_factory=dict)
    stats: dict = field(default_factory=dict)
    model: dict = field(default_factory=dict)
    importance: dict[str, dict[str, torch.Tensor]] | None = None

    @property
    def corpora(self) -> list[str]:
        return [r["corpus"] for r in self.rows]

    @property
    def core(self) -> dict[str, torch.Tensor]:
        return self.regions["core"]

    def records(self) -> list[dict]:
        return self.rows

    def summary(self) -> dict:
        out: dict = {}
        for r in self.rows:
            c = r["corpus"]
            for key in ("ppl_base", "ppl_top", "ppl_bottom", "ppl_random", "ppl_top_ratio", "ppl_bottom_ratio",
                        "ppl_random_ratio", "specific_size"):
                out[f"{c}.{key}"] = r.get(key)
        out["region_size"] = region_size(self.core)
        out["region_fraction"] = out["region_size"] / max(1, self.stats.get("n_entries", 0))
        out["n_tensors"] = len(self.core)
        out["n_corpora"] = len(self.rows)
        labels, matrix = self.overlap
        for i, a in enumerate(labels):
            for j in range(i + 1, len(labels)):
                out[f"overlap.{a}.{labels[j]}"] = matrix[i][j]
        out["method"] = self.config.get("method")
        out["seconds"] = self.stats.get("seconds")
        return out

    def save(self, directory: str | Path) -> None:
        d = write_result(directory, NAME, self)
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
        corpora = [r["corpus"] for r in got.records]
        names = [*CONTROLS, *(f"specific_{c}" for c in corpora if (d / f"specific_{c}.safetensors").is_file())]
        regions = {n: load_masks(d / f"{n}.safetensors") for n in names}
        ov = load_json(d / "overlap.json", "regions overlap")
        scores = None
        if all((d / f"importance_{c}.safetensors").is_file() for c in corpora) and got.config.get("save_importance"):
            from safetensors.torch import load_file

            scores = {c: load_file(str(d / f"importance_{c}.safetensors")) for c in corpora}
        return cls(got.records, regions, (ov["labels"], ov["matrix"]), got.config, got.stats, got.model, scores)


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


def check_inputs(lm, corpora: Mapping, config: RegionConfig) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Refuse what ``find_regions`` cannot use (one line naming the corpus or option) before any
    work; returns each corpus's (importance chunks, held-out chunks)."""
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
    return {name: split_chunks(c.chunks, config.eval_chunks, config.max_chunks, name) for name, c in corpora.items()}


def find_regions(lm, corpora: Mapping, config: RegionConfig | None = None, *, progress: bool = False
                 ) -> RegionResult:
    """Regions of ``lm`` over ``corpora`` {name: Corpus} (see the module docstring). The model is
    only read: its weights, ``requires_grad`` flags, ``.grad`` and train/eval mode are as they
    were when this returns or raises."""
    config = config or RegionConfig()
    t0 = time.time()
    splits = check_inputs(lm, corpora, config)
    params = region_tensors(lm, include_norms=config.include_norms)

    # importance per corpus, kept on the CPU (the masks are selected there)
    per_corpus = {}
    for name, (imp, _) in splits.items():
        scores = importance(lm, imp, config.method, config.batch_size, params, progress=progress)
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
    overlap = overlap_matrix({**{k: regions[k] for k in CONTROLS}, **tops, **specific})

    # perplexity on the held-out chunks, with nothing and with each region zeroed
    t1 = time.time()
    ppl = {name: {} for name in corpora}
    for region in (None, *CONTROLS):
        key = "base" if region is None else PPL_KEYS[region]
        with zeroed(params, regions[region]) if region else nullcontext():
            for name, (_, held_out) in splits.items():
                ppl[name][key] = perplexity(lm, held_out, config.batch_size, config.ppl_mode)
    t_ppl = time.time() - t1

    rows = []
    for name, c in corpora.items():
        imp, held_out = splits[name]
        p = ppl[name]
        row = {"corpus": name, "path": c.path, "n_tokens": c.n_tokens, "n_documents": c.n_documents,
               "seq_len": int(c.chunks.shape[1]), "n_chunks": int(c.chunks.shape[0]),
               "importance_chunks": int(imp.shape[0]), "eval_chunks": int(held_out.shape[0]),
               **{f"ppl_{k}": p[k] for k in ("base", "top", "bottom", "random")},
               **{f"ppl_{k}_ratio": _ratio(p[k], p["base"]) for k in ("top", "bottom", "random")},
               "specific_size": region_size(specific[f"specific_{name}"]) if specific else None}
        rows.append(row)
    stats = {"n_entries": sum(p.numel() for p in params.values()), "seconds_importance": round(t_importance, 3),
             "seconds_perplexity": round(t_ppl, 3), "seconds": round(time.time() - t0, 3)}
    return RegionResult(rows, regions, overlap, to_dict(config), stats, model_facts(lm),
                        per_corpus if config.save_importance else None)


def _ratio(x: float, base: float) -> float | None:
    if not (math.isfinite(base) and base > 0):
        return None
    return x / base
