"""Robustness of a DKN: does it carry the fact across rephrasings of the query?

The fact's query with one word inserted, deleted or replaced (outside the subject), scored with
the DKN left alone, attenuated (activations x ``attenuate``, default 0) and enhanced
(x ``enhance``, default 2). ``find_dkns`` runs it for every DKN it finds.
"""

from __future__ import annotations

import random
from typing import Sequence

import torch

from engramlab.data.facts import Fact, render, target_token_ids
from engramlab.models.loading import LoadedModel
from engramlab.models.prefix import PrefixCache
from engramlab.models.scoring import Neuron, NeuronScale, encode, target_logprobs

PERTURBATIONS = ("insert", "delete", "replace")
# Words that change the wording of a query but not what it asks.
FILLERS = ("really", "actually", "also", "indeed", "certainly", "now", "truly", "still")


# -- robustness ------------------------------------------------------------------------------------
def perturb(template: str, kind: str, rng: random.Random) -> str | None:
    """The template with one word inserted, deleted or replaced; None if it has no word to edit.

    The word holding the subject placeholder and the last word (which sets up the answer, e.g.
    "is" or "in") are never edited, so the query still asks for the same object.
    """
    words = template.split(" ")
    editable = [k for k, w in enumerate(words[:-1]) if "{}" not in w]
    if kind == "insert":
        words.insert(rng.randint(0, len(words) - 1), rng.choice(FILLERS))
    elif not editable:
        return None
    elif kind == "delete":
        del words[rng.choice(editable)]
    else:
        k = rng.choice(editable)
        words[k] = rng.choice([f for f in FILLERS if f != words[k].lower()])
    return " ".join(words)


@torch.no_grad()
def robustness(lm: LoadedModel, fact: Fact, dkn: Sequence[Neuron], *, template: int = 0, positions: str = "last",
               attenuate: float = 0.0, enhance: float = 2.0, seed: int = 0) -> dict:
    """{variant: {"base", "attenuated", "enhanced"}} P(target) for the clean query and each perturbation.

    Per variant one batch of three rows: the DKN untouched, x ``attenuate``, x ``enhance``; at the
    last prompt token (on one shared prefix) or, with ``positions="all"``, everywhere. The
    perturbations of a fact are drawn from ``seed`` and the fact, so they are the same every run."""
    rng = random.Random(f"{seed}:{fact.relation}:{fact.subject}")  # str seeds are stable
    text = fact.template(template)
    variants = {"clean": text, **{k: perturb(text, k, rng) for k in PERTURBATIONS}}
    where = "all" if positions == "all" else "prompt_end"
    edits = [None, NeuronScale(dkn, attenuate, where), NeuronScale(dkn, enhance, where)]
    out = {}
    for kind, variant in variants.items():
        if variant is None:
            continue
        prompt = render(variant, fact.subject)
        ids, target = encode(lm, prompt), target_token_ids(lm.tokenizer, prompt, fact.object)
        prefix = PrefixCache.run(lm, ids[:-1]) if where == "prompt_end" and len(ids) > 1 else None
        p = target_logprobs(lm, [ids] * 3, [target] * 3, edits=edits, prefix=prefix).exp().tolist()  # (3,)
        out[kind] = {"base": p[0], "attenuated": p[1], "enhanced": p[2]}
    return out
