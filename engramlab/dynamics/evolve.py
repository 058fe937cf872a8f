"""Any locator over a training run's checkpoints: ``evolve(run, out, analyses, facts, steps)``.

For each chosen checkpoint step s and each analysis a (a name in ``engramlab.locate.LOCATORS``)::

    OUT/step-NNNNNNN/<a>/      the locator's own result directory (its shared layout)
    OUT/step-NNNNNNN/groups.json  with groups (continual worlds): circuit numbers per group
    OUT/evolution.jsonl        one row per checkpoint: step, <a>.<summary key> for every a (timings
                               left out, so a resumed sweep gives the same rows), the comparisons of
                               ``dynamics.circuit_metrics`` / ``neuron_metrics`` (circuit.edge_jaccard_final,
                               circuit.entropy, ...), per-group numbers (``recall.top1_accuracy.kind.rel``)
                               and the run's own evaluation at that step (``run.*``)
    OUT/pairs.jsonl            with circuits: the discovery/evaluation pairs, frozen on the final
                               checkpoint, that every checkpoint's circuit is found and judged on
    OUT/transplant.json        with circuits: faithfulness and Hit@10 of the circuit of step s run on
                               the model of step t (``transplant`` checkpoints)
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


def world_facts(run_dir: str | Path, split: str = "heldout_templates", with_groups: bool = False):
    """The facts a synthetic run was evaluated on, as a FactSet: per evaluated person (the run's
    ``eval_people`` subset) and attribute, subject = the name, relation = the attribute, object =
    the value, and the person's templates of ``split`` (held-out by default) cut right before the
    value, so a prompt ends where the model should say it.

    ``with_groups=True`` returns (facts, groups): groups maps a subject to its knowledge type and
    frequency bucket ({"kind": "rel", "bucket": "high"}) in a continual world, None otherwise."""
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
    facts, groups = [], {}
    for i in people:
        person = getattr(world, population)[i]
        pools = person.heldout_templates if split != "train_templates" else person.train_templates
        for attribute in ATTRIBUTES:
            heads = [split_template(world.templates[attribute][t])[0].replace("{name}", "{}")
                     for t in pools[attribute]]
            facts.append(Fact(person.name, attribute, person.attributes[attribute], heads))
        if world.config.kind == "continual":
            groups[person.name] = {"kind": person.kind, "bucket": person.bucket}
    facts = FactSet(facts, f"{run_dir} (world, {split})")
    return (facts, groups or None) if with_groups else facts


def _scalar(v) -> bool:
    return v is None or isinstance(v, (bool, int, float, str))


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else repr(e)


class _Unloadable(Exception):
    """A checkpoint that cannot be loaded (the reason is the message)."""


class Checkpoints:
    """Loads a run's checkpoints one at a time (the last one stays loaded)."""

    def __init__(self, run_dir: Path, dtype: str, device: str):
        from engramlab.models.loading import list_checkpoints

        self.run_dir, self.dtype, self.device = run_dir, dtype, device
        self.paths = list_checkpoints(run_dir)
        self.step, self.lm = None, None

    def load(self, step: int):
        from engramlab.models.loading import load_model

        if self.step != step:
            self.step, self.lm = None, None  # free the previous model first
            try:
                if step not in self.paths:
                    raise EngramError(f"no checkpoint at step {step} in {self.run_dir}")
                self.lm = load_model(f"{self.run_dir}:{step}", dtype=self.dtype, device=self.device)
            except (EngramError, OSError, ValueError, RuntimeError) as e:  # corrupted: the caller notes it
                raise _Unloadable(_first_line(e)) from e
            self.step = step
        return self.lm


# ---------------------------------------------------------------------------- circuit pairs

def freeze_pairs(models: Checkpoints, facts, config, steps: Sequence[int], path: Path, log) -> int | None:
    """Choose the circuit's discovery/evaluation pairs once, on the latest loadable checkpoint of
    ``steps`` (facts it gets wrong left out when ``config.require_correct``), and write them to
    ``path``; kept when ``path`` exists (a resumed sweep). Returns the step chosen on."""
    from engramlab.locate.circuits.data import pair_records, split_pairs
    from engramlab.runs import atomic_write_json, atomic_write_jsonl, load_json

    meta = path.with_suffix(".json")
    if path.is_file() and meta.is_file():
        return load_json(meta, "frozen pairs").get("step")
    for step in sorted(steps, reverse=True):
        try:
            lm = models.load(step)
        except _Unloadable as e:
            log(f"step {step}: cannot freeze circuit pairs here ({e})")
            continue
        split = split_pairs(lm, facts, config.split, config.template, config.seed, config.require_correct)
        if not split.discovery or not split.evaluation:
            raise EngramError(f"circuit pairs: the checkpoint at step {step} leaves {len(split.discovery)} discovery "
                              f"and {len(split.evaluation)} evaluation pairs ({split.n_wrong} facts wrong); "
                              "give more facts, or --set circuit.require_correct=false")
        atomic_write_jsonl(path, pair_records(split))
        atomic_write_json(meta, {"step": int(step), "n_facts": split.n_facts, "n_wrong": split.n_wrong,
                                 "n_skipped": len(split.skipped)})
        return int(step)
    raise EngramError("circuit pairs: no checkpoint of the sweep can be loaded (see skipped.jsonl)")


def _evaluation_pairs(lm, facts, config, pairs_path: Path):
    """The frozen evaluation pairs (CorruptedPair) of ``pairs_path``."""
    from engramlab.locate.circuits.data import fixed_pairs

    return fixed_pairs(lm, facts, pairs_path, config.template).evaluation


def circuit_on(lm, kept_masks: dict, pairs, config) -> dict:
    """{key: evaluation} of each kept-edge mask in ``kept_masks`` run on ``lm`` with ``pairs``
    (clean and corrupted runs computed once for all of them); {} without pairs."""
    from engramlab.locate.circuits.data import encode_pairs
    from engramlab.locate.circuits.evaluate import CircuitEvaluator
    from engramlab.locate.circuits.graph import CircuitGraph

    if not pairs:
        return {}
    graph = CircuitGraph.from_model(lm)
    evaluator = CircuitEvaluator(lm, graph, encode_pairs(lm, pairs, config.template), config.ablation,
                                 config.metric, config.batch_size)
    return {key: evaluator.evaluate(kept) for key, kept in kept_masks.items()}


GROUP_KEYS = ("faithfulness", "hit_at_10_model", "hit_at_10_circuit")


def _group_labels(groups: dict) -> dict[str, set]:
    """{"kind.rel": {subjects}, "bucket.high": {...}, ...} from subject -> {kind, bucket}."""
    out: dict[str, set] = {}
    for subject, tags in groups.items():
        for key, value in tags.items():
            if value is not None:
                out.setdefault(f"{key}.{value}", set()).add(subject)
    return dict(sorted(out.items()))


def recall_by_group(result, labels: dict[str, set]) -> dict:
    """recall.top1_accuracy.<group> and recall.hit_at_10.<group> from a recall result's records."""
    out = {}
    rows = result.records()
    for label, subjects in labels.items():
        ranks = [r["target_rank"] for r in rows if r["subject"] in subjects and r.get("target_rank") is not None]
        out[f"top1_accuracy.{label}"] = sum(r == 1 for r in ranks) / len(ranks) if ranks else None
        out[f"hit_at_10.{label}"] = sum(r <= 10 for r in ranks) / len(ranks) if ranks else None
    return out


# ---------------------------------------------------------------------------- the sweep

def _train_rows(run_dir: Path) -> list[dict]:
    from engramlab.runs import read_jsonl

    path = run_dir / "metrics.jsonl"
    rows = read_jsonl(path) if path.is_file() else []
    return sorted((r for r in rows if isinstance(r.get("step"), int)), key=lambda r: r["step"])


def train_at(rows: list[dict], step: int) -> dict:
    """The run's own evaluation at ``step``: the last metrics.jsonl row at or before it, as
    ``run.<key>`` (``run.step`` says which row; a per-layer list becomes ``run.<key>.L<layer>``)."""
    before = [r for r in rows if r["step"] <= step]
    if not before:
        return {}
    out = {}
    for k, v in before[-1].items():
        if "seconds" in k:
            continue
        if _scalar(v):
            out[f"run.{k}"] = v
        elif isinstance(v, list) and all(isinstance(x, (int, float)) for x in v):
            out.update({f"run.{k}.L{i}": x for i, x in enumerate(v)})
    return out


def evolve(run_dir: str | Path, out: str | Path, analyses: Sequence[str], facts, steps: Sequence[int], *,
           configs: dict | None = None, groups: dict | None = None, transplant: int = 0,
           phase_metric: str = "auto", dtype: str = "float32", device: str = "cpu",
           progress: bool = False, log: Callable[[str], None] = lambda line: None, executor=None) -> dict:
    """Run every analysis on every checkpoint in ``steps`` (see the module docstring) and compare
    them over time; returns the summary: ``n_checkpoints`` (analysed), ``n_skipped``, the run's
    plateau keys, the change points (``dynamics.compare``) and the last checkpoint's numbers.

    ``executor`` (``engramlab.scale.executor.Executor``): with Ray, every (checkpoint, analysis)
    not finished yet is first a task of its own (``evolve_unit``), writing the same result
    directory a local run writes; the comparisons then read those directories back. A unit that
    fails after its retries is listed in skipped.jsonl with the reason; the others finish."""
    from dataclasses import replace

    from engramlab.dynamics.compare import compare_over_time
    from engramlab.locate import get_locator
    from engramlab.locate.circuits.config import CircuitConfig
    from engramlab.progress import progress_bar
    from engramlab.runs import atomic_write_json, atomic_write_jsonl, load_json

    run_dir, out = Path(run_dir), Path(out)
    locators = [get_locator(name) for name in analyses]
    names = [loc.name for loc in locators]
    configs = dict(configs or {})
    models = Checkpoints(run_dir, dtype, device)
    steps = sorted(int(s) for s in steps)
    labels = _group_labels(groups) if groups else {}
    pairs_step = None
    if "circuit" in names:
        circuit_cfg = configs.get("circuit") or CircuitConfig()
        if circuit_cfg.pairs is None:  # the same pairs at every checkpoint, chosen on the final one
            pairs_step = freeze_pairs(models, facts, circuit_cfg, steps, out / "pairs.jsonl", log)
            circuit_cfg = replace(circuit_cfg, pairs=str(out / "pairs.jsonl"))
        configs["circuit"] = circuit_cfg
    train_rows = _train_rows(run_dir)
    remote = {}
    if executor is not None and not executor.is_local:
        remote = _run_units(executor, run_dir, out, names, steps, facts, configs, dtype, device, log)
    rows, skipped, results = [], [], {name: [] for name in names}
    for step in progress_bar(steps, "evolve", enabled=progress):
        row: dict = {"step": step}
        try:
            for loc in locators:
                result = _step_result(loc, step, out, models, facts, configs.get(loc.name), skipped, log,
                                      remote.get((step, loc.name)))
                if result is None:
                    continue
                results[loc.name].append((step, result))
                row.update({f"{loc.name}.{k}": v for k, v in result.summary().items()
                            if _scalar(v) and "seconds" not in k})
                if labels and loc.name == "recall":
                    row.update({f"recall.{k}": v for k, v in recall_by_group(result, labels).items()})
                if labels and loc.name == "circuit":
                    row.update(_circuit_groups(step, out, models, facts, configs["circuit"], result, labels))
        except _Unloadable as e:
            skipped.append({"step": step, "analysis": None, "reason": str(e)})
            log(f"step {step}: skipped ({e})")
            continue
        row.update(train_at(train_rows, step))
        rows.append(row)
    matrix = None
    if "circuit" in names and transplant and results["circuit"]:
        matrix = transplant_matrix(results["circuit"], transplant, out, models, facts, configs["circuit"], skipped,
                                   log, progress)
        atomic_write_json(out / "transplant.json", matrix)
    run_summary = load_json(run_dir / "summary.json", "run summary") if (run_dir / "summary.json").is_file() else {}
    summary = compare_over_time(rows, results, run_summary, phase_metric=phase_metric, transplant=matrix)
    atomic_write_jsonl(out / "evolution.jsonl", rows)
    atomic_write_jsonl(out / "skipped.jsonl", skipped)
    summary = {"n_checkpoints": len(rows), "n_skipped": sum(s["analysis"] is None for s in skipped),
               "n_skipped_analyses": sum(s["analysis"] is not None for s in skipped),
               "analyses": ",".join(names), "first_step": rows[0]["step"] if rows else None,
               "last_step": rows[-1]["step"] if rows else None, "pairs_step": pairs_step,
               "plateau_start_step": run_summary.get("plateau_start_step"),
               "plateau_end_step": run_summary.get("plateau_end_step"), **summary}
    if rows:
        summary.update({k: v for k, v in rows[-1].items() if k != "step" and not k.startswith("run.")})
    return summary


def _finished(out: Path, step: int, name: str) -> bool:
    final = out / STEP_DIR.format(step) / name
    return (final / "config.json").is_file() and (final / "summary.json").is_file()


def _step_result(loc, step: int, out: Path, models: Checkpoints, facts, config, skipped: list, log,
                 remote: dict | None = None):
    """The result of ``loc`` at ``step``: read back when finished earlier, else computed, saved
    under a temporary name and renamed into place. None when the locator refuses this checkpoint
    (listed in ``skipped``); ``_Unloadable`` when the checkpoint cannot be loaded. ``remote``: what
    the unit's task reported when it ran elsewhere (``evolve_unit``): its skips, or that the
    checkpoint could not be loaded, or that the unit failed."""
    final = out / STEP_DIR.format(step) / loc.name
    if _finished(out, step, loc.name):
        return loc.load(final)
    if remote is not None:
        if "unloadable" in remote:
            raise _Unloadable(remote["unloadable"])
        for row in remote.get("skipped", []):
            skipped.append(row)
            log(f"step {step}: {loc.name} skipped ({row['reason']})")
        if remote.get("skipped"):
            return None
        raise EngramError(f"evolve: the task of step {step} / {loc.name} finished, but {final} is not there; "
                          "with a Ray cluster, --out must be on a filesystem every worker shares")
    lm = models.load(step)
    tmp = final.with_name(f".{loc.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        result = loc.find(lm, facts, config, progress=False)
    except EngramError as e:  # this analysis cannot run on this checkpoint (e.g. no fact known yet)
        skipped.append({"step": step, "analysis": loc.name, "reason": _first_line(e)})
        log(f"step {step}: {loc.name} skipped ({_first_line(e)})")
        return None
    result.save(tmp)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)  # the directory appears complete or not at all
    return result


def evolve_unit(run_dir: str, out: str, step: int, name: str, facts, config, dtype: str, device: str) -> dict:
    """One (checkpoint, analysis) of an evolve, as a task runs it: the result directory written
    into ``out`` as ``evolve`` writes it; returns {"skipped": [rows]} or {"unloadable": reason}."""
    from engramlab.locate import get_locator

    skipped: list = []
    try:
        _step_result(get_locator(name), step, Path(out), Checkpoints(Path(run_dir), dtype, device), facts, config,
                     skipped, lambda line: None)
    except _Unloadable as e:
        return {"unloadable": str(e)}
    return {"skipped": skipped}


def _run_units(executor, run_dir: Path, out: Path, names: list, steps: list, facts, configs: dict, dtype: str,
               device: str, log) -> dict:
    """Every unfinished (step, analysis) through ``executor``; {(step, name): what it reported}."""
    from engramlab.scale.executor import Unit

    todo = [(step, name) for step in steps for name in names if not _finished(out, step, name)]
    if not todo:
        return {}
    units = [Unit(f"step-{step}.{name}", evolve_unit, (str(run_dir), str(out), step, name, facts, configs.get(name),
                                                        dtype, device)) for step, name in todo]
    log(f"evolve: {len(units)} units on {executor.config.executor}")
    got = {}
    for (step, name), o in zip(todo, executor.run(units)):
        if o.error is not None:
            log(f"step {step}: {name} {o.error}")
            got[(step, name)] = {"skipped": [{"step": step, "analysis": name, "reason": o.error}]}
        else:
            got[(step, name)] = o.value
    return got


def _circuit_groups(step: int, out: Path, models: Checkpoints, facts, config, result, labels: dict) -> dict:
    """circuit.<faithfulness|hit_at_10_model|hit_at_10_circuit>.<group>: the step's circuit on its
    model, per group of evaluation pairs; kept in OUT/step-N/groups.json (needs the model once)."""
    from engramlab.runs import atomic_write_json, load_json

    path = out / STEP_DIR.format(step) / "groups.json"
    if path.is_file():
        return load_json(path, "group numbers")
    lm = models.load(step)
    pairs = _evaluation_pairs(lm, facts, config, Path(config.pairs))
    got = {}
    for label, subjects in labels.items():
        mine = [p for p in pairs if p.fact.subject in subjects]
        ev = circuit_on(lm, {"own": result.kept}, mine, config).get("own", {})
        got.update({f"circuit.{k}.{label}": ev.get(k) for k in GROUP_KEYS})
    atomic_write_json(path, got)
    return got


def transplant_matrix(circuits: list, n: int, out: Path, models: Checkpoints, facts, config, skipped: list,
                      log, progress: bool = False) -> dict:
    """The circuit of step s run on the model of step t, for ``n`` checkpoints spread evenly in log
    step (``select_steps("log:n")``; the last always in): {"steps", "faithfulness"[s][t],
    "hit_at_10_circuit"[s][t]}. The diagonal is each checkpoint's own held-out evaluation. Each
    model's row is kept in OUT/transplant/step-N.json, so an interrupted sweep resumes."""
    from engramlab.progress import progress_bar
    from engramlab.runs import atomic_write_json, load_json

    by_step = dict(circuits)
    chosen = select_steps(f"log:{n}", list(by_step))
    grid = {"faithfulness": {}, "hit_at_10_circuit": {}}
    for t in progress_bar(chosen, "transplant", enabled=progress):
        path = out / "transplant" / f"{STEP_DIR.format(t)}.json"
        if path.is_file():
            got = load_json(path, "transplant row")
        else:
            try:
                lm = models.load(t)
            except _Unloadable as e:
                skipped.append({"step": t, "analysis": "transplant", "reason": str(e)})
                continue
            pairs = _evaluation_pairs(lm, facts, config, Path(config.pairs))
            evaluated = circuit_on(lm, {str(s): by_step[s].kept for s in chosen}, pairs, config)
            got = {s: {k: ev[k] for k in grid} for s, ev in evaluated.items()}
            atomic_write_json(path, got)
        for s in chosen:
            for k in grid:
                grid[k][(s, t)] = got.get(str(s), {}).get(k)
    return {"steps": chosen, "rows": "circuit of step s (row)", "columns": "model of step t (column)",
            **{k: [[grid[k].get((s, t)) for t in chosen] for s in chosen] for k in grid}}


__all__ = ["CHECKPOINT_GRAMMAR", "Checkpoints", "circuit_on", "evolve", "evolve_unit", "freeze_pairs",
           "recall_by_group", "select_steps", "train_at", "transplant_matrix", "world_facts"]
