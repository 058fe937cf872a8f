"""Shared pieces of the ``engram`` command: the Typer app, common options, error handling.

Every sub-command that produces results takes ``--out DIR`` and writes a run directory
(``manifest.json``, ``summary.json``, artifacts; see ``engramlab.runs``). User errors print one
line starting with ``error:`` and exit with status 2.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable

import typer
from rich.console import Console
from rich.table import Table

from engramlab.errors import EngramError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="engramlab: find where language models store facts, and watch it form in training.")
console = Console()
err_console = Console(stderr=True)

# Shared option declarations: the same flag means the same thing in every verb.
ModelOpt = typer.Option(..., "--model", "-m", help="Local HF dir, .gguf file, engram run dir, RUN:STEP, or alias "
                        "smollm2-135m.")
DtypeOpt = typer.Option("float32", "--dtype", help="float32 (default) | bfloat16 | float16.")
DeviceOpt = typer.Option("cpu", "--device", help="cpu | cuda | auto.")
SeedOpt = typer.Option(0, "--seed", help="Random seed (every command is reproducible for a seed).")
OutOpt = typer.Option(..., "--out", "-o", help="Run directory to write (manifest.json, summary.json, artifacts).")
FactsOpt = typer.Option(..., "--facts", "-f", help="Fact file (.json LRE / .jsonl), directory, or bundled name(s) "
                        "(e.g. country_capital_city, lre; comma-separated).")
RelationOpt = typer.Option(None, "--relation", "-r", help="Keep only this relation (repeatable).")
LimitOpt = typer.Option(None, "--limit", "-n", help="At most N facts (after --relation).")


def user_errors(fn: Callable) -> Callable:
    """Turn EngramError into a one-line message and exit status 2 instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except EngramError as e:
            err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(2)
        except KeyboardInterrupt:
            err_console.print("interrupted")
            raise typer.Exit(130)

    return wrapper


def print_summary(title: str, out: Path, summary: dict, keys: list[str]) -> None:
    t = Table(title=f"{title} -> {out}", show_header=False)
    for k in keys:
        if k in summary:
            v = summary[k]
            t.add_row(k, f"{v:.4g}" if isinstance(v, float) else str(v))
    console.print(t)
