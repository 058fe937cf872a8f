"""Any locator over a training run's checkpoints: ``evolve(run, out, analyses, facts, steps)``.

For each chosen checkpoint step s and each analysis a (a name in ``engramlab.locate.LOCATORS``)::

    OUT/step-NNNNNNN/<a>/      the locator's own result directory (its shared layout)
    OUT/evolution.jsonl        one row per checkpoint: step, then <a>.<summary key> for every a; with
                               circuits also circuit.edge_jaccard_final / _prev and circuit.entropy
                               (``engramlab.dynamics.circuit_metrics``)
    OUT/skipped.jsonl          checkpoints that could not be loaded (``analysis`` null) and analyses
                               that could not run on a checkpoint, each with the reason
    OUT/facts.jsonl            the facts every checkpoint was analysed on (chosen once)

A checkpoint's result directory is written under a temporary name and renamed when complete, so
a killed sweep leaves either a finished directory (reused on the next run) or a temporary one
(removed and redone): re-running the same command resumes, and gives the same rows.

Checkpoint selection (``select_steps``), over the steps a run has: ``all``, ``first:N`` (the first
N), ``every:K`` (steps divisible by K), ``steps:a,b,c`` (exactly those), ``log:N`` (N picks spread
evenly in log(step + 1)). The final checkpoint is always included: comparisons with the final
circuit or neuron set need it.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Callable, Sequence

from engramlab.dynamics.config import CHECKPOINT_GRAMMAR
from engramlab.errors import EngramError

STEP_DIR = "step-{:07d}"


def select_steps(spec: str, available: Sequence[int]) -> list[int]:
    """The checkpoint steps ``spec`` picks out of ``available`` (ascending; the last always in)."""
    have = sorted(set(int(s) for s in available))
    if not have:
        raise EngramError("the run has no checkpoints; train it with --checkpoints (e.g. dense:24)")
    name, _, arg = str(spec).partition(":")

    def count(what: str) -> int:
        try:
            n = int(arg)
        except ValueError:
            n = 0
        if n < 1:
            raise EngramError(f"--checkpoints {spec!r}: {what} must be a whole number >= 1 ({CHECKPOINT_GRAMMAR})")
        return n

    if name == "all" and not arg:
        chosen = have
    elif name == "first":
        chosen = have[:count("N")]
    elif name == "every":
        k = count("K")
        chosen = [s for s in have if s % k == 0]
    elif name == "steps":
        try:
            wanted = sorted({int(x) for x in arg.split(",") if x.strip()})
        except ValueError:
            wanted = []
        if not wanted:
            raise EngramError(f"--checkpoints {spec!r}: give steps as steps:a,b,c ({CHECKPOINT_GRAMMAR})")
        missing = [s for s in wanted if s not in have]
        if missing:
            raise EngramError(f"--checkpoints {spec!r}: the run has no checkpoint at step(s) "
                              f"{', '.join(map(str, missing))}; it has {_show(have)}")
        chosen = wanted
    elif name == "log":
        n = count("N")
        if n >= len(have):
            chosen = have
        else:  # n targets evenly spaced in log(step + 1), each taking the nearest unused checkpoint
            lo, hi = math.log1p(have[0]), math.log1p(have[-1])
            chosen = set()
            for j in range(n):
                target = lo + (hi - lo) * j / max(n - 1, 1)
                free = [s for s in have if s not in chosen] or have
                chosen.add(min(free, key=lambda s: (abs(math.log1p(s) - target), s)))
            chosen = sorted(chosen)
    else:
        raise EngramError(f"--checkpoints {spec!r}: expected {CHECKPOINT_GRAMMAR}")
    return sorted(set(chosen) | {have[-1]})


def _show(steps: Sequence[int]) -> str:
    steps = list(steps)
    return ", ".join(map(str, steps)) if len(steps) <= 12 else \
        f"{', '.join(map(str, steps[:6]))}, ..., {', '.join(map(str, steps[-3:]))} ({len(steps)} in all)"


def world_facts(run_dir: str | Path, split: str = "heldout_templates"):
    """The facts a synthetic run was evaluated on, as a FactSet: per evaluated person (the run's
    ``eval_people`` subset) and attribute, subject = the name, relation = the attribute, object =
    the value, and the person's templates of ``split`` (held-out by default) cut right before the
    value, so a prompt ends where the model should say it."""
    from engramlab.data.facts import Fact, FactSet
    from engramlab.data.templates import split_template
    from engramlab.data.world import ATTRIBUTES, World
    from engramlab.runs import load_json

    run_dir = Path(run_dir)
    manifest = run_dir / "manifest.json"
    if not manifest.is_file():
        raise EngramError(f"--facts world: {run_dir} has no manifest.json; point --run at an `engram train` run")
    config = load_json(manifest, "run manifest").get("config") or {}
    if not config.get("world"):
        raise EngramError(f"--facts world: {run_dir} was not trained on a world (its config names none); "
                          "give a fact file with --facts")
    world_dir = Path(config["world"])
    if not world_dir.is_absolute() and not world_dir.exists():
        world_dir = run_dir / world_dir
    if not (world_dir / "world.json").is_file():
        raise EngramError(f"--facts world: the run's world {config['world']} is not there any more; "
                          "give a fact file with --facts, or restore the world directory")
    world = World.load(world_dir)
    population, people = world._eval_people(split, config.get("eval_people"), None)
    facts = []
    for i in people:
        person = getattr(world, population)[i]
        pools = person.heldout_templates if split != "train_templates" else person.train_templates
        for attribute in ATTRIBUTES:
            heads = [split_template(world.templates[attribute][t])[0].replace("{name}", "{}")
                     for t in pools[attribute]]
            facts.append(Fact(person.name, attribute, person.attributes[attribute], heads))
    return FactSet(facts, f"{run_dir} (world, {split})")


def _scalar(v) -> bool:
    return v is None or isinstance(v, (bool, int, float, str))


def evolve(run_dir: str | Path, out: str | Path, analyses: Sequence[str], facts, steps: Sequence[int], *,
           configs: dict | None = None, dtype: str = "float32", device: str = "cpu",
           progress: bool = False, log: Callable[[str], None] = lambda line: None) -> dict:
    """Run every analysis on every checkpoint in ``steps`` (see the module docstring); returns the
    summary: ``n_checkpoints`` (analysed), ``n_skipped``, the run's plateau keys, and the last
    checkpoint's ``<analysis>.<key>`` numbers."""
    from engramlab.locate import get_locator
    from engramlab.models.loading import list_checkpoints, load_model
    from engramlab.progress import progress_bar
    from engramlab.runs import atomic_write_jsonl, load_json

    run_dir, out = Path(run_dir), Path(out)
    locators = [get_locator(name) for name in analyses]
    configs = configs or {}
    checkpoints = list_checkpoints(run_dir)
    rows, skipped = [], []
    for step in progress_bar(list(steps), "evolve", enabled=progress):
        row: dict = {"step": int(step)}
        lm, why = None, None
        for loc in locators:
            final = out / STEP_DIR.format(step) / loc.name
            if (final / "config.json").is_file() and (final / "summary.json").is_file():
                result = loc.load(final)  # finished on an earlier run
            else:
                if lm is None:
                    try:
                        if step not in checkpoints:
                            raise EngramError(f"no checkpoint at step {step} in {run_dir}")
                        lm = load_model(f"{run_dir}:{step}", dtype=dtype, device=device)
                    except (EngramError, OSError, ValueError, RuntimeError) as e:  # corrupted: note it, go on
                        why = str(e).splitlines()[0] if str(e) else repr(e)
                        break
                tmp = final.with_name(f".{loc.name}.partial")
                shutil.rmtree(tmp, ignore_errors=True)
                try:
                    result = loc.find(lm, facts, configs.get(loc.name), progress=False)
                except EngramError as e:  # this analysis cannot run on this checkpoint (e.g. no fact known yet)
                    skipped.append({"step": int(step), "analysis": loc.name, "reason": str(e)})
                    log(f"step {step}: {loc.name} skipped ({e})")
                    continue
                result.save(tmp)
                shutil.rmtree(final, ignore_errors=True)
                tmp.rename(final)  # the directory appears complete or not at all
            row.update({f"{loc.name}.{k}": v for k, v in result.summary().items() if _scalar(v)})
        if why is not None:
            skipped.append({"step": int(step), "analysis": None, "reason": why})
            log(f"step {step}: skipped ({why})")
            continue
        rows.append(row)
    if "circuit" in [loc.name for loc in locators]:  # change between checkpoints, from the saved circuits
        from engramlab.dynamics.circuit_metrics import circuit_series

        done = [(row["step"], out / STEP_DIR.format(row["step"]) / "circuit") for row in rows]
        series = circuit_series([(step, get_locator("circuit").load(d)) for step, d in done
                                 if (d / "config.json").is_file()])
        for row in rows:
            row.update({f"circuit.{k}": v for k, v in series.get(row["step"], {}).items()})
    atomic_write_jsonl(out / "evolution.jsonl", rows)
    atomic_write_jsonl(out / "skipped.jsonl", skipped)
    summary = {"n_checkpoints": len(rows), "n_skipped": sum(s["analysis"] is None for s in skipped),
               "n_skipped_analyses": sum(s["analysis"] is not None for s in skipped),
               "analyses": ",".join(loc.name for loc in locators),
               "first_step": rows[0]["step"] if rows else None, "last_step": rows[-1]["step"] if rows else None}
    run_summary = load_json(run_dir / "summary.json", "run summary") if (run_dir / "summary.json").is_file() else {}
    for key in ("plateau_start_step", "plateau_end_step"):
        summary[key] = run_summary.get(key)
    if rows:
        summary.update({k: v for k, v in rows[-1].items() if k != "step"})
    return summary


__all__ = ["CHECKPOINT_GRAMMAR", "evolve", "select_steps", "world_facts"]
