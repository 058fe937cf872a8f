"""``engram evolve``: any registered locator over a training run's checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from engramlab.cli.common import (DeviceOpt, DtypeOpt, LimitOpt, OutOpt, OverwriteOpt, RelationOpt, SeedOpt, app,
                                  console, print_summary, user_errors)
from engramlab.cli.options import configured
from engramlab.dynamics.config import EvolutionConfig
from engramlab.errors import EngramError


@app.command()
@user_errors
@configured(EvolutionConfig)
def evolve(run: Path = typer.Option(..., "--run", help="Run directory written by `engram train` (with checkpoints)."),
           relation: Optional[List[str]] = RelationOpt, limit: Optional[int] = LimitOpt,
           out: Path = OutOpt, overwrite: bool = OverwriteOpt,
           seed: int = SeedOpt, dtype: str = DtypeOpt, device: str = DeviceOpt, config: EvolutionConfig = None):
    """Run locators (--analysis) on every chosen checkpoint of a run: one result per checkpoint under
    OUT/step-NNNNNNN/<analysis>/, their headline numbers over time in evolution.jsonl. Re-running
    the same command resumes: finished checkpoints are reused."""
    from engramlab.data.facts import load_facts
    from engramlab.dynamics.evolve import evolve as run_evolve, select_steps, world_facts
    from engramlab.locate import get_locator, select
    from engramlab.models.loading import list_checkpoints
    from engramlab.runs import RunDir, load_json, set_seed

    for name in config.analysis:
        get_locator(name)  # an unknown name fails here, listing the registered ones
    command = load_json(run / "manifest.json", "run manifest").get("command") if (run / "manifest.json").is_file() \
        else None
    if command != "train":
        raise EngramError(f"--run {run}: " + (f"holds a run of `engram {command}`" if command else "no manifest.json")
                          + "; point --run at a directory written by `engram train`")
    available = list(list_checkpoints(run))
    if not available:
        raise EngramError(f"--run {run}: the run has no checkpoints; train it with --checkpoints (e.g. dense:24)")
    steps = select_steps(config.checkpoints, available)
    saved_facts = out / "facts.jsonl"
    run_config = {"run": str(run), "relation": relation, "limit": limit, "dtype": dtype, "device": device,
                  "evolve": {**vars(config), "analysis": list(config.analysis)}}
    if saved_facts.is_file() and not overwrite:  # a re-run: the same facts, or a clear refusal
        before = load_json(out / "manifest.json", "evolve manifest").get("config", {}) \
            if (out / "manifest.json").is_file() else {}
        mine = {k: run_config[k] for k in ("run", "relation", "limit")} | {"facts": config.facts, "split": config.split}
        theirs = {k: before.get(k) for k in ("run", "relation", "limit")} | \
            {k: (before.get("evolve") or {}).get(k) for k in ("facts", "split")}
        if mine != theirs:
            raise EngramError(f"--out {out}: holds an evolve run on other facts or another run ({theirs}); "
                              "pass --overwrite to start again, or choose another --out")
        facts = load_facts(str(saved_facts))
    else:
        facts = world_facts(run, config.split) if config.facts == "world" else load_facts(config.facts)
        facts = select(facts, relation, limit)
    mode = "overwrite" if overwrite else "continue"
    with RunDir(out, "evolve", run_config, seed=seed, mode=mode) as rd:
        set_seed(seed)
        facts.to_jsonl(rd.file("facts.jsonl"))
        summary = run_evolve(run, rd.path, config.analysis, facts, steps, dtype=dtype, device=device, progress=True,
                             log=lambda line: console.print(line))
        rd.finish(summary)
    print_summary(f"evolve: {run} ({', '.join(config.analysis)})", out, summary,
                  ["n_checkpoints", "n_skipped", "first_step", "last_step", "plateau_start_step", "plateau_end_step"])
    console.print(f"wrote {out}/evolution.jsonl, skipped.jsonl, facts.jsonl, step-*/<analysis>/, summary.json")
