"""Knowledge-neuron attribution speed: the batched IG kernel against plain loops and against the
``knowledge-neurons`` package (PyPI, version 0.0.2).

    .venv/bin/python benchmarks/bench_neurons.py [--per-relation 2] [--steps 20] [--threads 1] [--skip-kn]

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
The package integrates over linspace(0, 1, m) (m points including 0), engramlab over k/m for
k = 1..m, so their scores agree closely but not exactly (Pearson reported).

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
from engramlab.locate.neurons.ig import integrated_gradients, integrated_gradients_plain
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
        runs = {
            "engramlab": lambda: integrated_gradients(lm, ids, target, steps=steps, site="pre"),
            "kn_batch_20": lambda: kn.get_scores(prompt, ground_truth, batch_size=steps, steps=steps, pbar=False),
            "kn_batch_10": lambda: kn.get_scores(prompt, ground_truth, batch_size=steps // 2, steps=steps, pbar=False),
        }
        wall, cpu, res = interleaved(runs, repeats)
        row = {"prompt": prompt, "n_tokens": len(ids), **{f"{k}_wall_s": v for k, v in wall.items()},
               **{f"{k}_cpu_s": v for k, v in cpu.items()},
               "pearson_vs_kn": pearson(res["engramlab"], res["kn_batch_20"])}
        rows.append(row)
        print(json.dumps(row), flush=True)
    out = {"prompts": rows, **summarize(rows, "engramlab", ["kn_batch_20", "kn_batch_10"])}
    out["min_pearson"] = min(r["pearson_vs_kn"] for r in rows)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--facts", default="country_capital_city,country_language,country_largest_city")
    ap.add_argument("--per-relation", type=int, default=2, help="facts per relation to time")
    ap.add_argument("--steps", type=int, default=20, help="integration steps m")
    ap.add_argument("--ig-rule", dest="rule", default="right", help="integration rule of part 1: right | left | trapezoid")
    ap.add_argument("--repeats", type=int, default=1, help="timed rounds after the warm-up")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--per-step-prompts", type=int, default=1, help="prompts also timed with the (slow) "
                    "per-layer, per-step loop")
    ap.add_argument("--skip-kn", action="store_true", help="skip the knowledge-neurons comparison")
    ap.add_argument("--skip-smollm2", action="store_true")
    ap.add_argument("--kn-dir", type=Path, default=Path("/tmp/kn-pkgs"), help="where the package is installed")
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
    text = json.dumps({k: v for k, v in report.items()}, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
