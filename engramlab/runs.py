"""Run directories: manifest, summary, artifacts - every file written atomically.

Each command that produces results writes into ``--out DIR``::

    DIR/manifest.json   command, full config, versions, seed, start/end time, status, pid, host
    DIR/summary.json    a flat JSON object of headline numbers
    DIR/...             the command's artifacts
    DIR/.lock           held (flock) by the one process writing the run

A file is written to a temporary name in the same directory and renamed over its target, so an
interrupted command never leaves a half-written file that looks complete: readers see the old
version or the new one. ``manifest.json`` carries ``status`` ("running", "complete", "failed",
"interrupted") and, while running, a ``heartbeat`` time refreshed every ``HEARTBEAT_SECONDS``.

A run directory belongs to one run: the command holds an exclusive lock on it for its whole life
(a second process on the same ``--out`` is refused at once), and it does not write into a
directory that holds another command's run or a complete run of its own command unless told to
(``mode="overwrite"`` clears it, ``mode="resume"`` continues it).
"""

from __future__ import annotations

import errno
import fcntl
import functools
import hashlib
import json
import os
import platform
import random
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

from engramlab.errors import EngramError


# -- atomic writes ----------------------------------------------------------------------------
def _current_umask() -> int:
    # os.umask can only be read by setting it; put it straight back.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def new_file_mode() -> int:
    """What ``open()`` would give a new file under the user's umask (mkstemp always makes 0600)."""
    return 0o666 & ~_current_umask()


def new_dir_mode() -> int:
    """What ``mkdir`` would give a new directory under the user's umask (mkdtemp makes 0700)."""
    return 0o777 & ~_current_umask()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write via a temp file in the same directory + os.replace: readers see the old file or the
    new one, never half of one. Keeps an existing file's permissions (mkstemp makes 0600)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        mode = path.stat().st_mode & 0o777 if path.exists() else new_file_mode()
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
    """Build a directory under a temporary name; it appears at ``path`` only when complete.

    The temporary name is ``.NAME.*.tmp`` next to ``path``; ``remove_orphans`` deletes the ones a
    killed process left behind."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        os.chmod(tmp, new_dir_mode())
    except OSError as err:
        raise EngramError(f"{path}: cannot create ({err.strerror}); check the directory's permissions "
                          f"and free space") from None
    try:
        yield tmp
        try:
            if path.exists():
                shutil.rmtree(path)
            os.replace(tmp, path)
        except OSError as err:
            raise EngramError(f"{path}: cannot write ({err.strerror}); check disk space and permissions") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def remove_orphans(root: str | Path) -> list[Path]:
    """Delete ``.NAME.*.tmp`` files and directories under ``root`` left by killed atomic writes.

    Only call this while holding ``root``'s run lock (no live writer). Sub-directories that are run
    directories of their own (they hold a manifest.json) are left to their own run."""
    removed = []
    root = Path(root)
    for entry in sorted(root.iterdir()) if root.is_dir() else []:
        if entry.name.startswith(".") and entry.name.endswith(".tmp"):
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
            removed.append(entry)
        elif entry.is_dir() and not entry.is_symlink() and not (entry / "manifest.json").exists():
            removed += remove_orphans(entry)
    return removed


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
    return dict(_versions())


@functools.lru_cache(maxsize=1)
def _versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in ("engramlab", "torch", "transformers", "numpy", "scipy", "tokenizers", "safetensors", "gguf"):
        try:
            from importlib.metadata import version

            out[name] = version(name)
        except Exception:
            out[name] = "not installed"
    return out


#: How manifests write times (``start_time``, ``end_time``, ``heartbeat``).
TIME_FORMAT = "%Y-%m-%dT%H:%M:%S%z"


def _now() -> str:
    return time.strftime(TIME_FORMAT)


def wall_seconds(manifest: dict) -> float | None:
    """A run's wall time from its manifest's start and end time (None while unfinished)."""
    from datetime import datetime

    try:
        return (datetime.strptime(manifest["end_time"], TIME_FORMAT)
                - datetime.strptime(manifest["start_time"], TIME_FORMAT)).total_seconds()
    except (KeyError, TypeError, ValueError):
        return None


# -- the run directory ------------------------------------------------------------------------
#: How often a running command refreshes ``heartbeat`` in its manifest (seconds).
HEARTBEAT_SECONDS = 30.0
#: What ``RunDir`` may do with a directory that already holds something.
MODES = ("new", "overwrite", "resume", "continue")
LOCK_NAME = ".lock"


class Terminated(KeyboardInterrupt):
    """SIGTERM (timeout, Slurm, systemd, docker stop), handled like Ctrl-C: the run is
    ``interrupted`` and can be resumed."""


def _raise_terminated(signum, frame):
    raise Terminated("terminated (SIGTERM)")


class RunDir:
    """A command's output directory, owned by one process for the command's whole life.

    >>> with RunDir(out, command="recall", config=cfg, seed=0) as run:
    ...     run.write_jsonl("facts.jsonl", rows)
    ...     run.finish({"top1_accuracy": 0.67})

    ``mode`` says what to do with a directory that already holds a run:

    - ``new`` (default): an empty or missing directory is used; a failed or interrupted run of the
      same command is cleared and started again, unless it holds checkpoints (then use resume or
      overwrite); another command's run, a complete run, or files that are no run are refused.
    - ``overwrite``: clear a previous run (or an empty directory) and start again.
    - ``resume``: continue the run of the same command found there (it must exist). A complete
      run is left as it is: ``already_complete`` is then True and ``summary`` holds its summary,
      and the command should do nothing.
    - ``continue``: keep whatever a run of the same command left (sweeps, which skip their
      finished units themselves).
    """

    def __init__(self, path: str | Path, command: str, config: dict, seed: int | None = None,
                 argv: list[str] | None = None, mode: str = "new", inputs: dict | None = None):
        if mode not in MODES:
            raise ValueError(f"RunDir mode {mode!r}: one of {MODES}")
        self.path = Path(path)
        self.command = command
        self.config = config
        self.seed = seed
        self.mode = mode
        self.inputs = inputs  # fingerprints of the input files (checked on resume)
        self.argv = list(sys.argv if argv is None else argv)
        self.started = _now()
        self._t0 = time.time()
        self.summary: dict | None = None
        self.already_complete = False
        self.previous: dict | None = None  # the manifest found on entry, if any
        self._lock_fd: int | None = None
        self._manifest_lock = threading.Lock()
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None
        self._old_sigterm = None
        self._status = "running"

    # -- entering: create, lock, check ownership ------------------------------------------------
    def __enter__(self) -> "RunDir":
        if self.path.exists() and not self.path.is_dir():
            raise EngramError(f"--out {self.path}: exists and is not a directory; choose another path")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise EngramError(f"--out {self.path}: cannot create the directory ({err.strerror}); "
                              f"choose a writable path") from None
        self._lock()
        try:
            self._claim()
            if self.already_complete:
                return self
            remove_orphans(self.path)
            self._write_manifest("running")
        except BaseException:
            self._unlock()
            raise
        if threading.current_thread() is threading.main_thread():
            self._old_sigterm = signal.signal(signal.SIGTERM, _raise_terminated)
        self._beat = threading.Thread(target=self._heartbeat, name=f"heartbeat {self.path.name}", daemon=True)
        self._beat.start()
        return self

    def _lock(self) -> None:
        lock_path = self.path / LOCK_NAME
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, new_file_mode())
        except OSError as err:
            raise EngramError(f"--out {self.path}: cannot create {LOCK_NAME} ({err.strerror}); "
                              f"choose a writable path") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "unknown process"
            os.close(fd)
            if err.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise EngramError(f"--out {self.path}: in use by another engram run ({holder}); wait for it "
                                  f"to end or choose another --out") from None
            raise EngramError(f"--out {self.path}: cannot lock ({err.strerror}); use a local directory") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode(), 0)
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing releases the flock
            self._lock_fd = None

    def _claim(self) -> None:
        """Decide, under the lock, whether this run may use what the directory holds."""
        here = [p for p in self.path.iterdir() if p.name != LOCK_NAME]
        manifest_path = self.path / "manifest.json"
        previous = None
        if manifest_path.is_file():
            try:
                previous = json.loads(manifest_path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                previous = {"command": "?", "status": "damaged"}
        self.previous = previous
        where = f"--out {self.path}"
        if not here:
            if self.mode == "resume":
                raise EngramError(f"{where}: no run to resume there; start it without --resume")
            return
        if previous is None:
            raise EngramError(f"{where}: holds files but no engram run (no manifest.json); choose an empty or "
                              f"new directory")
        command, status = previous.get("command"), previous.get("status")
        if self.mode == "overwrite":
            self._clear(here)
            return
        if command != self.command:
            raise EngramError(f"{where}: holds a run of `engram {command}`, not {self.command}; choose another "
                              f"--out, or pass --overwrite to replace it")
        if self.mode == "resume":
            self._check_inputs(previous.get("inputs") or {})
            if status == "complete":
                self.already_complete = True
                summary = self.path / "summary.json"
                self.summary = json.loads(summary.read_text(encoding="utf-8")) if summary.is_file() else {}
        elif self.mode == "new":
            if status == "complete":
                raise EngramError(f"{where}: holds a complete {command} run; choose another --out, or pass "
                                  f"--overwrite to replace it")
            if any((self.path / "checkpoints").glob("step-*")):
                raise EngramError(f"{where}: holds an unfinished {command} run with checkpoints ({status}); pass "
                                  f"--resume to continue it or --overwrite to start again")
            self._clear(here)
        # "continue": keep everything; the command skips what is done.

    def _check_inputs(self, saved: dict) -> None:
        for key, value in (self.inputs or {}).items():
            if key in saved and saved[key] != value:
                raise EngramError(f"--resume: {self.path} was started on other input ({key} differs: the files "
                                  f"changed since); resuming would mix two inputs - restore them or start a new run")

    def _clear(self, entries: list[Path]) -> None:
        for entry in entries:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink(missing_ok=True)

    # -- while running ------------------------------------------------------------------------
    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                self._write_manifest("running", only_if_running=True)
            except EngramError:
                pass  # a full disk shows up in the main thread's own writes

    # -- leaving ---------------------------------------------------------------------------------
    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if self.already_complete:
                return
            self._stop.set()
            if self._beat is not None:
                self._beat.join()
            if exc_type is None:
                if self._status != "complete":
                    self.finish(self.summary or {})
                return
            status = "interrupted" if issubclass(exc_type, KeyboardInterrupt) else "failed"
            reason = " ".join(str(exc).split()) or exc_type.__name__
            try:
                self._write_manifest(status, error=reason)
            except EngramError as manifest_err:
                # Say what went wrong first; the manifest failure is only a consequence of it.
                raise EngramError(f"{reason} (then {manifest_err})") from None
        finally:
            if self._old_sigterm is not None:
                signal.signal(signal.SIGTERM, self._old_sigterm)
                self._old_sigterm = None
            self._unlock()

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

    def _write_manifest(self, status: str, error: str | None = None, only_if_running: bool = False) -> None:
        with self._manifest_lock:
            if only_if_running and self._status != "running":
                return
            self._status = status
            manifest = {
                "command": self.command,
                "argv": self.argv,
                "config": self.config,
                "seed": self.seed,
                "versions": versions(),
                "start_time": self.started,
                "end_time": None if status == "running" else _now(),
                "status": status,
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "heartbeat": _now(),
            }
            if self.inputs:
                manifest["inputs"] = self.inputs
            if error:
                manifest["error"] = error
            atomic_write_json(self.file("manifest.json"), manifest)


def fingerprint(paths: Iterable[str | Path]) -> str:
    """sha256 over the names and bytes of ``paths`` (missing files count as absent)."""
    digest = hashlib.sha256()
    for path in sorted(Path(p) for p in paths):
        digest.update(path.name.encode() + b"\0")
        if path.is_file():
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
        digest.update(b"\0")
    return digest.hexdigest()


def run_is_live(manifest: dict, path: str | Path) -> bool:
    """Whether the run recorded in ``path``'s manifest still has a process holding its lock."""
    if manifest.get("status") != "running":
        return False
    try:
        fd = os.open(Path(path) / LOCK_NAME, os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


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
