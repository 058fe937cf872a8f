"""Shared pieces of the ``engram`` command: the Typer app, common options, error handling, and
``run_locator``, the one skeleton of every locator verb (its options come from its config through
``engramlab.cli.options.configured``).

Every sub-command that produces results takes ``--out DIR`` and writes a run directory
(``manifest.json``, ``summary.json``, artifacts; see ``engramlab.runs``). User errors print one
line starting with ``error:`` and exit with status 2.
"""

from __future__ import annotations

import functools
import logging
import sys
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
DeviceMapOpt = typer.Option(None, "--device-map", help="Spread the model's layers over several devices "
                            "(accelerate): auto | balanced | balanced_low_0 | sequential, or a JSON file {module: "
                            "device}; instead of --device.")
SeedOpt = typer.Option(0, "--seed", help="Random seed (every command is reproducible for a seed).")
OutOpt = typer.Option(..., "--out", "-o", help="Run directory to write (manifest.json, summary.json, artifacts).")
FactsOpt = typer.Option(..., "--facts", "-f", help="Fact file (.json LRE / .jsonl), directory, or bundled name(s) "
                        "(e.g. country_capital_city, lre; comma-separated).")
RelationOpt = typer.Option(None, "--relation", "-r", help="Keep only this relation (repeatable).")
LimitOpt = typer.Option(None, "--limit", "-n", help="At most N facts per relation (after --relation).")
OverwriteOpt = typer.Option(False, "--overwrite", help="Replace the run --out holds (cleared first) instead of "
                            "refusing to touch it.")


def _executor_opt(name: str):
    """A --executor/--ray-address/... option, its default and help from ``ExecutorConfig``."""
    import dataclasses

    from engramlab.config import declared_options
    from engramlab.scale.executor import ExecutorConfig

    opt = next(o for o in declared_options(ExecutorConfig) if o.name == name)
    default = next(f.default for f in dataclasses.fields(ExecutorConfig) if f.name == name)
    choices = f" ({' | '.join(opt.choices)})" if opt.choices else ""
    return typer.Option(default, opt.cli_flag, help=opt.help + choices)


# Where the units of sweep / evolve / study run (engramlab.scale.executor); never what they compute.
ExecutorOpt = _executor_opt("executor")
RayAddressOpt = _executor_opt("ray_address")
RetriesOpt = _executor_opt("retries")
TaskCpusOpt = _executor_opt("task_cpus")
TaskGpusOpt = _executor_opt("task_gpus")
TaskMemoryOpt = _executor_opt("task_memory")


def run_mode(overwrite: bool, resume: bool = False) -> str:
    """The ``RunDir`` mode for a verb's --overwrite / --resume flags."""
    if overwrite and resume:
        raise EngramError("--overwrite and --resume contradict each other: --resume continues the run in --out, "
                          "--overwrite replaces it; pass one")
    return "resume" if resume else "overwrite" if overwrite else "new"


class _StderrHandler(logging.StreamHandler):
    """Log lines ("loading model ...") to whatever sys.stderr is at the time of the line."""

    def emit(self, record):
        self.stream = sys.stderr
        super().emit(record)


def _show_log_lines() -> None:
    logger = logging.getLogger("engramlab")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    from engramlab.progress import quiet

    logger.setLevel(logging.WARNING if quiet() else logging.INFO)


def select_facts(facts: str, relation: list[str] | None, limit: int | None):
    """Load ``--facts``, keep ``--relation``/``--limit``; an empty selection is an error."""
    from engramlab.data.facts import load_facts
    from engramlab.locate.base import select

    if limit is not None and limit < 1:
        raise EngramError(f"--limit {limit}: must be >= 1 (leave it out for every fact)")
    return select(load_facts(facts), relation, limit)


def make_executor(executor: str, ray_address: str | None, retries: int, task_cpus: float, task_gpus: float,
                  task_memory: str | None, root: Path | None = None):
    """The ``Executor`` of a verb's executor flags, checked (Ray installed, the address answering)
    before anything is written."""
    from engramlab.scale.executor import Executor, ExecutorConfig

    return Executor(ExecutorConfig(executor=executor, ray_address=ray_address, retries=retries, task_cpus=task_cpus,
                                   task_gpus=task_gpus, task_memory=task_memory), root)


def check_model_options(model: str, dtype: str, device: str, device_map: str | None = None) -> None:
    """Check --model/--dtype/--device/--device-map before anything is written (loading comes later)."""
    from engramlab.models.loading import resolve_device, resolve_device_map, resolve_dtype, resolve_spec

    resolve_dtype(dtype)
    resolve_device(device)
    resolve_device_map(device_map, device)
    resolve_spec(model)


def user_errors(fn: Callable) -> Callable:
    """Turn EngramError into a one-line message and exit status 2 instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        _show_log_lines()
        try:
            return fn(*args, **kwargs)
        except EngramError as e:
            from rich.markup import escape  # a message may hold brackets: engramlab[ray], [A, B]

            err_console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2)
        except KeyboardInterrupt as e:
            from engramlab.runs import Terminated

            err_console.print("interrupted")
            # The shell's convention: 128 + the signal number (SIGINT 2, SIGTERM 15).
            raise typer.Exit(143 if isinstance(e, Terminated) else 130)

    return wrapper


def run_locator(name: str, config, *, model: str, facts: str, relation: list[str] | None, limit: int | None,
                out: Path, overwrite: bool, seed: int, dtype: str, device: str, device_map: str | None = None,
                extras: dict | None = None,
                sections: dict | None = None, prepare: Callable | None = None, after: Callable | None = None,
                table: bool | Callable = True, wrote: tuple[str, ...] = ()):
    """The skeleton of every locator verb, once: check the model options, load and select the facts,
    open the run directory (the full config in its manifest), seed, load the model, run the
    locator ``LOCATORS[name]``, save its result, finish the run, print its summary table.

    ``extras`` are the verb's own manifest keys (``paraphrases``); ``sections`` more configs for
    the manifest ({"evolvability": ...}); ``prepare(facts) -> facts`` runs on the selection before
    anything is written; ``after(run, lm, result, facts, summary)`` adds files and summary keys;
    ``table(result, summary, facts)`` prints the verb's own table instead of the summary keys.
    Returns (result, summary, facts)."""
    from engramlab.config import to_dict
    from engramlab.locate import LOCATORS
    from engramlab.models import load_model
    from engramlab.runs import RunDir, set_seed

    locator = LOCATORS[name]
    check_model_options(model, dtype, device, device_map)
    factset = select_facts(facts, relation, limit)
    if prepare is not None:
        factset = prepare(factset)
    run_config = {"model": model, "facts": facts, "relation": relation, "limit": limit, "dtype": dtype,
                  "device": device, **({"device_map": device_map} if device_map else {}), **(extras or {}),
                  name: to_dict(config),
                  **{k: (to_dict(v) if v is not None else None) for k, v in (sections or {}).items()}}
    with RunDir(out, name, run_config, seed=seed, mode=run_mode(overwrite)) as run:
        set_seed(seed)
        lm = load_model(model, dtype=dtype, device=device, device_map=device_map)
        result = locator.find(lm, factset, config, progress=True)
        result.save(run.path)
        summary = result.summary()
        if after is not None:
            after(run, lm, result, factset, summary)
        run.finish(summary)
    if callable(table):  # the verb's own table
        table(result, summary, factset)
    elif table:
        print_summary(f"{name}: {model} on {facts}", out, summary, list(locator.summary_keys))
    files = ("config.json", "records.jsonl", "summary.json", *locator.files, *wrote, "manifest.json")
    console.print(f"wrote {out}/{', '.join(files)}")
    return result, summary, factset


def print_summary(title: str, out: Path, summary: dict, keys: list[str]) -> None:
    t = Table(title=f"{title} -> {out}", show_header=False)
    for k in keys:
        if k in summary:
            v = summary[k]
            t.add_row(k, f"{v:.4g}" if isinstance(v, float) else str(v))
    console.print(t)
