"""``engram continual``: the continual pre-training study in one command."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from engramlab.cli.common import OutOpt, OverwriteOpt, app, console, print_summary, user_errors
from engramlab.errors import EngramError

SUMMARY_KEYS = ["k_rel_half_step", "k_compl_half_step", "high_half_step", "medium_half_step", "low_half_step",
                "k_rel_final_accuracy", "k_compl_final_accuracy", "phase_shift_step", "phase_shift_slope_before",
                "phase_shift_slope_after", "deep_to_shallow_stat", "deep_to_shallow_p"]


@app.command()
@user_errors
def continual(preset: str = typer.Option("demo", "--preset", help="demo (CPU, minutes) | paper (GPU); the stages "
                                         "of each are in the study file (engramlab/studies/continual.toml)."),
              study_file: Optional[Path] = typer.Option(None, "--config", help="A study file of the same shape as "
                                                        "continual.toml to use instead of it."),
              out: Path = OutOpt, overwrite: bool = OverwriteOpt):
    """Pre-train on world A, continue on world B (K_rel: A's people with new attributes; K_compl:
    new people, by frequency), and watch recall and circuits form over B's checkpoints; writes each
    stage's run under --out and the findings in --out/summary.json. Re-running resumes."""
    from engramlab.runs import RunDir
    from engramlab.studies.continual import PRESET_FILE, continual_summary, load_presets
    from engramlab.studies.stages import choose_preset, run_stages

    stages = choose_preset(load_presets(study_file or PRESET_FILE), preset, str(study_file or "continual.toml"))
    # the numbers come from the last evolve stage and the last training stage
    evolve_stage, train_stage = (next((s.name for s in reversed(stages) if s.command.split()[:1] == [verb]), None)
                                 for verb in ("evolve", "train"))
    if evolve_stage is None or train_stage is None:
        raise EngramError(f"study preset {preset!r} needs a train and an evolve stage")
    run_config = {"preset": preset, "study_file": str(study_file) if study_file else None,
                  "stages": [{"name": s.name, "command": s.command} for s in stages]}
    with RunDir(out, "continual", run_config, mode="overwrite" if overwrite else "continue") as run:
        run_stages(stages, run.path, log=lambda line: console.print(f"[bold]continual[/] {line}"))
        summary = continual_summary(run.path, evolve_stage=evolve_stage, train_stage=train_stage)
        run.finish(summary)
    print_summary(f"continual ({preset})", out, summary, SUMMARY_KEYS)
