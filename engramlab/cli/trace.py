"""``engram trace``: causal tracing (Meng et al. 2022) of every fact, with its heat maps (trace.png)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

from engramlab.cli.common import (DeviceMapOpt, DeviceOpt, DtypeOpt, FactsOpt, LimitOpt, ModelOpt, OutOpt, OverwriteOpt,
                                  RelationOpt, SeedOpt, app, run_locator, user_errors)
from engramlab.cli.options import configured
from engramlab.locate.trace.config import TraceConfig


@app.command()
@user_errors
@configured(TraceConfig)
def trace(model: str = ModelOpt,
          facts: str = FactsOpt,
          relation: Optional[List[str]] = RelationOpt,
          limit: Optional[int] = LimitOpt,
          out: Path = OutOpt, overwrite: bool = OverwriteOpt,
          seed: int = SeedOpt, dtype: str = DtypeOpt, device: str = DeviceOpt,
          device_map: Optional[str] = DeviceMapOpt, config: TraceConfig = None):
    """Causal tracing: noise on each fact's subject embeddings, then every clean hidden state (residual
    stream at one layer; MLP and attention outputs over --window layers) restored at every token and
    layer; writes the indirect effects (trace.safetensors), per-fact records and trace.png."""

    def plot(run, lm, result, factset, summary):
        from engramlab.report.sections.trace import draw_trace

        if result.p_clean.shape[0]:
            draw_trace(result, run.path / "trace.png")

    run_locator("trace", config, model=model, facts=facts, relation=relation, limit=limit, out=out,
                overwrite=overwrite, seed=seed, dtype=dtype, device=device, device_map=device_map, after=plot, wrote=("trace.png",))
