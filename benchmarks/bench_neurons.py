"""Knowledge-neuron attribution speed: the batched IG kernel against plain loops and against the
``knowledge-neurons`` package (PyPI, version 0.0.2).

    .venv/bin/python benchmarks/bench_neurons.py [--per-relation 2] [--steps 20] [--threads 1] [--skip-kn]
    .venv/bin/python benchmarks/bench_neurons.py --skip-smollm2 --skip-kn --screen --completeness --threads 1

Prompts: the first ``--per-relation`` facts of each relation of ``--facts`` (default the three
relations of the README's knowledge-neuron result), their main template.

Part 1, SmolLM2-135M (30 layers), every layer, m steps, site ``mlp.neurons``, zero baseline,
probability objective (the joint probability of the target tokens), integration rule ``--ig-rule``
(default right):
  * batched: ``engramlab.locate.neurons.ig.integrated_gradients``;
  * plain per-layer, per-step loop: the reference the tests use (a full forward + backward per
    layer and step), on the first ``--per-step-prompts`` prompts only (minutes each);
  * plain per-layer loop with the m steps in one batch (how the knowledge-neurons package works).
  Target: same scores (Pearson >= 0.999) and >= 4x faster than the plain per-layer loop.

Part 2, a GPT-2-architecture model built from a config (GPT-2 small sizes, random weights, the
SmolLM2 tokenizer), site ``pre`` (the c_fc output the package edits), m steps, every layer:
``KnowledgeNeurons.get_scores`` against ``integrated_gradients(..., site="pre")``. Target: >= 5x.
Equal accuracy (issue 14): the package's completeness error at m steps (its scores summed per
layer against F(a) - F(b), the probability of the target with c_fc at the last position as is or
zeroed, the ends from engramlab's batch) and engramlab timed at the fewest midpoint and
Gauss-Legendre steps (1..m) whose completeness error is no larger; the speed-ups of those runs
over ``kn_batch_20`` are reported (goal: >= 25x).
The package integrates over linspace(0, 1, m) (m points including 0), engramlab over k/m for
k = 1..m, so their scores agree closely but not exactly (Pearson reported).

Part 3 (``--screen``), the cheap screen on the bundled capital-city facts (``--screen-facts``, all
24 by default; both templates each), SmolLM2-135M: ``find_knowledge_neurons`` with
``--method ig`` (m = ``--steps``, right rule) against ``--method screen`` for each of
``--screen-layers`` (layers verified) and ``--method static``: the recall of the full-IG refined
neurons (micro: shared refined neurons over all of full IG's; and the mean per fact) and the
forward/backward pass counts (``summary.n_passes``). Goal: >= 10x fewer passes at recall >= 0.9.

Part 3 also runs screens that verify more layers with fewer Gauss-Legendre steps
(``--screen-layers 10:gauss-legendre:4``: 10 layers, 4 nodes), always against full IG at right/m.

Part 4 (``--completeness``), IG completeness error (``IGRun.completeness_error``: the sum rule's
relative error, averaged over layers with weights |F(a) - F(b)|) per rule and m on the first
``--completeness-prompts`` capital-city prompts, on ``--completeness-layers`` (default 7 layers
spread over the 30, to keep the sweep to minutes; 'all' for every layer): the smallest m of each
rule's grid whose mean (and whose worst) error over the prompts is <= 1%.

The package is not a project dependency: it is installed with ``pip install --no-deps --target``
into its own directory (default /tmp/kn-pkgs, with its missing dependency einops) and put on
sys.path only here; nothing in it is patched. Timings are the median of ``--repeats`` runs after
a warm-up, interleaved so that load from other processes hits every method alike; both wall
seconds and this process's CPU seconds are reported (with ``--threads 1`` on a shared machine
the CPU seconds are the steadier figure). Speed-ups are ratios of totals over the prompts.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from engramlab.data.facts import load_facts, target_token_ids
from engramlab.locate.neurons.ig import (completeness_error, integrated_gradients, integrated_gradients_plain,
                                        integrated_gradients_run)
from engramlab.models import load_model, wrap_model
from engramlab.models.loading import load_tokenizer

KN_VERSION = "0.0.2"


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten().double(), b.flatten().double()]))[0, 1])


def interleaved(runs: dict, repeats: int, cold: tuple = ()) -> tuple[dict, dict, dict]:
    """Run every method once (warm-up; not those in ``cold``, too slow to care), then ``repeats``
    rounds of each in turn, so that load from other processes falls on all alike. Returns median
    wall seconds, median CPU seconds of this process (what a shared machine distorts least, with
    one thread) and the last results."""
    results = {name: fn() for name, fn in runs.items() if name not in cold}
    wall = {name: [] for name in runs}
    cpu = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            w0, c0 = time.perf_counter(), time.process_time()
            results[name] = fn()
            wall[name].append(time.perf_counter() - w0)
            cpu[name].append(time.process_time() - c0)
    med = lambda d: {k: statistics.median(v) for k, v in d.items()}  # noqa: E731
    return med(wall), med(cpu), results


def summarize(rows: list[dict], base: str, others: list[str]) -> dict:
    """Total seconds per method over the prompts that ran it (the cost of attributing all of
    them) and the speed-ups of ``base`` over each other method on those same prompts."""
    out = {}
    for clock in ("wall", "cpu"):
        for name in others:
            ran = [r for r in rows if f"{name}_{clock}_s" in r]
            mine, theirs = (sum(r[f"{n}_{clock}_s"] for r in ran) for n in (base, name))
            out[f"{name}_{clock}_s_total"], out[f"{base}_{clock}_s_total_same_prompts_as_{name}"] = theirs, mine
            out[f"speedup_vs_{name}_{clock}"] = theirs / mine
    return out


def sample_facts(spec: str, per_relation: int) -> list:
    """The first ``per_relation`` facts of each relation of ``spec``."""
    return [f for group in load_facts(spec).by_relation().values() for f in list(group)[:per_relation]]


def bench_smollm2(facts: list, steps: int, repeats: int, per_step_prompts: int, rule: str = "right") -> dict:
    lm = load_model("smollm2-135m")
    rows = []
    for n, fact in enumerate(facts):
        prompt = fact.prompt()
        ids = lm.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        target = target_token_ids(lm.tokenizer, prompt, fact.object)
        runs = {"batched": lambda: integrated_gradients(lm, ids, target, steps=steps, rule=rule),
                "per_layer": lambda: integrated_gradients_plain(lm, ids, target, steps=steps, batch_steps=True,
                                                                rule=rule)}
        if n < per_step_prompts:  # minutes per prompt: timed once, without a warm-up
            runs["per_layer_per_step"] = lambda: integrated_gradients_plain(lm, ids, target, steps=steps, rule=rule)
        wall, cpu, res = interleaved(runs, repeats, cold=("per_layer_per_step",))
        row = {"prompt": prompt, "object": fact.object, "n_tokens": len(ids), "n_target_tokens": len(target),
               **{f"{k}_wall_s": v for k, v in wall.items()}, **{f"{k}_cpu_s": v for k, v in cpu.items()},
               **{f"pearson_vs_{k}": pearson(res["batched"], res[k]) for k in runs if k != "batched"},
               "max_abs_diff": max(float((res["batched"] - res[k]).abs().max()) for k in runs if k != "batched"),
               "max_abs_score": float(res["per_layer"].abs().max())}
        rows.append(row)
        print(json.dumps(row), flush=True)
    others = ["per_layer"] + (["per_layer_per_step"] if per_step_prompts else [])
    out = {"prompts": rows, **summarize(rows, "batched", others)}
    out["min_pearson"] = min(v for r in rows for k, v in r.items() if k.startswith("pearson"))
    return out


def install_kn(directory: Path) -> None:
    """The package and its one dependency missing from this venv, into their own directory."""
    if (directory / "knowledge_neurons").is_dir() and (directory / "einops").is_dir():
        return
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(directory),
                    f"knowledge-neurons=={KN_VERSION}", "einops"], check=True)


def bench_kn(kn_dir: Path, facts: list, steps: int, repeats: int) -> dict:
    install_kn(kn_dir)
    sys.path.insert(0, str(kn_dir))
    from knowledge_neurons import KnowledgeNeurons
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = load_tokenizer("smollm2-135m")
    config = GPT2Config(vocab_size=len(tok), n_embd=768, n_layer=12, n_head=12, n_inner=3072, n_positions=256,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).eval()
    model.requires_grad_(False)  # as load_model leaves every model: gradients w.r.t. activations only
    lm = wrap_model(model, tok, "gpt2-small-config")
    kn = KnowledgeNeurons(model, tok, model_type="gpt2", device="cpu")
    rows = []
    for fact in facts:
        prompt = fact.prompt()
        target = target_token_ids(tok, prompt, fact.object)
        if len(target) != 1:
            continue  # the package scores one target token for GPT-2 models
        ground_truth = tok.decode(target)
        # The package tokenizes with tok(prompt); give engramlab exactly the same ids.
        ids = tok(prompt)["input_ids"]
        # Equal accuracy: the package's completeness error at m = steps (its scores against
        # F(a) - F(b), F the target probability, b = 0 at c_fc, the ends taken from engramlab's
        # batch), and the fewest midpoint / Gauss-Legendre steps that reach it.
        ref = integrated_gradients_run(lm, ids, target, steps=steps, site="pre")
        every = list(range(lm.adapter.n_layers))
        kn_scores = kn.get_scores(prompt, ground_truth, batch_size=steps, steps=steps, pbar=False)
        kn_error = completeness_error(kn_scores.cpu(), ref.f_input, ref.f_baseline, every)
        equal = {}
        for rule in ("midpoint", "gauss-legendre"):
            errors = {m: integrated_gradients_run(lm, ids, target, steps=m, site="pre", rule=rule).completeness_error()
                      for m in range(1, steps + 1)}
            equal[rule] = (next((m for m, e in errors.items() if e <= kn_error), steps), errors)
        runs = {
            "engramlab": lambda: integrated_gradients(lm, ids, target, steps=steps, site="pre"),
            "kn_batch_20": lambda: kn.get_scores(prompt, ground_truth, batch_size=steps, steps=steps, pbar=False),
            "kn_batch_10": lambda: kn.get_scores(prompt, ground_truth, batch_size=steps // 2, steps=steps, pbar=False),
            **{f"engramlab_equal_{rule}": (lambda rule=rule: integrated_gradients(
                lm, ids, target, steps=equal[rule][0], site="pre", rule=rule)) for rule in equal},
            # Without the weight-0 rows at alpha = 1 and 0 (no self-check, no completeness error).
            **{f"engramlab_equal_{rule}_no_ends": (lambda rule=rule: integrated_gradients(
                lm, ids, target, steps=equal[rule][0], site="pre", rule=rule, ends=False)) for rule in equal},
        }
        wall, cpu, res = interleaved(runs, repeats)
        row = {"prompt": prompt, "n_tokens": len(ids), **{f"{k}_wall_s": v for k, v in wall.items()},
               **{f"{k}_cpu_s": v for k, v in cpu.items()},
               "pearson_vs_kn": pearson(res["engramlab"], res["kn_batch_20"]),
               "kn_completeness_error": kn_error, "engramlab_right_completeness_error": ref.completeness_error(),
               **{f"equal_{rule}_steps": m for rule, (m, _) in equal.items()},
               **{f"equal_{rule}_completeness_error": errs[m] for rule, (m, errs) in equal.items()}}
        rows.append(row)
        print(json.dumps(row), flush=True)
    out = {"prompts": rows, **summarize(rows, "engramlab", ["kn_batch_20", "kn_batch_10"])}
    out["min_pearson"] = min(r["pearson_vs_kn"] for r in rows)
    for rule in ("midpoint", "gauss-legendre", "midpoint_no_ends", "gauss-legendre_no_ends"):
        for clock in ("wall", "cpu"):
            out[f"speedup_equal_accuracy_{rule}_vs_kn_batch_20_{clock}"] = (
                sum(r[f"kn_batch_20_{clock}_s"] for r in rows) / sum(r[f"engramlab_equal_{rule}_{clock}_s"] for r in rows))
    return out


def _refined(result) -> dict:
    return {(r["subject"], r["object"]): {(l, i) for l, i, _ in r["neurons"]} for r in result.attributed()}


def parse_screens(spec: str, steps: int) -> list[tuple[int, str, int]]:
    """"3,10:gauss-legendre:4" -> [(3, "right", steps), (10, "gauss-legendre", 4)]: layers
    verified, and the rule and steps the verification uses; "all:RULE:M" (0) is full IG with
    that rule and m (how much of the screen's loss is the rule's)."""
    out = []
    for item in spec.split(","):
        k, *rest = item.split(":")
        out.append((0 if k == "all" else int(k), rest[0] if rest else "right", int(rest[1]) if len(rest) > 1 else steps))
    return out


def bench_screen(n_facts: int | None, steps: int, screens: list[tuple[int, str, int]], screen_neurons: int) -> dict:
    """Full IG (right rule, ``steps``) against the screen (and the static score alone) on the
    capital-city facts."""
    from engramlab.data.facts import FactSet
    from engramlab.locate.neurons.find import NeuronConfig, find_knowledge_neurons

    lm = load_model("smollm2-135m")
    facts = load_facts("country_capital_city")
    facts = FactSet(list(facts)[:n_facts]) if n_facts else facts
    common = dict(steps=steps, n_compare=0, n_random_repeats=0)
    runs = {"ig": NeuronConfig(method="ig", **common), "static": NeuronConfig(method="static", **common)}
    for k, rule, m in screens:
        mine = {**common, "steps": m, "ig_rule": rule}
        runs[f"screen_{k}_{rule}_{m}" if k else f"ig_{rule}_{m}"] = (
            NeuronConfig(method="screen", screen_layers=k, screen_neurons=screen_neurons, **mine) if k
            else NeuronConfig(method="ig", **mine))
    out, refined = {"n_facts": len(facts), "steps": steps, "screen_neurons": screen_neurons}, {}
    for name, config in runs.items():
        c0 = time.process_time()
        result = find_knowledge_neurons(lm, facts, config)
        summary = result.summary()
        refined[name] = _refined(result)
        out[name] = {"n_passes": summary["n_passes"], "mean_passes_per_fact": summary["mean_passes_per_fact"],
                     "n_attributed": summary["n_attributed"], "cpu_s": round(time.process_time() - c0, 2),
                     "mean_completeness_error": summary["mean_completeness_error"]}
        if name != "ig":
            keys = [k for k in refined["ig"] if refined["ig"][k]]
            hit = sum(len(refined["ig"][k] & refined[name].get(k, set())) for k in keys)
            total = sum(len(refined["ig"][k]) for k in keys)
            out[name]["recall_micro"] = hit / total if total else None
            out[name]["recall_mean_per_fact"] = (statistics.mean(len(refined["ig"][k] & refined[name].get(k, set()))
                                                                 / len(refined["ig"][k]) for k in keys)
                                                 if keys else None)
            out[name]["pass_ratio_ig_over_this"] = out["ig"]["n_passes"] / summary["n_passes"]
        print(json.dumps({name: out[name]}), flush=True)
    layers = [l for v in refined["ig"].values() for l, _ in v]
    out["ig_refined_layers"] = {str(l): layers.count(l) for l in sorted(set(layers))}
    return out


GRIDS = {"right": [20, 40, 80, 160], "left": [20, 40, 80, 160], "trapezoid": [4, 8, 16, 32, 64],
         "midpoint": [2, 4, 8, 16, 32, 64], "gauss-legendre": [2, 3, 4, 6, 8, 12, 16, 24, 32]}


def bench_completeness(n_prompts: int, rules: list[str], layers: list[int] | None) -> dict:
    """Completeness error per rule and m on the first capital-city prompts, on ``layers`` (None:
    every layer; the error is per layer, so a subset only changes which layers are averaged)."""
    from engramlab.locate.neurons.ig import integrated_gradients_run

    lm = load_model("smollm2-135m")
    prompts = [(f.prompt(j), f.object) for f in load_facts("country_capital_city") for j in range(len(f.templates))]
    prompts = prompts[:n_prompts]
    out = {"prompts": [p for p, _ in prompts], "tolerance": 0.01, "layers": layers or "all"}
    for rule in rules:
        curve = {}
        for m in GRIDS[rule]:
            errors = []
            for prompt, obj in prompts:
                ids = lm.tokenizer(prompt, add_special_tokens=False)["input_ids"]
                target = target_token_ids(lm.tokenizer, prompt, obj)
                errors.append(integrated_gradients_run(lm, ids, target, steps=m, rule=rule,
                                                       layers=layers).completeness_error())
            curve[m] = {"mean": statistics.mean(errors), "max": max(errors)}
        first = next((m for m, e in curve.items() if e["mean"] <= 0.01), None)
        out[rule] = {"curve": {str(m): {k: round(v, 5) for k, v in e.items()} for m, e in curve.items()},
                     "steps_for_1pct_mean": first,
                     "steps_for_1pct_every_prompt": next((m for m, e in curve.items() if e["max"] <= 0.01), None)}
        print(json.dumps({rule: out[rule]}), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--facts", default="country_capital_city,country_language,country_largest_city")
    ap.add_argument("--per-relation", type=int, default=2, help="facts per relation to time")
    ap.add_argument("--steps", type=int, default=20, help="integration steps m")
    ap.add_argument("--ig-rule", dest="rule", default="right", help="integration rule of part 1: right | left | trapezoid | midpoint | gauss-legendre")
    ap.add_argument("--repeats", type=int, default=1, help="timed rounds after the warm-up")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--per-step-prompts", type=int, default=1, help="prompts also timed with the (slow) "
                    "per-layer, per-step loop")
    ap.add_argument("--skip-kn", action="store_true", help="skip the knowledge-neurons comparison")
    ap.add_argument("--skip-smollm2", action="store_true")
    ap.add_argument("--kn-dir", type=Path, default=Path("/tmp/kn-pkgs"), help="where the package is installed")
    ap.add_argument("--screen", action="store_true", help="part 3: the screen's recall and pass count vs full IG")
    ap.add_argument("--screen-facts", type=int, default=None, help="capital-city facts for part 3 (default all)")
    ap.add_argument("--screen-layers", default="3,10:gauss-legendre:4,all:gauss-legendre:4",
                    help="screens to run, comma-separated: LAYERS[:RULE[:STEPS]] (default rule right, --steps); "
                    "LAYERS 'all': full IG with that rule and steps")
    ap.add_argument("--screen-neurons", type=int, default=50, help="top static-score neurons that choose layers")
    ap.add_argument("--completeness", action="store_true", help="part 4: completeness error per rule and m")
    ap.add_argument("--completeness-prompts", type=int, default=3)
    ap.add_argument("--completeness-rules", default="right,trapezoid,midpoint,gauss-legendre")
    ap.add_argument("--completeness-layers", default="0,5,10,15,20,25,29",
                    help="comma-separated layers for part 4, or 'all'")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    report = {"threads": torch.get_num_threads(), "steps": args.steps, "rule": args.rule, "torch": torch.__version__}
    facts = sample_facts(args.facts, args.per_relation)
    if not args.skip_smollm2:
        report["smollm2"] = bench_smollm2(facts, args.steps, args.repeats, args.per_step_prompts, args.rule)
    if not args.skip_kn:
        report["knowledge_neurons"] = bench_kn(args.kn_dir, facts, args.steps, args.repeats)
    if args.screen:
        report["screen"] = bench_screen(args.screen_facts, args.steps, parse_screens(args.screen_layers, args.steps),
                                        args.screen_neurons)
    if args.completeness:
        layers = None if args.completeness_layers == "all" else [int(l) for l in args.completeness_layers.split(",")]
        report["completeness"] = bench_completeness(args.completeness_prompts, args.completeness_rules.split(","), layers)
    text = json.dumps({k: v for k, v in report.items()}, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
