"""``engram world``, ``engram train``, ``engram sweep``: the knowledge-acquisition lab."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from engramlab.cli.common import (
    DeviceOpt,
    ExecutorOpt,
    OutOpt,
    OverwriteOpt,
    RayAddressOpt,
    RetriesOpt,
    SeedOpt,
    TaskCpusOpt,
    TaskGpusOpt,
    TaskMemoryOpt,
    app,
    console,
    make_executor,
    print_summary,
    run_mode,
    user_errors,
)
from engramlab.cli.options import Settings, configured
from engramlab.data.world import WorldConfig
from engramlab.errors import EngramError
from engramlab.train.config import TrainConfig


@app.command()
@user_errors
@configured(WorldConfig, build_config=False)
def world(preset: str = typer.Option("tiny", "--preset", "-p", help="tiny | small | paper | continual-tiny | "
                                     "continual."),
          out: Path = OutOpt, seed: int = SeedOpt, overwrite: bool = OverwriteOpt,
          n_people: Optional[int] = typer.Option(None, "--n-people", "-N", help="Trained population size."),
          n_heldout: Optional[int] = typer.Option(None, "--n-heldout", help="Held-out population size."),
          disjoint_from: Optional[Path] = typer.Option(None, "--disjoint-from", help="Another world whose names "
                                                       "this one must not reuse (fine-tuning on new people)."),
          rel_from: Optional[Path] = typer.Option(None, "--rel-from", help="Continual worlds: an earlier world "
                                                  "whose trained people become the rel people, every attribute "
                                                  "changed (a knowledge update); same pools required."),
          config: Settings = None):
    """Generate a synthetic biography world (people, attributes, templates) into --out; any world
    setting by --set KEY=VALUE (e.g. --set n_cities=100) or a --config file."""
    from engramlab.data.world import WORLD_FILES, World, build_world
    from engramlab.runs import RunDir, fingerprint

    # The preset's settings, then the file, --set and the flags given (None: the preset's).
    overrides = {"n_people": n_people, "n_heldout": n_heldout, "seed": seed, **config.given}
    exclude = set()
    if disjoint_from is not None:
        other = World.load(disjoint_from)
        exclude = {p.name for p in other.people + other.heldout_people}
    run_config = {"preset": preset, "overrides": overrides, "disjoint_from": str(disjoint_from or "") or None}
    rel_world, inputs = None, None
    if rel_from is not None:
        rel_world = World.load(rel_from)
        run_config["rel_from"] = str(rel_from)
        inputs = {"rel_world": fingerprint(Path(rel_from) / name for name in WORLD_FILES)}
    w = build_world(preset, exclude_names=exclude, rel_world=rel_world, **overrides)
    # torch and transformers: only once the settings are known good
    from engramlab.data.wordtok import build_word_tokenizer
    from engramlab.train.metrics import baseline_loss

    with RunDir(out, "world", run_config, seed=seed, mode=run_mode(overwrite), inputs=inputs) as run:
        w.save(run.path)
        tok = build_word_tokenizer(w)
        counts = w.value_counts()
        run.finish({"kind": w.config.kind, "n_people": len(w.people), "n_heldout": len(w.heldout_people),
                    "vocab_size": len(tok), "baseline_loss": baseline_loss(w),
                    **{f"values.{k}": v for k, v in counts.items()}})
    source = f" ({w.config.n_rel} rel people revised from {rel_from})" if rel_from is not None else ""
    console.print(f"world {preset}: {len(w.people)} people{source}, {len(w.heldout_people)} held out, "
                  f"word vocabulary {len(tok)}, no-knowledge loss {baseline_loss(w):.3f} -> {out}")


@app.command()
@user_errors
@configured(TrainConfig, build_config=False)
def train(world: Optional[Path] = typer.Option(None, "--world", "-w", help="World directory from engram world."),
          out: Path = OutOpt,
          resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last checkpoint "
                                      "(its saved config is used)."),
          overwrite: bool = OverwriteOpt,
          seed: int = SeedOpt, device: str = DeviceOpt, config: Settings = None):
    """Train a model on a world's biographies; checkpoints and knowledge metrics over training."""
    from engramlab.config import to_dict
    from engramlab.data.world import WORLD_FILES, World
    from engramlab.runs import RunDir, fingerprint, load_json

    if resume:
        manifest = out / "manifest.json"
        if not manifest.is_file():
            raise EngramError(f"--resume: {out} has no manifest.json, so no run to resume; start it without --resume")
        previous = load_json(manifest, "run manifest")
        if previous.get("command") != "train":
            raise EngramError(f"--resume: {out} holds a run of `engram {previous.get('command')}`, not train; "
                              f"point --out at a train run")
        saved = previous["config"]
        _refuse_changed_settings(config, saved)
        # Runs made before eval_template_choice existed evaluated the lowest template indices.
        cfg = TrainConfig(**{"eval_template_choice": "first", **saved})
    else:
        if world is None:
            raise EngramError("engram train needs --world DIR (make one with `engram world --preset tiny --out DIR`)")
        cfg = config.build()
    from engramlab.train.trainer import train as run_training  # torch: only once the settings are known good

    w = World.load(cfg.world)
    inputs = {"world": fingerprint(Path(cfg.world) / name for name in WORLD_FILES)}
    with RunDir(out, "train", to_dict(cfg), seed=cfg.seed, mode=run_mode(overwrite, resume), inputs=inputs) as run:
        if run.already_complete:  # resuming a finished run changes nothing
            summary = run.summary
        else:
            summary = run_training(w, run.path, cfg, resume=resume)
            run.finish(summary)
    print_summary("train", out, summary, ["n_params", "n_params_non_embedding", "baseline_loss",
                                           "baseline_loss_empirical", "final_attr_loss", "final_attr_acc",
                                           "plateau_start_step", "plateau_end_step", "heldout_loss_final",
                                           "old_acc_final", "tokens_per_second"])


def _refuse_changed_settings(config: Settings, saved: dict) -> None:
    """With --resume the saved config is used; a setting given now that says otherwise is an error."""
    import json

    from engramlab.config import to_dict

    def as_saved(cfg) -> dict:  # compared as the manifest stores them (a tuple comes back as a list)
        return json.loads(json.dumps(to_dict(cfg)))

    before = as_saved(TrainConfig(**{"eval_template_choice": "first", **saved}))
    for path, value in config.given.items():
        # A field the manifest lacks (added since the run was made) ran at its default: compared with that.
        # Both sides parsed by TrainConfig, so "20:40" given now equals [20, 40] saved (or "20:40" in
        # a manifest written before patch_window became a pair).
        if as_saved(TrainConfig(**{**before, path: value}))[path] != before[path]:
            where = config.origin[path]
            given = f"{where} {value!r}" if where.startswith("--") and where != "--set" else \
                f"{path}={value!r} ({where})"
            was = saved.get(path, before[path])  # as the manifest wrote it; a field it lacks: the default
            raise EngramError(f"--resume continues with the run's saved config, but {given} differs from its "
                              f"{was!r}; leave it out, or start a new run in another --out")


@app.command()
@user_errors
@configured(TrainConfig, only=("model_config", "steps", "batch_size", "lr", "eval_every", "eval_people",
                               "eval_templates", "eval_context", "checkpoints", "plateau_exit", "schedule",
                               "stop_at_plateau_end", "precision", "compile", "grad_accum", "peak_tflops"),
            defaults={"checkpoints": "none", "schedule": "constant", "stop_at_plateau_end": True})
def sweep(out: Path = OutOpt,
          grid: List[str] = typer.Option(..., "--grid", "-g", help="KEY=V1,V2 (or KEY=V1|V2), repeatable; world "
                                         "keys (n_people, ...) and training keys (sampler, lr, seed, ...)."),
          preset: str = typer.Option("tiny", "--preset", "-p", help="World preset the grid modifies."),
          device: str = DeviceOpt, config: TrainConfig = None,
          executor: str = ExecutorOpt, ray_address: Optional[str] = RayAddressOpt, retries: int = RetriesOpt,
          task_cpus: float = TaskCpusOpt, task_gpus: float = TaskGpusOpt, task_memory: Optional[str] = TaskMemoryOpt):
    """Train over a grid (e.g. N x sampler x seed) and fit plateau_end = a*N^b; resumes finished runs.
    Its defaults differ from train's: no checkpoints, a constant learning rate (plateau ends stay
    comparable across run lengths), and each run stops at its plateau's end (--full-runs: not).
    --executor ray trains the grid's runs as Ray tasks, into the same run directories."""
    from engramlab.config import to_dict
    from engramlab.runs import RunDir
    from engramlab.train.sweep import parse_grid, run_sweep

    parsed = parse_grid(grid)
    runner = make_executor(executor, ray_address, retries, task_cpus, task_gpus, task_memory, out)
    with RunDir(out, "sweep", {"grid": parsed, "preset": preset, "base": to_dict(config)}, mode="continue") as run:
        summary = run_sweep(run.path, parsed, preset=preset, base=config, log=console.print, executor=runner)
        run.finish(summary)
    print_summary("sweep", out, summary, list(summary))
