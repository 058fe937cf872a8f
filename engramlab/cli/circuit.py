"""``engram circuit``: the edges of the head/MLP graph that carry facts, found with EAP-IG."""

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

SUMMARY_KEYS = ["n_nodes", "n_edges_total", "n_edges_ungrouped", "n_edges_kept", "edge_fraction", "faithfulness",
                "discovery_faithfulness", "hit_at_10_model", "hit_at_10_circuit", "n_discovery", "n_evaluation",
                "n_wrong", "n_skipped", "n_mover_heads", "n_relation_heads", "n_mixture_heads", "seconds"]


@app.command()
@user_errors
def circuit(model: str = ModelOpt,
            facts: str = FactsOpt,
            relation: Optional[List[str]] = RelationOpt,
            limit: Optional[int] = LimitOpt,
            out: Path = OutOpt, overwrite: bool = OverwriteOpt,
            method: str = typer.Option("eap-ig", "--method", help="eap-ig | eap | clean-corrupted."),
            steps: int = typer.Option(5, "--steps", help="EAP-IG integration steps m."),
            ig_rule: str = typer.Option("right", "--ig-rule", help="EAP-IG integration points k/m: right "
                                        "(k = 1..m; Hanna et al., DKC) | left (k = 0..m-1; upstream EAP-IG v2) | "
                                        "trapezoid (k = 0..m, m + 1 passes)."),
            metric: str = typer.Option("logit_diff", "--metric", help="logit_diff (clean vs corrupted answer) | "
                                       "logprob (clean answer)."),
            rule: str = typer.Option("topn", "--rule", help="Pruning rule: topn | threshold | greedy "
                                     "(the integration rule is --ig-rule)."),
            top_n: Optional[int] = typer.Option(None, "--top-n", help="Edges to keep (default: the smallest N, "
                                                "at most --max-fraction of the edges, reaching "
                                                "--target-faithfulness on the discovery facts)."),
            threshold: Optional[float] = typer.Option(None, "--threshold", help="|score| cut for --rule threshold."),
            target_faithfulness: float = typer.Option(0.9, "--target-faithfulness"),
            max_fraction: float = typer.Option(0.1, "--max-fraction"),
            ablation: str = typer.Option("corrupted", "--ablation", help="What edges outside the circuit carry: "
                                         "corrupted | zero | mean; edges are scored with the same ablation."),
            score_ablation: Optional[str] = typer.Option(None, "--score-ablation", help="Score edges with "
                                                         "another ablation's differences (corrupted | zero | "
                                                         "mean; default: --ablation)."),
            split: float = typer.Option(0.5, "--split", help="Share of each relation's subjects used for "
                                        "discovery; the rest is held out for evaluation."),
            template: int = typer.Option(0, "--template", help="Index of the prompt template to use."),
            batch_size: int = typer.Option(8, "--batch-size", help="Pairs per attribution batch."),
            mover_ratio: float = typer.Option(10.0, "--mover-ratio", help="Head roles: |subject| / |relation| "
                                              "direct effect above this: mover head."),
            relation_ratio: float = typer.Option(0.1, "--relation-ratio", help="Head roles: below this: relation "
                                                 "head (between the two: mixture)."),
            keep_wrong: bool = typer.Option(False, "--keep-wrong", help="Keep facts the model gets wrong."),
            eapig_json: bool = typer.Option(False, "--eapig-json", help="Also write circuit_eapig.json (every "
                                            "edge, EAP-IG layout)."),
            draw: bool = typer.Option(True, "--draw/--no-draw", help="Write circuit.svg and circuit.dot."),
            seed: int = SeedOpt, dtype: str = DtypeOpt, device: str = DeviceOpt):
    """Find the circuit behind facts (EAP-IG edge scores on discovery facts) and evaluate it on
    held-out facts: faithfulness, Hit@10, faithfulness vs N, head roles, logit lens."""
    from engramlab.data.facts import load_facts
    from engramlab.locate.circuits import CircuitConfig, find_circuit
    from engramlab.report.circuits import draw_circuit
    from engramlab.models import load_model
    from engramlab.runs import RunDir, set_seed

    ccfg = CircuitConfig(relation=relation or None, limit=limit, method=method, steps=steps, ig_rule=ig_rule,
                         metric=metric, rule=rule, top_n=top_n, threshold=threshold,
                         target_faithfulness=target_faithfulness, max_fraction=max_fraction, ablation=ablation,
                         score_ablation=score_ablation, split=split, template=template, seed=seed,
                         require_correct=not keep_wrong, batch_size=batch_size, mover_ratio=mover_ratio,
                         relation_ratio=relation_ratio)
    check_model_options(model, dtype, device)
    select_facts(facts, relation, limit)  # an unknown relation or --limit 0 is an error before anything is written
    loaded = load_facts(facts)
    config = {"model": model, "facts": facts, "dtype": dtype, "device": device, **vars(ccfg)}
    with RunDir(out, "circuit", config, seed=seed, mode=run_mode(overwrite)) as run:
        set_seed(seed)
        lm = load_model(model, dtype=dtype, device=device)
        result = find_circuit(lm, loaded, ccfg, show_progress=True)
        result.save(run.path, eapig=eapig_json)
        if draw:
            draw_circuit(result.scores, result.kept, result.graph, run.file("circuit.svg"))
        summary = result.summary()
        run.finish(summary)
    print_summary(f"circuit: {model} on {facts}", out, summary, SUMMARY_KEYS)
    if summary["n_edges_ungrouped"] != summary["n_edges_total"]:
        console.print(f"edge counts are per key/value head ({result.graph.n_kv_heads} kv heads for "
                      f"{result.graph.n_heads} query heads): EAP-IG's ungrouped graph has "
                      f"{summary['n_edges_ungrouped']:,} edges")
    if result.skipped:
        console.print(f"skipped {len(result.skipped)} fact(s) (reasons in skipped.jsonl)")
    console.print(f"wrote {out}/scores.safetensors, circuit.json, evaluation.json, components.json"
                  + (", circuit.svg" if draw else "") + ", summary.json")

