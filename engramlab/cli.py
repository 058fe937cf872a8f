"""The ``engram`` command: one thin sub-command per verb (parse -> call the API -> write the run).

Every sub-command that produces results takes ``--out DIR`` and writes a run directory
(``manifest.json``, ``summary.json``, artifacts; see ``engramlab.runs``). User errors print one
line starting with ``error:`` and exit with status 2.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Callable, List, Optional

import typer
from rich.console import Console
from rich.table import Table

from engramlab.errors import EngramError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="engramlab: find where language models store facts, and watch it form in training.")
console = Console()
err_console = Console(stderr=True)

# Shared option declarations: the same flag means the same thing in every verb.
ModelOpt = typer.Option(..., "--model", "-m", help="Local HF dir, .gguf file, engram run dir, RUN:STEP, or alias "
                        "smollm2-135m.")
DtypeOpt = typer.Option("float32", "--dtype", help="float32 (default) | bfloat16 | float16.")
DeviceOpt = typer.Option("cpu", "--device", help="cpu | cuda | auto.")
SeedOpt = typer.Option(0, "--seed", help="Random seed (every command is reproducible for a seed).")
OutOpt = typer.Option(..., "--out", "-o", help="Run directory to write (manifest.json, summary.json, artifacts).")


def user_errors(fn: Callable) -> Callable:
    """Turn EngramError into a one-line message and exit status 2 instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except EngramError as e:
            err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(2)
        except KeyboardInterrupt:
            err_console.print("interrupted")
            raise typer.Exit(130)

    return wrapper


@app.command()
@user_errors
def inspect(model: str = ModelOpt, dtype: str = DtypeOpt, device: str = DeviceOpt,
            seq_len: int = typer.Option(8, "--seq-len", help="Sequence length used to show site shapes."),
            layer: Optional[int] = typer.Option(0, "--layer", help="Layer whose sites to list (-1: all)."),
            as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
            out: Optional[Path] = typer.Option(None, "--out", "-o", help="Also write inspect.json here.")):
    """Model family, sizes, and the hook sites with their tensor shapes."""
    from engramlab.models import SITE_DOCS, load_model
    from engramlab.models.hooks import GLOBAL_SITES
    from engramlab.runs import RunDir, to_json

    lm = load_model(model, dtype=dtype, device=device)
    info = lm.adapter.describe()
    info.update(spec=model, source=lm.source, dtype=str(lm.dtype).replace("torch.", ""), device=str(lm.device))
    names = lm.hooks.names(None if layer == -1 else layer)
    if layer != -1:
        names += list(GLOBAL_SITES)
    docs = {**SITE_DOCS, **GLOBAL_SITES}
    sites = [{"site": n, "shape": list(lm.hooks.shape(n, 1, seq_len)), "doc": docs[n.split(".", 2)[-1]
              if n.startswith("blocks.") else n][1]} for n in names]
    if out is not None:
        with RunDir(out, "inspect", {"model": model, "dtype": dtype, "device": device}) as run:
            run.write_json("inspect.json", {"model": info, "sites": sites})
            run.finish({k: v for k, v in info.items() if isinstance(v, (int, float, str, bool))})
    if as_json:
        print(to_json({"model": info, "sites": sites}), end="")
        return
    t = Table(title=f"{model}", show_header=False)
    for k, v in info.items():
        t.add_row(k, str(v))
    console.print(t)
    s = Table(title=f"hook sites (batch=1, pos={seq_len})")
    for col in ("site", "shape", "tensor"):
        s.add_column(col)
    for row in sites:
        s.add_row(row["site"], str(tuple(row["shape"])), row["doc"])
    console.print(s)
    if layer != -1 and lm.adapter.n_layers > 1:
        console.print(f"(sites repeat for layers 0..{lm.adapter.n_layers - 1}; --layer -1 lists all)")


@app.command()
@user_errors
def recall(model: str = ModelOpt,
           facts: str = typer.Option(..., "--facts", "-f", help="Fact file (.json LRE / .jsonl), directory, "
                                     "or bundled name (e.g. country_capital_city, lre)."),
           relation: Optional[List[str]] = typer.Option(None, "--relation", "-r", help="Keep only this relation "
                                                        "(repeatable)."),
           limit: Optional[int] = typer.Option(None, "--limit", "-n", help="Score at most N facts."),
           template: int = typer.Option(0, "--template", help="Index of the prompt template to use."),
           batch_size: int = typer.Option(16, "--batch-size"),
           out: Path = OutOpt, seed: int = SeedOpt, dtype: str = DtypeOpt, device: str = DeviceOpt):
    """Score recall per fact: probability and rank of the first target token, greedy exact match."""
    from engramlab.data.facts import load_facts
    from engramlab.models import load_model
    from engramlab.recall import score_recall
    from engramlab.runs import RunDir, set_seed

    config = {"model": model, "facts": facts, "relation": relation, "limit": limit, "template": template,
              "batch_size": batch_size, "dtype": dtype, "device": device}
    factset = load_facts(facts).filter(relation=relation or None, limit=limit)
    with RunDir(out, "recall", config, seed=seed) as run:
        set_seed(seed)
        lm = load_model(model, dtype=dtype, device=device)
        result = score_recall(lm, factset, template_index=template, batch_size=batch_size, show_progress=True)
        result.save(run.path)
        summary = result.summary()
        run.finish(summary)
    t = Table(title=f"recall: {model} on {facts} ({len(factset)} facts)")
    for col in ("relation", "n", "top1", "top10", "exact"):
        t.add_column(col, justify="right" if col != "relation" else "left")
    for rel, acc in result.per_relation().items():
        t.add_row(rel, str(acc["n_facts"]), f"{acc['top1_accuracy']:.2f}", f"{acc['top10_accuracy']:.2f}",
                  f"{acc['exact_match']:.2f}")
    t.add_row("[bold]all", str(summary["n_facts"]), f"{summary['top1_accuracy']:.2f}",
              f"{summary['top10_accuracy']:.2f}", f"{summary['exact_match']:.2f}")
    console.print(t)
    console.print(f"wrote {out}/facts.jsonl, summary.json, manifest.json")


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
          out: Path = OutOpt, seed: int = SeedOpt,
          n_people: Optional[int] = typer.Option(None, "--n-people", "-N", help="Trained population size."),
          n_heldout: Optional[int] = typer.Option(None, "--n-heldout", help="Held-out population size."),
          disjoint_from: Optional[Path] = typer.Option(None, "--disjoint-from", help="Another world whose names "
                                                       "this one must not reuse (fine-tuning on new people)."),
          sets: Optional[List[str]] = typer.Option(None, "--set", help="Any world setting, KEY=VALUE "
                                                   "(repeatable), e.g. --set n_cities=100.")):
    """Generate a synthetic biography world (people, attributes, templates) into --out."""
    from engramlab.data.world import World, build_world
    from engramlab.data.wordtok import build_word_tokenizer
    from engramlab.runs import RunDir
    from engramlab.train.metrics import baseline_loss

    overrides = {"n_people": n_people, "n_heldout": n_heldout, "seed": seed, **_parse_sets(sets, "--set")}
    exclude = set()
    if disjoint_from is not None:
        other = World.load(disjoint_from)
        exclude = {p.name for p in other.people + other.heldout_people}
    config = {"preset": preset, "overrides": overrides, "disjoint_from": str(disjoint_from or "") or None}
    w = build_world(preset, exclude_names=exclude, **overrides)
    with RunDir(out, "world", config, seed=seed) as run:
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
def train(world_dir: Optional[Path] = typer.Option(None, "--world", "-w", help="World directory from engram world."),
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
          seed: int = SeedOpt, device: str = DeviceOpt):
    """Train a model on a world's biographies; checkpoints and knowledge metrics over training."""
    from dataclasses import asdict

    from engramlab.data.world import World
    from engramlab.runs import RunDir, load_json
    from engramlab.train.trainer import TrainConfig, train as run_training

    if resume:
        manifest = out / "manifest.json"
        if not manifest.is_file():
            raise EngramError(f"--resume: {out} has no manifest.json, so no run to resume; start it without --resume")
        cfg = TrainConfig(**load_json(manifest, "run manifest")["config"])
    else:
        if world_dir is None:
            raise EngramError("engram train needs --world DIR (make one with `engram world --preset tiny --out DIR`)")
        cfg = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, min_lr_ratio=min_lr_ratio, schedule=schedule,
                          warmup_steps=warmup_steps, weight_decay=weight_decay, beta1=beta1, beta2=beta2,
                          grad_clip=grad_clip, sampler=sampler, seed=seed, eval_every=eval_every,
                          eval_people=eval_people, eval_templates=eval_templates, checkpoints=checkpoints,
                          plateau_reach=plateau_reach, plateau_exit=plateau_exit, device=device,
                          model_config=model_config, init=init, tokenizer=tokenizer, old_world=old_world,
                          patch_attention_from=patch_attention_from, patch_window=patch_window,
                          stop_at_plateau_end=stop_at_plateau_end, world=str(world_dir))
    w = World.load(cfg.world)
    with RunDir(out, "train", asdict(cfg), seed=cfg.seed) as run:
        summary = run_training(w, run.path, cfg, resume=resume)
        run.finish(summary)
    _print_summary("train", out, summary, ["baseline_loss", "final_attr_loss", "final_attr_acc", "plateau_start_step",
                                           "plateau_end_step", "heldout_loss_final", "old_acc_final",
                                           "tokens_per_second"])


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
                       eval_templates=eval_templates, checkpoints=checkpoints, plateau_exit=plateau_exit,
                       model_config=model_config, device=device, schedule=schedule,
                       stop_at_plateau_end=not full_runs)
    with RunDir(out, "sweep", {"grid": parsed, "preset": preset, "base": asdict(base)}) as run:
        summary = run_sweep(run.path, parsed, preset=preset, base=base, log=console.print)
        run.finish(summary)
    _print_summary("sweep", out, summary, list(summary))


def _print_summary(title: str, out: Path, summary: dict, keys: list[str]) -> None:
    t = Table(title=f"{title} -> {out}", show_header=False)
    for k in keys:
        if k in summary:
            v = summary[k]
            t.add_row(k, f"{v:.4g}" if isinstance(v, float) else str(v))
    console.print(t)


def main() -> None:  # pragma: no cover - console entry point
    app(prog_name="engram")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
