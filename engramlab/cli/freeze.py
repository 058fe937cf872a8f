"""``engram freeze``: continue training a model on one corpus of an ``engram regions`` run with
nothing, its core region or its random region held fixed, and track every corpus's perplexity."""

from __future__ import annotations

from pathlib import Path

import typer

from engramlab.cli.common import DeviceOpt, OutOpt, OverwriteOpt, SeedOpt, app, console, print_summary, run_mode, \
    user_errors
from engramlab.cli.options import configured
from engramlab.errors import EngramError
from engramlab.train.freeze_config import FreezeConfig


@app.command()
@user_errors
@configured(FreezeConfig)
def freeze(regions: Path = typer.Option(..., "--regions", help="An engram regions run directory: its model, "
                                        "corpora, seq_len, held-out split and core/random masks are used."),
           train: str = typer.Option(..., "--train", help="The corpus (a NAME of the regions run) to train on."),
           out: Path = OutOpt, overwrite: bool = OverwriteOpt,
           resume: bool = typer.Option(False, "--resume", help="Continue the run in --out: finished arms are "
                                       "skipped, an unfinished one continues from its last checkpoint."),
           seed: int = SeedOpt, device: str = DeviceOpt, config: FreezeConfig = None):
    """Further training on --train's chunks (never its held-out ones) once per arm: none (nothing
    frozen), core (the regions run's core region held fixed), random (its random region, the same
    size); perplexity of every corpus's held-out chunks over steps, forgetting per arm, a plot."""
    from engramlab.config import to_dict
    from engramlab.runs import RunDir
    from engramlab.dynamics.freezing import freeze_study, read_regions_run

    info = read_regions_run(regions)
    if train not in info["names"]:
        raise EngramError(f"--train {train}: not a corpus of {regions} (it has {', '.join(info['names'])}); "
                          f"choose one of them")
    mode = run_mode(overwrite, resume)
    if mode == "new" and out.is_dir() and any(out.glob("*/checkpoints/step-*")):
        raise EngramError(f"--out {out}: holds an unfinished run with checkpoints; pass --resume to continue it or "
                          f"--overwrite to start again")
    run_config = {"regions": str(regions), "train": train, "device": device, "freeze": to_dict(config),
                  "model": info["model"], "corpus": info["corpus"]}
    with RunDir(out, "freeze", run_config, seed=seed, mode=mode) as run:
        if run.already_complete:
            summary = run.summary
        else:
            summary = freeze_study(info, train, run.path, config, resume=resume, device=device)
            run.finish(summary)
    keys = [f"{a}.{k}" for a in config.arms for k in ("forgetting", "train_ppl_ratio", "frozen_max_change",
                                                       "seconds_per_step")]
    print_summary(f"freeze: train on {train}", out, summary, [*keys, "steps", "seconds"])
    console.print(f"wrote {out}/{', '.join([*(a + '/' for a in config.arms), 'freezing.png', 'summary.json'])}")
