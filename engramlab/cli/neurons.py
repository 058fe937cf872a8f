"""``engram neurons``: knowledge neurons of facts by integrated gradients, with interventions."""

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
from engramlab.locate.neurons.config import NeuronConfig


@app.command()
@user_errors
@configured(NeuronConfig)
def neurons(model: str = ModelOpt,
            facts: str = FactsOpt,
            relation: Optional[List[str]] = RelationOpt,
            limit: Optional[int] = LimitOpt,
            out: Path = OutOpt, overwrite: bool = OverwriteOpt,
            paraphrases: bool = typer.Option(False, "--paraphrases/--no-paraphrases", help="Add engramlab's "
                                             "paraphrase templates (at least 3 per bundled relation) to each "
                                             "fact's own: refinement needs several paraphrases."),
            seed: int = SeedOpt, dtype: str = DtypeOpt, device: str = DeviceOpt,
            device_map: Optional[str] = DeviceMapOpt, config: NeuronConfig = None):
    """Find each fact's knowledge neurons (integrated gradients over MLP neurons) and test them by
    suppressing and enhancing them."""
    from engramlab.data.facts import with_paraphrases
    from engramlab.report.neurons import plot_neuron_layers

    def prepare(factset):
        if paraphrases:
            factset = with_paraphrases(factset)
        need = max(config.min_prompts, 2)
        few = sum(len(f.templates) < need for f in factset)
        if few:
            console.print(f"note: {few} of {len(factset)} facts have fewer than {need} templates, so their "
                          f"refined neurons are {'none' if config.min_prompts > 1 else 'their top coarse ones'}; "
                          "--paraphrases adds engramlab's paraphrases")
        return factset

    def plot(run, lm, result, factset, summary):
        plot_neuron_layers(result.attributed(), result.model["n_layers"], run.file("neuron_layers.png"))

    result, _, _ = run_locator("neurons", config, model=model, facts=facts, relation=relation, limit=limit,
                               out=out, overwrite=overwrite, seed=seed, dtype=dtype, device=device, device_map=device_map,
                               extras={"paraphrases": paraphrases}, prepare=prepare, after=plot,
                               wrote=("neuron_layers.png",))
    skipped = [r for r in result.records() if r["skipped"]]
    if skipped:
        console.print(f"skipped {len(skipped)} fact(s) the model does not predict (reasons in records.jsonl)")
