"""Regions as boolean masks over the region tensors: selection, combination, overlap, files.

A region is a dict parameter name -> bool tensor shaped like the parameter. ``ratio`` (and the
set-difference fractions ``q``, ``p``) are fractions in (0, 1); a region of ratio r over a tensor of
n entries holds exactly int(r * n) of them (``scope="tensor"``, the reference's per-matrix budget)
or int(r * N) of all N entries together (``scope="global"``).

Ties are broken deterministically: among equal scores the entry that comes first wins, in the order
of the dict, then of the flattened tensor (for a top mask and for a bottom mask alike).
"""

from __future__ import annotations

from typing import Mapping

import torch

from engramlab.errors import EngramError
# the files live below locate: training (--freeze) reads them too
from engramlab.models.param_masks import FORMAT, load_masks, save_masks  # noqa: F401

Masks = dict[str, torch.Tensor]
Scores = Mapping[str, torch.Tensor]
SCOPES = ("tensor", "global")
NORMALIZE = ("total", "none")


# -- selection ------------------------------------------------------------------------------------
def top_mask(score: torch.Tensor, ratio: float, what: str = "ratio") -> torch.Tensor:
    """The int(ratio * numel) entries of ``score`` with the largest values."""
    return _select([score], _count(ratio, score.numel(), what), largest=True)[0]


def bottom_mask(score: torch.Tensor, ratio: float, what: str = "ratio") -> torch.Tensor:
    """The int(ratio * numel) entries of ``score`` with the smallest values."""
    return _select([score], _count(ratio, score.numel(), what), largest=False)[0]


def random_mask(shape, ratio: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """int(ratio * numel) entries drawn uniformly without replacement (seeded by ``generator``)."""
    shape = torch.Size(shape)
    k = _count(ratio, shape.numel(), "ratio")
    mask = torch.zeros(shape.numel(), dtype=torch.bool)
    mask[torch.randperm(shape.numel(), generator=generator)[:k]] = True
    return mask.view(shape)


def top_masks(scores: Scores, ratio: float, scope: str = "tensor") -> Masks:
    """``top_mask`` of every tensor (``scope="tensor"``) or the top int(ratio * N) of all entries."""
    return _masks(scores, ratio, scope, largest=True)


def bottom_masks(scores: Scores, ratio: float, scope: str = "tensor") -> Masks:
    return _masks(scores, ratio, scope, largest=False)


def random_masks(shapes: Mapping[str, object], ratio: float, seed: int = 0, scope: str = "tensor") -> Masks:
    """A random region shaped like ``shapes`` (name -> shape or tensor), from ``seed``. Globally the
    k entries are the top k of i.i.d. uniform draws, a uniform k-subset of all entries."""
    _check_scope(scope)
    g = torch.Generator().manual_seed(int(seed))
    sizes = {n: torch.Size(s.shape if isinstance(s, torch.Tensor) else s) for n, s in shapes.items()}
    if scope == "tensor":
        return {n: random_mask(s, ratio, g) for n, s in sizes.items()}
    return top_masks({n: torch.rand(s, generator=g) for n, s in sizes.items()}, ratio, "global")


def _masks(scores: Scores, ratio: float, scope: str, largest: bool) -> Masks:
    _check_scope(scope)
    if not scores:
        raise EngramError("regions: no score tensors to select from")
    _check_finite(scores)
    if scope == "tensor":
        return {n: _select([s], _count(ratio, s.numel(), "ratio"), largest)[0] for n, s in scores.items()}
    total = sum(s.numel() for s in scores.values())
    return dict(zip(scores, _select(list(scores.values()), _count(ratio, total, "ratio"), largest)))


def _select(tensors: list[torch.Tensor], k: int, largest: bool) -> list[torch.Tensor]:
    """Masks of the k largest (smallest) entries over all ``tensors`` together, ties to the first.

    The k-th value v is found on the concatenation; every entry beyond v is taken, and of those
    equal to v the first ones in order, as many as are still needed."""
    flat = [t.detach().flatten().float().cpu() for t in tensors]
    if k == 0:
        return [torch.zeros(t.shape, dtype=torch.bool) for t in tensors]
    signed = [f if largest else -f for f in flat]
    v = torch.topk(torch.cat(signed), k, largest=True, sorted=False).values.min()
    beyond = sum(int((f > v).sum()) for f in signed)
    need = k - beyond  # >= 1: at least one entry equals v
    out = []
    for f, t in zip(signed, tensors):
        m = f > v
        ties = (f == v).nonzero().flatten()[:max(need, 0)]
        m[ties] = True
        need -= len(ties)
        out.append(m.view(t.shape))
    return out


def _count(ratio, n: int, what: str) -> int:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio < 1:
        raise EngramError(f"--{what} {ratio!r}: must be a fraction strictly between 0 and 1 (0.01 is 1%)")
    return int(ratio * n)


def _check_scope(scope):
    if scope not in SCOPES:
        raise EngramError(f"--scope {scope!r}: choose one of {', '.join(SCOPES)}")


def _check_finite(scores: Scores):
    for n, s in scores.items():
        if not bool(torch.isfinite(s).all()):
            raise EngramError(f"regions: the scores of {n!r} contain NaN or inf; recompute the importance "
                              "(a float16 model overflowed?) with --dtype float32")


# -- across corpora -------------------------------------------------------------------------------
def core_scores(per_corpus: Mapping[str, Scores], normalize: str = "total") -> dict[str, torch.Tensor]:
    """Sum over corpora of each corpus's importance, the score the core region is the top of.

    ``normalize="total"``: each corpus's scores are divided by their total over all its tensors
    first, so every corpus weighs the same whatever its size or loss scale (snip grows with the
    number of batches). ``"none"``: the raw sum, the reference's Σ_lang |I_lang|."""
    if normalize not in NORMALIZE:
        raise EngramError(f"--normalize {normalize!r}: choose one of {', '.join(NORMALIZE)}")
    names = _check_corpora(per_corpus)
    out = {n: torch.zeros(s.shape, dtype=torch.float32) for n, s in next(iter(per_corpus.values())).items()}
    for corpus, scores in per_corpus.items():
        scale = 1.0
        if normalize == "total":
            total = sum(float(s.double().sum()) for s in scores.values())
            if not total > 0:
                raise EngramError(f"corpus {corpus!r}: its importance scores are all zero; the corpus "
                                  "reached no gradient (check it is not empty)")
            scale = 1.0 / total
        for n in names:
            out[n].add_(scores[n].detach().float().cpu(), alpha=scale)
    return out


def specific_region(per_corpus: Mapping[str, Scores], target: str, q: float, p: float,
                    scope: str = "tensor") -> Masks:
    """Wei et al. 2024's set difference: the target corpus's top q minus, for every other corpus,
    its top p (q, p fractions; with q = p = 0.01 the reference's monolingual region)."""
    names = _check_corpora(per_corpus, target)
    _count(q, 1, "q"), _count(p, 1, "p")
    region = _masks(per_corpus[target], q, scope, largest=True)
    for corpus, scores in per_corpus.items():
        if corpus != target:
            other = _masks(scores, p, scope, largest=True)
            for n in names:
                region[n] &= ~other[n]
    return region


def specificity(per_corpus: Mapping[str, Scores], target: str) -> dict[str, torch.Tensor]:
    """Graded specificity of each parameter to ``target``, in (-1, 1): its percentile rank in the
    target's scores minus the largest of its percentile ranks in the other corpora's.

    The percentile rank of an entry is the fraction of its tensor's entries with a strictly smaller
    score (ties share a rank), so it is per tensor like the regions. Near 1: important for the
    target only; near 0 or below: at least as important elsewhere."""
    names = _check_corpora(per_corpus, target)
    others = [c for c in per_corpus if c != target]
    if not others:
        raise EngramError(f"specificity of {target!r}: needs at least two corpora")
    out = {}
    for n in names:
        rank_other = torch.stack([_percentile(per_corpus[c][n]) for c in others]).amax(0)
        out[n] = _percentile(per_corpus[target][n]) - rank_other
    return out


def _percentile(score: torch.Tensor) -> torch.Tensor:
    flat = score.detach().flatten().float().cpu()
    ranks = torch.searchsorted(flat.sort().values, flat, side="left")
    return (ranks.float() / flat.numel()).view(score.shape)


def _check_corpora(per_corpus: Mapping[str, Scores], target: str | None = None) -> list[str]:
    if not per_corpus:
        raise EngramError("regions: no corpora given; pass --corpus NAME=PATH")
    if target is not None and target not in per_corpus:
        raise EngramError(f"regions: no corpus named {target!r} (corpora: {', '.join(per_corpus)})")
    first_name, first = next(iter(per_corpus.items()))
    for corpus, scores in per_corpus.items():
        if list(scores) != list(first) or any(scores[n].shape != first[n].shape for n in first):
            raise EngramError(f"corpus {corpus!r}: its importance covers other tensors than {first_name!r}'s; "
                              "score every corpus on the same model and tensors")
    return list(first)


# -- overlap --------------------------------------------------------------------------------------
def jaccard(mask_a: Masks, mask_b: Masks) -> float:
    """|A ∩ B| / |A ∪ B| over all tensors together (two empty regions: 1.0, they are equal)."""
    if list(mask_a) != list(mask_b) or any(mask_a[n].shape != mask_b[n].shape for n in mask_a):
        raise EngramError("jaccard: the two regions cover different tensors; build both over the same model")
    inter = sum(int((mask_a[n] & mask_b[n]).sum()) for n in mask_a)
    union = sum(int((mask_a[n] | mask_b[n]).sum()) for n in mask_a)
    return 1.0 if union == 0 else inter / union


def overlap_matrix(regions: Mapping[str, Masks]) -> tuple[list[str], list[list[float]]]:
    """Labels and the symmetric matrix of ``jaccard`` between every two regions (diagonal 1)."""
    labels = list(regions)
    matrix = [[1.0] * len(labels) for _ in labels]
    for i, a in enumerate(labels):
        for j in range(i + 1, len(labels)):
            matrix[i][j] = matrix[j][i] = jaccard(regions[a], regions[labels[j]])
    return labels, matrix


def region_size(masks: Masks) -> int:
    return sum(int(m.sum()) for m in masks.values())


