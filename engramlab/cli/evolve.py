"""``engram evolve``: any registered locator over a training run's checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from engramlab.cli.common import (DeviceOpt, DtypeOpt, ExecutorOpt, LimitOpt, OutOpt, OverwriteOpt, RayAddressOpt,
                                  RelationOpt, RetriesOpt, SeedOpt, TaskCpusOpt, TaskGpusOpt, TaskMemoryOpt, app,
                                  console, make_executor, print_summary, user_errors)
from engramlab.cli.options import Settings, configured
from engramlab.dynamics.config import EVOLVE_DEFAULTS, EvolutionConfig
from engramlab.errors import EngramError
from engramlab.locate.configs import LOCATOR_CONFIGS


def locator_settings(given: dict[str, Settings]) -> dict:
    """Each analysis's config: the settings given (``--set circuit.top_n=300``, a --config file's
    ``circuit:`` section) over evolve's own defaults (``EVOLVE_DEFAULTS``) over the locator's."""
    from engramlab.config import build

    out = {}
    for name, s in given.items():
        values = {f"{s.prefix}{k}": v for k, v in EVOLVE_DEFAULTS.get(name, {}).items()}
        values.update({p: s.values[p] for p in s.origin})
        out[name] = build(s.cls, values, s.prefix)
    return out


@app.command()
@user_errors
@configured(EvolutionConfig, sections=LOCATOR_CONFIGS, section_flags=False, build_config=False)
def evolve(run: Path = typer.Option(..., "--run", help="Run directory written by `engram train` (with checkpoints)."),
           relation: Optional[List[str]] = RelationOpt, limit: Optional[int] = LimitOpt,
           out: Path = OutOpt, overwrite: bool = OverwriteOpt,
           seed: int = SeedOpt, dtype: str = DtypeOpt, device: str = DeviceOpt, config: Settings = None,
           recall: Settings = None, neurons: Settings = None, dkn: Settings = None, circuit: Settings = None,
           regions: Settings = None, trace: Settings = None, factcheck: Settings = None,
           executor: str = ExecutorOpt, ray_address: Optional[str] = RayAddressOpt, retries: int = RetriesOpt,
           task_cpus: float = TaskCpusOpt, task_gpus: float = TaskGpusOpt, task_memory: Optional[str] = TaskMemoryOpt):
    """Run locators (--analysis) on every chosen checkpoint of a run: one result per checkpoint under
    OUT/step-NNNNNNN/<analysis>/, their numbers and comparisons over time in evolution.jsonl, change
    points in summary.json. Each analysis (one parameter per registered locator below) takes its settings as --set ANALYSIS.FIELD=VALUE (or a
    --config file's section). Re-running the same command resumes: finished checkpoints are reused.
    --executor ray runs each (checkpoint, analysis) as a Ray task, into the same run directory."""
    from engramlab.config import to_dict
    from engramlab.dynamics.evolve import evolve as run_evolve, select_steps, world_facts
    from engramlab.locate import get_locator, select
    from engramlab.models.loading import list_checkpoints
    from engramlab.runs import RunDir, load_json, set_seed

    config = config.build()
    runner = make_executor(executor, ray_address, retries, task_cpus, task_gpus, task_memory, out)
    for name in config.analysis:
        get_locator(name)  # an unknown name fails here, listing the registered ones
    configs = locator_settings({"recall": recall, "neurons": neurons, "dkn": dkn, "circuit": circuit,
                                "regions": regions, "trace": trace, "factcheck": factcheck})
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
                  "evolve": {**vars(config), "analysis": list(config.analysis)},
                  **{name: to_dict(configs[name]) for name in config.analysis}}
    groups = None
    if config.facts == "world":
        facts, groups = world_facts(run, config.split, with_groups=True)
    if saved_facts.is_file() and not overwrite:  # a re-run: the same facts, or a clear refusal
        from engramlab.data.facts import load_facts

        before = load_json(out / "manifest.json", "evolve manifest").get("config", {}) \
            if (out / "manifest.json").is_file() else {}
        mine = {k: run_config[k] for k in ("run", "relation", "limit")} | {"facts": config.facts, "split": config.split}
        theirs = {k: before.get(k) for k in ("run", "relation", "limit")} | \
            {k: (before.get("evolve") or {}).get(k) for k in ("facts", "split")}
        if mine != theirs:
            raise EngramError(f"--out {out}: holds an evolve run on other facts or another run ({theirs}); "
                              "pass --overwrite to start again, or choose another --out")
        facts = load_facts(str(saved_facts))
    elif config.facts != "world":
        from engramlab.data.facts import load_facts

        facts = load_facts(config.facts)
    if not saved_facts.is_file() or overwrite:
        facts = select(facts, relation, limit)
    mode = "overwrite" if overwrite else "continue"
    with RunDir(out, "evolve", run_config, seed=seed, mode=mode) as rd:
        set_seed(seed)
        facts.to_jsonl(rd.file("facts.jsonl"))
        summary = run_evolve(run, rd.path, config.analysis, facts, steps, configs=configs, groups=groups,
                             transplant=config.transplant, phase_metric=config.phase_metric, dtype=dtype,
                             device=device, progress=True, log=lambda line: console.print(line),
                             executor=runner)
        rd.finish(summary)
    print_summary(f"evolve: {run} ({', '.join(config.analysis)})", out, summary,
                  ["n_checkpoints", "n_skipped", "first_step", "last_step", "plateau_start_step", "plateau_end_step",
                   "phase_shift_step", "phase_shift_metric", "deep_to_shallow_stat", "deep_to_shallow_p"])
    console.print(f"wrote {out}/evolution.jsonl, skipped.jsonl, facts.jsonl, step-*/<analysis>/, summary.json")

