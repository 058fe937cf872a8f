"""Knowledge neurons (Dai et al., 2022): which MLP neurons hold a fact, and what editing them does.

``find_knowledge_neurons(lm, facts, config)`` runs, per fact:

1. a rank check: a fact whose first target token ranks beyond ``max_rank`` after its main prompt
   is skipped with the reason recorded (attributing what the model does not know is noise);
   paraphrases beyond it are left out of the selection;
2. attribution: integrated gradients over every layer's MLP neurons at the last prompt position,
   for each paraphrase (the fact's templates) - see ``engramlab.locate.ig``;
3. selection: coarse neurons score > ``threshold`` x max per paraphrase; refined neurons are
   those in the coarse sets of at least a share p of the paraphrases, by one of two rules
   (``refine``):
   - "fact" (engramlab's default): p starts at ``p_start`` (0.5) and moves by 0.05 per fact
     towards ``min_neurons``..``max_neurons`` kept; what remains is ranked by paraphrase count,
     then mean score, and cut to ``max_neurons`` (``refine_neurons``);
   - "dai" (Dai et al. 2022's code): a neuron needs at least max(p * n, ``min_prompts`` = 3)
     of the fact's n paraphrases; p starts at 0.7 and moves by 0.05 per *relation* until the
     relation's mean count per fact is in ``min_neurons``..``max_neurons`` (at most 6 tries);
     no cap (``refine_relation_dai``);
4. interventions on the refined set at the last prompt position: suppress (x0) and enhance (x2),
   measured as the relative change (p' - p) / p of the target probability (teacher-forced, the
   product over the target tokens: the quantity the default objective "prob" attributes) on the
   fact, on other facts of its relation, on facts of other relations, and for as many random
   neurons drawn from the same layers.

Relation neurons are those in the refined sets of at least ``relation_share`` of a relation's
attributed facts. The consistency of a fact is the mean pairwise Jaccard index of its
paraphrases' coarse sets (None with one paraphrase).
"""

from __future__ import annotations

import contextvars
import math
import random
import time
from collections import Counter
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Iterator, Sequence

import torch

from engramlab.config import check, option, validate
from engramlab.data.facts import FactSet, target_token_ids
from engramlab.locate import integration
from engramlab.locate.ig import BASELINES, OBJECTIVES, SITES, integrated_gradients
from engramlab.models.context import check_facts_fit
from engramlab.models.loading import pad_rows
from engramlab.progress import progress_bar
from engramlab.runs import atomic_write_json, atomic_write_jsonl, load_json, read_jsonl

P_STEP = 0.05
SUPPRESS, ENHANCE = 0.0, 2.0
REFINE = ("fact", "dai")
# Per refinement rule: (p_start, min_prompts) when not given.
_PRESETS = {"fact": (0.5, 1), "dai": (0.7, 3)}
DAI_TRIES = 6  # Dai's 2_get_kn.py evaluates at most 6 values of p per relation


@dataclass
class NeuronConfig:
    """Settings of ``find_knowledge_neurons``.

    The defaults are engramlab's (per-fact refinement, right-sum rule); ``refine="dai"`` with
    ``ig_rule="left"`` is the closest to Dai et al. 2022's code (see docs/neurons.md for what still
    differs). ``p_start`` and ``min_prompts`` left at None take the refinement rule's preset."""

    steps: int = option(20, "m, integration steps.", range=(1, None))
    baseline: str = option("zero", "zero | mean (positions 1..P-2) | mean_all (positions 0..P-2).",
                           choices=BASELINES)
    objective: str = option("prob", "prob (joint probability) | logprob | prob_sum of the target tokens.",
                            choices=OBJECTIVES)
    site: str = option("neurons", "neurons (input of the MLP output projection) | pre (pre-activation).",
                       choices=SITES)
    ig_rule: str = option("right", "Integration rule: right | left (Dai's code) | trapezoid.",
                          choices=integration.RULES)
    threshold: float = option(0.2, "Coarse: score > threshold x max score of the prompt.", range=(0, 1),
                              open_high=True)
    refine: str = option("fact", "fact (p adapted per fact, cut to max_neurons) | dai (per relation).",
                         choices=REFINE)
    p_start: float | None = option(None, "Refined: kept by >= p of the paraphrases (None: 0.5 fact, 0.7 dai).",
                                   range=(0, 1), open_low=True)
    min_prompts: int | None = option(None, "...and by >= this many paraphrases (None: 1 fact, 3 dai).",
                                     range=(1, None), integer=True)
    min_neurons: int = option(2, "fact: per fact; dai: the relation's mean per fact, kept in this range.",
                              range=(1, None))
    max_neurons: int = option(5, "...and at most this many.", range=(1, None))
    relation_share: float = option(0.1, "Relation neurons: in >= this share of the relation's facts.",
                                   range=(0, 1), open_low=True)
    max_rank: int = option(100, "Skip facts whose first target token ranks beyond this.", range=(1, None))
    batch_layers: int | None = option(None, "Layers per IG batch (None: as many as fit in memory).",
                                      range=(1, None), integer=True)
    n_random_repeats: int = option(3, "Random-neuron controls per fact.", range=(0, None),
                                   flag="--random-repeats")
    seed: int = 0
    n_compare: int = option(20, "At most this many facts of the same / other relations per fact.",
                            range=(0, None))

    def __post_init__(self):
        validate(self)
        p_start, min_prompts = _PRESETS[self.refine]
        self.p_start = p_start if self.p_start is None else self.p_start
        self.min_prompts = min_prompts if self.min_prompts is None else self.min_prompts
        check(self, "min_neurons", self.min_neurons <= self.max_neurons, f"must be <= max_neurons ({self.max_neurons})")


# -- attribution and probabilities ----------------------------------------------------------------
def _pad_id(lm) -> int:
    # Right padding never reaches the scored positions, so any id does when there is no tokenizer.
    return lm.pad_id if lm.tokenizer is not None else 0


def _ids(lm, prompt: str | Sequence[int]) -> list[int]:
    if isinstance(prompt, str):
        return list(lm.tokenizer(prompt, add_special_tokens=False)["input_ids"])
    return [int(i) for i in prompt]


def attribute_neurons(lm, prompt: str | Sequence[int], target_ids: Sequence[int], config: NeuronConfig,
                      layers: Sequence[int] | None = None) -> torch.Tensor:
    """Integrated-gradients scores (n_layers, d_mlp) of every MLP neuron at the last prompt
    position for the target tokens (``config.objective``: by default their joint probability).
    Layers not in ``layers`` are 0."""
    return integrated_gradients(lm, _ids(lm, prompt), list(target_ids), steps=config.steps,
                                baseline=config.baseline, objective=config.objective, site=config.site,
                                layers=layers, batch_layers=config.batch_layers, rule=config.ig_rule)


# Where target_probabilities put each row's last prompt token, for intervene(positions=-1).
_PROMPT_END: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar("prompt_end", default=None)


@contextmanager
def intervene(lm, neurons: Sequence[tuple[int, int]], factor: float, positions=-1) -> Iterator[None]:
    """Multiply the given (layer, index) ``mlp.neurons`` by ``factor`` (0 suppresses, 2 enhances).

    ``positions=-1`` is the last prompt token: inside ``target_probability(ies)``, whose input also
    holds the teacher-forced target tokens, that is where the prompt ends, row by row; elsewhere it
    is the last position. ``None`` edits every position; an int or a list is passed on as is."""
    by_layer: dict[int, list[int]] = {}
    for layer, index in neurons:
        by_layer.setdefault(int(layer), []).append(int(index))

    def edit(index: list[int]):
        def fn(t):  # (batch, pos, d_mlp)
            where = positions
            if isinstance(positions, int) and positions == -1:
                ends = _PROMPT_END.get()
                where = ends if ends is not None and ends.shape[0] == t.shape[0] else -1
            mask = torch.zeros(t.shape[1:], dtype=torch.bool, device=t.device)
            mask[:, index] = True
            if where is None:
                mask = mask.expand_as(t)
            elif isinstance(where, torch.Tensor):  # one position per row
                rows = torch.zeros_like(t, dtype=torch.bool)
                rows[torch.arange(t.shape[0], device=t.device), where.to(t.device)] = mask[0]
                mask = rows
            else:
                keep = torch.zeros(t.shape[1], 1, dtype=torch.bool, device=t.device)
                keep[where] = True
                mask = (mask & keep).expand_as(t)
            return torch.where(mask, t * factor, t)
        return fn

    with ExitStack() as stack:
        for layer, index in by_layer.items():
            stack.enter_context(lm.hooks.hook(f"blocks.{layer}.mlp.neurons", edit(index)))
        yield


def _logits_at(lm, prompts: list[list[int]], inputs: list[list[int]], wanted: list[list[int]]) -> list[torch.Tensor]:
    """One right-padded forward of ``inputs``; per row, the logits (len(wanted[i]), vocab) at the
    positions ``wanted[i]``. Only the positions some row wants go through the unembedding, and
    ``intervene(positions=-1)`` sees where each row's prompt ends."""
    ids, mask = pad_rows(inputs, _pad_id(lm), lm.device)
    keep = sorted({p for ps in wanted for p in ps})
    token = _PROMPT_END.set(torch.tensor([len(r) - 1 for r in prompts], device=lm.device))
    try:
        logits = lm.model(input_ids=ids, attention_mask=mask,
                          logits_to_keep=torch.tensor(keep, device=lm.device)).logits  # (batch, len(keep), vocab)
    finally:
        _PROMPT_END.reset(token)
    column = {p: c for c, p in enumerate(keep)}
    return [logits[i, [column[p] for p in ps]] for i, ps in enumerate(wanted)]


@torch.no_grad()
def target_probabilities(lm, prompts: Sequence[str | Sequence[int]], targets: Sequence[Sequence[int]],
                         objective: str = "prob", batch_size: int = 32) -> list[float]:
    """Teacher-forced probability of each target (the product over its tokens; "logprob": the
    sum of log-probabilities), one padded forward per batch of prompts."""
    out = []
    for start in range(0, len(prompts), batch_size):
        rows = [_ids(lm, p) for p in prompts[start: start + batch_size]]
        tgts = [list(t) for t in targets[start: start + batch_size]]
        # Position len(prompt) - 1 + j predicts target token j.
        wanted = [list(range(len(r) - 1, len(r) - 1 + len(t))) for r, t in zip(rows, tgts)]
        for logits, t in zip(_logits_at(lm, rows, [r + t[:-1] for r, t in zip(rows, tgts)], wanted), tgts):
            total = float(logits.float().log_softmax(-1).gather(-1, torch.tensor(t, device=lm.device)[:, None]).sum())
            out.append(total if objective == "logprob" else math.exp(total))
    return out


def target_probability(lm, prompt: str | Sequence[int], target_ids: Sequence[int], objective: str = "prob") -> float:
    """Teacher-forced probability of the target tokens after ``prompt`` (product over tokens)."""
    return target_probabilities(lm, [prompt], [target_ids], objective)[0]


@torch.no_grad()
def first_token_ranks(lm, prompts: Sequence[str], targets: Sequence[Sequence[int]], batch_size: int = 32) -> list[int]:
    """Rank (1 = most likely) of each target's first token right after its prompt."""
    ranks = []
    for start in range(0, len(prompts), batch_size):
        rows = [_ids(lm, p) for p in prompts[start: start + batch_size]]
        last = _logits_at(lm, rows, rows, [[len(r) - 1] for r in rows])
        for logits, t in zip(last, targets[start: start + batch_size]):
            ranks.append(int((logits[0] > logits[0, t[0]]).sum()) + 1)
    return ranks


# -- selection --------------------------------------------------------------------------------------
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


def apply_refinement(records: list[dict], config: NeuronConfig) -> dict[str, list[list[int]]]:
    """Set ``neurons`` and ``p`` of every attributed record from its saved ``coarse`` sets by
    ``config.refine`` (and its p_start, min_prompts, min/max_neurons), and return the relation
    neurons ({relation: [[layer, index], ...]}, ``config.relation_share``). Paraphrases left out
    (``None``) do not count. Works on the records of a saved run, so refinement variants need no
    new attribution."""
    done = [r for r in records if r["skipped"] is None]
    by_relation: dict[str, list[dict]] = {}
    for r in done:
        by_relation.setdefault(r["relation"], []).append(r)

    def usable(r: dict) -> list[list[tuple]]:
        return [[tuple(n) for n in c] for c in r["coarse"] if c is not None]

    def store(r: dict, neurons: list, share: float) -> None:
        r.update(neurons=[[l, i, _short(s)] for l, i, s in neurons], p=share)

    for mine in by_relation.values():
        if config.refine == "dai":
            refined, share = refine_relation_dai([usable(r) for r in mine], config.p_start, config.min_prompts,
                                                 config.min_neurons, config.max_neurons)
            for r, neurons in zip(mine, refined):
                store(r, neurons, share)
            continue
        for r in mine:
            sets = usable(r)
            if config.min_prompts > 1:  # drop neurons in fewer paraphrases before adapting p
                count, _ = _tally(sets)
                sets = [[n for n in c if count[(n[0], n[1])] >= config.min_prompts] for c in sets]
            store(r, *refine_neurons(sets, config.p_start, config.min_neurons, config.max_neurons))
    return {rel: relation_neurons([[(l, i) for l, i, _ in r["neurons"]] for r in mine], config.relation_share)
            for rel, mine in by_relation.items()}


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


# -- the locator ------------------------------------------------------------------------------------
@dataclass
class NeuronResult:
    """Per-fact knowledge neurons and intervention effects (one record per fact, in order).

    A record: relation, subject, object, ``prompts`` (the paraphrases), ``ranks`` (first target
    token after each), ``neurons`` ([layer, index, mean score] refined, best first), ``coarse``
    (per paraphrase: [layer, index, score] lists, None where left out), ``p`` (the final share),
    ``consistency``, ``skipped`` (reason or None), ``effects`` (see ``measure_effects``)."""

    records: list[dict]
    relation_neurons: dict[str, list[list[int]]]
    config: dict
    stats: dict = field(default_factory=dict)

    def attributed(self) -> list[dict]:
        return [r for r in self.records if r["skipped"] is None]

    def summary(self) -> dict:
        done = self.attributed()
        effects = [r["effects"] for r in done if r.get("effects")]

        out = {"n_facts": len(self.records), "n_attributed": len(done),
               "n_skipped": len(self.records) - len(done), **_effect_means(effects)}
        out["mean_neurons_per_fact"] = _mean([len(r["neurons"]) for r in done])
        out["n_without_neurons"] = sum(not r["neurons"] for r in done)
        out["mean_prompts_per_fact"] = _mean([sum(c is not None for c in r["coarse"]) for r in done])
        out["mean_coarse_per_prompt"] = _mean([len(c) for r in done for c in r["coarse"] if c is not None])
        out["mean_consistency"] = _mean([r["consistency"] for r in done])
        out["n_relation_neurons"] = sum(len(v) for v in self.relation_neurons.values())
        out["seconds_per_fact"] = self.stats.get("seconds_per_fact")
        out["cpu_seconds_per_fact"] = self.stats.get("cpu_seconds_per_fact")
        for rel in sorted({r["relation"] for r in done}):
            mine = [r for r in done if r["relation"] == rel]
            out[f"relation.{rel}.n_attributed"] = len(mine)
            for key, value in _effect_means([r["effects"] for r in mine if r.get("effects")]).items():
                if key.endswith("_drop"):
                    out[f"relation.{rel}.{key}"] = value
        return out

    def save(self, directory: str | Path) -> None:
        d = Path(directory)
        atomic_write_jsonl(d / "neurons.jsonl", self.records)
        atomic_write_json(d / "relation_neurons.json", self.relation_neurons)
        atomic_write_json(d / "neurons_config.json", {"config": self.config, "stats": self.stats})

    @classmethod
    def load(cls, directory: str | Path) -> "NeuronResult":
        d = Path(directory)
        meta = load_json(d / "neurons_config.json", "knowledge-neuron config")
        return cls(read_jsonl(d / "neurons.jsonl"), load_json(d / "relation_neurons.json", "relation neurons"),
                   meta["config"], meta.get("stats", {}))


def _effect_means(effects: list[dict]) -> dict:
    """Mean drop (minus the relative change under suppression: 1 = the probability went to zero)
    and mean relative change under enhancement, per kind of target."""
    out = {}
    for key in ("own", "same_relation", "other_relation", "random"):
        out[f"mean_{key}_drop"] = _mean([None if e["suppress"][key] is None else -e["suppress"][key]
                                         for e in effects])
        out[f"mean_{key}_enhance"] = _mean([e["enhance"][key] for e in effects])
    return out


def find_knowledge_neurons(lm, facts: FactSet, config: NeuronConfig | None = None,
                           show_progress: bool = False) -> NeuronResult:
    """Attribute, select and test the knowledge neurons of every fact (see module docstring)."""
    config = config or NeuronConfig()
    check_facts_fit(lm, facts)
    start, cpu_start = time.time(), time.process_time()
    tok = lm.tokenizer
    prompts = [[fact.prompt(j) for j in range(len(fact.templates))] for fact in facts]
    targets = [[target_token_ids(tok, p, fact.object) for p in ps] for fact, ps in zip(facts, prompts)]
    flat_ranks = iter(first_token_ranks(lm, [p for ps in prompts for p in ps], [t for ts in targets for t in ts]))
    ranks = [[next(flat_ranks) for _ in ps] for ps in prompts]

    records = []
    for fact, ps, ts, rs in progress_bar(list(zip(facts, prompts, targets, ranks)), "knowledge neurons",
                                         enabled=show_progress):
        record = {"relation": fact.relation, "subject": fact.subject, "object": fact.object, "prompts": ps,
                  "target_tokens": tok.convert_ids_to_tokens(ts[0]), "ranks": rs, "neurons": [], "coarse": [],
                  "p": None, "consistency": None, "skipped": None, "effects": None}
        records.append(record)
        if rs[0] > config.max_rank:
            record["skipped"] = (f"object {fact.object!r} ranks {rs[0]} after {ps[0]!r}, beyond max_rank "
                                 f"{config.max_rank}: the model does not predict it")
            continue
        coarse: list[list | None] = []
        for p, t, r in zip(ps, ts, rs):
            coarse.append(None if r > config.max_rank else
                          coarse_neurons(attribute_neurons(lm, p, t, config), config.threshold))
        # Rounded as saved, so that refining a saved run (apply_refinement) gives the same result.
        coarse = [None if c is None else [[l, i, _short(s)] for l, i, s in c] for c in coarse]
        record.update(coarse=coarse, consistency=consistency([c for c in coarse if c is not None]))
    attributed_seconds = time.time() - start

    rel_neurons = apply_refinement(records, config)
    measure_effects(lm, records, [ts[0] for ts in targets], config)
    n_done = sum(r["skipped"] is None for r in records)
    total, cpu = time.time() - start, time.process_time() - cpu_start
    # CPU seconds (all threads of this process) are the steadier figure on a shared machine.
    stats = {"attribution_seconds": round(attributed_seconds, 3), "total_seconds": round(total, 3),
             "cpu_seconds": round(cpu, 3), "seconds_per_fact": round(total / n_done, 3) if n_done else None,
             "cpu_seconds_per_fact": round(cpu / n_done, 3) if n_done else None}
    meta = {**asdict(config), "model": getattr(lm, "spec", None), "n_layers": lm.adapter.n_layers,
            "d_mlp": lm.adapter.d_mlp}
    return NeuronResult(records, rel_neurons, meta, stats)


def _short(x: float) -> float:
    return float(f"{x:.6g}")


def measure_effects(lm, records: list[dict], targets: list[list[int]], config: NeuronConfig) -> None:
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
    rng = random.Random(config.seed)
    d_mlp = lm.adapter.d_mlp
    for k in known:
        neurons = [(l, i) for l, i, _ in records[k]["neurons"]]
        if not neurons:
            continue
        rel = records[k]["relation"]
        same = [j for j in known if j != k and records[j]["relation"] == rel]
        other = [j for j in known if records[j]["relation"] != rel]
        same = rng.sample(same, min(config.n_compare, len(same)))
        other = rng.sample(other, min(config.n_compare, len(other)))
        controls = [_random_like(neurons, d_mlp, rng) for _ in range(config.n_random_repeats)]
        group = [k, *same, *other]
        effects = {"base_prob": _short(base[k])}
        for name, factor in (("suppress", SUPPRESS), ("enhance", ENHANCE)):
            with intervene(lm, neurons, factor):
                probs = target_probabilities(lm, [prompts[j] for j in group], [targets[j] for j in group])
            change = [(p - base[j]) / base[j] if base[j] > 0 else None for p, j in zip(probs, group)]
            randoms = []
            for control in controls:
                with intervene(lm, control, factor):
                    p = target_probability(lm, prompts[k], targets[k])
                randoms.append((p - base[k]) / base[k] if base[k] > 0 else None)
            effects[name] = {"own": change[0], "same_relation": _mean(change[1: 1 + len(same)]),
                             "other_relation": _mean(change[1 + len(same):]), "random": _mean(randoms)}
        records[k]["effects"] = effects


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _random_like(neurons: list[tuple[int, int]], d_mlp: int, rng: random.Random) -> list[tuple[int, int]]:
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

