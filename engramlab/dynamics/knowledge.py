"""What a run's learning curves say about its knowledge: plateau, hallucination onset, forgetting.

Input: the evaluation rows of ``metrics.jsonl`` (one dict per evaluation, ascending ``step``;
keys ``<split>.attr_loss``, ``<split>.attr_acc``, ... as written by ``train.metrics``) and the
no-knowledge baseline loss B. Output: a flat dict (the curve part of ``summary.json``):

* ``final_*``: the last row's eval attribute loss / accuracy and train-template accuracy;
* ``plateau_start_step`` / ``plateau_end_step``: ``detect_plateau`` on ``eval.attr_loss``:
  first row with loss <= B (1 + reach), then the first row after it with loss <= B (1 - exit);
* ``*_train_dist`` (rows with ``dist.*``, non-uniform samplers): the same on the training
  distribution;
* ``heldout_rise_step`` (rows with ``heldout.*``): hallucination onset, the first row at or after
  the plateau start whose loss on never-seen people is > B (1 + exit) (confidently wrong);
  ``heldout_loss_at_plateau_end`` is that loss at the plateau end;
* ``old_acc_halved_step`` (rows with ``old.*``, fine-tuning): forgetting speed, the first row whose
  old-population accuracy is < half the first row's.

Keys appear only for the splits present in the last row, so summaries of runs without held-out
people or an old world keep their shape.
"""

from __future__ import annotations

from typing import Sequence

from engramlab.dynamics.plateau import detect_plateau


def plateau_of(rows: Sequence[dict], baseline: float, split: str = "eval", reach: float = 0.05,
               exit: float = 0.10) -> tuple[int | None, int | None]:
    """(plateau_start_step, plateau_end_step) of ``<split>.attr_loss`` over ``rows``."""
    return detect_plateau([r["step"] for r in rows], [r[f"{split}.attr_loss"] for r in rows], baseline, reach, exit)


def hallucination_onset(rows: Sequence[dict], baseline: float, start: int | None, exit: float = 0.10) -> int | None:
    """First step >= ``start`` whose held-out-people loss is > baseline * (1 + exit); None if none
    (or no plateau start): rising above the baseline on never-seen people is confident error."""
    if start is None:
        return None
    rise = [r["step"] for r in rows if r["step"] >= start and r["heldout.attr_loss"] > baseline * (1 + exit)]
    return rise[0] if rise else None


def forgetting_step(rows: Sequence[dict]) -> int | None:
    """First step whose old-population accuracy is below half of the first row's; None if none."""
    halved = [r["step"] for r in rows if r["old.attr_acc"] < rows[0]["old.attr_acc"] / 2]
    return halved[0] if halved else None


def summarize_training(rows: Sequence[dict], baseline: float, reach: float = 0.05, exit: float = 0.10,
                       baseline_empirical: float | None = None) -> dict:
    """The curve analysis of one run (see the module docstring); ``rows`` must not be empty.

    ``baseline_empirical`` (optional): the loss of knowing only the trained people's empirical
    marginals, reported next to ``baseline_loss`` and not used by any criterion.
    """
    start, end = plateau_of(rows, baseline, "eval", reach, exit)
    last = rows[-1]
    out = {"baseline_loss": baseline}
    if baseline_empirical is not None:
        out["baseline_loss_empirical"] = baseline_empirical
    out.update({
        "final_step": last["step"],
        "final_attr_loss": last["eval.attr_loss"],
        "final_attr_acc": last["eval.attr_acc"],
        "final_train_template_acc": last["train.attr_acc"],
        "plateau_start_step": start,
        "plateau_end_step": end,
    })
    if "dist.attr_loss" in last:  # knowledge on the training distribution (non-uniform samplers)
        out["plateau_start_step_train_dist"], out["plateau_end_step_train_dist"] = \
            plateau_of(rows, baseline, "dist", reach, exit)
        out["final_attr_acc_train_dist"] = last["dist.attr_acc"]
    if "heldout.attr_loss" in last:
        out["heldout_loss_final"] = last["heldout.attr_loss"]
        out["heldout_top1_prob_final"] = last["heldout.first_token_top1_prob"]
        out["heldout_rise_step"] = hallucination_onset(rows, baseline, start, exit)
        at_end = [r for r in rows if r["step"] == end]
        out["heldout_loss_at_plateau_end"] = at_end[0]["heldout.attr_loss"] if at_end else None
    if "old.attr_acc" in last:
        out["old_acc_initial"] = rows[0]["old.attr_acc"]
        out["old_acc_final"] = last["old.attr_acc"]
        out["old_acc_min"] = min(r["old.attr_acc"] for r in rows)
        out["old_acc_halved_step"] = forgetting_step(rows)
    return out
