"""The continual pre-training study: ``engram continual [--preset demo|paper] --out DIR``.

Ou et al. (2025) continue pre-training a model on new facts about people and watch the knowledge
circuits form over checkpoints. Their three findings, and what this study measures for each from
the ``evolve`` stage (recall and circuits at every checkpoint of the continued run):

1. Relevant new knowledge (K_rel: known people, new attributes) is acquired faster than
   completely new knowledge (K_compl: new people), and frequent facts faster than rare ones:
   ``<group>_half_step``, the first checkpoint at which the group's recall top-1 accuracy reaches
   half its final value (groups k_rel, k_compl, high, medium, low), ``<group>_mean_accuracy``
   (the accuracy averaged over training time: area under the curve / steps), the final accuracy,
   Hit@10 and circuit Hit@10, and the half step from the training run's own denser evaluation
   (``train_<group>_half_step``); ``k_rel_first`` (earlier half step, the larger mean on a tie) and
   ``frequency_order`` (high <= medium <= low half steps).
2. The circuit's phase shift from formation to optimization: ``phase_shift_step``, the knee of
   edge Jaccard with the final circuit against log step, with the slopes on both sides
   (``dynamics.compare``), and the knee of circuit entropy.
3. Deep to shallow: ``deep_to_shallow_stat`` (Kendall's tau between layer and the step at which
   the answer surfaces there in the logit lens; < 0: deeper layers first) and its one-sided
   ``deep_to_shallow_p``.

The presets and their stages live in ``continual.toml`` next to this module (``--config FILE``
replaces it). Every stage writes an ordinary run directory under DIR (``studies.stages``).
"""

from __future__ import annotations

import json
from pathlib import Path

from engramlab.errors import EngramError
from engramlab.studies.stages import load_study_file

PRESET_FILE = Path(__file__).with_name("continual.toml")
#: summary prefix -> the evolve group label (world_facts groups: kind.<kind>, bucket.<bucket>)
GROUPS = {"k_rel": "kind.rel", "k_compl": "kind.compl", "high": "bucket.high", "medium": "bucket.medium",
          "low": "bucket.low"}


def load_presets(path: str | Path = PRESET_FILE) -> dict[str, dict]:
    """{preset: {"description", "stages": [Stage]}} from a study file (module docstring)."""
    return load_study_file(path, "continual.toml")


def _rows(path: Path) -> list[dict]:
    from engramlab.runs import read_jsonl

    return read_jsonl(path) if path.is_file() else []


def continual_summary(root: str | Path, evolve_stage: str = "evolve", train_stage: str = "train-b") -> dict:
    """The study's numbers (module docstring) from its evolve and continued-training stages."""
    from engramlab.dynamics.changepoints import half_step
    from engramlab.dynamics.compare import column

    root = Path(root)
    rows = _rows(root / evolve_stage / "evolution.jsonl")
    if not rows:
        raise EngramError(f"{root / evolve_stage}: no evolution.jsonl; the evolve stage has not run")
    evolved = json.loads((root / evolve_stage / "summary.json").read_text())
    train = [r for r in _rows(root / train_stage / "metrics.jsonl") if isinstance(r.get("step"), int)]
    out: dict = {}
    for name, label in GROUPS.items():
        steps, acc = column(rows, f"recall.top1_accuracy.{label}")
        out[f"{name}_half_step"] = half_step(steps, acc)
        out[f"{name}_mean_accuracy"] = _mean_over_steps(steps, acc)
        out[f"{name}_final_accuracy"] = acc[-1] if acc else None
        out[f"{name}_final_hit_at_10"] = next(iter(column(rows, f"recall.hit_at_10.{label}")[1][-1:]), None)
        out[f"{name}_final_circuit_hit_at_10"] = next(iter(column(rows, f"circuit.hit_at_10_circuit.{label}")[1][-1:]),
                                                      None)
        t_steps, t_acc = column(train, f"eval.attr_acc.{label}")
        out[f"train_{name}_half_step"] = half_step(t_steps, t_acc)
    out.update(_group_sizes(root, evolve_stage))
    for key in ("phase_shift_step", "phase_shift_metric", "phase_shift_slope_before", "phase_shift_slope_after",
                "phase_shift_improvement", "entropy_knee_step", "entropy_knee_slope_before",
                "entropy_knee_slope_after", "deep_to_shallow_stat", "deep_to_shallow_p", "deep_to_shallow_n",
                "edge_deep_to_shallow_stat", "edge_deep_to_shallow_p", "plateau_start_step", "plateau_end_step",
                "n_checkpoints", "n_skipped", "transplant_first_on_last", "transplant_last_on_first"):
        out[key] = evolved.get(key)
    rel, compl = out["k_rel_half_step"], out["k_compl_half_step"]
    # earlier half step; on a tie (checkpoints are coarse) the larger area under the curve
    out["k_rel_first"] = None if rel is None or compl is None else \
        (rel, -(out["k_rel_mean_accuracy"] or 0)) < (compl, -(out["k_compl_mean_accuracy"] or 0))
    order = [out[f"{b}_half_step"] for b in ("high", "medium", "low")]
    out["frequency_order"] = None if None in order else order == sorted(order)
    return out


def _mean_over_steps(steps: list[int], values: list) -> float | None:
    """The accuracy averaged over training time: the trapezoid area under values(step) divided by
    the steps covered (a group learned earlier has the larger mean)."""
    pairs = [(s, float(v)) for s, v in zip(steps, values) if v is not None]
    if len(pairs) < 2 or pairs[-1][0] == pairs[0][0]:
        return pairs[0][1] if pairs else None
    area = sum((s1 - s0) * (v0 + v1) / 2 for (s0, v0), (s1, v1) in zip(pairs, pairs[1:]))
    return area / (pairs[-1][0] - pairs[0][0])


def _group_sizes(root: Path, evolve_stage: str) -> dict:
    """<group>_n_facts: how many of the evolved facts each group holds."""
    from engramlab.dynamics.evolve import world_facts
    from engramlab.runs import load_json

    manifest = load_json(root / evolve_stage / "manifest.json", "evolve manifest")
    run = (manifest.get("config") or {}).get("run")
    split = ((manifest.get("config") or {}).get("evolve") or {}).get("split", "heldout_templates")
    try:
        facts, groups = world_facts(run, split, with_groups=True)
    except EngramError:
        return {}
    groups = groups or {}
    out = {}
    for name, label in GROUPS.items():
        key, value = label.split(".", 1)
        out[f"{name}_n_facts"] = sum(1 for f in facts if groups.get(f.subject, {}).get(key) == value)
    return out


__all__ = ["GROUPS", "PRESET_FILE", "continual_summary", "load_presets"]
