"""What a model knows about a world's individuals, measured at one training step.

Definitions (for one evaluation sentence ``prompt + " " + value + suffix``, teacher forced):

* attribute loss: cross-entropy summed over the value's tokens; averaged over sentences of an
  attribute, then over the six attributes (so every attribute weighs the same);
* attribute accuracy: every value token is the argmax;
* first-token statistics (held-out population): probability of the model's top-1 token at the
  first value token, and the entropy of that distribution - a model that hallucinates is
  confident about people it never saw;
* attention statistics: name->name mass in the first layer (queries on name tokens, keys on
  earlier name tokens) and attribute->name mass at the first value token, per layer: the mass
  the position predicting the value puts on the person's name, averaged over heads.
"""

from __future__ import annotations

import math
from contextlib import ExitStack
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engramlab.data.world import ATTRIBUTES, World
from engramlab.data.wordtok import encode_eval_items, encode_with_spans


def baseline_loss(world: World) -> float:
    """No-knowledge loss: mean over attributes of log(number of possible values).

    Values are drawn uniformly and independently of who is sampled, so a model that knows the
    marginal of every attribute but nothing about individuals reaches exactly this loss.
    """
    counts = world.value_counts()
    return float(sum(math.log(counts[a]) for a in ATTRIBUTES) / len(ATTRIBUTES))


@dataclass
class EvalSet:
    """One pre-encoded evaluation split. Tensors are (n_items, T) unless noted."""

    name: str
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    value_mask: torch.Tensor
    first_value_mask: torch.Tensor
    name_mask: torch.Tensor
    attribute_ids: torch.Tensor  # (n_items,)
    value_start: torch.Tensor  # (n_items,)
    buckets: list[str] | None = None  # per item, for continual worlds (high/medium/low)

    @classmethod
    def build(cls, name: str, world: World, split: str, tokenizer, max_people: int, max_templates: int,
              people: list[int] | None = None) -> "EvalSet":
        items = world.eval_items(split, max_people=max_people, max_templates=max_templates, people=people)
        enc = encode_eval_items(tokenizer, items)
        # Name tokens: encode the same texts with the name's character span as the "value".
        people = world.heldout_people if split == "heldout_people" else world.people
        spans = []
        for it in items:
            start = it.prompt.find(people[it.person_index].name)
            spans.append([(it.attribute, start, start + len(people[it.person_index].name))])
        names = encode_with_spans(tokenizer, [it.text for it in items], spans, add_eos=False)
        buckets = [people[it.person_index].bucket for it in items] if world.config.kind == "continual" else None
        return cls(name, enc["input_ids"], enc["attention_mask"], enc["value_mask"], enc["first_value_mask"],
                   names["value_mask"], enc["attribute_ids"], enc["value_start"], buckets)

    def __len__(self) -> int:
        return self.input_ids.shape[0]


@torch.no_grad()
def evaluate(model, evalset: EvalSet, batch_size: int = 256, hooks=None, attention_stats: bool = False,
             pattern_source=None) -> dict:
    """Metrics of ``model`` on ``evalset`` as a flat dict prefixed with the set's name.

    ``pattern_source(input_ids, attention_mask) -> {site: pattern}`` substitutes attention
    patterns (attention-patched twins are evaluated as they are trained).
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    item_loss, item_acc, top1, entropy = [], [], [], []
    n_layers = hooks.adapter.n_layers if hooks is not None else 0
    attr_name = torch.zeros(n_layers)
    name_name = 0.0
    want_patterns = attention_stats and hooks is not None
    sites = [f"blocks.{l}.attn.pattern" for l in range(n_layers)]
    for s in range(0, len(evalset), batch_size):
        ids = evalset.input_ids[s : s + batch_size].to(device)
        am = evalset.attention_mask[s : s + batch_size].to(device)
        vm = evalset.value_mask[s : s + batch_size].to(device)
        nm = evalset.name_mask[s : s + batch_size].to(device)
        vstart = evalset.value_start[s : s + batch_size].to(device)
        with ExitStack() as stack:
            if pattern_source is not None:
                for site, pat in pattern_source(ids, am).items():
                    stack.enter_context(hooks.replace(site, pat))
            cache = stack.enter_context(hooks.capture(sites)) if want_patterns else None
            logits = model(input_ids=ids, attention_mask=am).logits.float()  # (B, T, V)
        pred, target, vmask = logits[:, :-1], ids[:, 1:], vm[:, 1:]
        ce = F.cross_entropy(pred.transpose(1, 2), target, reduction="none")  # (B, T-1)
        item_loss.append((ce * vmask).sum(1).cpu())
        item_acc.append(((pred.argmax(-1) == target) | ~vmask).all(1).cpu())
        rows = torch.arange(ids.shape[0], device=device)
        first = logits[rows, vstart - 1].softmax(-1)  # distribution predicting the first value token
        top1.append(first.max(-1).values.cpu())
        entropy.append(-(first * first.clamp_min(1e-30).log()).sum(-1).cpu())
        if want_patterns:
            for l, site in enumerate(sites):
                pat = cache[site].float()  # (B, H, T, T)
                q = pat[rows, :, vstart - 1]  # (B, H, T): the query predicting the value
                attr_name[l] += (q * nm[:, None, :]).sum(-1).mean(1).sum().cpu()
            p0 = cache[sites[0]].float().mean(1)  # (B, T, T), averaged over heads
            earlier = torch.tril(nm[:, :, None] & nm[:, None, :], diagonal=-1)  # name query, earlier name key
            has_prev = earlier.any(-1)  # name tokens with an earlier name token
            mass = (p0 * earlier).sum(-1)  # (B, T)
            name_name += float((mass * has_prev).sum() / has_prev.sum().clamp_min(1)) * ids.shape[0]
    model.train(was_training)
    loss, acc = torch.cat(item_loss), torch.cat(item_acc).float()
    attrs = evalset.attribute_ids
    per_attr_loss = {a: float(loss[attrs == i].mean()) for i, a in enumerate(ATTRIBUTES) if (attrs == i).any()}
    per_attr_acc = {a: float(acc[attrs == i].mean()) for i, a in enumerate(ATTRIBUTES) if (attrs == i).any()}
    p = evalset.name
    out = {
        f"{p}.attr_loss": sum(per_attr_loss.values()) / len(per_attr_loss),
        f"{p}.attr_acc": sum(per_attr_acc.values()) / len(per_attr_acc),
        f"{p}.first_token_top1_prob": float(torch.cat(top1).mean()),
        f"{p}.first_token_entropy": float(torch.cat(entropy).mean()),
    }
    out.update({f"{p}.attr_loss.{a}": v for a, v in per_attr_loss.items()})
    out.update({f"{p}.attr_acc.{a}": v for a, v in per_attr_acc.items()})
    if evalset.buckets is not None:
        for bucket in sorted(set(evalset.buckets)):
            sel = torch.tensor([b == bucket for b in evalset.buckets])
            out[f"{p}.attr_acc.bucket.{bucket}"] = float(acc[sel].mean())
            out[f"{p}.attr_loss.bucket.{bucket}"] = float(loss[sel].mean())
    if want_patterns:
        out[f"{p}.attn.name_to_name_layer0"] = name_name / len(evalset)
        out[f"{p}.attn.attr_to_name"] = [float(x) / len(evalset) for x in attr_name]
    return out
