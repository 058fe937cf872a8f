"""Where units of work run: in this process (``local``, the default) or as Ray tasks (``ray``).

A unit is one call ``fn(*args)`` of a module-level function that writes its results into the run
directory itself and returns a small picklable value: a training run of a sweep, one (checkpoint,
locator) of an evolve, one stage of a study. The caller first plans every unit, then hands the
ones still to do to ``run_units``, then assembles its outputs from the run directory exactly as
it would after a local run, so nothing downstream can tell which executor ran.

With Ray each unit is a task with the resources of ``ExecutorConfig`` (CPUs, a GPU fraction,
memory). A task whose worker dies (killed, out of memory) or that raises is run again up to
``retries`` times (Ray's ``max_retries`` with ``retry_exceptions``); a unit that still fails is
reported (``Outcome.error``) and the others finish. Workers need engramlab installed (the same
version), and the run directory and its inputs (worlds, checkpoints) at the same paths: on one
machine that holds; on a cluster put them on a shared filesystem. What a task is sent: the
function's import path and its arguments (paths, configs, fact sets), never a model.

Each unit appends a line ``start PID HOST TIME`` to ``OUT/.units/<key>`` when it starts and
``done PID HOST TIME`` when it finishes, so one can see where a unit runs and how often it was
started (a retried unit has several starts).
"""

from __future__ import annotations

import importlib.util
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from engramlab.config import option, validate
from engramlab.errors import EngramError
from engramlab.sizes import parse_bytes

EXECUTORS = ("local", "ray")
RAY_PIN = "ray==2.60.0"
_INSTALL = "pip install 'engramlab[ray]'"
#: How long the reachability check of --ray-address waits before giving up (seconds).
CONNECT_TIMEOUT = 10.0
UNITS_DIR = ".units"


@dataclass
class ExecutorConfig:
    """How the units of a sweep, an evolve or a study are run (not what they compute: results
    are the same either way, and a run made by one executor is resumed by the other)."""

    executor: str = option("local", "local: one unit after another in this process | ray: each unit a Ray "
                           "task (needs engramlab's ray extra).", choices=EXECUTORS)
    ray_address: str | None = option(None, "With --executor ray: the cluster to join (HOST:PORT of `ray start "
                                     "--head`, or auto); default: start a local Ray instance.")
    retries: int = option(2, "With --executor ray: runs of a failed unit after the first (a killed worker, an "
                          "exception) before it is reported as failed.", range=(0, None))
    task_cpus: float = option(1.0, "CPUs each Ray task holds (its torch thread count).", range=(0, None),
                              open_low=True)
    task_gpus: float = option(0.0, "GPUs each Ray task holds (a fraction shares one).", range=(0, None))
    task_memory: str | None = option(None, "Memory each Ray task reserves, e.g. 8GB (scheduling only).")

    def __post_init__(self):
        validate(self)
        if self.task_memory is not None:
            parse_bytes(self.task_memory, "--task-memory")
        if self.executor == "local" and self.ray_address:
            raise EngramError(f"--ray-address {self.ray_address}: only used with --executor ray; add --executor ray "
                              "or drop it")


@dataclass
class Unit:
    """One call ``fn(*args)``; ``key`` names it in logs, in ``OUT/.units`` and in failures;
    ``after``: keys of units that must have finished (without failing) before this one starts."""

    key: str
    fn: Callable
    args: tuple = ()
    after: tuple = ()


@dataclass
class _Refused:
    """A unit's ``EngramError``: the same input fails the same way every time, so it is reported
    at once, not retried."""

    message: str


@dataclass
class Outcome:
    key: str
    value: Any = None
    error: str | None = None  # the unit failed (refused, or after its retries) or was not run: why, one line


@dataclass
class _Marker:
    """Where each started run of a unit is noted (``OUT/.units/<key>``)."""

    root: Path | None
    key: str

    @property
    def path(self) -> Path | None:
        return None if self.root is None else self.root / UNITS_DIR / self.key.replace("/", "_")

    def note(self, what: str) -> None:
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:  # a line is one small append: never torn
                f.write(f"{what} {os.getpid()} {socket.gethostname()} {time.time():.3f}\n")


def _run_marked(marker: _Marker, threads: int | None, fn: Callable, args: tuple):
    """What a task runs: note the start, set torch's threads to the task's CPUs, call, clean up."""
    if threads is not None:
        import torch

        torch.set_num_threads(max(1, threads))
    marker.note("start")
    try:
        value = fn(*args)
    except EngramError as e:
        marker.note("refused")
        return _Refused(str(e))
    marker.note("done")
    return value


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[-1] if text else ''}".strip()


def ray_available() -> bool:
    return importlib.util.find_spec("ray") is not None


def check_address(address: str) -> None:
    """Refuse a --ray-address nothing answers at within ``CONNECT_TIMEOUT`` seconds, before
    anything is written (``ray.init`` itself keeps retrying for minutes)."""
    if address in ("auto", "local"):
        return
    target = address.removeprefix("ray://")
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise EngramError(f"--ray-address {address}: give HOST:PORT (the address `ray start --head` prints, "
                          "e.g. 10.0.0.5:6379) or auto")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT).close()
    except OSError as e:
        raise EngramError(f"--ray-address {address}: nothing answers there ({e.strerror or e}); start the head "
                          "with `ray start --head` on that machine, or leave --ray-address out for a local "
                          "instance") from None


class Executor:
    """Runs ``Unit``s; see the module docstring. ``root``: the run directory (for ``.units``)."""

    def __init__(self, config: ExecutorConfig | None = None, root: str | Path | None = None):
        self.config = config or ExecutorConfig()
        self.root = Path(root) if root is not None else None
        if self.config.executor == "ray":
            self.check()

    @property
    def is_local(self) -> bool:
        return self.config.executor == "local"

    def check(self) -> None:
        """Fail now, with the fix, when Ray cannot be used (nothing is written before this)."""
        if not ray_available():
            raise EngramError(f"--executor ray: Ray is not installed; {_INSTALL} (pins {RAY_PIN}), or use "
                              "--executor local")
        if self.config.ray_address:
            check_address(self.config.ray_address)

    def run(self, units: Sequence[Unit], done: Callable[[Outcome], None] | None = None,
            before: Callable[[Unit], None] | None = None) -> list[Outcome]:
        """Run every unit, each once the units it comes ``after`` have finished; ``done`` is called
        as each one finishes (in completion order), ``before`` as a local unit starts. Returns the
        outcomes in the order of ``units``. Local: units run in the order given (which must list
        every unit after those it needs) and an exception propagates, as without an executor; a
        unit's ``EngramError`` is its outcome's error. Ray: see the module docstring; a unit whose
        predecessor failed is not run (its error says which)."""
        earlier: set = set()
        for u in units:  # in an order that can run: everything a unit needs comes before it
            missing = [k for k in u.after if k not in earlier]
            if missing:
                raise ValueError(f"unit {u.key}: comes after {missing}, which are not among the units before it")
            earlier.add(u.key)
        if self.is_local:
            out, failed = [], {}
            for u in units:
                blocked = [k for k in u.after if k in failed]
                if blocked:
                    o = Outcome(u.key, error=f"not run: {blocked[0]} failed")
                else:
                    if before:
                        before(u)
                    o = _outcome(u.key, _run_marked(_Marker(self.root, u.key), None, u.fn, u.args))
                if o.error is not None:
                    failed[u.key] = o
                if done:
                    done(o)
                out.append(o)
            return out
        return self._run_ray(list(units), done)

    def _run_ray(self, units: list[Unit], done) -> list[Outcome]:
        import ray

        c = self.config
        if not ray.is_initialized():
            kwargs: dict = {"include_dashboard": False, "log_to_driver": True, "configure_logging": False}
            if c.ray_address:
                kwargs["address"] = c.ray_address
            try:
                ray.init(**kwargs)
            except (ConnectionError, RuntimeError, ValueError) as e:
                raise EngramError(f"--ray-address {c.ray_address or '(local)'}: Ray did not start or connect "
                                  f"({_first_line(e)})") from None
        options: dict = {"num_cpus": c.task_cpus, "num_gpus": c.task_gpus, "max_retries": c.retries,
                         "retry_exceptions": c.retries > 0}
        if c.task_memory is not None:
            options["memory"] = parse_bytes(c.task_memory, "--task-memory")
        task = ray.remote(_run_marked).options(**options)
        threads = max(1, int(c.task_cpus))
        out: list[Outcome | None] = [None] * len(units)
        index = {u.key: i for i, u in enumerate(units)}
        waiting, pending = list(range(len(units))), {}

        def settle(i: int, o: Outcome) -> None:
            out[i] = o
            if done:
                done(o)

        while waiting or pending:
            for i in list(waiting):  # start what can start; drop what can never run
                after = [out[index[k]] for k in units[i].after]
                failed = next((units[index[k]].key for k, o in zip(units[i].after, after)
                               if o is not None and o.error is not None), None)
                if failed is not None:
                    waiting.remove(i)
                    settle(i, Outcome(units[i].key, error=f"not run: {failed} failed"))
                elif all(o is not None for o in after):
                    waiting.remove(i)
                    u = units[i]
                    pending[task.remote(_Marker(self.root, u.key), threads, u.fn, u.args)] = i
            if not pending:
                continue  # everything left was just settled as blocked
            ready, _ = ray.wait(list(pending), num_returns=1)
            i = pending.pop(ready[0])
            try:
                o = _outcome(units[i].key, ray.get(ready[0]))
            except ray.exceptions.RayError as e:  # failed after its retries: report it, go on
                cause = getattr(e, "cause", None)
                why = _first_line(cause if isinstance(cause, BaseException) else e)
                o = Outcome(units[i].key, error=f"failed after {c.retries + 1} attempts: {why}")
            settle(i, o)
        return out  # type: ignore[return-value]


def _outcome(key: str, value) -> Outcome:
    return Outcome(key, error=value.message) if isinstance(value, _Refused) else Outcome(key, value)


__all__ = ["EXECUTORS", "Executor", "ExecutorConfig", "Outcome", "RAY_PIN", "Unit", "check_address",
           "ray_available"]
