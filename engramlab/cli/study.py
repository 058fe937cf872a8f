"""``engram study`` (the main job: every stage, then ``report.html``) and ``engram report DIR``."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from engramlab.cli.common import (ExecutorOpt, OutOpt, OverwriteOpt, RayAddressOpt, RetriesOpt, TaskCpusOpt, TaskGpusOpt,
                                  TaskMemoryOpt, app, console, make_executor, user_errors)


def _findings_lines(summary: dict) -> list[str]:
    from engramlab.report.findings import FINDINGS

    width = max(len(s.title) for s in FINDINGS)
    return [f"  {s.title:<{width}}  {summary.get(f'finding.{s.key}', 'not run')}" for s in FINDINGS]


@app.command()
@user_errors
def study(preset: str = typer.Option("demo", "--preset", help="demo (CPU, under 15 minutes) | paper (one GPU, "
                                     "hours); the stages of each are in the study file (engramlab/studies/study.toml)."),
          study_file: Optional[Path] = typer.Option(None, "--config", help="A study file of the same shape as "
                                                    "study.toml to use instead of it."),
          quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only one line per finished stage."),
          out: Path = OutOpt, overwrite: bool = OverwriteOpt,
          executor: str = ExecutorOpt, ray_address: Optional[str] = RayAddressOpt, retries: int = RetriesOpt,
          task_cpus: float = TaskCpusOpt, task_gpus: float = TaskGpusOpt, task_memory: Optional[str] = TaskMemoryOpt):
    """The whole pipeline: a world, training with checkpoints, fine-tuning, attention patching,
    evolve over checkpoints, the locators on SmolLM2-135M, continual pre-training; then
    --out/report.html with the findings table. Every stage writes its own run directory under
    --out; re-running resumes where it stopped. --executor ray runs each stage as a Ray task as soon as
    the stages it reads are finished (independent stages at the same time)."""
    from engramlab.report.html import best_findings, render_sections, write_report
    from engramlab.report.runs import collect
    from engramlab.runs import RunDir
    from engramlab.studies.stages import choose_preset, run_stages
    from engramlab.studies.study import PRESET_FILE, load_presets, stage_line, study_summary

    runner = make_executor(executor, ray_address, retries, task_cpus, task_gpus, task_memory, out)
    presets = load_presets(study_file or PRESET_FILE)
    stages = choose_preset(presets, preset, str(study_file or "study.toml"))
    run_config = {"preset": preset, "description": presets[preset]["description"],
                  "study_file": str(study_file) if study_file else None,
                  "stages": [{"name": s.name, "command": s.command} for s in stages]}
    t0 = time.monotonic()

    def started(line: str) -> None:
        if not quiet:
            console.print(f"[bold]study[/] {line}", highlight=False, soft_wrap=True)

    def finished(stage, kept: bool) -> None:
        line = stage_line(stage.name, out / stage.name)
        console.print(f"[bold green]\u2713[/] {line}{' (kept)' if kept else ''}", highlight=False, soft_wrap=True)

    with RunDir(out, "study", run_config, mode="overwrite" if overwrite else "continue") as run:
        run_stages(stages, run.path, log=started, quiet=quiet, done=finished, executor=runner)
        if not quiet:
            console.print("[bold]study[/] writing report.html", highlight=False)
        report = collect(run.path)
        sections = render_sections(report)
        page = write_report(run.path, report=report, sections=sections)
        summary = study_summary(run.path, stages, best_findings(sections))
        run.finish(summary)
    minutes, seconds = divmod(int(time.monotonic() - t0), 60)
    console.print(f"study ({preset}): {len(stages)} stages, {minutes}m{seconds:02d}s this time; report: {page}",
                  highlight=False, soft_wrap=True)
    for line in _findings_lines(summary):
        console.print(line, highlight=False)


@app.command()
@user_errors
def report(directory: Path = typer.Argument(..., help="A run directory: engram study's --out, or any verb's."),
           out: Optional[Path] = typer.Option(None, "--out", "-o", help="Where to write the page (default: "
                                              "DIRECTORY/report.html).")):
    """Rebuild report.html from a run directory (a study, or one verb's run: then its section);
    the same directory always gives the same page."""
    from engramlab.report.html import write_report

    path = write_report(directory, out)
    console.print(f"report: {path}", highlight=False)
