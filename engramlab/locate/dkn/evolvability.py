"""What degenerate knowledge neurons are good for: robustness and evolvability.

* **Robustness** (``robustness``, defined in ``dkn_robustness`` and re-exported here): the
  fact's query with one word inserted, deleted or replaced (outside the subject), scored with the
  DKN left alone, attenuated and enhanced.
* **Evolvability** (``evolvability``): fine-tune on new facts (invented subjects of the same
  relations) updating only the MLP in/out weights of one neuron set per arm, or the whole model;
  report accuracy on the new facts and retention of the old ones. Every arm gets the same
  optimiser, learning rate and steps, and the model is restored between arms. Arms (``ARMS``):

  ==========  ====================================================================================
  dkn         the union of the DKN neurons over the facts
  kn          as many non-DKN candidates (coarse KNs) as the DKN has *in each of its layers*, the
              strongest first; a layer short of candidates borrows from the nearest layers and the
              shortfall is reported (``n_unmatched``)
  random      as many random neurons as the DKN has in each of its layers, from those layers,
              never a candidate (seeded)
  kn_all      the union of all candidates (what the DKN paper compares with: larger, so size is
              confounded)
  random_any  as many random neurons as the DKN, from any layer
  full        every parameter
  ==========  ====================================================================================
"""

from __future__ import annotations

import random
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch

from engramlab.data.facts import Fact, target_token_ids
from engramlab.config import to_dict
from engramlab.locate.base import model_facts, read_result, write_result
from engramlab.locate.dkn.config import ARMS, EvolveConfig  # noqa: F401 (re-exported)
from engramlab.locate.dkn.find import DKNConfig, DKNResult
from engramlab.locate.dkn.robustness import PERTURBATIONS, perturb, robustness  # noqa: F401 (re-exported)
from engramlab.models.scoring import Neuron, encode_prompts, target_logits, target_logprobs
from engramlab.models.adapters import ArchAdapter
from engramlab.models.loading import LoadedModel
from engramlab.runs import atomic_write_json, load_json

# -- evolvability ------------------------------------------------------------------------------------
_SYLLABLES = ("bal", "dor", "ka", "ven", "tir", "mo", "zel", "qua", "ran", "thes", "lu", "vor", "nim", "pa")


def invented_subjects(n: int, seed: int) -> list[str]:
    """``n`` distinct made-up proper names (three syllables + "ia"), deterministic for a seed."""
    rng, names = random.Random(seed), []
    while len(names) < n:
        name = "".join(rng.choice(_SYLLABLES) for _ in range(3)).capitalize() + "ia"
        if name not in names:
            names.append(name)
    return names


def new_facts(old: Sequence[Fact], n: int, seed: int) -> list[Fact]:
    """Facts the model cannot know: invented subjects with objects taken from other old facts of the
    same relation (so the object is a plausible answer the model can say)."""
    rng = random.Random(seed)
    by_relation: dict[str, list[Fact]] = {}
    for f in old:
        by_relation.setdefault(f.relation, []).append(f)
    relations = sorted(by_relation)
    out = []
    for k, subject in enumerate(invented_subjects(n, seed)):
        donor = rng.choice(by_relation[relations[k % len(relations)]])
        out.append(Fact(subject, donor.relation, donor.object, donor.templates))
    return out


def neuron_param_masks(adapter: ArchAdapter, neurons: Sequence[Neuron]) -> dict[str, tuple[torch.nn.Parameter, torch.Tensor]]:
    """{parameter name: (parameter, 0/1 mask)} selecting the in/gate columns and out rows of ``neurons``.

    The adapter's W_in/W_gate/W_out are views of the parameters (transposed or not, per family);
    the same strides applied to a zero tensor shaped like the parameter mark exactly the entries
    the view's neuron slice covers, whatever the layout.
    """
    names = {id(p): name for name, p in adapter.model.named_parameters()}
    params = dict(adapter.model.named_parameters())
    by_layer: dict[int, list[int]] = {}
    for layer, index in neurons:
        by_layer.setdefault(layer, []).append(index)
    masks: dict[str, tuple[torch.nn.Parameter, torch.Tensor]] = {}
    for layer, index in by_layer.items():
        for view, axis in ((adapter.W_in(layer), 1), (adapter.W_gate(layer), 1), (adapter.W_out(layer), 0)):
            if view is None:
                continue
            base = view if view._base is None else view._base
            name = names[id(base)]
            mask = masks.setdefault(name, (params[name], torch.zeros_like(base)))[1]
            mask_view = mask.as_strided(view.shape, view.stride(), view.storage_offset() - base.storage_offset())
            mask_view.index_fill_(axis, torch.tensor(index, device=mask.device), 1.0)
    return masks


def _batch(lm: LoadedModel, facts: Sequence[Fact], template: int) -> tuple[list[list[int]], list[list[int]]]:
    """The facts as teacher-forced rows: (prompt ids per fact, target ids per fact)."""
    prompts = [f.prompt(template) for f in facts]
    return encode_prompts(lm, prompts), [target_token_ids(lm.tokenizer, p, f.object) for p, f in zip(prompts, facts)]


def _loss(lm: LoadedModel, batch) -> torch.Tensor:
    """Mean over the facts of the mean cross-entropy of their target tokens given the prompt (and
    the earlier target tokens): mean_i -log P(target_i | prompt_i) / T_i, differentiable."""
    prompts, targets = batch
    logp = target_logprobs(lm, prompts, targets, batch_size=max(1, len(prompts)))  # (n,), one forward pass
    return (-logp / torch.tensor([len(t) for t in targets], device=logp.device)).mean()


@torch.no_grad()
def _recall(lm: LoadedModel, batch) -> dict:
    """Top-1 accuracy and mean probability of the first target token."""
    prompts, targets = batch
    first = torch.cat(list(target_logits(lm, prompts, [t[:1] for t in targets], batch_size=max(1, len(prompts)))))
    first = first.float()  # (n, vocab): the logits right after each prompt
    target = torch.tensor([t[0] for t in targets], device=first.device)
    return {"top1": float((first.argmax(-1) == target).float().mean()),
            "mean_prob": float(first.softmax(-1).gather(1, target[:, None]).mean())}


def layer_counts(neurons: Sequence[Neuron]) -> dict[int, int]:
    """{layer: number of ``neurons`` in it}, layers ascending."""
    out: dict[int, int] = {}
    for layer, _ in sorted(neurons):
        out[layer] = out.get(layer, 0) + 1
    return out


def matched_kn(dkn: Sequence[Neuron], candidates: dict[Neuron, float]) -> tuple[list[Neuron], int]:
    """Non-DKN candidates matching the DKN's size and layers, and how many sit in another layer.

    ``candidates`` maps each candidate to its strength (higher first). For every DKN layer l with
    c_l DKN neurons the c_l strongest non-DKN candidates of layer l are taken; a layer with too
    few then takes the rest from the nearest layers (ties: the earlier layer), then by strength,
    and counts as unmatched (an arm can come out smaller when there are too few candidates).
    """
    pool = {n: s for n, s in candidates.items() if n not in set(dkn)}
    picked: set[Neuron] = set()
    short: dict[int, int] = {}
    for layer, count in layer_counts(dkn).items():  # same layer first, for every layer
        same = sorted((n for n in pool if n[0] == layer), key=lambda n: (-pool[n], n[1]))[:count]
        picked.update(same)
        if len(same) < count:
            short[layer] = count - len(same)
    for layer, count in short.items():  # then the shortfalls, from the nearest layers
        free = sorted((n for n in pool if n not in picked), key=lambda n: (abs(n[0] - layer), n[0], -pool[n], n[1]))
        picked.update(free[:count])
    return sorted(picked), sum(short.values())


def matched_random(dkn: Sequence[Neuron], exclude: set, d_mlp: int, seed: int) -> list[Neuron]:
    """Per DKN layer as many random neurons of that layer as the DKN has there, none in ``exclude``."""
    gen = torch.Generator().manual_seed(seed)
    out: list[Neuron] = []
    for layer, count in layer_counts(dkn).items():
        order = torch.randperm(d_mlp, generator=gen).tolist()
        out += [(layer, i) for i in order if (layer, i) not in exclude][:count]
    return sorted(out)


@contextmanager
def trained(lm: LoadedModel, masks: dict | None, batch, config: EvolveConfig) -> Iterator[int]:
    """Inside the block the model is fine-tuned with Adam on the masked entries (``masks=None``:
    every parameter); yields the number of trainable entries. The weights are restored on exit."""
    if masks is None:
        masks = {name: (p, None) for name, p in lm.model.named_parameters()}
    saved = {name: (p.detach().clone(), p.requires_grad) for name, (p, _) in masks.items()}
    hooks = []
    try:
        for p, m in masks.values():
            p.requires_grad_(True)
            if m is not None:  # zero gradients outside the neurons: Adam then never moves those entries
                hooks.append(p.register_hook(lambda g, m=m: g * m))
        opt = torch.optim.Adam([p for p, _ in masks.values()], lr=config.lr)
        for _ in range(config.steps):
            opt.zero_grad(set_to_none=True)
            _loss(lm, batch).backward()
            opt.step()
        yield sum(int(p.numel() if m is None else m.sum()) for p, m in masks.values())
    finally:
        for h in hooks:
            h.remove()
        with torch.no_grad():
            for name, (p, _) in masks.items():
                p.copy_(saved[name][0])
                p.requires_grad_(saved[name][1])


def evolvability(lm: LoadedModel, result: DKNResult, facts: Sequence[Fact], config: EvolveConfig | None = None,
                 method: str | None = None) -> dict:
    """Learn new facts through the DKN, the knowledge neurons, random neurons, or the whole model.

    ``result`` gives the neuron sets of the arms (module docstring): ``method``'s DKN neurons
    (union over the facts), the candidates, and random neurons matched to the DKN. A candidate's
    strength is its largest attribution over the facts relative to that fact's strongest one.
    ``facts`` are the facts ``result`` was computed on; the evaluated ones are the old facts.
    Per arm: ``n_neurons``, ``neurons``, ``layers`` ({layer: count}), ``n_params`` (trainable entries),
    ``n_unmatched`` (``kn``), and accuracy/probability on the new and the old facts.
    """
    config = config or EvolveConfig()
    config.validate()
    method = method or result.config.get("method", "persistence")
    template = int(result.config.get("template", 0))
    evaluated = [r for r in result.records() if not r["skipped"]]
    keys = {(r["relation"], r["subject"], r["object"]) for r in evaluated}
    old = [f for f in facts if (f.relation, f.subject, f.object) in keys]
    if not old:
        return {"method": method, "skipped": "no evaluated facts", "arms": {}}
    dkn = sorted({tuple(n) for r in evaluated for n in r["methods"].get(method, {}).get("dkn_neurons", [])})
    strength: dict[Neuron, float] = {}
    for r in evaluated:
        top = max((s for _, _, s in r["candidates"]), default=0.0) or 1.0
        for l, i, s in r["candidates"]:
            strength[(l, i)] = max(strength.get((l, i), -float("inf")), s / top)
    kn, n_unmatched = matched_kn(dkn, strength)
    d_mlp, n_total = lm.adapter.d_mlp, lm.adapter.n_layers * lm.adapter.d_mlp
    picks = torch.randperm(n_total, generator=torch.Generator().manual_seed(config.seed))[:len(dkn)].tolist()
    neuron_sets = {"dkn": dkn, "kn": kn, "random": matched_random(dkn, set(strength) | set(dkn), d_mlp, config.seed),
                   "kn_all": sorted(strength), "random_any": sorted((k // d_mlp, k % d_mlp) for k in picks)}

    learn = new_facts(old, config.n_new, config.seed)
    new_batch, old_batch = _batch(lm, learn, template), _batch(lm, old, template)
    before_new, before_old = _recall(lm, new_batch), _recall(lm, old_batch)
    out = {"method": method, "n_old": len(old), "n_new": len(learn),
           "new_facts": [{"prompt": f.prompt(template), "relation": f.relation, "subject": f.subject,
                           "object": f.object} for f in learn],
           "before": {"new_top1": before_new["top1"], "old_top1": before_old["top1"]}, "arms": {}, "skipped_arms": {}}
    for arm in config.arms:
        neurons = neuron_sets.get(arm)
        if neurons is not None and not neurons:
            out["skipped_arms"][arm] = ("no candidate neurons to train" if arm == "kn_all" else
                                        "no DKN neurons to train or match")
            continue
        masks = None if arm == "full" else neuron_param_masks(lm.adapter, neurons)
        with trained(lm, masks, new_batch, config) as n_params:
            new, kept = _recall(lm, new_batch), _recall(lm, old_batch)
        numbers = {"n_neurons": len(neurons) if neurons is not None else None,
                   "neurons": [list(n) for n in neurons] if neurons is not None else None,
                   "layers": {str(l): c for l, c in layer_counts(neurons).items()} if neurons is not None else None,
                   "n_params": n_params, "new_top1": new["top1"], "new_mean_prob": new["mean_prob"],
                   "old_top1": kept["top1"], "old_mean_prob": kept["mean_prob"]}
        if arm == "kn":
            numbers["n_unmatched"] = n_unmatched
        out["arms"][arm] = numbers
    return out


@dataclass
class EvolvabilityResult:
    """The evolvability step's outcome: per arm, what it trained and how new and old facts fare.

    ``arms`` {arm: numbers} (see ``evolvability``); ``records()`` one row per new fact learnt, with
    the relation and object it was given. Saved in its own directory (``engram dkn --evolvability``
    writes ``OUT/evolvability/``) with the shared layout plus ``evolvability.json`` (everything)."""

    outcome: dict  # what ``evolvability`` returns
    config: dict = field(default_factory=dict)
    stats: dict = field(default_factory=dict)
    model: dict = field(default_factory=dict)

    @property
    def arms(self) -> dict[str, dict]:
        return self.outcome.get("arms", {})

    def records(self) -> list[dict]:
        return [{"relation": f.get("relation"), "subject": f.get("subject"), "object": f["object"],
                 "prompt": f["prompt"]} for f in self.outcome.get("new_facts", [])]

    def summary(self) -> dict:
        """``{arm}.{number}`` for every arm (neuron lists and layer counts left out), plus the counts."""
        out = {"n_old": self.outcome.get("n_old", 0), "n_new": self.outcome.get("n_new", 0),
               "method": self.outcome.get("method")}
        for key, value in self.outcome.get("before", {}).items():
            out[f"before.{key}"] = value
        for arm, numbers in self.arms.items():
            out.update({f"{arm}.{k}": v for k, v in numbers.items() if k not in ("neurons", "layers")})
        return out

    def save(self, directory: str | Path) -> None:
        d = write_result(directory, "evolvability", self)
        atomic_write_json(d / "evolvability.json", self.outcome)

    @classmethod
    def load(cls, directory: str | Path) -> "EvolvabilityResult":
        d = Path(directory)
        if not (d / "config.json").is_file() and (d / "evolvability.json").is_file():  # before the contract
            return cls(load_json(d / "evolvability.json", "evolvability"))
        got = read_result(d, "evolvability", records_required=False)
        return cls(load_json(d / "evolvability.json", "evolvability"), got.config, got.stats, got.model)


def evaluate_evolvability(lm: LoadedModel, dkn: DKNResult, facts: Sequence[Fact], config: EvolveConfig | None = None,
                          *, progress: bool = False) -> EvolvabilityResult:
    """The evolvability step after ``find_degenerate_neurons``: ``evolvability`` as a Result."""
    config = config or EvolveConfig()
    start = time.time()
    outcome = evolvability(lm, dkn, facts, config)
    return EvolvabilityResult(outcome, to_dict(config), {"seconds": round(time.time() - start, 3)}, model_facts(lm))
