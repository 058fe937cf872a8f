"""Does a model know a fact? Recall scoring for a FactSet.

For each fact the prompt is ``templates[t].format(subject)`` (no chat template, no special
tokens) and the target is the token sequence of " " + object. One teacher-forced forward pass
over prompt + target (``engramlab.models.scoring.target_logits``) gives, per fact:

* ``target_prob`` / ``target_rank``: probability and rank (1 = most likely) of the first target
  token after the prompt - the definition behind the LRE README's top-1/top-10 table;
* ``exact_match``: greedy decoding reproduces the whole object. Greedy decoding emits the target
  iff at every target position the argmax equals the target token given the target prefix, which
  is exactly what the teacher-forced pass checks, so no generation loop is needed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from engramlab.config import option, to_dict, validate
from engramlab.locate.base import RowResult

if TYPE_CHECKING:  # torch and the models load when scoring starts, not when the CLI builds its flags
    from engramlab.data.facts import FactSet
    from engramlab.models.loading import LoadedModel


@dataclass
class RecallConfig:
    """How recall is scored."""

    template: int = option(0, "Index of the prompt template to use (negative counts from the end).")
    batch_size: int = option(16, "Facts per forward pass.", range=(1, None))

    def __post_init__(self):
        validate(self)


@dataclass
class RecallResult(RowResult):
    """Per-fact recall records and their summary (see ``engramlab.locate.base.Result``); the
    records are also written as ``facts.jsonl``, their name before the shared layout."""

    NAME = "recall"
    OLD_CONFIG = ("recall_config.json",)
    OLD_RECORDS = ("facts.jsonl",)

    def summary(self) -> dict:
        """Flat headline numbers: overall and per-relation accuracies."""
        out = _accuracies(self.rows)
        relations = sorted({r["relation"] for r in self.rows})
        out["n_relations"] = len(relations)
        for rel in relations:
            for k, v in _accuracies([r for r in self.rows if r["relation"] == rel]).items():
                out[f"relation.{rel}.{k}"] = v
        return out

    def per_relation(self) -> dict[str, dict]:
        rels = sorted({r["relation"] for r in self.rows})
        return {rel: _accuracies([r for r in self.rows if r["relation"] == rel]) for rel in rels}


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


def score_recall(lm: LoadedModel, facts: FactSet, config: RecallConfig | None = None, *, progress: bool = False,
                 template_index: int | None = None, batch_size: int | None = None,
                 show_progress: bool | None = None) -> RecallResult:
    """Score every fact of ``facts`` with ``lm`` (see module docstring for the definitions).

    ``template_index``, ``batch_size`` and ``show_progress`` are the old spellings of
    ``config.template``, ``config.batch_size`` and ``progress`` (accepted for one release)."""
    if template_index is not None or batch_size is not None:
        base = config or RecallConfig()
        config = RecallConfig(template=base.template if template_index is None else template_index,
                              batch_size=base.batch_size if batch_size is None else batch_size)
    import torch

    from engramlab.data.facts import target_token_ids
    from engramlab.locate.base import fact_record, model_facts
    from engramlab.models.context import check_facts_fit
    from engramlab.models.scoring import answer_ranks, target_logits
    from engramlab.progress import progress_bar

    config = config or RecallConfig()
    progress = progress if show_progress is None else show_progress
    check_facts_fit(lm, facts)
    tok = lm.tokenizer
    facts = list(facts)
    prompts = [fact.prompt(config.template) for fact in facts]
    targets = [target_token_ids(tok, prompt, fact.object) for fact, prompt in zip(facts, prompts)]
    with torch.no_grad():  # the generator runs inside: every batch without a graph
        rows = target_logits(lm, prompts, targets, batch_size=config.batch_size)  # a generator: one batch at a time

        records = []
        for fact, prompt, t, pred in progress_bar(zip(facts, prompts, targets, rows), "recall", enabled=progress,
                                                  total=len(facts)):
            pred = pred.float()  # (len(t), vocab): row j predicts target token j given the earlier ones
            first = pred[0]
            greedy = pred.argmax(-1).tolist()
            records.append(fact_record(
                fact, prompt, tok.convert_ids_to_tokens(t),
                target_prob=float(first.softmax(-1)[t[0]]),
                target_rank=int(answer_ranks(first[None], torch.tensor([t[0]]))[0]),
                top1_token=tok.decode([int(first.argmax())]),
                exact_match=greedy == t,
                greedy_completion=tok.decode(greedy),
            ))
        return RecallResult(records, to_dict(config), {"n_facts": len(facts)}, model_facts(lm))
