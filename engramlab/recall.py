"""Does a model know a fact? Recall scoring for a FactSet.

For each fact the prompt is ``templates[t].format(subject)`` (no chat template, no special
tokens) and the target is the token sequence of " " + object. One teacher-forced forward pass
over prompt + target gives, per fact:

* ``target_prob`` / ``target_rank``: probability and rank (1 = most likely) of the first target
  token after the prompt - the definition behind the LRE README's top-1/top-10 table;
* ``exact_match``: greedy decoding reproduces the whole object. Greedy decoding emits the target
  iff at every target position the argmax equals the target token given the target prefix, which
  is exactly what the teacher-forced pass checks, so no generation loop is needed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from engramlab.config import option, validate
from engramlab.data.facts import FactSet, target_token_ids
from engramlab.models.context import check_facts_fit
from engramlab.models.loading import LoadedModel, pad_rows
from engramlab.progress import progress_bar
from engramlab.runs import atomic_write_json, atomic_write_jsonl, load_json, read_jsonl


@dataclass
class RecallConfig:
    """How recall is scored."""

    template: int = option(0, "Index of the prompt template to use (negative counts from the end).")
    batch_size: int = option(16, "Facts per forward pass.", range=(1, None))

    def __post_init__(self):
        validate(self)


@dataclass
class RecallResult:
    """Per-fact recall records and their summary (the Result shape every locator shares)."""

    records: list[dict]
    config: dict = field(default_factory=dict)

    def summary(self) -> dict:
        """Flat headline numbers: overall and per-relation accuracies."""
        out = _accuracies(self.records)
        relations = sorted({r["relation"] for r in self.records})
        out["n_relations"] = len(relations)
        for rel in relations:
            for k, v in _accuracies([r for r in self.records if r["relation"] == rel]).items():
                out[f"relation.{rel}.{k}"] = v
        return out

    def per_relation(self) -> dict[str, dict]:
        rels = sorted({r["relation"] for r in self.records})
        return {rel: _accuracies([r for r in self.records if r["relation"] == rel]) for rel in rels}

    def save(self, directory: str | Path) -> None:
        d = Path(directory)
        atomic_write_jsonl(d / "facts.jsonl", self.records)
        atomic_write_json(d / "recall_config.json", self.config)

    @classmethod
    def load(cls, directory: str | Path) -> "RecallResult":
        d = Path(directory)
        config = load_json(d / "recall_config.json", "recall config") if (d / "recall_config.json").exists() else {}
        return cls(read_jsonl(d / "facts.jsonl"), config)


def _accuracies(records: list[dict]) -> dict:
    n = len(records)
    if n == 0:  # no facts: no accuracy (null in summary.json), not a misleading 0.0
        return {"n_facts": 0, "top1_accuracy": None, "top10_accuracy": None, "exact_match": None,
                "mean_target_prob": None}
    return {
        "n_facts": n,
        "top1_accuracy": sum(r["target_rank"] == 1 for r in records) / n,
        "top10_accuracy": sum(r["target_rank"] <= 10 for r in records) / n,
        "exact_match": sum(bool(r["exact_match"]) for r in records) / n,
        "mean_target_prob": sum(r["target_prob"] for r in records) / n,
    }


@torch.no_grad()
def score_recall(lm: LoadedModel, facts: FactSet, template_index: int = 0, batch_size: int = 16,
                 show_progress: bool = False) -> RecallResult:
    """Score every fact of ``facts`` with ``lm`` (see module docstring for the definitions)."""
    RecallConfig(template=template_index, batch_size=batch_size)
    check_facts_fit(lm, facts)
    tok = lm.tokenizer
    items = []
    for fact in facts:
        prompt = fact.prompt(template_index)
        prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        target = target_token_ids(tok, prompt, fact.object)
        items.append((fact, prompt, prompt_ids, target))

    records = []
    batches = range(0, len(items), batch_size)
    for start in progress_bar(batches, "recall", enabled=show_progress):
        chunk = items[start : start + batch_size]
        ids, mask = pad_rows([p + t for _, _, p, t in chunk], lm.pad_id, lm.device)
        logits = lm.model(input_ids=ids, attention_mask=mask).logits.float()  # (batch, pos, vocab)
        for row, (fact, prompt, p, t) in enumerate(chunk):
            # Position i predicts token i+1: target token j is predicted at len(p) - 1 + j.
            pred = logits[row, len(p) - 1 : len(p) - 1 + len(t)]  # (len(t), vocab)
            first = pred[0]
            probs = first.softmax(-1)
            target_logit = first[t[0]]
            rank = int((first > target_logit).sum()) + 1
            greedy = pred.argmax(-1).tolist()
            records.append({
                "relation": fact.relation,
                "subject": fact.subject,
                "object": fact.object,
                "prompt": prompt,
                "target_tokens": tok.convert_ids_to_tokens(t),
                "target_prob": float(probs[t[0]]),
                "target_rank": rank,
                "top1_token": tok.decode([int(first.argmax())]),
                "exact_match": greedy == t,
                "greedy_completion": tok.decode(greedy),
            })
    config = {"template_index": template_index, "batch_size": batch_size, "n_facts": len(items)}
    return RecallResult(records, config)
