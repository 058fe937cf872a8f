"""``engram plan``: predicted peak memory and passes of a locator run, before running it (``engramlab.plan``)."""

from __future__ import annotations

import json
from typing import List, Optional

import typer
from rich.markup import escape
from rich.table import Table

from engramlab.cli.common import (DeviceOpt, DtypeOpt, FactsOpt, LimitOpt, ModelOpt, RelationOpt, app, console,
                                  select_facts, user_errors)
from engramlab.cli.options import Settings, configured
from engramlab.errors import EngramError
from engramlab.locate.configs import LOCATOR_CONFIGS
from engramlab.plan import ANALYSES, PlanConfig
from engramlab.sizes import format_bytes

SECTIONS = {name: LOCATOR_CONFIGS[name] for name in ANALYSES}


@app.command()
@user_errors
@configured(PlanConfig, sections=SECTIONS, section_flags=False, build_config=False)
def plan(model: str = ModelOpt, facts: str = FactsOpt, relation: Optional[List[str]] = RelationOpt,
         limit: Optional[int] = LimitOpt,
         as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON instead of a table."),
         dtype: str = DtypeOpt, device: str = DeviceOpt, config: Settings = None,
         neurons: Settings = None, circuit: Settings = None, trace: Settings = None):
    """Predict the peak memory and the forward/backward passes of `engram ANALYSIS` from the model's
    config and the tokenized facts (no weights are loaded, nothing runs), and with --budget say which
    settings bring it under the budget. The analysis's settings: --set ANALYSIS.FIELD=VALUE
    (--set neurons.steps=10, --set circuit.batch_size=4), as in evolve."""
    from engramlab import plan as planning
    from engramlab.models.loading import load_tokenizer, resolve_dtype

    cfg = config.build()
    given = {"neurons": neurons, "circuit": circuit, "trace": trace}
    stray = sorted(f"{name}.{path}" for name, s in given.items() if name != cfg.analysis for path in s.given)
    if stray:
        raise EngramError(f"--set {stray[0]}: not a setting of --analysis {cfg.analysis}; use "
                          f"{cfg.analysis}.FIELD=VALUE")
    analysis = cfg.analysis
    locator_config = given[analysis].build()
    limit_bytes = planning.parse_budget(cfg.budget) if cfg.budget is not None else None
    resolve_dtype(dtype)
    if device not in ("cpu", "cuda"):  # a plan for a GPU run needs no GPU here
        raise EngramError(f"--device {device!r}: plan for cpu or cuda")
    shapes = planning.Shapes.from_spec(model)
    tokenizer = load_tokenizer(model)
    factset = select_facts(facts, relation, limit)
    got = planning.plan_for(analysis, shapes, tokenizer, factset, locator_config, dtype, device, limit_bytes)
    over = limit_bytes is not None and got.peak > limit_bytes
    found = planning.suggest(analysis, shapes, tokenizer, factset, locator_config, limit_bytes, dtype, device) \
        if over else []
    if as_json:
        print(json.dumps(planning.to_json(got, limit_bytes, found), indent=2))
        return
    fmt = format_bytes
    t = Table(title=f"plan: {analysis} on {model} ({shapes.model_type}, {dtype}, {device})")
    t.add_column("quantity")
    t.add_column("predicted", justify="right")
    t.add_row("peak memory", fmt(got.peak))
    t.add_row("  weights", fmt(got.weights))
    for part, size in got.parts.items():
        t.add_row(f"  {escape(part)}", fmt(size))
    t.add_row("forward/backward passes", f"{got.n_passes:,}")
    for key, value in got.settings.items():
        t.add_row(escape(key), escape(str(value)))
    if limit_bytes is not None:
        t.add_row("budget", f"{fmt(limit_bytes)}: " + ("[bold red]over[/]" if over else "[green]fits[/]"))
    console.print(t)
    if over:
        if not found:
            console.print("no setting of the knobs brings it under the budget (see docs/plan.md for what is missing)")
            return
        s = Table(title="settings that fit the budget")
        for col in ("settings", "peak", "passes"):
            s.add_column(col)
        for sug in found:
            flags = " ".join(f"--set {analysis}.{k}={v}" for k, v in sug.changes.items())
            s.add_row(escape(flags), fmt(sug.plan.peak), f"{sug.plan.n_passes:,}")
        console.print(s)
