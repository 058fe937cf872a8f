"""Run directories: manifest, summary, artifacts - every file written atomically.

Each command that produces results writes into ``--out DIR``::

    DIR/manifest.json   command, full config, versions, seed, start/end time, status
    DIR/summary.json    a flat JSON object of headline numbers
    DIR/...             the command's artifacts

A file is written to a temporary name in the same directory and renamed over its target, so an
interrupted command never leaves a half-written file that looks complete: readers see the old
version or the new one. ``manifest.json`` carries ``status`` ("running", "complete", "failed").
"""

from __future__ import annotations

import json
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

from engramlab.errors import EngramError


# -- atomic writes ----------------------------------------------------------------------------
def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write via a temp file in the same directory + os.replace: readers see the old file or the
    new one, never half of one. Keeps an existing file's permissions (mkstemp makes 0600)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise EngramError(f"{path}: cannot write ({err.strerror}); check the directory") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException as err:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(err, OSError):
            raise EngramError(f"{path}: cannot write ({err.strerror}); check disk space and permissions") from None
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def to_json(obj: Any) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False, default=_json_default) + "\n"


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, to_json(obj))


def atomic_write_jsonl(path: str | Path, rows: Iterable[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False, default=_json_default) + "\n" for r in rows))


def append_jsonl(path: str | Path, row: dict) -> None:
    """Append one line (for logs such as metrics.jsonl; a torn last line is dropped on read)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row, ensure_ascii=False, default=_json_default) + "\n")
        f.flush()


def read_jsonl(path: str | Path) -> list[dict]:
    """Read a JSONL log, ignoring a torn final line left by an interrupted append."""
    rows = []
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise EngramError(f"{path} line {i + 1}: not valid JSON; the file is damaged, re-run the command")
    return rows


@contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Build a directory under a temporary name; it appears at ``path`` only when complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _json_default(o):
    try:
        import numpy as np
        import torch
    except ImportError:  # pragma: no cover
        np = torch = None
    if np is not None and isinstance(o, np.generic):
        return o.item()
    if np is not None and isinstance(o, np.ndarray):
        return o.tolist()
    if torch is not None and isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, (set, tuple)):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


# -- reproducibility ----------------------------------------------------------------------------
def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in ("engramlab", "torch", "transformers", "numpy", "scipy", "tokenizers", "safetensors", "gguf"):
        try:
            from importlib.metadata import version

            out[name] = version(name)
        except Exception:
            out[name] = "not installed"
    return out


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


# -- the run directory ------------------------------------------------------------------------
class RunDir:
    """A command's output directory.

    >>> with RunDir(out, command="recall", config=cfg, seed=0) as run:
    ...     run.write_jsonl("facts.jsonl", rows)
    ...     run.finish({"top1_accuracy": 0.67})
    """

    def __init__(self, path: str | Path, command: str, config: dict, seed: int | None = None,
                 argv: list[str] | None = None):
        self.path = Path(path)
        self.command = command
        self.config = config
        self.seed = seed
        self.argv = list(sys.argv if argv is None else argv)
        self.started = _now()
        self._t0 = time.time()
        self.summary: dict | None = None

    def __enter__(self) -> "RunDir":
        if self.path.exists() and not self.path.is_dir():
            raise EngramError(f"--out {self.path}: exists and is not a directory; choose another path")
        self.path.mkdir(parents=True, exist_ok=True)
        self._write_manifest("running")
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            if self.summary is None:
                self.finish({})
            return
        status = "interrupted" if exc_type is KeyboardInterrupt else "failed"
        self._write_manifest(status, error=" ".join(str(exc).split()) or exc_type.__name__)

    def file(self, name: str) -> Path:
        return self.path / name

    def write_json(self, name: str, obj: Any) -> Path:
        atomic_write_json(self.file(name), obj)
        return self.file(name)

    def write_jsonl(self, name: str, rows: Iterable[dict]) -> Path:
        atomic_write_jsonl(self.file(name), rows)
        return self.file(name)

    def finish(self, summary: dict) -> None:
        """Write ``summary.json`` (flat: nested dicts are flattened with dots) and close the manifest."""
        self.summary = flatten(summary)
        self.summary.setdefault("wall_seconds", round(time.time() - self._t0, 3))
        atomic_write_json(self.file("summary.json"), self.summary)
        self._write_manifest("complete")

    def _write_manifest(self, status: str, error: str | None = None) -> None:
        manifest = {
            "command": self.command,
            "argv": self.argv,
            "config": self.config,
            "seed": self.seed,
            "versions": versions(),
            "start_time": self.started,
            "end_time": None if status == "running" else _now(),
            "status": status,
        }
        if error:
            manifest["error"] = error
        atomic_write_json(self.file("manifest.json"), manifest)


def flatten(d: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}: summary.json stays a flat object that scripts can read."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def load_json(path: str | Path, what: str = "file") -> Any:
    """Read JSON with a one-line error naming the file."""
    path = Path(path)
    if not path.is_file():
        raise EngramError(f"{path}: {what} not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise EngramError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}); "
                          f"the {what} is damaged, re-create it") from e
