"""``sweep``: train over a grid of settings and fit how the plateau scales with N.

A grid is a dict KEY -> list of values. Keys that are world settings (``n_people``,
``n_cities``, ...) shape the world; keys that are training settings (``sampler``, ``lr``,
``steps``, ...) shape the run; ``seed`` sets both. Every combination is one run directory
``OUT/runs/<name>``. A finished run is skipped only when the config it was trained with equals
the one requested now (and its world is the one the grid point builds); otherwise it is trained
again, with a line naming the keys that differ. So an interrupted sweep resumes where it stopped,
and a sweep re-run with other settings never reports old results. Every grid point's world and
training config is built and checked before the first run starts. After the runs::

    OUT/sweep.jsonl        one row per run: its grid values and summary
    OUT/failed.jsonl       runs that failed (under Ray, after their retries), with the reason
    OUT/fit.json           plateau_end_step ~ a * N^b, per group of the other grid keys
    OUT/plateau_vs_n.png   the fit, log-log
    OUT/loss_curves.png    eval attribute loss / baseline over steps, one line per run
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path

from engramlab.data.world import World, WorldConfig, build_world
from engramlab.dynamics.plateau import fit_power_law
from engramlab.errors import EngramError
from engramlab.runs import RunDir, atomic_write_json, atomic_write_jsonl, read_jsonl
from engramlab.train.trainer import TrainConfig, train

WORLD_KEYS = {f.name for f in dataclasses.fields(WorldConfig)}
TRAIN_KEYS = {f.name for f in dataclasses.fields(TrainConfig)} - {"world", "extra"}


def parse_grid(items: list[str]) -> dict[str, list]:
    """``["n_people=250,500", "sampler=uniform|celebrities:k=10,w=8"]`` -> grid dict.

    Values are split on "|" when the list has one (sampler specs contain commas), else on ",".
    """
    grid: dict[str, list] = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not values:
            raise EngramError(f"--grid {item!r}: use KEY=V1,V2 (or KEY=V1|V2 for values with commas)")
        if key not in WORLD_KEYS | TRAIN_KEYS:
            raise EngramError(f"--grid {item!r}: unknown key {key!r}; world keys: {', '.join(sorted(WORLD_KEYS))}; "
                              f"training keys: {', '.join(sorted(TRAIN_KEYS))}")
        grid[key] = [_cast(v.strip()) for v in values.split("|" if "|" in values else ",")]
    return grid


def _cast(value: str):
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


def _run_name(point: dict) -> str:
    text = "_".join(f"{k}-{v}" for k, v in point.items())
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in text)


def train_unit(world_dir: str, run_dir: str, cfg: TrainConfig, show_progress: bool = False) -> str:
    """One grid point's training run, as the executor runs it (in this process or a Ray task)."""
    with RunDir(run_dir, "train", dataclasses.asdict(cfg), seed=cfg.seed, mode="overwrite") as run:
        # An unfinished or different unit is trained again from the start.
        run.finish(train(World.load(world_dir), run.path, cfg, show_progress=show_progress))
    return run_dir


def run_sweep(out: str | Path, grid: dict[str, list], preset: str = "tiny", base: TrainConfig | None = None,
              show_progress: bool = True, log=print, executor=None) -> dict:
    """Run every grid point (skipping finished ones that match), then fit and plot. Returns the summary.

    ``executor`` (``engramlab.scale.executor.Executor``; default local): where the training runs
    go. A run that fails under Ray after its retries is listed in failed.jsonl (``n_failed``) and
    left out of the fit; the others finish."""
    from engramlab.scale.executor import Executor, Unit

    executor = executor or Executor()
    out = Path(out)
    base = base or TrainConfig()
    keys = list(grid)
    units = []
    for values in itertools.product(*(grid[k] for k in keys)):  # plan (and validate) everything first
        point = dict(zip(keys, values))
        world_kw = {k: v for k, v in point.items() if k in WORLD_KEYS}
        train_kw = {k: v for k, v in point.items() if k in TRAIN_KEYS}
        world = build_world(preset, **world_kw)
        world_dir = out / "worlds" / _run_name(world_kw or {"preset": preset})
        cfg = dataclasses.replace(base, **train_kw, world=str(world_dir))
        units.append((point, world, world_dir, cfg, out / "runs" / _run_name(point)))
    todo = []
    for point, world, world_dir, cfg, run_dir in units:
        if not _same_world(world_dir, world):
            world.save(world_dir)
        differs = _differences(run_dir, dataclasses.asdict(cfg))
        if differs:
            if differs != ["(not finished)"]:
                log(f"sweep: {run_dir.name} was trained with other settings ({', '.join(differs)}); training again")
            todo.append(Unit(run_dir.name, train_unit, (str(world_dir), str(run_dir), cfg,
                                                        show_progress and executor.is_local)))
    if todo and not executor.is_local:
        log(f"sweep: {len(todo)} runs on {executor.config.executor}")

    def started(unit) -> None:
        if executor.is_local:
            log(f"sweep: {unit.key}")

    failed = {}
    for o in executor.run(todo, before=started):
        if o.error is not None:
            failed[o.key] = o.error
            log(f"sweep: {o.key} {failed[o.key]}")
    rows = []
    for point, world, world_dir, cfg, run_dir in units:
        if run_dir.name in failed:
            continue
        summary = json.loads((run_dir / "summary.json").read_text())
        rows.append({**point, "run": str(run_dir.relative_to(out)), **{f"summary.{k}": v for k, v in summary.items()}})
    atomic_write_jsonl(out / "sweep.jsonl", rows)
    atomic_write_jsonl(out / "failed.jsonl", [{"run": k, "reason": v} for k, v in failed.items()])
    fits = fit_groups(rows, keys)
    atomic_write_json(out / "fit.json", fits)
    plot_sweep(out, rows, fits, keys)
    summary = {"n_runs": len(rows), "n_failed": len(failed)}
    for name, fit in fits.items():
        prefix = "fit" if name == "all" else f"fit.{name}"
        summary.update({f"{prefix}_{k}": v for k, v in fit.items() if k in ("a", "b", "r2", "n")})
    return summary


def _same_world(world_dir: Path, world: World) -> bool:
    if not (world_dir / "world.json").is_file():
        return False
    try:
        return World.load(world_dir) == world
    except EngramError:  # damaged: build it again
        return False


def _differences(run_dir: Path, requested: dict) -> list[str]:
    """Why the unit in ``run_dir`` cannot be reused: [] when it is a complete run of ``requested``."""
    try:
        manifest = json.loads((run_dir / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return ["(not finished)"]
    if manifest.get("status") != "complete" or not (run_dir / "summary.json").is_file():
        return ["(not finished)"]
    saved = manifest.get("config") or {}
    if isinstance(saved.get("patch_window"), str):  # written before patch_window became a pair
        try:
            saved = {**saved, "patch_window": [int(x) for x in saved["patch_window"].split(":")]}
        except ValueError:
            pass  # not "A:B": it differs from any pair requested now
    # Compared as the manifest stores them: a tuple (patch_window) comes back from JSON as a list.
    requested = json.loads(json.dumps(requested))
    # A field the manifest lacks (added since the run was made) ran at its default.
    # (Runs made before eval_template_choice existed evaluated the lowest template indices.)
    defaults = {**json.loads(json.dumps(dataclasses.asdict(TrainConfig()))), "eval_template_choice": "first"}
    saved = {**{k: v for k, v in defaults.items() if k not in saved}, **saved}
    return [f"{k}: {saved.get(k)!r} -> {v!r}" for k, v in requested.items() if saved.get(k) != v]


def fit_groups(rows: list[dict], keys: list[str]) -> dict[str, dict]:
    """Fit plateau_end_step = a * n_people^b within each group of the non-N, non-seed keys."""
    if "n_people" not in keys:
        return {}
    group_keys = [k for k in keys if k not in ("n_people", "seed")]
    groups: dict[str, list[dict]] = {}
    for r in rows:
        name = ",".join(f"{k}={r[k]}" for k in group_keys) or "all"
        groups.setdefault(name, []).append(r)
    fits = {}
    for name, members in groups.items():
        pts = [(r["n_people"], r["summary.plateau_end_step"]) for r in members
               if r.get("summary.plateau_end_step") is not None]
        fit = fit_power_law([p[0] for p in pts], [p[1] for p in pts])
        fit["points"] = pts
        fits[name] = fit
    return fits


def plot_sweep(out: Path, rows: list[dict], fits: dict, keys: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    import numpy as np

    if fits:
        fig, ax = plt.subplots(figsize=(5.5, 4))
        for name, fit in fits.items():
            pts = np.array(fit["points"], dtype=float)
            if len(pts) == 0:
                continue
            line = ax.loglog(pts[:, 0], pts[:, 1], "o", label=name)[0]
            if fit["b"] is not None:
                xs = np.geomspace(pts[:, 0].min(), pts[:, 0].max(), 50)
                ax.loglog(xs, fit["a"] * xs ** fit["b"], "-", color=line.get_color(),
                          label=f"{fit['a']:.3g}·N^{fit['b']:.2f}")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # crowded minor labels
        ax.set_xlabel("individuals N")
        ax.set_ylabel("plateau end (steps)")
        ax.set_title("Plateau length vs population size")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "plateau_vs_n.png", dpi=120)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        metrics = read_jsonl(out / r["run"] / "metrics.jsonl")
        base = metrics[0]["baseline_loss"]
        label = ", ".join(f"{k}={r[k]}" for k in keys)
        ax.plot([m["step"] for m in metrics], [m["eval.attr_loss"] / base for m in metrics], label=label, lw=1)
    ax.axhline(1.0, color="k", ls="--", lw=0.8)
    ax.set_ylim(0, 2.5)
    ax.set_xlabel("step")
    ax.set_ylabel("attribute loss / no-knowledge baseline")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png", dpi=120)
    plt.close(fig)
