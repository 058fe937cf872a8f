"""``engram world``, ``engram train``, ``engram sweep``: the knowledge-acquisition lab."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from engramlab.cli.common import (
    DeviceOpt,
    OutOpt,
    OverwriteOpt,
    SeedOpt,
    app,
    console,
    print_summary,
    run_mode,
    user_errors,
)
from engramlab.errors import EngramError


def _parse_sets(items: list[str] | None, flag: str) -> dict:
    """``--set key=value`` pairs -> dict (ints and floats parsed)."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise EngramError(f"{flag} {item!r}: use KEY=VALUE, e.g. {flag} n_cities=100")
        for cast in (int, float):
            try:
                out[key] = cast(value)
                break
            except ValueError:
                continue
        else:
            out[key] = value
    return out


@app.command()
@user_errors
def world(preset: str = typer.Option("tiny", "--preset", "-p", help="tiny | small | paper | continual-tiny | "
                                     "continual."),
          out: Path = OutOpt, seed: int = SeedOpt, overwrite: bool = OverwriteOpt,
          n_people: Optional[int] = typer.Option(None, "--n-people", "-N", help="Trained population size."),
          n_heldout: Optional[int] = typer.Option(None, "--n-heldout", help="Held-out population size."),
          disjoint_from: Optional[Path] = typer.Option(None, "--disjoint-from", help="Another world whose names "
                                                       "this one must not reuse (fine-tuning on new people)."),
          sets: Optional[List[str]] = typer.Option(None, "--set", help="Any world setting, KEY=VALUE "
                                                   "(repeatable), e.g. --set n_cities=100.")):
    """Generate a synthetic biography world (people, attributes, templates) into --out."""
    from engramlab.data.wordtok import build_word_tokenizer
    from engramlab.data.world import World, build_world
    from engramlab.runs import RunDir
    from engramlab.train.metrics import baseline_loss

    overrides = {"n_people": n_people, "n_heldout": n_heldout, "seed": seed, **_parse_sets(sets, "--set")}
    exclude = set()
    if disjoint_from is not None:
        other = World.load(disjoint_from)
        exclude = {p.name for p in other.people + other.heldout_people}
    config = {"preset": preset, "overrides": overrides, "disjoint_from": str(disjoint_from or "") or None}
    w = build_world(preset, exclude_names=exclude, **overrides)
    with RunDir(out, "world", config, seed=seed, mode=run_mode(overwrite)) as run:
        w.save(run.path)
        tok = build_word_tokenizer(w)
        counts = w.value_counts()
        run.finish({"kind": w.config.kind, "n_people": len(w.people), "n_heldout": len(w.heldout_people),
                    "vocab_size": len(tok), "baseline_loss": baseline_loss(w),
                    **{f"values.{k}": v for k, v in counts.items()}})
    console.print(f"world {preset}: {len(w.people)} people, {len(w.heldout_people)} held out, "
                  f"word vocabulary {len(tok)}, no-knowledge loss {baseline_loss(w):.3f} -> {out}")


@app.command()
@user_errors
def train(ctx: typer.Context,
          world_dir: Optional[Path] = typer.Option(None, "--world", "-w", help="World directory from engram world."),
          model_config: str = typer.Option("tiny", "--model-config", help="tiny | small | paper (+ -gpt2), or a "
                                           "HF config.json / model dir for fresh weights."),
          out: Path = OutOpt,
          init: Optional[str] = typer.Option(None, "--init", help="Continue training this model SPEC (pretrained "
                                             "model or a run checkpoint) instead of fresh weights."),
          tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help="Train from scratch with this HF "
                                                  "tokenizer (model SPEC) instead of the world's word tokenizer."),
          steps: int = typer.Option(2000, "--steps"), batch_size: int = typer.Option(32, "--batch-size"),
          lr: float = typer.Option(1e-3, "--lr"), min_lr_ratio: float = typer.Option(0.1, "--min-lr-ratio"),
          schedule: str = typer.Option("cosine", "--schedule", help="cosine | constant | linear."),
          warmup_steps: int = typer.Option(0, "--warmup-steps"),
          weight_decay: float = typer.Option(0.1, "--weight-decay"),
          beta1: float = typer.Option(0.9, "--beta1"), beta2: float = typer.Option(0.95, "--beta2"),
          grad_clip: float = typer.Option(1.0, "--grad-clip"),
          sampler: str = typer.Option("uniform", "--sampler", help="uniform | powerlaw:alpha=A | "
                                      "celebrities:k=K,w=W | warmup:size=S,epochs=E | sequential:groups=G,steps=T | "
                                      "replay:weight=W."),
          eval_every: int = typer.Option(50, "--eval-every"), eval_people: int = typer.Option(100, "--eval-people"),
          eval_templates: int = typer.Option(2, "--eval-templates"),
          eval_context: str = typer.Option("sentence", "--eval-context", help="sentence: each evaluation sentence "
                                           "alone; biography: whole evaluation-template biographies (the paper)."),
          eval_template_choice: str = typer.Option("random", "--eval-template-choice", help="random: "
                                                   "--eval-templates drawn per person (seeded); first: lowest "
                                                   "indices (before 2026-12)."),
          checkpoints: str = typer.Option("dense:24", "--checkpoints", help="dense:N | log:N | every:K | none."),
          old_world: Optional[str] = typer.Option(None, "--old-world", help="Population trained before (retention "
                                                  "metrics, replay); default: the --init run's world."),
          patch_attention_from: Optional[str] = typer.Option(None, "--patch-attention-from", help="RUN:STEP whose "
                                                             "attention patterns the twin uses (stop-gradient)."),
          patch_window: Optional[str] = typer.Option(None, "--patch-window", help="A:B steps to patch (default all)."),
          plateau_exit: float = typer.Option(0.10, "--plateau-exit", help="Plateau ends at the first eval this "
                                             "fraction below the baseline."),
          plateau_reach: float = typer.Option(0.05, "--plateau-reach", help="Plateau starts at the first eval "
                                              "within this fraction above the baseline."),
          stop_at_plateau_end: bool = typer.Option(False, "--stop-at-plateau-end", help="End the run once the "
                                                   "plateau is over."),
          resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last checkpoint "
                                      "(its saved config is used)."),
          overwrite: bool = OverwriteOpt,
          seed: int = SeedOpt, device: str = DeviceOpt):
    """Train a model on a world's biographies; checkpoints and knowledge metrics over training."""
    from dataclasses import asdict

    from engramlab.data.world import World
    from engramlab.data.world import WORLD_FILES
    from engramlab.runs import RunDir, fingerprint, load_json
    from engramlab.train.trainer import TrainConfig
    from engramlab.train.trainer import train as run_training

    if resume:
        manifest = out / "manifest.json"
        if not manifest.is_file():
            raise EngramError(f"--resume: {out} has no manifest.json, so no run to resume; start it without --resume")
        previous = load_json(manifest, "run manifest")
        if previous.get("command") != "train":
            raise EngramError(f"--resume: {out} holds a run of `engram {previous.get('command')}`, not train; "
                              f"point --out at a train run")
        saved = previous["config"]
        _refuse_changed_flags(ctx, saved)
        # Runs made before eval_template_choice existed evaluated the lowest template indices.
        cfg = TrainConfig(**{"eval_template_choice": "first", **saved})
    else:
        if world_dir is None:
            raise EngramError("engram train needs --world DIR (make one with `engram world --preset tiny --out DIR`)")
        cfg = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, min_lr_ratio=min_lr_ratio, schedule=schedule,
                          warmup_steps=warmup_steps, weight_decay=weight_decay, beta1=beta1, beta2=beta2,
                          grad_clip=grad_clip, sampler=sampler, seed=seed, eval_every=eval_every,
                          eval_people=eval_people, eval_templates=eval_templates, eval_context=eval_context,
                          eval_template_choice=eval_template_choice, checkpoints=checkpoints,
                          plateau_reach=plateau_reach, plateau_exit=plateau_exit, device=device,
                          model_config=model_config, init=init, tokenizer=tokenizer, old_world=old_world,
                          patch_attention_from=patch_attention_from, patch_window=patch_window,
                          stop_at_plateau_end=stop_at_plateau_end, world=str(world_dir))
    w = World.load(cfg.world)
    inputs = {"world": fingerprint(Path(cfg.world) / name for name in WORLD_FILES)}
    with RunDir(out, "train", asdict(cfg), seed=cfg.seed, mode=run_mode(overwrite, resume), inputs=inputs) as run:
        if run.already_complete:  # resuming a finished run changes nothing
            summary = run.summary
        else:
            summary = run_training(w, run.path, cfg, resume=resume)
            run.finish(summary)
    print_summary("train", out, summary, ["n_params", "n_params_non_embedding", "baseline_loss",
                                           "baseline_loss_empirical", "final_attr_loss", "final_attr_acc",
                                           "plateau_start_step", "plateau_end_step", "heldout_loss_final",
                                           "old_acc_final", "tokens_per_second"])


def _refuse_changed_flags(ctx: typer.Context, saved: dict) -> None:
    """With --resume the saved config is used; a flag given now that says otherwise is an error."""
    for name, value in ctx.params.items():
        key = "world" if name == "world_dir" else name
        # Compared by name: typer may ship its own copy of click's ParameterSource.
        if key not in saved or getattr(ctx.get_parameter_source(name), "name", None) != "COMMANDLINE":
            continue
        now = str(value) if key == "world" and value is not None else value
        if now != saved[key]:
            flag = "--" + name.replace("_dir", "").replace("_", "-")
            raise EngramError(f"--resume continues with the run's saved config, but {flag} {now!r} differs from "
                              f"its {saved[key]!r}; leave {flag} out, or start a new run in another --out")


@app.command()
@user_errors
def sweep(out: Path = OutOpt,
          grid: List[str] = typer.Option(..., "--grid", "-g", help="KEY=V1,V2 (or KEY=V1|V2), repeatable; world "
                                         "keys (n_people, ...) and training keys (sampler, lr, seed, ...)."),
          preset: str = typer.Option("tiny", "--preset", "-p", help="World preset the grid modifies."),
          model_config: str = typer.Option("tiny", "--model-config"),
          steps: int = typer.Option(2000, "--steps"), batch_size: int = typer.Option(32, "--batch-size"),
          lr: float = typer.Option(1e-3, "--lr"), eval_every: int = typer.Option(50, "--eval-every"),
          eval_people: int = typer.Option(100, "--eval-people"),
          eval_templates: int = typer.Option(2, "--eval-templates"),
          eval_context: str = typer.Option("sentence", "--eval-context", help="sentence | biography (see train)."),
          checkpoints: str = typer.Option("none", "--checkpoints", help="Checkpoint schedule of each run."),
          plateau_exit: float = typer.Option(0.10, "--plateau-exit"),
          schedule: str = typer.Option("constant", "--schedule", help="LR schedule of each run; constant keeps "
                                       "plateau ends comparable across run lengths."),
          full_runs: bool = typer.Option(False, "--full-runs", help="Train every run to --steps instead of "
                                         "stopping at the plateau end."),
          device: str = DeviceOpt):
    """Train over a grid (e.g. N x sampler x seed) and fit plateau_end = a*N^b; resumes finished runs."""
    from dataclasses import asdict

    from engramlab.runs import RunDir
    from engramlab.train.sweep import parse_grid, run_sweep
    from engramlab.train.trainer import TrainConfig

    parsed = parse_grid(grid)
    base = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, eval_every=eval_every, eval_people=eval_people,
                       eval_templates=eval_templates, eval_context=eval_context, checkpoints=checkpoints,
                       plateau_exit=plateau_exit,
                       model_config=model_config, device=device, schedule=schedule,
                       stop_at_plateau_end=not full_runs)
    with RunDir(out, "sweep", {"grid": parsed, "preset": preset, "base": asdict(base)}, mode="continue") as run:
        summary = run_sweep(run.path, parsed, preset=preset, base=base, log=console.print)
        run.finish(summary)
    print_summary("sweep", out, summary, list(summary))
