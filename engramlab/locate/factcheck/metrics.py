"""Verdicts and their scores: precision / recall / F1 with true claims positive, and tau.

A checker gives each claim a score s (higher: more likely true). The IG checkers judge a claim
true when s >= tau (false when below, as the reference does); the prompt checker's score is
log P(" True") - log P(" False") and its tau is 0.

With true claims as the positive class, on the claims that have a verdict::

    TP = #{true claim, judged true}    FP = #{false claim, judged true}    FN = #{true claim, judged false}
    precision = TP / (TP + FP)   recall = TP / (TP + FN)   F1 = 2 P R / (P + R)

F1 = 2 TP / (2 TP + FP + FN), which is 2 P R / (P + R) where P and R are defined and 0 when
nothing is judged true (P undefined) although true claims exist. None where a denominator is 0.

**Fitting tau** (``fit_threshold``) uses the TRAINING claims only: the candidates are the lowest
training score (every claim judged true) and the midpoints between consecutive distinct sorted
training scores; the chosen one maximises the training F1, ties broken by training accuracy, then
by the lower tau. The test claims are never looked at.
"""

from __future__ import annotations

from typing import Sequence


def confusion(truths: Sequence[bool], verdicts: Sequence[bool | None]) -> dict:
    """{tp, fp, fn, tn} over the pairs whose verdict is not None."""
    out = {"tp": 0, "fp": 0, "fn": 0, "tn": 0}
    for t, v in zip(truths, verdicts):
        if v is None:
            continue
        out[("tp" if v else "fn") if t else ("fp" if v else "tn")] += 1
    return out


def scores_of(c: dict) -> dict:
    """precision, recall, f1, accuracy of a confusion count (None where undefined)."""
    tp, fp, fn, tn = c["tp"], c["fp"], c["fn"], c["tn"]
    precision = tp / (tp + fp) if tp + fp else None
    recall = tp / (tp + fn) if tp + fn else None
    # 2TP / (2TP + FP + FN) is 2PR / (P + R) where both are defined, and 0 (not undefined) when a
    # checker judges nothing true although true claims exist.
    f1 = 2 * tp / (2 * tp + fp + fn) if 2 * tp + fp + fn else None
    n = tp + fp + fn + tn
    return {"precision": precision, "recall": recall, "f1": f1, "accuracy": (tp + tn) / n if n else None}


def judge(scores: Sequence[float | None], tau: float | None) -> list[bool | None]:
    """True where score >= tau, False below it, None where the score (or tau) is missing."""
    return [None if s is None or tau is None else bool(s >= tau) for s in scores]


def fit_threshold(scores: Sequence[float], truths: Sequence[bool]) -> float | None:
    """tau maximising F1 (then accuracy, then the lower tau) of ``judge(scores, tau)`` against
    ``truths``, over the lowest score and the midpoints of consecutive distinct sorted scores
    (module docstring). None without scores."""
    pairs = [(float(s), bool(t)) for s, t in zip(scores, truths) if s is not None]
    if not pairs:
        return None
    values = sorted({s for s, _ in pairs})
    candidates = [values[0]] + [(a + b) / 2 for a, b in zip(values, values[1:])]
    best, best_key = None, None
    for tau in candidates:
        m = scores_of(confusion([t for _, t in pairs], judge([s for s, _ in pairs], tau)))
        key = (m["f1"] if m["f1"] is not None else -1.0, m["accuracy"] or 0.0, -tau)
        if best_key is None or key > best_key:
            best, best_key = tau, key
    return best


__all__ = ["confusion", "fit_threshold", "judge", "scores_of"]
