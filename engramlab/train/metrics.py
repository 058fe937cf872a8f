"""What a model knows about a world's individuals, measured at one training step.

An evaluation set is a list of documents, teacher forced: in ``sentence`` context (default)
each document is one sentence ``<bos> prompt value suffix``; in ``biography`` context (the
fact-learning paper's protocol) it is a whole biography of six evaluation-template sentences,
so every value is predicted with the other five sentences (and five more mentions of the
name) in context. Per value (one attribute of one document):

* attribute loss: cross-entropy summed over the value's tokens, -log p(value | context);
  averaged over the values of an attribute, then over the six attributes (each weighs the same);
* attribute accuracy: every value token is the argmax;
* ``first_token_top1_prob`` / ``first_token_entropy``: probability of the model's top-1 token,
  and the entropy (nats) of the distribution, where it predicts the value's *first* token (the
  recall position; a model that hallucinates is confident about people it never saw);
  ``value_top1_prob`` / ``value_entropy``: the same averaged over *all* the value's tokens (the
  paper's averaging), then over values;
* attention statistics (first layer = layer 0; every pattern averaged over heads):
  ``attn.last_name_to_name_layer0``: the paper's name->name: mass the *last* token of a name
  mention puts on the other tokens of the same mention, averaged over mentions;
  ``attn.name_to_name_layer0`` (engramlab's earlier definition, kept): mass every name token
  that has an earlier name token in the document puts on all earlier name tokens, averaged
  over those tokens (in biography context this includes earlier mentions);
  ``attn.attr_to_name`` (per layer): mass the position predicting a value's first token puts
  on the name tokens (all mentions before it), averaged over values.

Continual worlds also get accuracy and loss per group of people, each a mean over the group's
values: ``attr_acc.bucket.<high|medium|low|unseen>``, ``attr_acc.kind.<rel|compl>`` and
``attr_acc.kind.<k>.bucket.<b>`` (and ``attr_loss.`` the same).
"""

from __future__ import annotations

import math
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engramlab.data.world import ATTRIBUTES, World
from engramlab.data.wordtok import encode_with_spans
from engramlab.errors import EngramError
from engramlab.train.config import EVAL_CONTEXTS  # noqa: F401 (re-exported)
from engramlab.models.hooks import site_name


def baseline_loss(world: World) -> float:
    """No-knowledge loss: mean over attributes of log(number of possible values).

    Values are drawn uniformly and independently of who is sampled, so a model that knows the
    marginal of every attribute but nothing about individuals reaches exactly this loss in
    expectation over populations.
    """
    counts = world.value_counts()
    return float(sum(math.log(counts[a]) for a in ATTRIBUTES) / len(ATTRIBUTES))


def _value_parts(attribute: str, value: str) -> list[str]:
    if attribute != "birth_date":
        return [value]
    month_day, year = value.split(", ")  # "March 16, 2042"
    return [*month_day.split(" "), year]


def empirical_marginal_loss(world: World) -> float:
    """No-knowledge loss of a model that knows the *empirical* marginals of the trained people.

    For N people, attribute a with value counts c_v: the model predicts p(v) = c_v / N and its
    loss on them is the plug-in entropy H_a = -sum_v (c_v / N) log(c_v / N); birth dates count as
    independent month, day and year (the analytic baseline's log(12 * 31 * years) makes the same
    factorisation), so H_birth_date = H_month + H_day + H_year. Returns mean_a H_a. It is below
    ``baseline_loss`` by about (pool size - 1) / 2N per pool: the finite-population gap a model
    can close without knowing anyone. People count once each (not weighted by a sampler).
    """
    n = len(world.people)
    total = 0.0
    for attribute in ATTRIBUTES:
        columns = zip(*(_value_parts(attribute, p.attributes[attribute]) for p in world.people))
        for column in columns:
            total -= sum(c / n * math.log(c / n) for c in Counter(column).values())
    return total / len(ATTRIBUTES)


@dataclass
class EvalSet:
    """One pre-encoded evaluation split of N documents (sentences or biographies), length T.

    value_attr (N, T) long: index in ATTRIBUTES of the value a token belongs to, else -1;
    first_value_mask (N, T) bool: the first token of each value;
    name_group (N, T) long: for tokens of a name mention, the index in ATTRIBUTES of the
    sentence holding it (one mention per sentence, so it tells mentions apart), else -1;
    buckets: per document, the person's frequency bucket (continual worlds) or None;
    kinds: per document, the person's kind, "rel" or "compl" (continual worlds) or None.
    """

    name: str
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    value_attr: torch.Tensor
    first_value_mask: torch.Tensor
    name_group: torch.Tensor
    context: str = "sentence"
    buckets: list[str] | None = None
    kinds: list[str] | None = None

    @classmethod
    def build(cls, name: str, world: World, split: str, tokenizer, max_people: int | None,
              max_templates: int | None, people: list[int] | None = None, context: str = "sentence",
              template_choice: str = "random") -> "EvalSet":
        """Encode ``split`` of ``world`` (see World.eval_items / eval_biographies)."""
        choose = dict(max_people=max_people, max_templates=max_templates, people=people,
                      template_choice=template_choice)
        if context == "sentence":
            docs = [[it] for it in world.eval_items(split, **choose)]
        elif context == "biography":
            docs = world.eval_biographies(split, **choose)
        else:
            raise EngramError(f"--eval-context {context!r}: use sentence or biography")
        members = world.heldout_people if split == "heldout_people" else world.people
        texts, value_spans, name_spans = [], [], []
        for doc in docs:
            pos, values, names = 0, [], []
            for it in doc:  # sentences joined by single spaces, as in training biographies
                person_name = members[it.person_index].name
                at = pos + it.prompt.find(person_name)
                names.append((it.attribute, at, at + len(person_name)))
                values.append((it.attribute, pos + it.value_span[0], pos + it.value_span[1]))
                pos += len(it.text) + 1
            texts.append(" ".join(it.text for it in doc))
            value_spans.append(values)
            name_spans.append(names)
        enc = encode_with_spans(tokenizer, texts, value_spans, add_eos=False)
        names = encode_with_spans(tokenizer, texts, name_spans, add_eos=False)
        buckets = kinds = None
        if world.config.kind == "continual":
            buckets = [members[doc[0].person_index].bucket for doc in docs]
            kinds = [members[doc[0].person_index].kind for doc in docs]
        return cls(name, enc["input_ids"], enc["attention_mask"], enc["attribute_ids"], enc["first_value_mask"],
                   names["attribute_ids"], context, buckets, kinds)

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def _group_metrics(prefix: str, evalset: EvalSet, docs: torch.Tensor, acc: torch.Tensor,
                   loss: torch.Tensor) -> dict:
    """Accuracy and loss per group of people (continual worlds), each a mean over the group's
    values (not over attributes first): ``attr_acc.bucket.<b>`` / ``attr_loss.bucket.<b>`` per
    frequency bucket, ``.kind.<k>`` per kind (rel, compl) and ``.kind.<k>.bucket.<b>`` per
    (kind, bucket) pair present. ``docs`` (n_values,): each value's document; ``acc``, ``loss``
    (n_values,)."""
    out = {}
    groupings = {"bucket": evalset.buckets, "kind": evalset.kinds}
    if evalset.buckets is not None and evalset.kinds is not None:
        groupings["kind_bucket"] = [f"{k}.bucket.{b}" for k, b in zip(evalset.kinds, evalset.buckets)]
    for grouping, labels in groupings.items():
        if labels is None:
            continue
        of_value = [labels[int(d)] for d in docs]
        for label in sorted(set(labels)):
            sel = torch.tensor([x == label for x in of_value])
            key = "kind" if grouping == "kind_bucket" else grouping
            out[f"{prefix}.attr_acc.{key}.{label}"] = float(acc[sel].mean())
            out[f"{prefix}.attr_loss.{key}.{label}"] = float(loss[sel].mean())
    return out


def _mean(total: float, count: float) -> float:
    return total / count if count else float("nan")


@torch.no_grad()
def evaluate(model, evalset: EvalSet, batch_size: int | None = None, hooks=None, attention_stats: bool = False,
             pattern_source=None) -> dict:
    """Metrics of ``model`` on ``evalset`` (see the module docstring) as a flat dict prefixed
    with the set's name. ``batch_size``: documents per forward (default 256 sentences or 48
    biographies).

    ``pattern_source(input_ids, attention_mask) -> {site: pattern}`` substitutes attention
    patterns (attention-patched twins are evaluated as they are trained).
    """
    device = next(model.parameters()).device
    batch_size = batch_size or (256 if evalset.context == "sentence" else 48)
    was_training = model.training
    model.eval()
    # One record per value (document, attribute): loss, exact match, top-1 prob and entropy at
    # the first token and averaged over the value's tokens.
    loss, acc, top1_first, ent_first, top1_all, ent_all, attr_of, doc_of = ([] for _ in range(8))
    n_layers = hooks.adapter.n_layers if hooks is not None else 0
    want_patterns = attention_stats and hooks is not None
    sites = [site_name("attn.pattern", l) for l in range(n_layers)]
    attr_name = torch.zeros(n_layers, dtype=torch.float64)
    n_values = 0
    nn_sum = nn_count = last_sum = last_count = 0.0
    for s in range(0, len(evalset), batch_size):
        ids = evalset.input_ids[s : s + batch_size].to(device)
        am = evalset.attention_mask[s : s + batch_size].to(device)
        va = evalset.value_attr[s : s + batch_size, 1:].to(device)  # (B, T-1): value of the *target*
        first = evalset.first_value_mask[s : s + batch_size, 1:].to(device)
        group = evalset.name_group[s : s + batch_size].to(device)  # (B, T)
        with ExitStack() as stack:
            if pattern_source is not None:
                for site, pat in pattern_source(ids, am).items():
                    stack.enter_context(hooks.replace(site, pat))
            cache = stack.enter_context(hooks.capture(sites)) if want_patterns else None
            logits = model(input_ids=ids, attention_mask=am).logits.float()  # (B, T, V)
        pred, target = logits[:, :-1], ids[:, 1:]  # position t predicts token t + 1
        ce = F.cross_entropy(pred.transpose(1, 2), target, reduction="none")  # (B, T-1)
        right = pred.argmax(-1) == target
        is_value = va >= 0
        probs = pred[is_value].softmax(-1)  # (n_value_tokens, V), only where a value is predicted
        tok_top1 = torch.zeros_like(ce)
        tok_ent = torch.zeros_like(ce)
        tok_top1[is_value] = probs.max(-1).values
        tok_ent[is_value] = -(probs * probs.clamp_min(1e-30).log()).sum(-1)
        rows = torch.arange(ids.shape[0], device=device)
        for a in range(len(ATTRIBUTES)):
            m = va == a  # (B, T-1)
            present = m.any(1)
            n_tok = m.sum(1).clamp_min(1)
            fm = m & first
            loss.append((ce * m).sum(1)[present].cpu())
            acc.append((right | ~m).all(1)[present].cpu())
            top1_first.append((tok_top1 * fm).sum(1)[present].cpu())
            ent_first.append((tok_ent * fm).sum(1)[present].cpu())
            top1_all.append(((tok_top1 * m).sum(1) / n_tok)[present].cpu())
            ent_all.append(((tok_ent * m).sum(1) / n_tok)[present].cpu())
            attr_of.append(torch.full((int(present.sum()),), a))
            doc_of.append((rows[present] + s).cpu())
        if want_patterns:
            name = group >= 0  # (B, T)
            b_idx, q_idx = first.nonzero(as_tuple=True)  # query position predicting a first value token
            n_values += len(b_idx)
            for l, site in enumerate(sites):
                q = cache[site].float()[b_idx, :, q_idx]  # (n_values, H, T)
                attr_name[l] += float((q * name[b_idx][:, None, :]).sum(-1).mean(1).sum())
            p0 = cache[sites[0]].float().mean(1)  # (B, T, T) layer 0, averaged over heads
            below = torch.ones(p0.shape[-2:], dtype=torch.bool, device=device).tril(-1)  # key < query
            earlier = name[:, :, None] & name[:, None, :] & below
            has_prev = earlier.any(-1)
            nn_sum += float(((p0 * earlier).sum(-1) * has_prev).sum())
            nn_count += float(has_prev.sum())
            same = earlier & (group[:, :, None] == group[:, None, :])
            nxt = torch.cat([group[:, 1:], torch.full_like(group[:, :1], -1)], 1)
            last = name & (nxt != group) & same.any(-1)  # last token of a mention with 2+ tokens
            last_sum += float(((p0 * same).sum(-1) * last).sum())
            last_count += float(last.sum())
    model.train(was_training)
    loss, acc = torch.cat(loss).double(), torch.cat(acc).double()
    attrs, docs = torch.cat(attr_of), torch.cat(doc_of)
    per_attr_loss = {a: float(loss[attrs == i].mean()) for i, a in enumerate(ATTRIBUTES) if (attrs == i).any()}
    per_attr_acc = {a: float(acc[attrs == i].mean()) for i, a in enumerate(ATTRIBUTES) if (attrs == i).any()}
    p = evalset.name
    out = {
        f"{p}.attr_loss": sum(per_attr_loss.values()) / len(per_attr_loss),
        f"{p}.attr_acc": sum(per_attr_acc.values()) / len(per_attr_acc),
        f"{p}.first_token_top1_prob": float(torch.cat(top1_first).mean()),
        f"{p}.first_token_entropy": float(torch.cat(ent_first).mean()),
        f"{p}.value_top1_prob": float(torch.cat(top1_all).mean()),
        f"{p}.value_entropy": float(torch.cat(ent_all).mean()),
    }
    out.update({f"{p}.attr_loss.{a}": v for a, v in per_attr_loss.items()})
    out.update({f"{p}.attr_acc.{a}": v for a, v in per_attr_acc.items()})
    out.update(_group_metrics(p, evalset, docs, acc, loss))
    if want_patterns:
        out[f"{p}.attn.name_to_name_layer0"] = _mean(nn_sum, nn_count)
        out[f"{p}.attn.last_name_to_name_layer0"] = _mean(last_sum, last_count)
        out[f"{p}.attn.attr_to_name"] = [float(x) / max(n_values, 1) for x in attr_name]
    return out
