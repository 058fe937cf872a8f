"""The claims a fact checker judges: the split, the false objects, the complex statements.

For every fact (subject, relation, gold object) there is a **true claim** (the gold object) and a
**false claim** (another object of the same relation, drawn with the seed). Each claim comes in two
forms:

* simple: the fact's prompt followed by the claimed object, "The capital city of France is Paris";
* complex: the same claim inside distractor clauses that keep the subject and still end at the
  object slot (``complex_prompt``), "According to a survey that was widely discussed, and despite
  some disagreement among experts, the capital city of France, a place with a long and complicated
  history, is Paris".

The reference's stored complex file lost its subject (its ``str.format(entity=...)`` had no
placeholder): here the subject is put in by plain replacement of the template's ``{}``, and a test
checks every complex prompt contains it.

**Split** (``split_relation``): per relation, the facts in a seeded order; the first
``round(test_fraction x n)`` (at least 1, and at most n - 1) are the test split, the rest train.
A relation with fewer than two facts, or with a single distinct object (no false claim can be made
from the relation's own objects), is skipped with the reason.
"""

from __future__ import annotations

import random
from typing import Sequence

from engramlab.data.facts import PLACEHOLDER, render

#: Clauses put before the statement (it then starts in lower case unless it starts with the subject).
LEADS = (
    "According to a survey that was widely discussed last year, and despite some disagreement among experts,",
    "As several old books mention, although the details are often forgotten and rarely taught in schools,",
    "In a long conversation about travel, food and the weather that went on late into the evening,",
    "While most people would not think about it twice, and the question rarely comes up at all,",
)
#: Appositions put right after the subject (between commas).
APPOSITIONS = (
    "a place with a long and complicated history",
    "which many visitors describe in very different ways",
    "often mentioned in the news for unrelated reasons",
    "about which a great deal has been written",
)
#: The shapes of a complex statement: a lead clause, an apposition after the subject, or both.
SHAPES = ("lead", "apposition", "both")


def _rng(seed: int, *key) -> random.Random:
    # A string seed is hashed with SHA-512 by ``random``: the same on every run and machine.
    return random.Random(":".join(map(str, ("factcheck", seed, *key))))


def complex_prompt(template: str, subject: str, seed: int, key: str = "") -> str:
    """The complex form of ``template`` (with ``{}`` for the subject): a seeded shape of ``SHAPES``
    with a seeded lead clause and / or apposition. It keeps the subject, and ends exactly as the
    template does after its last ``{}``, so the object slot is the same as the simple prompt's."""
    rng = _rng(seed, "complex", key)
    shape = SHAPES[rng.randrange(len(SHAPES))]
    lead, apposition = LEADS[rng.randrange(len(LEADS))], APPOSITIONS[rng.randrange(len(APPOSITIONS))]
    text = template
    if shape in ("apposition", "both"):
        head, sep, tail = text.rpartition(PLACEHOLDER)  # the last mention: the one nearest the object
        text = f"{head}{PLACEHOLDER}, {apposition},{tail}" if tail.startswith(" ") else \
            f"{head}{PLACEHOLDER} ({apposition}){tail}"  # a tail glued to the subject ("{}'s") keeps it
    if shape in ("lead", "both"):
        if not text.startswith(PLACEHOLDER) and text[:1].isupper() and text[1:2].islower():
            text = text[0].lower() + text[1:]  # "The capital" -> "the capital"; "{} is" keeps the name
        text = f"{lead} {text}"
    return render(text, subject)


def split_relation(n: int, test_fraction: float, seed: int, relation: str) -> list[str]:
    """"train" / "test" for each of a relation's ``n`` facts (n >= 2): a seeded permutation, the
    first max(1, min(n - 1, round(test_fraction x n))) in it are the test split."""
    order = list(range(n))
    _rng(seed, "split", relation).shuffle(order)
    n_test = max(1, min(n - 1, round(test_fraction * n)))
    test = set(order[:n_test])
    return ["test" if k in test else "train" for k in range(n)]


def false_objects(objects: Sequence[str], seed: int, relation: str) -> list[str]:
    """For each gold object of a relation, another distinct object of the relation, seeded
    (needs at least two distinct objects)."""
    distinct = list(dict.fromkeys(objects))
    out = []
    for k, gold in enumerate(objects):
        others = [o for o in distinct if o != gold]
        out.append(others[_rng(seed, "false", relation, k).randrange(len(others))])
    return out


def skip_reason(objects: Sequence[str]) -> str | None:
    """Why a relation with these objects cannot be checked, or None."""
    if len(objects) < 2:
        return f"{len(objects)} fact(s): need at least 2 (one to train on, one to test)"
    if len(set(objects)) < 2:
        return f"a single distinct object ({objects[0]!r}): no false claim can be drawn from the relation"
    return None


__all__ = ["APPOSITIONS", "LEADS", "SHAPES", "complex_prompt", "false_objects", "skip_reason", "split_relation"]
