"""How often each individual of a continual world appears in its corpus.

A continual world writes person i's biography ``frequency_i`` times; the frequencies are drawn
independently from a spec (``FREQUENCY_GRAMMAR``)::

    3                   everyone 3 times
    choice:1,3,8        uniform over the listed values (a repeated value weighs more)
    zipf:a=1.5,max=20   p(f) ∝ f^-a for f = 1..max

    pmf = frequency_pmf("zipf:a=1.5,max=20")          # {1: 0.39, 2: 0.14, ...}
    freqs = draw_frequencies("choice:1,3,8", 100, random.Random(0))
    frequency_bucket(4)                               # "medium"
"""

from __future__ import annotations

import random

from engramlab.data.samplers import parse_spec, spec_number
from engramlab.errors import EngramError

FREQUENCY_GRAMMAR = "N | choice:V1,V2,... | zipf:a=A,max=M"


def frequency_pmf(spec: str) -> dict[int, float]:
    """Distribution of how many biographies an individual gets: {frequency: probability}.

    "3" -> everyone 3 times; "choice:1,3,8" -> uniform over the listed values;
    "zipf:a=1.5,max=20" -> p(f) ∝ f^-a for f = 1..max.
    """
    text = str(spec).strip()
    if text.isdigit() and int(text) >= 1:
        return {int(text): 1.0}
    name, _, rest = text.partition(":")
    if name == "choice":
        values = [v.strip() for v in rest.split(",") if v.strip()]
        if not values or not all(v.isdigit() and int(v) >= 1 for v in values):
            raise EngramError(f"frequency spec {spec!r}: choice needs positive integers like "
                              f"choice:1,3,8; grammar: {FREQUENCY_GRAMMAR}")
        counts: dict[int, float] = {}
        for v in values:  # repeated values weigh more, as in random.choice over the list
            counts[int(v)] = counts.get(int(v), 0.0) + 1.0 / len(values)
        return counts
    if name == "zipf":
        _, params = parse_spec(text, FREQUENCY_GRAMMAR, "frequency")
        a = spec_number(spec, params, "a", FREQUENCY_GRAMMAR, "frequency", float, 0.0)
        top = spec_number(spec, params, "max", FREQUENCY_GRAMMAR, "frequency", int, 1)
        if params:
            raise EngramError(f"frequency spec {spec!r}: unknown key(s) {sorted(params)}; "
                              f"grammar: {FREQUENCY_GRAMMAR}")
        weights = {f: f ** -a for f in range(1, top + 1)}
        total = sum(weights.values())
        return {f: w / total for f, w in weights.items()}
    raise EngramError(f"unknown frequency spec {spec!r}; grammar: {FREQUENCY_GRAMMAR}")


def draw_frequencies(spec: str, n: int, rng: random.Random) -> list[int]:
    """``n`` independent frequencies from ``frequency_pmf(spec)``."""
    pmf = frequency_pmf(spec)
    return rng.choices(list(pmf), weights=list(pmf.values()), k=n)


def frequency_bucket(frequency: int) -> str:
    """"high" (>5 biographies), "medium" (2-5), "low" (1), "unseen" (0: held-out people)."""
    if frequency > 5:
        return "high"
    if frequency >= 2:
        return "medium"
    return "low" if frequency == 1 else "unseen"
