"""Selecting knowledge neurons from attribution scores: coarse sets, refinement, consistency.

* coarse: score > threshold x max score of the prompt (``coarse_neurons``);
* refined: in the coarse sets of at least a share p of a fact's paraphrases, p adapted per fact
  (``refine_neurons``, engramlab) or per relation (``refine_relation_dai``, Dai et al. 2022);
* relation neurons: in the refined sets of at least ``share`` of a relation's facts;
* consistency: mean pairwise Jaccard index of the paraphrases' coarse sets.
"""

from __future__ import annotations

from collections import Counter
from itertools import combinations
from typing import Sequence

import torch

P_STEP = 0.05
DAI_TRIES = 6  # Dai's 2_get_kn.py evaluates at most 6 values of p per relation


def coarse_neurons(scores: torch.Tensor, threshold: float) -> list[tuple[int, int, float]]:
    """(layer, index, score) of the neurons scoring above ``threshold`` x the maximum, best first.

    ``scores`` (n_layers, d_mlp). Nothing is selected when no score is positive."""
    top = float(scores.max())
    if top <= 0:
        return []
    layer, index = torch.nonzero(scores > threshold * top, as_tuple=True)
    found = [(int(l), int(i), float(scores[l, i])) for l, i in zip(layer, index)]
    return sorted(found, key=lambda n: -n[2])


def _tally(coarse_sets: Sequence[Sequence[tuple[int, int, float]]]) -> tuple[Counter, dict]:
    """Per (layer, index): in how many of the sets it is, and the sum of its scores there."""
    count: Counter = Counter()
    total: dict[tuple[int, int], float] = {}
    for neurons in coarse_sets:
        for l, i, s in neurons:
            count[(l, i)] += 1
            total[(l, i)] = total.get((l, i), 0.0) + s
    return count, total


def _ranked(keys, count: Counter, total: dict) -> list[tuple[int, int, float]]:
    """(layer, index, mean score), by number of paraphrases, then mean score, then position."""
    keys = sorted(keys, key=lambda k: (-count[k], -total[k] / count[k], k))
    return [(l, i, total[(l, i)] / count[(l, i)]) for l, i in keys]


def refine_relation_dai(facts_coarse: Sequence[Sequence[Sequence[tuple[int, int, float]]]], p_start: float = 0.7,
                        min_prompts: int = 3, min_mean: float = 2, max_mean: float = 5,
                        tries: int = DAI_TRIES) -> tuple[list[list[tuple[int, int, float]]], float]:
    """Dai et al. 2022's refinement (``2_get_kn.py``) for the facts of one relation.

    ``facts_coarse[f]`` holds fact f's coarse sets, one per paraphrase (n_f of them). A neuron is
    refined for fact f when it is in at least max(p * n_f, ``min_prompts``) of them. p starts at
    ``p_start``; while the mean number of refined neurons per fact (over all the given facts) is
    outside [``min_mean``, ``max_mean``], p moves by 0.05 (up when too many, down when too few),
    for at most ``tries`` values of p. No cap. Returns (per fact: (layer, index, mean score) by
    paraphrase count then mean score, the p used)."""
    if not facts_coarse:
        return [], p_start
    tallies = [_tally(sets) for sets in facts_coarse]

    def kept(p: float) -> list[list[tuple[int, int]]]:
        # round() as in refine_neurons: 0.05-steps must not drift above a whole count.
        return [[k for k, c in count.items() if c >= max(round(p * len(sets), 9), min_prompts)]
                for (count, _), sets in zip(tallies, facts_coarse)]

    p = p_start
    for attempt in range(tries):
        chosen = kept(p)
        mean = sum(len(c) for c in chosen) / len(chosen)
        if min_mean <= mean <= max_mean or attempt == tries - 1:
            break
        p = round(p + (P_STEP if mean > max_mean else -P_STEP), 9)
    return [_ranked(c, count, total) for c, (count, total) in zip(chosen, tallies)], p


def refine_neurons(coarse_sets: Sequence[Sequence[tuple[int, int, float]]], p_start: float = 0.5,
                   min_neurons: int = 2, max_neurons: int = 5) -> tuple[list[tuple[int, int, float]], float]:
    """engramlab's per-fact refinement: neurons shared by at least a share p of the paraphrases'
    coarse sets, p adapted per fact.

    p starts at ``p_start``; while more than ``max_neurons`` are kept it rises by 0.05 (but not
    past a p that keeps fewer than ``min_neurons``), while fewer than ``min_neurons`` it falls by
    0.05. Whatever remains is cut to the best ``max_neurons`` by number of paraphrases, then mean
    score (with one paraphrase: the top coarse neurons). Returns ((layer, index, mean score) best first, final p)."""
    n = len(coarse_sets)
    if n == 0:
        return [], p_start
    count, total = _tally(coarse_sets)

    def kept(p: float) -> list[tuple[int, int]]:
        # round() guards against 0.1 + 0.2-style drift making p * n a hair above a whole count.
        return [key for key, c in count.items() if c >= round(p * n, 9)]

    p, chosen = p_start, kept(p_start)
    if len(chosen) > max_neurons:
        while len(chosen) > max_neurons and p + P_STEP <= 1 + 1e-9:
            fewer = kept(round(p + P_STEP, 9))
            if len(fewer) < min_neurons:  # overshoot: stay at p and cut the ranking instead
                break
            p, chosen = round(p + P_STEP, 9), fewer
    else:
        while len(chosen) < min_neurons and p - P_STEP > 1e-9:
            p = round(p - P_STEP, 9)
            chosen = kept(p)
    return _ranked(chosen, count, total)[:max_neurons], p


def relation_neurons(neuron_sets: Sequence[Sequence[tuple[int, int]]], share: float = 0.1) -> list[list[int]]:
    """[layer, index] of the neurons in at least ``share`` of the given sets (one set per fact)."""
    if not neuron_sets:
        return []
    count = Counter((int(l), int(i)) for s in neuron_sets for l, i in set((n[0], n[1]) for n in s))
    need = share * len(neuron_sets)
    return sorted([l, i] for (l, i), c in count.items() if c >= need - 1e-9)


def consistency(coarse_sets: Sequence[Sequence[tuple]]) -> float | None:
    """Mean pairwise Jaccard index of the paraphrases' coarse sets (None for fewer than two)."""
    sets = [{(n[0], n[1]) for n in s} for s in coarse_sets]
    pairs = list(combinations(sets, 2))
    if not pairs:
        return None
    return sum(len(a & b) / len(a | b) if a | b else 1.0 for a, b in pairs) / len(pairs)
