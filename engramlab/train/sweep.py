"""``sweep``: train over a grid of settings and fit how the plateau scales with N.

A grid is a dict KEY -> list of values. Keys that are world settings (``n_people``,
``n_cities``, ...) shape the world; keys that are training settings (``sampler``, ``lr``,
``steps``, ...) shape the run; ``seed`` sets both. Every combination is one run directory
``OUT/runs/<name>``; a finished run (its summary.json exists) is skipped, so an interrupted
sweep resumes where it stopped. After the runs::

    OUT/sweep.jsonl        one row per run: its grid values and summary
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


def run_sweep(out: str | Path, grid: dict[str, list], preset: str = "tiny", base: TrainConfig | None = None,
              show_progress: bool = True, log=print) -> dict:
    """Run every grid point (skipping finished ones), then fit and plot. Returns the summary."""
    out = Path(out)
    base = base or TrainConfig()
    keys = list(grid)
    rows = []
    for values in itertools.product(*(grid[k] for k in keys)):
        point = dict(zip(keys, values))
        run_dir = out / "runs" / _run_name(point)
        if not (run_dir / "summary.json").is_file():
            world_kw = {k: v for k, v in point.items() if k in WORLD_KEYS}
            train_kw = {k: v for k, v in point.items() if k in TRAIN_KEYS}
            world = build_world(preset, **world_kw)
            world_dir = out / "worlds" / _run_name(world_kw or {"preset": preset})
            if not (world_dir / "world.json").is_file():
                world.save(world_dir)
            cfg = dataclasses.replace(base, **train_kw, world=str(world_dir))
            log(f"sweep: {run_dir.name}")
            # An unfinished unit is trained again from the start.
            with RunDir(run_dir, "train", dataclasses.asdict(cfg), seed=cfg.seed, mode="overwrite") as run:
                run.finish(train(World.load(world_dir), run.path, cfg, show_progress=show_progress))
        summary = json.loads((run_dir / "summary.json").read_text())
        rows.append({**point, "run": str(run_dir.relative_to(out)), **{f"summary.{k}": v for k, v in summary.items()}})
    atomic_write_jsonl(out / "sweep.jsonl", rows)
    fits = fit_groups(rows, keys)
    atomic_write_json(out / "fit.json", fits)
    plot_sweep(out, rows, fits, keys)
    summary = {"n_runs": len(rows)}
    for name, fit in fits.items():
        prefix = "fit" if name == "all" else f"fit.{name}"
        summary.update({f"{prefix}_{k}": v for k, v in fit.items() if k in ("a", "b", "r2", "n")})
    return summary


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
