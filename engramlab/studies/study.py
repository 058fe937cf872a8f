"""The main job: ``engram study [--preset demo|paper] --out DIR``.

A study is a list of stages (``studies.stages``) from ``study.toml`` next to this module (or the
``--config`` file): a synthetic world and a training run with dense-early checkpoints, fine-tuning
with and without replay, an attention-patching twin, ``evolve`` over the checkpoints, the locators
on SmolLM2-135M, and the continual pre-training study, each an ordinary run directory under DIR.
When the stages are done, ``report.html`` is written from them (``report.html.write_report``) and
``summary.json`` holds each stage's wall time and every finding's verdict.

``stage_line`` is the one line printed when a stage finishes ("train: 2000 steps, plateau
150->400, final acc 0.97, 3m12s"), written from the stage's own summary.json and manifest.
"""

from __future__ import annotations

from pathlib import Path

from engramlab.runs import wall_seconds
from engramlab.studies.stages import load_study_file

PRESET_FILE = Path(__file__).with_name("study.toml")


def load_presets(path: str | Path = PRESET_FILE) -> dict[str, dict]:
    """{preset: {"description", "stages": [Stage]}} from a study file (``study.toml``'s shape)."""
    return load_study_file(path, "study.toml")


def clock(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    s = int(round(seconds))
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def _num(x, digits: int = 2) -> str:
    if x is None:
        return "—"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _times(x) -> str:
    """A ratio in 3 significant digits (1.9e+05, 1.48)."""
    return f"{x:.3g}" if isinstance(x, (int, float)) and not isinstance(x, bool) else "—"


def _describe(command: str, s: dict, config: dict) -> str:
    """The headline of one verb's summary, in words."""
    if command == "world":
        return f"{s.get('n_people', '?')} people, {s.get('n_heldout', '?')} held out"
    if command == "train":
        steps = s.get("final_step", config.get("steps", "?"))  # a run stopped at its plateau end trained fewer
        text = f"{steps} steps"
        if s.get("plateau_start_step") is not None:
            text += f", plateau {s.get('plateau_start_step')}\u2192{_num(s.get('plateau_end_step'))}"
        text += f", final acc {_num(s.get('final_attr_acc'))}"
        if s.get("old_acc_initial") is not None:
            text += (f", old people's acc {_num(s.get('old_acc_initial'))}, min {_num(s.get('old_acc_min'))}, "
                     f"final {_num(s.get('old_acc_final'))}")
        return text
    if command == "sweep":
        b = s.get("fit_b")
        return f"{s.get('n_runs', '?')} runs" + (f", plateau end \u2248 {_num(s.get('fit_a'))}\u00b7N^{_num(b)} "
                                                  f"(R\u00b2 {_num(s.get('fit_r2'))})" if b is not None else "")
    if command == "evolve":
        text = f"{s.get('n_checkpoints', '?')} checkpoints"
        if s.get("phase_shift_step") is not None:
            text += f", knee at {s.get('phase_shift_step')}"
        if s.get("deep_to_shallow_stat") is not None:
            text += f", deep\u2192shallow tau {_num(s.get('deep_to_shallow_stat'))}"
        return text
    if command == "recall":
        return f"{s.get('n_facts', '?')} facts, top-1 {_num(s.get('top1_accuracy'))}, top-10 {_num(s.get('top10_accuracy'))}"
    if command == "neurons":
        return (f"{s.get('n_facts', '?')} facts, {_num(s.get('mean_neurons_per_fact'), 1)} neurons/fact, own drop "
                f"{_num(s.get('mean_own_drop'))} vs other relations {_num(s.get('mean_other_relation_drop'))}, "
                f"random {_num(s.get('mean_random_drop'))}")
    if command == "dkn":
        return f"{s.get('n_facts', '?')} facts, DKN found rate {_num(s.get('dkn_found_rate'))}"
    if command == "circuit":
        text = (f"{s.get('n_edges_kept', '?')}/{s.get('n_edges_total', '?')} edges, held-out faithfulness "
                f"{_num(s.get('faithfulness'))}")
        if s.get("cpr") is not None:
            text += f", CPR {_num(s.get('cpr'))} CMD {_num(s.get('cmd'))} ({s.get('mib_ranking', '?')})"
        return text
    if command == "trace":
        return (f"{s.get('n_facts', '?')} facts, MLP effect at the last subject token peaks at layer "
                f"{s.get('trace.peak_mlp_layer', '?')}, mean max indirect effect "
                f"{_num(s.get('trace.mean_max_indirect_effect'))}")
    if command == "factcheck":
        f1 = lambda prefix: " / ".join(_num(s.get(f"{prefix}{c}.f1")) for c in ("dkn", "kn", "prompt"))  # noqa: E731
        return (f"{s.get('n_test_claims', '?')} test claims, F1 DKN / KN / prompt {f1('')} simple, "
                f"{f1('complex.')} complex; DKN found rate {_num(s.get('dkn_found_rate'))}")
    if command == "doctor":
        failed = s.get("doctor.n_failed")
        return (f"{s.get('doctor.n_checks', '?')} adapter checks, "
                + ("all pass" if failed == 0 else f"{failed if failed is not None else '?'} failed"))
    if command == "regions":
        if s.get("accuracy.base") is not None:
            return (f"{s.get('n_facts', '?')} facts, accuracy {_num(s.get('accuracy.base'))}, with the answer tokens' "
                    f"region zeroed {_num(s.get('accuracy.top_value'))}, the template tokens' "
                    f"{_num(s.get('accuracy.top_template'))}")
        corpora = [k[: -len(".ppl_top_ratio")] for k in s if k.endswith(".ppl_top_ratio")]
        parts = [f"{c} core x{_times(s.get(f'{c}.ppl_top_ratio'))} random x{_times(s.get(f'{c}.ppl_random_ratio'))}"
                 for c in corpora]
        if s.get("dimensions.top"):
            parts.append(f"{s.get('dimensions.n_breaking')} breaking dimension(s), massive {s.get('dimensions.massive') or 'none'}")
        return "; ".join(parts) or "no corpora"
    if command == "freeze":
        arms = [k[: -len(".forgetting")] for k in s if k.endswith(".forgetting")]
        return ", ".join(f"{a} forgetting x{_times(s.get(f'{a}.forgetting'))}" for a in arms) or "no arms"
    if command == "corpus":
        return ", ".join(f"{k} {_num(v)}" for k, v in list(s.items())[:4] if isinstance(v, (int, float)))
    if command == "continual":
        return f"K_rel half step {_num(s.get('k_rel_half_step'))} vs K_compl {_num(s.get('k_compl_half_step'))}"
    return ", ".join(f"{k} {_num(v)}" for k, v in list(s.items())[:3] if isinstance(v, (int, float)))


def stage_line(name: str, run_dir: str | Path) -> str:
    """``"<name>: <headline>, <wall time>"`` for a finished stage (see the module docstring)."""
    from engramlab.runs import load_json

    run_dir = Path(run_dir)
    manifest = load_json(run_dir / "manifest.json", f"stage {name} manifest")
    summary = load_json(run_dir / "summary.json", f"stage {name} summary") if (run_dir / "summary.json").is_file() else {}
    config = manifest.get("config") if isinstance(manifest.get("config"), dict) else {}
    return f"{name}: {_describe(str(manifest.get('command')), summary, config)}, {clock(wall_seconds(manifest))}"


def study_summary(root: str | Path, stages, found: dict) -> dict:
    """``stage.<name>.seconds`` per stage, ``total_stage_seconds``, and ``finding.<key>`` (the verdict)
    with ``finding.<key>.measured`` for every row of the findings table (``found``: the report's
    ``best_findings``)."""
    from engramlab.report.findings import FINDINGS
    from engramlab.runs import load_json

    root = Path(root)
    out: dict = {}
    total = 0.0
    for st in stages:
        m = root / st.name / "manifest.json"
        secs = wall_seconds(load_json(m, f"stage {st.name} manifest")) if m.is_file() else None
        out[f"stage.{st.name}.seconds"] = secs
        total += secs or 0.0
    out["total_stage_seconds"] = total
    for spec in FINDINGS:
        f = found.get(spec.key)
        out[f"finding.{spec.key}"] = f.verdict if f else "not run"
        out[f"finding.{spec.key}.measured"] = f.measured if f else None
    out["n_findings_reproduced"] = sum(1 for f in found.values() if f.verdict == "reproduced")
    out["n_findings_measured"] = len(found)
    return out


__all__ = ["PRESET_FILE", "clock", "load_presets", "stage_line", "study_summary", "wall_seconds"]
