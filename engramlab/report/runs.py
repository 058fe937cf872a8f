"""The run directories a report is made from.

``collect(dir)`` gives the :class:`RunView` of every run under ``dir``: a single verb's run
directory is one run; a study or ``engram continual`` directory (a manifest whose config lists
``stages``) is its stages, in stage order (nested studies expanded), followed by itself. Paths a
run recorded (``--world``, ``--run``, ``--init``) are absolute at run time; :meth:`Report.find`
also finds them after the study directory was moved, by the stage name they end in.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from engramlab.errors import EngramError


@dataclass
class RunView:
    """One run directory: ``name`` is its stage name (or the directory's name)."""

    name: str
    path: Path
    manifest: dict
    summary: dict

    @property
    def command(self) -> str:
        return str(self.manifest.get("command") or "")

    @property
    def config(self) -> dict:
        c = self.manifest.get("config")
        return c if isinstance(c, dict) else {}

    def json(self, name: str, default=None):
        p = self.path / name
        if not p.is_file():
            return default
        return json.loads(p.read_text())

    def jsonl(self, name: str) -> list[dict]:
        from engramlab.runs import read_jsonl

        p = self.path / name
        return read_jsonl(p) if p.is_file() else []

    def has(self, name: str) -> bool:
        return (self.path / name).exists()


@dataclass
class Report:
    """Everything a section renderer may look at: the runs, and a way to follow their references."""

    root: Path
    runs: list[RunView] = field(default_factory=list)

    def of(self, *commands: str) -> list[RunView]:
        return [r for r in self.runs if r.command in commands]

    def find(self, recorded) -> RunView | None:
        """The collected run a recorded path points to (itself, or after a move the run with the same
        directory name), or None (a pretrained model spec, a path outside the study)."""
        if not recorded:
            return None
        p = Path(str(recorded))
        if not p.exists() and ":" in p.name:  # RUN:STEP (a checkpoint of a run)
            p = p.with_name(p.name.rsplit(":", 1)[0])
        for r in self.runs:
            try:
                if p.exists() and p.resolve() == r.path.resolve():
                    return r
            except OSError:
                pass
        for r in self.runs:
            if p.name and r.path.name == p.name:
                return r
        return None

    def follow(self, recorded) -> RunView | None:
        """:meth:`find`, else the recorded directory itself when it is a run that still exists
        (``engram report`` on one run of a study), else None."""
        found = self.find(recorded)
        if found is not None or not recorded:
            return found
        p = Path(str(recorded))
        try:
            return _view(p, p.name)
        except EngramError:  # an unreadable directory is as good as a missing one here
            return None

    def world_kind(self, run: RunView) -> str:
        """``kind`` of a training run's world (``bio``, ``continual``); "" when it cannot be read."""
        world = self.follow(run.config.get("world"))
        header = world.json("world.json") if world is not None else None
        if header is None and run.config.get("world"):  # a world directory without a manifest
            p = Path(str(run.config["world"])) / "world.json"
            try:
                header = json.loads(p.read_text()) if p.is_file() else None
            except (OSError, ValueError):
                header = None
        cfg = header.get("config") if isinstance(header, dict) else None
        return str(cfg.get("kind", "")) if isinstance(cfg, dict) else ""


def _view(path: Path, name: str) -> RunView | None:
    from engramlab.runs import load_json

    manifest = path / "manifest.json"
    if not manifest.is_file():
        return None
    m = load_json(manifest, f"{path.name} manifest")
    summary = path / "summary.json"
    s = load_json(summary, f"{path.name} summary") if summary.is_file() else {}
    return RunView(name=name, path=path, manifest=m if isinstance(m, dict) else {}, summary=s if isinstance(s, dict) else {})


def _expand(view: RunView, out: list[RunView], depth: int = 0) -> None:
    stages = view.config.get("stages") if depth < 4 else None
    if isinstance(stages, list):
        for st in stages:
            name = st.get("name") if isinstance(st, dict) else None
            if name:
                child = _view(view.path / name, name)
                if child is not None:
                    _expand(child, out, depth + 1)
    out.append(view)


def collect(directory: str | Path) -> Report:
    """The runs under ``directory``; an error naming it when it holds no run."""
    root = Path(directory)
    if not root.is_dir():
        raise EngramError(f"{root}: no such directory; give a run directory (an engram command's --out)")
    view = _view(root, root.name)
    if view is None:
        raise EngramError(f"{root}: not a run directory (no manifest.json); give the --out of an engram command "
                          "or of engram study")
    runs: list[RunView] = []
    _expand(view, runs)
    return Report(root=root, runs=runs)


__all__ = ["Report", "RunView", "collect"]
