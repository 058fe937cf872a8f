"""``engram inspect`` and ``engram recall``: what a model is and which facts it knows."""

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
    run_mode,
    user_errors,
)
from engramlab.cli.options import configured
from engramlab.errors import EngramError
from engramlab.recall import RecallConfig


@app.command()
@user_errors
def inspect(model: str = ModelOpt, dtype: str = DtypeOpt, device: str = DeviceOpt,
            device_map: Optional[str] = DeviceMapOpt,
            seq_len: int = typer.Option(8, "--seq-len", help="Sequence length used to show site shapes."),
            layer: Optional[int] = typer.Option(0, "--layer", help="Layer whose sites to list (-1: all)."),
            as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
            out: Optional[Path] = typer.Option(None, "--out", "-o", help="Also write inspect.json here."),
            overwrite: bool = OverwriteOpt):
    """Model family, sizes, and the hook sites with their tensor shapes."""
    if seq_len < 1:
        raise EngramError(f"--seq-len {seq_len}: must be >= 1")
    if layer is not None and layer < -1:
        raise EngramError(f"--layer {layer}: give a layer index, or -1 for every layer")
    from engramlab.models import SITE_DOCS, load_model  # torch: only once the options are known good
    from engramlab.models.hooks import GLOBAL_SITES
    from engramlab.runs import RunDir, to_json

    lm = load_model(model, dtype=dtype, device=device, device_map=device_map)
    info = lm.adapter.describe()
    info.update(spec=model, source=lm.source, dtype=str(lm.dtype).replace("torch.", ""), device=str(lm.device))
    names = lm.hooks.names(None if layer == -1 else layer)
    if layer != -1:
        names += list(GLOBAL_SITES)
    docs = {**SITE_DOCS, **GLOBAL_SITES}
    sites = [{"site": n, "shape": list(lm.hooks.shape(n, 1, seq_len)), "doc": docs[n.split(".", 2)[-1]
              if n.startswith("blocks.") else n][1]} for n in names]
    if out is not None:
        with RunDir(out, "inspect", {"model": model, "dtype": dtype, "device": device},
                    mode=run_mode(overwrite)) as run:
            run.write_json("inspect.json", {"model": info, "sites": sites})
            run.finish({k: v for k, v in info.items() if isinstance(v, (int, float, str, bool))})
    if as_json:
        print(to_json({"model": info, "sites": sites}), end="")
        return
    t = Table(title=f"{model}", show_header=False)
    for k, v in info.items():
        t.add_row(k, str(v))
    console.print(t)
    s = Table(title=f"hook sites (batch=1, pos={seq_len})")
    for col in ("site", "shape", "tensor"):
        s.add_column(col)
    for row in sites:
        s.add_row(row["site"], str(tuple(row["shape"])), row["doc"])
    console.print(s)
    if layer != -1 and lm.adapter.n_layers > 1:
        console.print(f"(sites repeat for layers 0..{lm.adapter.n_layers - 1}; --layer -1 lists all)")


@app.command()
@user_errors
@configured(RecallConfig)
def recall(model: str = ModelOpt,
           facts: str = FactsOpt,
           relation: Optional[List[str]] = RelationOpt,
           limit: Optional[int] = LimitOpt,
           out: Path = OutOpt, overwrite: bool = OverwriteOpt, seed: int = SeedOpt, dtype: str = DtypeOpt,
           device: str = DeviceOpt, device_map: Optional[str] = DeviceMapOpt, config: RecallConfig = None):
    """Score recall per fact: probability and rank of the first target token, greedy exact match."""
    def table(result, summary, factset):
        t = Table(title=f"recall: {model} on {facts} ({len(factset)} facts)")
        for col in ("relation", "n", "top1", "top10", "exact"):
            t.add_column(col, justify="right" if col != "relation" else "left")
        for rel, acc in result.per_relation().items():
            t.add_row(rel, str(acc["n_facts"]), f"{acc['top1_accuracy']:.2f}", f"{acc['top10_accuracy']:.2f}",
                      f"{acc['exact_match']:.2f}")
        t.add_row("[bold]all", str(summary["n_facts"]), f"{summary['top1_accuracy']:.2f}",
                  f"{summary['top10_accuracy']:.2f}", f"{summary['exact_match']:.2f}")
        console.print(t)

    run_locator("recall", config, model=model, facts=facts, relation=relation, limit=limit, out=out,
                overwrite=overwrite, seed=seed, dtype=dtype, device=device, device_map=device_map, table=table)
