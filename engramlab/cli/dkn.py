"""``engram dkn``: degenerate knowledge neurons per fact, by every clustering method."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from engramlab.cli.common import (
    DeviceMapOpt,
    DeviceOpt,
    DtypeOpt,
    FactsOpt,
    LimitOpt,
    ModelOpt,
    OutOpt,
    OverwriteOpt,
    RelationOpt,
    SeedOpt,
    app,
    console,
    run_locator,
    user_errors,
)
from engramlab.cli.options import configured
from engramlab.locate.dkn.config import DKNConfig, EvolveConfig


@app.command()
@user_errors
@configured(DKNConfig, sections={"evolvability": EvolveConfig})
def dkn(model: str = ModelOpt,
        facts: str = FactsOpt,
        relation: Optional[List[str]] = RelationOpt,
        limit: Optional[int] = LimitOpt,
        out: Path = OutOpt, overwrite: bool = OverwriteOpt,
        evolve: bool = typer.Option(False, "--evolvability", help="Also fine-tune on new facts through DKN / KN "
                                    "/ random neurons / the full model (settings: --evolve-*)."),
        seed: int = SeedOpt, dtype: str = DtypeOpt, device: str = DeviceOpt, device_map: Optional[str] = DeviceMapOpt,
        config: DKNConfig = None, evolvability: EvolveConfig = None):
    """Find degenerate knowledge neurons: clusters of knowledge neurons that back each other up."""
    from engramlab.locate.dkn.evolvability import evaluate_evolvability

    evolved = []

    def evolve_step(run, lm, result, factset, summary):
        evo = evaluate_evolvability(lm, result, list(factset), evolvability, progress=True)
        evo.save(run.path / "evolvability")
        summary.update({f"evolvability.{k}": v for k, v in evo.summary().items() if k.split(".")[0] in evo.arms})
        evolved.append(evo)

    def table(result, summary, factset):
        t = Table(title=f"dkn: {model} on {facts} ({summary['n_evaluated']} of {summary['n_facts']} facts "
                        "evaluated)")
        for col in ("method", "found", "of which sampled", "partial drop", "full drop", "clusters", "dkn neurons"):
            t.add_column(col, justify="left" if col == "method" else "right")
        fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        for m in config.methods:
            g = lambda k: summary.get(f"{m}.{k}")  # noqa: E731
            t.add_row(m, fmt(g("dkn_found_rate")), fmt(g("dkn_found_rate_sampled")), fmt(g("mean_partial_drop")),
                      fmt(g("mean_full_drop")), fmt(g("mean_clusters")), fmt(g("mean_dkn_neurons")))
        console.print(t)
        if evolved and evolved[0].arms:
            e = Table(title="evolvability (accuracy on new facts / retention of old ones)")
            for col in ("arm", "neurons", "layers", "new top1", "old top1"):
                e.add_column(col)
            for arm, v in evolved[0].arms.items():
                layers = ",".join(f"{l}:{c}" for l, c in (v.get("layers") or {}).items()) or "all"
                e.add_row(arm, str(v["n_neurons"] or "all"), layers, fmt(v["new_top1"]), fmt(v["old_top1"]))
            console.print(e)

    run_locator("dkn", config, model=model, facts=facts, relation=relation, limit=limit, out=out,
                overwrite=overwrite, seed=seed, dtype=dtype, device=device, device_map=device_map,
                sections={"evolvability": evolvability if evolve else None},
                after=evolve_step if evolve else None, table=table, wrote=("evolvability/",) if evolve else ())
