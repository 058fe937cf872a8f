"""``engram circuit``: the edges of the head/MLP graph that carry facts, found with EAP-IG."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

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
from engramlab.locate.circuits.config import CircuitConfig


@app.command()
@user_errors
@configured(CircuitConfig)
def circuit(model: str = ModelOpt,
            facts: str = FactsOpt,
            relation: Optional[List[str]] = RelationOpt,
            limit: Optional[int] = LimitOpt,
            out: Path = OutOpt, overwrite: bool = OverwriteOpt,
            eapig_json: bool = typer.Option(False, "--eapig-json", help="Also write circuit_eapig.json (every "
                                            "edge, EAP-IG layout)."),
            draw: bool = typer.Option(True, "--draw/--no-draw", help="Write circuit.svg and circuit.dot."),
            seed: int = SeedOpt, dtype: str = DtypeOpt, device: str = DeviceOpt,
            device_map: Optional[str] = DeviceMapOpt, config: CircuitConfig = None):
    """Find the circuit behind facts (EAP-IG edge scores on discovery facts) and evaluate it on
    held-out facts: faithfulness, Hit@10, faithfulness vs N, head roles, logit lens."""
    from engramlab.locate.circuits.store import write_eapig
    from engramlab.report.circuits import draw_circuit

    def extras(run, lm, result, factset, summary):
        if eapig_json:
            write_eapig(run.file("circuit_eapig.json"), result)
        if draw:
            draw_circuit(result.scores, result.kept, result.graph, run.file("circuit.svg"))

    wrote = (("circuit_eapig.json",) if eapig_json else ()) + (("circuit.svg", "circuit.dot") if draw else ())
    result, summary, _ = run_locator("circuit", config, model=model, facts=facts, relation=relation, limit=limit,
                                     out=out, overwrite=overwrite, seed=seed, dtype=dtype, device=device, device_map=device_map,
                                     after=extras, wrote=wrote)
    if summary["n_edges_ungrouped"] != summary["n_edges_total"]:
        console.print(f"edge counts are per key/value head ({result.graph.n_kv_heads} kv heads for "
                      f"{result.graph.n_heads} query heads): EAP-IG's ungrouped graph has "
                      f"{summary['n_edges_ungrouped']:,} edges")
    if result.skipped:
        console.print(f"skipped {len(result.skipped)} fact(s) (reasons in skipped.jsonl)")
