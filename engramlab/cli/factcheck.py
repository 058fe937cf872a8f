"""``engram factcheck``: true and false claims judged by relation-level DKNs, knowledge neurons and the
model itself, simple and complex statements; precision / recall / F1 on a held-out split."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

from rich.table import Table

from engramlab.cli.common import (DeviceMapOpt, DeviceOpt, DtypeOpt, FactsOpt, LimitOpt, ModelOpt, OutOpt, OverwriteOpt,
                                  RelationOpt, SeedOpt, app, console, run_locator, user_errors)
from engramlab.cli.options import configured
from engramlab.locate.factcheck.config import CHECKERS, FORMS, OWN_OPTIONS, FactcheckConfig


@app.command()
@user_errors
@configured(FactcheckConfig, only=OWN_OPTIONS)
def factcheck(model: str = ModelOpt,
              facts: str = FactsOpt,
              relation: Optional[List[str]] = RelationOpt,
              limit: Optional[int] = LimitOpt,
              out: Path = OutOpt, overwrite: bool = OverwriteOpt,
              seed: int = SeedOpt, dtype: str = DtypeOpt, device: str = DeviceOpt,
              device_map: Optional[str] = DeviceMapOpt, config: FactcheckConfig = None):
    """Fact-checking with degenerate knowledge neurons (AMIG; Chen et al. 2024): for each fact a true and
    a false claim (simple, and inside distractor clauses), judged by the mean IG attribution of the
    relation's DKNs and of its knowledge neurons (found on the training split; below tau: false) and
    by asking the model "Is this true or false?"; P/R/F1 on the test split, factcheck.png. The DKN and
    KN locators' settings: --set dkn.FIELD=V / --set kn.FIELD=V (e.g. --set dkn.t_low=0.2)."""

    def plot(run, lm, result, factset, summary):
        from engramlab.report.sections.factcheck import draw_factcheck

        draw_factcheck(summary, run.path / "factcheck.png")

    def table(result, summary, factset):
        fmt = lambda v: "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
        t = Table(title=f"factcheck: {model} on {facts} ({summary['n_test_claims']} test claims of "
                        f"{summary['n_claims']}; DKN found rate {fmt(summary.get('dkn_found_rate'))})")
        for col in ("checker", "form", "precision", "recall", "F1", "claims judged", "tau"):
            t.add_column(col, justify="left" if col in ("checker", "form") else "right")
        for checker in CHECKERS:
            for form in FORMS:
                p = f"{'' if form == 'simple' else 'complex.'}{checker}."
                if p + "f1" in summary:
                    t.add_row(checker, form, fmt(summary[p + "precision"]), fmt(summary[p + "recall"]),
                              fmt(summary[p + "f1"]), fmt(summary[p + "n_claims"]), fmt(summary[p + "threshold"]))
        console.print(t)
        for checker in CHECKERS:
            if summary.get(f"{checker}.abstain"):
                console.print(f"{checker}: {summary[f'{checker}.abstain']}")
        if summary.get("n_skipped_relations"):
            console.print(f"skipped relations: {summary['skipped_relations']} (reasons in records.jsonl)")

    run_locator("factcheck", config, model=model, facts=facts, relation=relation, limit=limit, out=out,
                overwrite=overwrite, seed=seed, dtype=dtype, device=device, device_map=device_map, after=plot,
                table=table, wrote=("factcheck.png", "dkn/", "kn/"))
