"""Progress for long work: a rich bar on a terminal, periodic one-line heartbeats in logs.

On a terminal (stderr is a TTY) a transient bar shows the count and the time left. When stderr
is a file or a pipe (batch jobs, ``nohup``, CI, ``2>log``) a bar would be a mess of carriage
returns, so instead one line is written when the work starts, every ``ENGRAM_PROGRESS_SECONDS``
seconds (default 30) and when it ends::

    train: 120/600 (20%), 0:01:10 elapsed, ETA 0:04:40, loss 3.214

``status`` (a callable returning a short string, e.g. the current loss) is appended to each line
and shown beside the bar.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
DEFAULT_SECONDS = 30.0


def quiet() -> bool:
    """``ENGRAM_QUIET`` set (``engram study --quiet`` sets it while a stage runs): no bars, no heartbeats."""
    return os.environ.get("ENGRAM_QUIET", "") not in ("", "0")


def heartbeat_seconds() -> float:
    value = os.environ.get("ENGRAM_PROGRESS_SECONDS", "")
    try:
        return max(0.0, float(value)) if value else DEFAULT_SECONDS
    except ValueError:
        return DEFAULT_SECONDS


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def progress_line(description: str, done: int, total: int | None, elapsed: float, status: str = "") -> str:
    """One heartbeat line; the ETA assumes the remaining items take as long as the done ones."""
    parts = [f"{description}: {done}/{total}" if total else f"{description}: {done}"]
    if total:
        parts[0] += f" ({100 * done / total:.0f}%)"
    parts.append(f"{_clock(elapsed)} elapsed")
    if total and done:
        parts.append(f"ETA {_clock(elapsed / done * (total - done))}")
    if status:
        parts.append(status)
    return ", ".join(parts)


def progress_bar(items: Iterable[T], description: str, enabled: bool = True,
                 total: int | None = None, status: Callable[[], str] | None = None) -> Iterator[T]:
    """Yield ``items`` while showing progress on stderr (see the module docstring)."""
    if total is None:
        total = len(items) if hasattr(items, "__len__") else None
    if not enabled or quiet():
        yield from items
    elif sys.stderr.isatty():
        yield from _rich_bar(items, description, total, status)
    else:
        yield from _heartbeats(items, description, total, status)


def _heartbeats(items, description, total, status) -> Iterator:
    every, t0 = heartbeat_seconds(), time.monotonic()
    last, done = t0, 0

    def line():
        text = progress_line(description, done, total, time.monotonic() - t0, status() if status else "")
        print(text, file=sys.stderr, flush=True)

    line()
    for item in items:
        yield item
        done += 1
        now = time.monotonic()
        if now - last >= every and done != total:
            last = now
            line()
    line()


def _rich_bar(items, description, total, status) -> Iterator:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
    if status:
        columns.append(TextColumn("{task.fields[status]}"))
    with Progress(*columns, transient=True) as progress:
        task = progress.add_task(description, total=total, status="")
        for item in items:
            yield item
            progress.update(task, advance=1, status=status() if status else "")
