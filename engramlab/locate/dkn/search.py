"""The enforced DKN test: the largest set of >= 2 clusters whose every proper subset can be
suppressed with a drop of P(target) below ``t_low`` while suppressing all of it drops it by more
than ``t_high`` (``search_dkn``), exhaustive while the subsets are few, sampled beyond."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from itertools import combinations
from typing import Callable


@dataclass
class SubsetSearch:
    """Outcome of ``search_dkn`` for one fact and one clustering."""

    dkn: list[int] | None  # cluster indices of the DKN, or None
    partial_drop: float | None  # largest drop over the checked proper subsets of the DKN
    full_drop: float | None  # drop with the whole DKN suppressed
    all_drop: float  # drop with every cluster suppressed (measured whether or not a DKN exists)
    max_single_drop: float  # largest drop from suppressing one cluster
    check: str  # "exhaustive": every proper subset of the DKN (if any) was measured; "sampled": only some
    bounded: bool  # the subset budget was exceeded: the search sampled and/or set clusters aside
    n_shed: int  # clusters set aside by the bounded search
    n_subsets: int  # subsets whose drop was measured
    n_verified: int | None  # proper subsets of the DKN that were measured (of 2^k - 2); None without DKN
    reason: str | None  # why there is no DKN


def _n_subsets(k: int, max_size: int) -> int:
    return sum(math.comb(k, s) for s in range(1, max_size + 1))


def search_dkn(drop_of: Callable[[list[frozenset]], list[float]], n_clusters: int, t_low: float = 0.05,
               t_high: float = 0.3, max_dkn_clusters: int | None = None, max_subsets: int = 512,
               subset_samples: int = 64, seed: int = 0) -> SubsetSearch:
    """Find the largest set of >= 2 clusters that passes the DKN test (module docstring).

    ``drop_of`` maps subsets of cluster indices to relative drops. While testing every subset of
    up to ``max_dkn_clusters`` clusters would take more than ``max_subsets`` measurements, the
    search is *sampled*: the set of all remaining clusters is checked against its singletons, its
    leave-one-outs and ``subset_samples`` random proper subsets, and if it fails one cluster is set
    aside: the one whose absence the rest tolerates best (largest drop with the rest suppressed),
    ties going to the one that hurts most alone. Once few enough remain, every subset is measured
    and the largest passing set (then the largest full drop) wins.

    Soundness: a DKN from the exhaustive phase (``check="exhaustive"``, even after shedding) had
    every proper subset measured. A DKN accepted in the sampled step (``check="sampled"``) passed
    only the subsets it reports (``n_verified`` of 2^k - 2): a subset that was not drawn may
    still drop P(target) by ``t_low`` or more, so such DKNs are counted apart.
    """
    cache: dict[frozenset, float] = {}

    def drops(subsets: list[frozenset]) -> list[float]:
        missing = list(dict.fromkeys(s for s in subsets if s not in cache))
        if missing:
            cache.update(zip(missing, drop_of(missing)))
        return [cache[s] for s in subsets]

    active = list(range(n_clusters))
    all_drop = drops([frozenset(active)])[0] if active else 0.0
    max_single = max(drops([frozenset([c]) for c in active]), default=0.0)
    sampled, shed = False, 0

    def outcome(dkn=None, partial=None, full=None, reason=None, check="exhaustive", verified=None) -> SubsetSearch:
        if dkn is not None and verified is None:
            verified = 2 ** len(dkn) - 2  # the exhaustive phase measured every proper subset
        return SubsetSearch(dkn, partial, full, all_drop, max_single, check, sampled, shed, len(cache), verified, reason)

    if n_clusters < 2:
        return outcome(reason=f"{n_clusters} cluster(s); a DKN needs 2")
    rng = random.Random(seed)
    limit = min(max_dkn_clusters or n_clusters, n_clusters)
    while _n_subsets(len(active), limit) > max_subsets:
        sampled = True
        whole = frozenset(active)
        alone = drops([frozenset([c]) for c in active])
        rest = drops([whole - {c} for c in active])
        if limit == len(active):  # the whole remaining set is itself a candidate: sample its subsets
            samples = {frozenset(rng.sample(active, rng.randint(2, len(active) - 2)))
                       for _ in range(subset_samples if len(active) >= 4 else 0)}
            full = drops([whole])[0]
            partial = max(alone + rest + drops(sorted(samples, key=sorted)))
            if full <= t_high:  # fewer clusters suppressed are assumed not to drop it more
                return outcome(reason=f"suppressing all {len(active)} remaining clusters drops P(target) by "
                                      f"only {full:.3f} <= t_high", check="sampled")
            if partial < t_low:
                n_checked = len({frozenset([c]) for c in active} | {whole - {c} for c in active} | samples)
                return outcome(sorted(active), partial, full, check="sampled", verified=n_checked)
        # Set aside the cluster the others do best without (largest drop of the rest), then the
        # one that hurts most alone (the least degenerate).
        active.pop(max(range(len(active)), key=lambda k: (rest[k], alone[k])))
        shed += 1
        limit = min(limit, len(active))

    subsets = [frozenset(c) for size in range(1, limit + 1) for c in combinations(active, size)]
    values = dict(zip(subsets, drops(subsets)))
    within: dict[frozenset, float] = {}  # largest drop over a set's non-empty subsets, itself included
    best, best_key, best_full = None, None, -math.inf
    for s in subsets:  # ordered by size: every subset is done before its supersets
        partial = max(within[s - {c}] for c in s) if len(s) > 1 else -math.inf
        within[s] = max(values[s], partial)
        if len(s) < 2:
            continue
        best_full = max(best_full, values[s])
        if values[s] > t_high and partial < t_low and (best_key is None or (len(s), values[s]) > best_key):
            best, best_key = (sorted(s), partial, values[s]), (len(s), values[s])
    if best is not None:
        return outcome(*best)
    if best_full <= t_high:
        return outcome(reason=f"no set of clusters drops P(target) by more than t_high (best {best_full:.3f})")
    return outcome(reason="every set of clusters that drops P(target) by more than t_high has a proper subset "
                          "that drops it by t_low or more")


Search = SubsetSearch  # the name before the dkn package
