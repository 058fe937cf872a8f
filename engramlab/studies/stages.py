"""Run a study's stages: each one an ``engram`` command writing its own run directory.

A stage is (name, command line). ``run_stages(stages, root)`` runs ``engram <command> --out
ROOT/<name>`` for each, in order, in this process. A stage whose run directory is ``complete`` and
was made by the same command line is skipped, so an interrupted study resumes at the first
unfinished stage: an interrupted ``train`` continues from its last checkpoint (``--resume``), an
``evolve`` from its finished checkpoints, a ``sweep`` from its finished runs, anything else starts
again (as does an unfinished stage whose command line has changed since). A complete stage made with
other settings is an error (the study's later stages were built on it).
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from engramlab.errors import EngramError

#: Flags that say how to (re)start a run, not what it computes.
_RESTART_FLAGS = ("--resume", "--overwrite")


@dataclass(frozen=True)
class Stage:
    """``command``: an engram command line without ``engram`` and ``--out``; ``{root}`` stands
    for the study directory (``--world {root}/world-a``)."""

    name: str
    command: str

    def argv(self, root: Path) -> list[str]:
        try:
            words = shlex.split(self.command.format(root=root))
        except (ValueError, KeyError, IndexError) as e:
            raise EngramError(f"stage {self.name!r}: cannot read its command {self.command!r} ({e}); "
                              "write it as an engram command line, {root} for the study directory") from None
        if not words:
            raise EngramError(f"stage {self.name!r}: empty command; give an engram command line")
        if "--out" in words:
            raise EngramError(f"stage {self.name!r}: drop --out from its command (a stage writes to "
                              f"STUDY/{self.name})")
        return words + ["--out", str(root / self.name)]


#: The keys a study file may hold: per preset table, and per stage.
PRESET_KEYS = ("description", "stages")
STAGE_KEYS = ("name", "command")


def load_study_file(path: str | Path, example: str) -> dict[str, dict]:
    """{preset: {"description", "stages": [Stage]}} from a study file: one TOML table per preset with
    ``description`` and ``stages = [{name, command}, ...]``. ``example`` names the packaged file
    of that shape, for the errors. An unknown key is an error naming it and the valid ones."""
    import tomllib

    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise EngramError(f"--config {path}: no such file; give a study file like {example}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise EngramError(f"--config {path}: not valid TOML ({e}); see {example} for the shape") from None
    presets = {}
    for name, table in data.items():
        if not isinstance(table, dict):
            raise EngramError(f"{path}: {name} = ... is not a preset table; write [{name}] with "
                              f"{' and '.join(PRESET_KEYS)}")
        unknown = sorted(set(table) - set(PRESET_KEYS))
        if unknown:
            raise EngramError(f"{path}: [{name}] has unknown key {unknown[0]!r}; valid keys: {', '.join(PRESET_KEYS)}")
        stages = table.get("stages")
        if not isinstance(stages, list) or not stages:
            raise EngramError(f"{path}: preset [{name}] needs stages = [{{name = ..., command = ...}}, ...]")
        out = []
        for i, s in enumerate(stages):
            if isinstance(s, dict) and set(s) - set(STAGE_KEYS):
                bad = sorted(set(s) - set(STAGE_KEYS))[0]
                raise EngramError(f"{path}: [{name}] stage {i + 1}: unknown key {bad!r}; valid keys: "
                                  f"{', '.join(STAGE_KEYS)}")
            if not isinstance(s, dict) or not isinstance(s.get("name"), str) or not isinstance(s.get("command"), str):
                raise EngramError(f"{path}: [{name}] stage {i + 1}: give name = \"...\" and command = \"...\"")
            if not s["name"] or "/" in s["name"] or s["name"].startswith("."):
                raise EngramError(f"{path}: [{name}] stage {i + 1}: name {s['name']!r} must be a plain directory "
                                  "name (no '/', not starting with '.')")
            out.append(Stage(s["name"], s["command"]))
        if len({s.name for s in out}) != len(out):
            raise EngramError(f"{path}: [{name}] has two stages with the same name; names are directories")
        presets[name] = {"description": str(table.get("description", "")).strip(), "stages": out}
    return presets


def choose_preset(presets: dict, preset: str, source: str) -> list["Stage"]:
    """The stages of ``preset``; an unknown one is an error listing the file's presets."""
    if preset not in presets:
        raise EngramError(f"--preset {preset!r}: unknown; {source} has {', '.join(presets)}")
    return presets[preset]["stages"]


def _same(a: list[str], b: list[str]) -> bool:
    return [w for w in a if w not in _RESTART_FLAGS] == [w for w in b if w not in _RESTART_FLAGS]


#: Verbs that pick up where an unfinished run of theirs stopped when simply run again.
RESUME_BY_RERUN = ("evolve", "sweep", "continual", "study")


def _restart_flags(stage: Stage, root: Path, argv: list[str]) -> list[str]:
    """How to restart an unfinished stage: ``train`` from its last checkpoint that kept the
    optimizer state (a kill before the first one leaves only step 0's weights: start again),
    ``freeze`` with --resume (its finished arms kept), verbs that resume by being run again as they
    are, anything else afresh. An unfinished run of
    an older command line is started afresh (only a verb with --overwrite can be)."""
    verb = argv[0]
    if not _same(_recorded_argv(stage, root), argv):
        return [] if verb == "sweep" else ["--overwrite"]  # a sweep retrains the runs whose config differs
    if verb in RESUME_BY_RERUN:
        return []  # they redo only what is missing
    if verb == "train" and any((root / stage.name / "checkpoints").glob("step-*/optimizer.pt")):
        return ["--resume"]
    if verb == "freeze":  # finished arms are kept, an unfinished one continues from its checkpoint
        return ["--resume"]
    return ["--overwrite"]


def _recorded_argv(stage: Stage, root: Path) -> list[str]:
    from engramlab.runs import load_json

    m = load_json(root / stage.name / "manifest.json", f"stage {stage.name} manifest")
    return list(m.get("argv") or [])[1:]


def stage_state(stage: Stage, root: Path) -> str:
    """new | complete | unfinished | other (complete, but made by another command line)."""
    from engramlab.runs import load_json

    manifest = root / stage.name / "manifest.json"
    if not manifest.is_file():
        return "new"
    if load_json(manifest, f"stage {stage.name} manifest").get("status") != "complete":
        return "unfinished"
    return "complete" if _same(_recorded_argv(stage, root), stage.argv(root)) else "other"


@contextlib.contextmanager
def _silenced(quiet: bool):
    """While a stage runs under ``--quiet``: its stdout (tables, summaries) dropped, no progress bars
    or log lines (``ENGRAM_QUIET``); errors and warnings still reach stderr."""
    if not quiet:
        yield
        return
    saved = os.environ.get("ENGRAM_QUIET")
    os.environ["ENGRAM_QUIET"] = "1"
    try:
        with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
            yield
    finally:
        if saved is None:
            os.environ.pop("ENGRAM_QUIET", None)
        else:
            os.environ["ENGRAM_QUIET"] = saved


def _run_command(argv: list[str], quiet: bool):
    """``engram ARGV`` in this process; its exit code (None or 0: success)."""
    from engramlab.cli import app

    saved, sys.argv = sys.argv, ["engram", *argv]  # the stage's manifest records its own command
    try:
        with _silenced(quiet):
            return app(args=argv, prog_name="engram", standalone_mode=False)
    finally:
        sys.argv = saved


def stage_unit(stage: Stage, root: str, quiet: bool) -> None:
    """One stage as an executor's task runs it; a failing command is an ``EngramError``. How to
    restart is decided here, when the task starts: a retried task finds what its killed run left."""
    root = Path(root)
    argv = stage.argv(root)
    if stage_state(stage, root) == "unfinished":
        argv = argv + _restart_flags(stage, root, argv)
    code = _run_command(argv, quiet)
    if code not in (None, 0):
        raise EngramError(f"stage {stage.name} (engram {' '.join(argv)}) failed (exit {code})")


def depends_on(stage: Stage, earlier: list[Stage]) -> tuple[str, ...]:
    """The earlier stages whose directories ``stage``'s command names (``{root}/NAME``...): it can
    start once they are finished. Paths are a study's only coupling between stages."""
    named = set(re.findall(r"\{root\}/([^/\s:,'\"=]+)", stage.command))
    return tuple(s.name for s in earlier if s.name in named)


def run_stages(stages: list[Stage], root: str | Path, log: Callable[[str], None] = lambda line: None,
               quiet: bool = False, done: Callable[[Stage, bool], None] | None = None, executor=None) -> dict:
    """Run (or skip, when finished) every stage; returns {stage name: its summary.json}.
    ``log`` gets a line as each stage starts; ``done(stage, kept)`` is called as each one is
    finished (``kept``: it was finished before); ``quiet`` silences the stages themselves.

    ``executor`` (``engramlab.scale.executor.Executor``) with Ray: each unfinished stage is a task,
    started once the stages it names (``depends_on``) are finished, so independent stages run at
    the same time; a failed stage (after its retries) stops only the stages that need it, and the
    study fails at the end naming it."""
    from engramlab.runs import Terminated, load_json

    root = Path(root)
    plans = []
    for index, stage in enumerate(stages):
        argv, state = stage.argv(root), stage_state(stage, root)
        if state == "other":
            raise EngramError(f"{root / stage.name}: stage {stage.name} was run with another command line; "
                              "pass --overwrite to run the study again, or choose another --out")
        if state == "unfinished":
            argv = argv + _restart_flags(stage, root, argv)
        plans.append((index, stage, argv, state))
    if executor is not None and not executor.is_local:
        _run_parallel(plans, root, executor, log, quiet, done)
    else:
        for index, stage, argv, state in plans:
            if state == "complete":
                log(f"[{index + 1}/{len(stages)}] {stage.name}: done earlier, kept")
            else:
                log(f"[{index + 1}/{len(stages)}] {stage.name}: engram {' '.join(argv)}")
                code = _run_command(argv, quiet)
                if code == 130:
                    raise KeyboardInterrupt
                if code == 143:
                    raise Terminated("SIGTERM")
                if code not in (None, 0):
                    raise EngramError(f"stage {stage.name} (engram {' '.join(argv)}) failed (exit {code}, message "
                                      "above); fix it and run the study again: finished stages are kept")
            if done is not None:
                done(stage, state == "complete")
    summaries = {}
    for stage in stages:
        summary = root / stage.name / "summary.json"
        summaries[stage.name] = load_json(summary, f"stage {stage.name} summary") if summary.is_file() else {}
    return summaries


def _run_parallel(plans: list, root: Path, executor, log, quiet: bool, done) -> None:
    from engramlab.scale.executor import Unit

    n, by_name, units, to_run = len(plans), {}, [], set()
    for index, stage, argv, state in plans:
        by_name[stage.name] = stage
        if state == "complete":
            log(f"[{index + 1}/{n}] {stage.name}: done earlier, kept")
            if done is not None:
                done(stage, True)
            continue
        waits = tuple(d for d in depends_on(stage, [p[1] for p in plans[:index]]) if d in to_run)  # not finished yet
        log(f"[{index + 1}/{n}] {stage.name}: engram {' '.join(argv)}"
            + (f" (after {', '.join(waits)})" if waits else ""))
        units.append(Unit(stage.name, stage_unit, (stage, str(root), quiet), after=waits))
        to_run.add(stage.name)

    def finished(o) -> None:
        if o.error is None and done is not None:
            done(by_name[o.key], False)
        elif o.error is not None:
            log(f"{o.key}: {o.error}")

    failed = [o for o in executor.run(units, done=finished) if o.error is not None]
    if failed:
        raise EngramError(f"{len(failed)} stage(s) did not finish: " + "; ".join(f"{o.key} ({o.error})" for o in failed)
                          + "; fix it and run the study again: finished stages are kept")


__all__ = ["PRESET_KEYS", "RESUME_BY_RERUN", "STAGE_KEYS", "Stage", "choose_preset", "depends_on", "load_study_file",
           "run_stages", "stage_state", "stage_unit"]
