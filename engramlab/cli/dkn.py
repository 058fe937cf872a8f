"""``engram dkn``: degenerate knowledge neurons per fact, by every clustering method."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

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
    run_mode,
    select_facts,
    user_errors,
)


def _methods(value: str) -> tuple[str, ...]:
    return tuple(m.strip() for m in value.split(",") if m.strip())


@app.command()
@user_errors
def dkn(model: str = ModelOpt,
        facts: str = FactsOpt,
        relation: Optional[List[str]] = RelationOpt,
        limit: Optional[int] = LimitOpt,
        out: Path = OutOpt, overwrite: bool = OverwriteOpt,
        template: int = typer.Option(0, "--template", help="Prompt template index."),
        known_rank: int = typer.Option(1, "--known-rank", help="Skip facts whose first target token ranks "
                                       "worse than this (1: only facts the model gets right)."),
        threshold: float = typer.Option(0.2, "--threshold", help="Candidates: attribution > threshold x max."),
        max_candidates: int = typer.Option(24, "--max-candidates", help="At most this many candidates (strongest)."),
        steps: int = typer.Option(20, "--steps", help="Integrated-gradients steps."),
        baseline: str = typer.Option("zero", "--baseline", help="IG baseline: zero | mean."),
        max_span: int = typer.Option(3, "--max-span", help="Layers two neurons may be apart and still share "
                                     "an edge."),
        fold_norm: bool = typer.Option(True, "--fold-norm/--no-fold-norm", help="Fold the MLP norm's weight "
                                       "(and LayerNorm centring) into the read vectors."),
        norm_scale: str = typer.Option("none", "--norm-scale", help="none | rms: scale every edge into layer j "
                                       "by 1/rms of what layer j's MLP norm reads at the fact's last prompt token."),
        methods: str = typer.Option(",".join(("persistence", "pairs", "hierarchical", "dbscan", "kmeans")),
                                    "--methods", help="Comma-separated clustering methods to run."),
        method: str = typer.Option("persistence", "--method", help="Method reported by the top-level keys."),
        quantile: float = typer.Option(0.9, "--quantile", help="Persistence/hierarchical: keep clusters more "
                                       "persistent than this quantile of the merge distances."),
        clustering: str = typer.Option("quantile", "--clustering", help="Persistence parameterisation: quantile "
                                       "(engramlab: single linkage cut at --quantile of the deaths) | reference "
                                       "(the published NTC; add --outliers drop for its clusters only)."),
        distance_quantile: float = typer.Option(0.2, "--distance-quantile", help="Reference NTC: keep edges "
                                                "shorter than this quantile of the distances."),
        edge_fraction: float = typer.Option(0.5, "--edge-fraction", help="Reference NTC: sweep only this "
                                            "shortest fraction of the kept edges."),
        birth_quantile: float = typer.Option(0.5, "--birth-quantile", help="Reference NTC: a cluster's "
                                             "persistence must exceed this quantile of the births."),
        linkage: str = typer.Option("average", "--linkage", help="Hierarchical linkage."),
        dbscan_eps: Optional[float] = typer.Option(None, "--dbscan-eps", help="Default: the persistence "
                                                   "threshold."),
        dbscan_min_samples: int = typer.Option(3, "--dbscan-min-samples"),
        kmeans_k: Optional[int] = typer.Option(None, "--kmeans-k", help="Default: as many as persistence finds."),
        outliers: str = typer.Option("singleton", "--outliers", help="Unconnected neurons and DBSCAN noise: "
                                     "singleton | drop (same for every method)."),
        t_low: float = typer.Option(0.05, "--t-low", help="Every proper subset must drop P(target) by less "
                                    "(relative)."),
        t_high: float = typer.Option(0.3, "--t-high", help="The whole DKN must drop P(target) by more."),
        max_subsets: int = typer.Option(512, "--max-subsets", help="Largest exhaustive subset search; beyond it "
                                        "the search samples and says so."),
        subset_samples: int = typer.Option(64, "--subset-samples", help="Random proper subsets per sampled check."),
        positions: str = typer.Option("last", "--positions", help="Suppress at the last prompt token | all."),
        robustness: bool = typer.Option(True, "--robustness/--no-robustness", help="Score perturbed queries "
                                        "with each DKN attenuated and enhanced."),
        attenuate: float = typer.Option(0.0, "--attenuate", help="Robustness: scale of attenuated DKN neurons."),
        enhance: float = typer.Option(2.0, "--enhance", help="Robustness: scale of enhanced DKN neurons."),
        batch_layers: Optional[int] = typer.Option(None, "--batch-layers", help="Layers per IG batch (default: "
                                                   "as many as fit in memory)."),
        evolve: bool = typer.Option(False, "--evolvability", help="Also fine-tune on new facts through DKN / KN "
                                    "/ random neurons / the full model."),
        evolve_new: int = typer.Option(8, "--evolve-new", help="New facts to learn."),
        evolve_steps: int = typer.Option(30, "--evolve-steps"),
        evolve_lr: float = typer.Option(1e-3, "--evolve-lr"),
        evolve_arms: str = typer.Option("dkn,kn,random,kn_all,full", "--evolve-arms", help="Comma-separated: dkn "
                                        "| kn, random (matched to the DKN in size and layers) | kn_all (every "
                                        "candidate) | random_any (any layer) | full."),
        batch_size: int = typer.Option(64, "--batch-size", help="Subsets per forward pass."),
        seed: int = SeedOpt, dtype: str = DtypeOpt, device: str = DeviceOpt):
    """Find degenerate knowledge neurons: clusters of knowledge neurons that back each other up."""
    from dataclasses import asdict

    from engramlab.locate.dkn import DKNConfig, find_dkns
    from engramlab.locate.dkn.evolvability import EvolveConfig, evolvability
    from engramlab.locate.dkn.clustering import ClusterConfig
    from engramlab.models import load_model
    from engramlab.runs import RunDir, set_seed

    config = DKNConfig(threshold=threshold, max_candidates=max_candidates, steps=steps, baseline=baseline,
                       template=template, known_rank=known_rank, max_span=max_span, fold_norm=fold_norm,
                       norm_scale=norm_scale, methods=_methods(methods), method=method,
                       cluster=ClusterConfig(quantile=quantile, clustering=clustering,
                                             distance_quantile=distance_quantile, edge_fraction=edge_fraction,
                                             birth_quantile=birth_quantile, linkage=linkage, dbscan_eps=dbscan_eps,
                                             dbscan_min_samples=dbscan_min_samples, kmeans_k=kmeans_k,
                                             outliers=outliers, seed=seed),
                       t_low=t_low, t_high=t_high, max_subsets=max_subsets, subset_samples=subset_samples,
                       positions=positions, batch_size=batch_size, robustness=robustness, attenuate=attenuate,
                       enhance=enhance, batch_layers=batch_layers, seed=seed)
    config.validate()
    evolve_config = EvolveConfig(n_new=evolve_new, steps=evolve_steps, lr=evolve_lr, arms=_methods(evolve_arms),
                                 seed=seed)
    if evolve:
        evolve_config.validate()
    check_model_options(model, dtype, device)
    factset = select_facts(facts, relation, limit)
    run_config = {"model": model, "facts": facts, "relation": relation, "limit": limit, "dtype": dtype,
                  "device": device, "dkn": asdict(config), "evolvability": asdict(evolve_config) if evolve else None}
    with RunDir(out, "dkn", run_config, seed=seed, mode=run_mode(overwrite)) as run:
        set_seed(seed)
        lm = load_model(model, dtype=dtype, device=device)
        result = find_dkns(lm, factset, config, show_progress=True)
        if evolve:
            result.evolvability = evolvability(lm, result, list(factset), evolve_config)
        result.save(run.path)
        summary = result.summary()
        run.finish(summary)

    t = Table(title=f"dkn: {model} on {facts} ({summary['n_evaluated']} of {summary['n_facts']} facts evaluated)")
    for col in ("method", "found", "of which sampled", "partial drop", "full drop", "clusters", "dkn neurons"):
        t.add_column(col, justify="left" if col == "method" else "right")
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    for m in config.methods:
        g = lambda k: summary.get(f"{m}.{k}")  # noqa: E731
        t.add_row(m, fmt(g("dkn_found_rate")), fmt(g("dkn_found_rate_sampled")), fmt(g("mean_partial_drop")),
                  fmt(g("mean_full_drop")),
                  fmt(g("mean_clusters")), fmt(g("mean_dkn_neurons")))
    console.print(t)
    if result.evolvability and result.evolvability.get("arms"):
        e = Table(title="evolvability (accuracy on new facts / retention of old ones)")
        for col in ("arm", "neurons", "layers", "new top1", "old top1"):
            e.add_column(col)
        for arm, v in result.evolvability["arms"].items():
            layers = ",".join(f"{l}:{c}" for l, c in (v.get("layers") or {}).items()) or "all"
            e.add_row(arm, str(v["n_neurons"] or "all"), layers, fmt(v["new_top1"]), fmt(v["old_top1"]))
        console.print(e)
    console.print(f"wrote {out}/dkn.jsonl, summary.json, manifest.json")
