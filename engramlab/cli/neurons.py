"""``engram neurons``: knowledge neurons of facts by integrated gradients, with interventions."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from engramlab.cli.common import (
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
    check_model_options,
    console,
    print_summary,
    run_mode,
    select_facts,
    user_errors,
)

SUMMARY_KEYS = ["n_facts", "n_attributed", "n_skipped", "mean_own_drop", "mean_same_relation_drop",
                "mean_other_relation_drop", "mean_random_drop", "mean_own_enhance", "mean_prompts_per_fact",
                "mean_neurons_per_fact", "n_without_neurons", "mean_consistency", "n_relation_neurons",
                "seconds_per_fact"]


@app.command()
@user_errors
def neurons(model: str = ModelOpt,
            facts: str = FactsOpt,
            relation: Optional[List[str]] = RelationOpt,
            limit: Optional[int] = LimitOpt,
            out: Path = OutOpt, overwrite: bool = OverwriteOpt,
            paraphrases: bool = typer.Option(False, "--paraphrases/--no-paraphrases", help="Add engramlab's "
                                             "paraphrase templates (at least 3 per bundled relation) to each "
                                             "fact's own: refinement needs several paraphrases."),
            steps: int = typer.Option(20, "--steps", help="Integrated-gradients steps m."),
            ig_rule: str = typer.Option("right", "--ig-rule", help="Integration rule: right (k = 1..m) | left "
                                        "(k = 0..m-1, Dai et al.'s code) | trapezoid."),
            baseline: str = typer.Option("zero", "--baseline", help="zero | mean (mean activation over prompt "
                                         "positions 1..P-2, position 0 left out) | mean_all (0..P-2)."),
            objective: str = typer.Option("prob", "--objective", help="prob (joint probability of the target "
                                          "tokens, what the interventions measure) | logprob | prob_sum (sum "
                                          "of per-token probabilities)."),
            site: str = typer.Option("neurons", "--site", help="neurons (MLP output-projection input) | pre "
                                     "(pre-activation: gate / c_fc output)."),
            threshold: float = typer.Option(0.2, "--threshold", help="Coarse neurons: score > threshold x max."),
            refine: str = typer.Option("fact", "--refine", help="fact (p adapted per fact, cut to --max-neurons) "
                                       "| dai (Dai et al. 2022: p from 0.7 adapted per relation, >= 3 "
                                       "paraphrases, no cap)."),
            p_start: Optional[float] = typer.Option(None, "--p-start", help="Refined: share of paraphrases "
                                                    "to start from (default 0.5 fact, 0.7 dai)."),
            min_prompts: Optional[int] = typer.Option(None, "--min-prompts", help="Refined: in at least this "
                                                      "many paraphrases (default 1 fact, 3 dai)."),
            max_neurons: int = typer.Option(5, "--max-neurons", help="Refined neurons per fact, at most (dai: "
                                            "the relation's mean, at most)."),
            min_neurons: int = typer.Option(2, "--min-neurons", help="Refined neurons per fact, at least, when "
                                            "the paraphrases allow (dai: the relation's mean, at least)."),
            relation_share: float = typer.Option(0.1, "--relation-share", help="Relation neurons: in at least "
                                                 "this share of the relation's facts."),
            max_rank: int = typer.Option(100, "--max-rank", help="Skip facts whose first target token ranks "
                                         "beyond this."),
            batch_layers: Optional[int] = typer.Option(None, "--batch-layers", help="Layers per IG batch "
                                                       "(default: as many as fit in memory)."),
            random_repeats: int = typer.Option(3, "--random-repeats", help="Random-neuron controls per fact."),
            n_compare: int = typer.Option(20, "--n-compare", help="Facts of the same / other relations each "
                                          "fact's neurons are tested on, at most."),
            seed: int = SeedOpt, dtype: str = DtypeOpt, device: str = DeviceOpt):
    """Find each fact's knowledge neurons (integrated gradients over MLP neurons) and test them by
    suppressing and enhancing them."""
    from engramlab.data.facts import with_paraphrases
    from engramlab.locate.neurons import NeuronConfig, find_knowledge_neurons
    from engramlab.models import load_model
    from engramlab.report.neurons import plot_neuron_layers
    from engramlab.runs import RunDir, set_seed

    ncfg = NeuronConfig(steps=steps, baseline=baseline, objective=objective, site=site, ig_rule=ig_rule,
                        threshold=threshold, refine=refine, p_start=p_start, min_prompts=min_prompts,
                        min_neurons=min_neurons, max_neurons=max_neurons, relation_share=relation_share,
                        max_rank=max_rank, batch_layers=batch_layers, n_random_repeats=random_repeats, seed=seed,
                        n_compare=n_compare)
    check_model_options(model, dtype, device)
    factset = select_facts(facts, relation, limit)
    if paraphrases:
        factset = with_paraphrases(factset)
    few = sum(len(f.templates) < max(ncfg.min_prompts, 2) for f in factset)
    if few:
        console.print(f"note: {few} of {len(factset)} facts have fewer than {max(ncfg.min_prompts, 2)} templates, "
                      f"so their refined neurons are {'none' if ncfg.min_prompts > 1 else 'their top coarse ones'}; "
                      "--paraphrases adds engramlab's paraphrases")
    config = {"model": model, "facts": facts, "relation": relation, "limit": limit, "paraphrases": paraphrases,
              "dtype": dtype, "device": device, **{k: v for k, v in vars(ncfg).items()}}
    with RunDir(out, "neurons", config, seed=seed, mode=run_mode(overwrite)) as run:
        set_seed(seed)
        lm = load_model(model, dtype=dtype, device=device)
        result = find_knowledge_neurons(lm, factset, ncfg, show_progress=True)
        result.save(run.path)
        plot_neuron_layers(result.attributed(), result.config["n_layers"], run.file("neuron_layers.png"))
        summary = result.summary()
        run.finish(summary)
    print_summary(f"knowledge neurons: {model} on {facts}", out, summary, SUMMARY_KEYS)
    skipped = [r for r in result.records if r["skipped"]]
    if skipped:
        console.print(f"skipped {len(skipped)} fact(s) the model does not predict (reasons in neurons.jsonl)")
    console.print(f"wrote {out}/neurons.jsonl, relation_neurons.json, neuron_layers.png, summary.json")

