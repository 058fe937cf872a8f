"""Run a study's stages: each one an ``engram`` command writing its own run directory.

A stage is (name, command line). ``run_stages(stages, root)`` runs ``engram <command> --out
ROOT/<name>`` for each, in order, in this process. A stage whose run directory is ``complete`` and
was made by the same command line is skipped, so an interrupted study resumes at the first
unfinished stage: an interrupted ``train`` continues from its last checkpoint (``--resume``), an
``evolve`` from its finished checkpoints, anything else starts again. A complete stage made with
other settings is an error (the study's later stages were built on it).
"""

from __future__ import annotations

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


def _same(a: list[str], b: list[str]) -> bool:
    return [w for w in a if w not in _RESTART_FLAGS] == [w for w in b if w not in _RESTART_FLAGS]


def stage_state(stage: Stage, root: Path) -> str:
    """new | complete | unfinished | other (complete, but made by another command line)."""
    from engramlab.runs import load_json

    manifest = root / stage.name / "manifest.json"
    if not manifest.is_file():
        return "new"
    m = load_json(manifest, f"stage {stage.name} manifest")
    if m.get("status") != "complete":
        return "unfinished"
    return "complete" if _same(list(m.get("argv") or [])[1:], stage.argv(root)) else "other"


def run_stages(stages: list[Stage], root: str | Path, log: Callable[[str], None] = lambda line: None) -> dict:
    """Run (or skip, when finished) every stage; returns {stage name: its summary.json}."""
    from engramlab.cli import app
    from engramlab.runs import Terminated, load_json

    root = Path(root)
    summaries = {}
    for stage in stages:
        argv, state = stage.argv(root), stage_state(stage, root)
        if state == "other":
            raise EngramError(f"{root / stage.name}: stage {stage.name} was run with another command line; "
                              "pass --overwrite to run the study again, or choose another --out")
        if state == "complete":
            log(f"{stage.name}: done earlier, kept")
        else:
            if state == "unfinished":
                verb = argv[0]
                has_ckpt = (root / stage.name / "checkpoints").is_dir()
                argv = argv + (["--resume"] if verb == "train" and has_ckpt else [] if verb == "evolve"
                               else ["--overwrite"])
            log(f"{stage.name}: engram {' '.join(argv)}")
            saved, sys.argv = sys.argv, ["engram", *argv]  # the stage's manifest records its own command
            try:
                code = app(args=argv, prog_name="engram", standalone_mode=False)
            finally:
                sys.argv = saved
            if code == 130:
                raise KeyboardInterrupt
            if code == 143:
                raise Terminated("SIGTERM")
            if code not in (None, 0):
                raise EngramError(f"stage {stage.name} (engram {' '.join(argv)}) failed (exit {code}, message "
                                  "above); fix it and run the study again: finished stages are kept")
        summary = root / stage.name / "summary.json"
        summaries[stage.name] = load_json(summary, f"stage {stage.name} summary") if summary.is_file() else {}
    return summaries


__all__ = ["Stage", "run_stages", "stage_state"]
