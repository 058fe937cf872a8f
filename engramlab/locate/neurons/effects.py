"""What editing a fact's knowledge neurons does: suppression and enhancement, with controls.

The relative change (p' - p) / p of the teacher-forced target probability when the refined
neurons are scaled (x0 suppresses, x2 enhances) at the last prompt token: on the fact, on other
facts of its relation, on facts of other relations, and for as many random neurons from the same
layers.
"""

from __future__ import annotations

import random

from engramlab.locate.base import mean_of, short
from engramlab.models.scoring import Neuron, NeuronScale, target_probabilities, target_probability

SUPPRESS, ENHANCE = 0.0, 2.0


def measure_effects(lm, records: list[dict], targets: list[list[int]], n_compare: int = 20,
                    n_random_repeats: int = 3, seed: int = 0) -> None:
    """Fill ``record["effects"]`` of every attributed fact that has neurons.

    effects = {"base_prob": p, "suppress": {...}, "enhance": {...}}, each with the relative change
    (p' - p) / p of the target probability on the main prompt of: "own" (the fact), "same_relation"
    and "other_relation" (mean over up to ``n_compare`` other attributed facts), "random" (the fact,
    with as many random neurons from the same layers, mean over ``n_random_repeats`` draws)."""
    known = [k for k, r in enumerate(records) if r["skipped"] is None]
    if not known:
        return
    prompts = {k: records[k]["prompts"][0] for k in known}
    base = dict(zip(known, target_probabilities(lm, [prompts[k] for k in known], [targets[k] for k in known])))
    rng = random.Random(seed)
    d_mlp = lm.adapter.d_mlp
    for k in known:
        neurons = [(l, i) for l, i, _ in records[k]["neurons"]]
        if not neurons:
            continue
        rel = records[k]["relation"]
        same = [j for j in known if j != k and records[j]["relation"] == rel]
        other = [j for j in known if records[j]["relation"] != rel]
        same = rng.sample(same, min(n_compare, len(same)))
        other = rng.sample(other, min(n_compare, len(other)))
        controls = [_random_like(neurons, d_mlp, rng) for _ in range(n_random_repeats)]
        group = [k, *same, *other]
        effects = {"base_prob": short(base[k])}
        for name, factor in (("suppress", SUPPRESS), ("enhance", ENHANCE)):
            probs = target_probabilities(lm, [prompts[j] for j in group], [targets[j] for j in group],
                                         edits=NeuronScale(neurons, factor))
            change = [(p - base[j]) / base[j] if base[j] > 0 else None for p, j in zip(probs, group)]
            randoms = []
            for control in controls:
                p = target_probability(lm, prompts[k], targets[k], edits=NeuronScale(control, factor))
                randoms.append((p - base[k]) / base[k] if base[k] > 0 else None)
            effects[name] = {"own": change[0], "same_relation": mean_of(change[1: 1 + len(same)]),
                             "other_relation": mean_of(change[1 + len(same):]), "random": mean_of(randoms)}
        records[k]["effects"] = effects




def _random_like(neurons: list[Neuron], d_mlp: int, rng: random.Random) -> list[Neuron]:
    """As many random neurons as ``neurons``, each in the same layer as one of them, none of them."""
    taken = set(neurons)
    out = []
    for layer, _ in neurons:
        pick = (layer, rng.randrange(d_mlp))
        while pick in taken:
            pick = (layer, rng.randrange(d_mlp))
        taken.add(pick)
        out.append(pick)
    return out
