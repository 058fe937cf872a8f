"""``engram doctor``: check the architecture adapter on a model (see ``engramlab.models.doctor``)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from engramlab.cli.common import DeviceMapOpt, DeviceOpt, DtypeOpt, ModelOpt, OverwriteOpt, app, check_model_options, \
    console, run_mode, user_errors


@app.command()
@user_errors
def doctor(model: str = ModelOpt, dtype: str = DtypeOpt, device: str = DeviceOpt,
           device_map: Optional[str] = DeviceMapOpt,
           out: Optional[Path] = typer.Option(None, "--out", "-o", help="Also write a run directory here "
                                              "(summary.json, checks.json)."),
           overwrite: bool = OverwriteOpt):
    """Check the adapter on MODEL: logits against the HF forward, every hook site's firing and shape,
    bit-identical write-back, heads through W_O, the residual sums, gradients at every site.
    Exit status 1 when a check fails."""
    check_model_options(model, dtype, device, device_map)
    from engramlab.models import load_model  # torch: only once the options are known good
    from engramlab.models.doctor import run_doctor, summary, tolerance
    from engramlab.runs import RunDir

    def diagnose():
        lm = load_model(model, dtype=dtype, device=device, device_map=device_map)
        return lm, run_doctor(lm)

    if out is not None:
        with RunDir(out, "doctor", {"model": model, "dtype": dtype, "device": device,
                                    **({"device_map": device_map} if device_map else {})},
                    mode=run_mode(overwrite)) as run:
            lm, checks = diagnose()
            run.write_json("checks.json", [c.row() for c in checks])
            run.finish(summary(checks))
    else:
        lm, checks = diagnose()
    failed = [c for c in checks if not c.passed]
    t = Table(title=f"doctor: {model} ({lm.adapter.family}, {str(lm.dtype).replace('torch.', '')}, "
                    f"tolerance {tolerance(lm.dtype):.2g})")
    for col in ("check", "result", "measured"):
        t.add_column(col)
    for c in checks:
        t.add_row(c.name, "[green]pass[/]" if c.passed else "[bold red]FAIL[/]", escape(c.detail))
    console.print(t)
    for c in failed:  # one plain line per failure, whatever the terminal width
        console.print(escape(f"FAILED {c.name}: {c.detail}"), highlight=False, soft_wrap=True)
    console.print(f"{len(checks) - len(failed)} of {len(checks)} checks passed" +
                  (f"; wrote {out}/checks.json, summary.json, manifest.json" if out is not None else ""))
    if failed:
        raise typer.Exit(1)
