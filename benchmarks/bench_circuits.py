"""EAP-IG edge attribution against the floor it cannot beat: m plain forward+backward passes.

    .venv/bin/python benchmarks/bench_circuits.py [--models smollm2-135m,gpt2-small] [--batch 8]
        [--facts country_capital_city] [--steps 5] [--ig-rule right] [--ablation corrupted] [--repeats 3]
        [--threads 1] [--device cpu] [--json out.json] [--parts attribution,circuit]
        [--circuit-facts person_mother] [--circuit-limit 200] [--top-n 5000]
        [--completeness-rules right,left,trapezoid,midpoint,gauss-legendre] [--completeness-target 0.01]

For each model, on one batch of clean/corrupted pairs of real prompts (the first ``--batch`` pairs
``corrupted_pairs`` makes from ``--facts``, SmolLM2's tokenizer for both models, right-padded):

* time: EAP-IG with m = ``--steps`` (``attribute_batch``: one forward+backward pass per point of
  ``--ig-rule`` (m; m + 1 for trapezoid) with the per-head gradient hooks, one no-grad forward of
  the corrupted prompts (the clean ones too when the rule has no alpha = 1 point), the scores;
  under corrupted ablation the batch's shared prompt prefix runs once; ``--ablation`` as in
  ``engram circuit``) against as many plain passes of the same batch (forward from input
  embeddings that require grad over every position, metric at the last token, gradient w.r.t.
  the embeddings). Target: ratio < 1.5 (issue 14's goal: <= 1.2).
* peak memory: the extra memory one EAP-IG call needs over the loaded model, against one plain
  forward+backward. Target: ratio < 1.5. On CPU it is the peak resident set (VmHWM, reset through
  /proc/self/clear_refs) minus the resident set before the call, with glibc told to return large
  blocks to the system at once (MALLOC_MMAP_THRESHOLD_), so freed tensors do not linger; on CUDA
  it is torch's peak allocation.

``gpt2-small`` is GPT-2 small's shape (12 x 12 heads, d_model 768) with random weights, built from
``GPT2Config()``: no download. Each model runs in its own process so one cannot inflate the
other's memory figures. Wall times on a shared machine vary; the ratios are what to compare.

``--parts completeness`` (not run by default) measures, on the same batch, the EAP-IG completeness
error (``attribute.completeness_errors``, mean over the pairs) of each ``--completeness-rules`` rule
for growing m, and reports the first m reaching ``--completeness-target`` (1%).

``--parts circuit`` (run by default after ``attribution``) times the whole locator, ``find_circuit``,
as ``engram circuit`` runs it: SmolLM2-135M on the first ``--circuit-limit`` (200) facts of
``--circuit-facts`` (person_mother), wrong answers kept (``--keep-wrong``: SmolLM2 gets most of
them wrong, and the filter would leave a handful), m = ``--steps``, once with the automatic N and
once per ``--top-n``. It prints each stage's seconds (``stats``: filter, attribute, search,
heads, lens, evaluate, curve) and seconds / attribute_seconds. Target: <= 2 (everything after the
attribution costs at most the attribution again).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

import torch

MODELS = ("smollm2-135m", "gpt2-small")


def _load(name: str, device: str):
    from engramlab.models import load_model, wrap_model
    from engramlab.models.loading import load_tokenizer

    if name == "gpt2-small":
        from transformers import GPT2Config, GPT2LMHeadModel

        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config()).eval().to(device)
        model.requires_grad_(False)
        # SmolLM2's tokenizer (49,152 ids) fits GPT-2's 50,257-entry embedding: same prompts for both
        return wrap_model(model, load_tokenizer("smollm2-135m"))
    return load_model(name, device=device)


def _batch(lm, batch: int, facts: str):
    """The first ``batch`` clean/corrupted pairs of ``facts`` (real prompts, padded as in use)."""
    from engramlab.data.facts import corrupted_pairs, load_facts
    from engramlab.locate.circuits.data import encode_pairs

    pairs = corrupted_pairs(load_facts(facts), lm.tokenizer)
    if len(pairs) < batch:
        raise SystemExit(f"{facts}: only {len(pairs)} pairs, fewer than --batch {batch}")
    return encode_pairs(lm, pairs[:batch])


def _plain_pass(lm, b) -> None:
    """One forward+backward: the gradient of the metric w.r.t. the input embeddings. Like EAP-IG it
    unembeds only the last real token of each row (the metric reads nothing else), so the
    comparison does not credit EAP-IG with that saving."""
    from engramlab.locate.circuits.attribute import metric_values

    embeds = lm.adapter.embed(b.clean_ids).detach().requires_grad_(True)
    hidden = lm.model.base_model(inputs_embeds=embeds, attention_mask=b.mask).last_hidden_state
    logits = lm.adapter.unembed(hidden[torch.arange(len(b), device=hidden.device), b.last])
    torch.autograd.grad(metric_values(logits, b, "logit_diff").sum(), embeds)


def _rss_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", open("/proc/self/status").read()).group(1))


def _peak_extra_mib(fn, device: str) -> float:
    """Extra memory (MiB) ``fn`` needs at its peak over what is resident before it."""
    import gc

    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    before = _rss_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark to the current resident set
    fn()
    return (_rss_kib("VmHWM") - before) / 1024


def _timed(fn, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def measure(name: str, batch: int, facts: str, steps: int, repeats: int, device: str, ig_rule: str = "right",
            ablation: str = "corrupted") -> dict:
    from engramlab.locate.circuits import CircuitGraph, attribute_batch
    from engramlab.locate.integration import integration_points

    lm = _load(name, device)
    graph = CircuitGraph.from_model(lm)
    b = _batch(lm, batch, facts)
    eap_ig = lambda: attribute_batch(lm, graph, b, "eap-ig", steps, rule=ig_rule, ablation=ablation)  # noqa: E731
    passes = len(integration_points(ig_rule, steps))

    def plain_m():
        for _ in range(passes):
            _plain_pass(lm, b)

    # memory first, each call's first run after one warm-up of both
    eap_ig(), plain_m()
    mem_plain = _peak_extra_mib(lambda: _plain_pass(lm, b), device)
    mem_eap = _peak_extra_mib(eap_ig, device)
    t_plain, t_eap = [], []
    for _ in range(repeats):  # interleaved, so drifting load hits both alike
        t_plain.append(_timed(plain_m, device))
        t_eap.append(_timed(eap_ig, device))
    plain_s, eap_s = statistics.median(t_plain), statistics.median(t_eap)
    return {"model": name, "device": device, "threads": torch.get_num_threads(), "batch": batch, "facts": facts,
            "tokens": int(b.mask.sum()), "width": b.mask.shape[1],
            "steps": steps, "ig_rule": ig_rule, "ablation": ablation, "passes": passes, "n_edges": graph.n_edges,
            "eap_ig_seconds_per_example": eap_s / batch, "plain_seconds_per_example": plain_s / batch,
            "time_ratio": eap_s / plain_s,
            "eap_ig_peak_extra_mib": mem_eap, "plain_fwd_bwd_peak_extra_mib": mem_plain,
            "memory_ratio": mem_eap / mem_plain}


COMPLETENESS_STEPS = {"right": (1, 2, 4, 8, 16, 32, 64), "left": (1, 2, 4, 8, 16, 32, 64),
                      "trapezoid": (1, 2, 3, 4, 6, 8, 12, 16), "midpoint": (1, 2, 3, 4, 6, 8, 12, 16),
                      "gauss-legendre": (1, 2, 3, 4, 5, 6, 8, 10, 12, 16)}


def completeness(name: str, batch: int, facts: str, rules: list[str], target: float, device: str) -> list[dict]:
    """Per rule, the EAP-IG completeness error (``attribute.completeness_errors``: |sum of the
    input's edge scores - (M(corrupted) - M(clean))| / |M(corrupted) - M(clean)|, mean and max
    over the pairs) for growing m (``COMPLETENESS_STEPS``), stopping at the first m whose mean
    error is at most ``target``; that m is the rule's ``steps_needed`` (None: not reached)."""
    from engramlab.locate.circuits import CircuitGraph, attribute_batch
    from engramlab.locate.circuits.attribute import completeness_errors
    from engramlab.locate.integration import integration_points

    lm = _load(name, device)
    graph = CircuitGraph.from_model(lm)
    b = _batch(lm, batch, facts)
    rows = []
    for rule in rules:
        needed = None
        for m in COMPLETENESS_STEPS[rule]:
            terms: list = []
            t0 = time.perf_counter()
            attribute_batch(lm, graph, b, "eap-ig", m, rule=rule, completeness=terms)
            seconds = time.perf_counter() - t0
            errors = [e for e in completeness_errors(terms) if e is not None]
            mean = sum(errors) / len(errors)
            rows.append({"model": name, "facts": facts, "batch": batch, "rule": rule, "steps": m,
                         "passes": len(integration_points(rule, m)), "mean_completeness_error": mean,
                         "median_completeness_error": statistics.median(errors),
                         "max_completeness_error": max(errors), "seconds": seconds})
            if mean <= target:
                needed = m
                break
        for r in rows:
            if r["rule"] == rule:
                r["steps_needed"] = needed
    return rows


def _print_completeness(rows: list[dict], target: float) -> None:
    for rule in dict.fromkeys(r["rule"] for r in rows):
        mine = [r for r in rows if r["rule"] == rule]
        sweep = ", ".join(f"m={r['steps']} {100 * r['mean_completeness_error']:.2f}%" for r in mine)
        need = mine[-1]["steps_needed"]
        print(f"{mine[0]['model']} completeness ({mine[0]['facts']}, {mine[0]['batch']} pairs) {rule:>14}: {sweep} "
              f"-> {'m = ' + str(need) if need else 'not reached'} for <= {100 * target:g}% "
              f"({mine[-1]['passes'] if need else '-'} passes)")


STAGES = ("filter", "attribute", "search", "heads", "lens", "evaluate", "curve")


def end_to_end(facts: str, limit: int, steps: int, top_ns: list[int | None], repeats: int, device: str) -> list[dict]:
    """``find_circuit`` on SmolLM2-135M, each N in ``top_ns`` (None: automatic) ``repeats`` times:
    per-stage seconds and seconds / attribute_seconds (stats of the result)."""
    from engramlab.data.facts import load_facts
    from engramlab.locate.base import select
    from engramlab.locate.circuits import CircuitConfig, find_circuit

    lm = _load("smollm2-135m", device)
    chosen = select(load_facts(facts), None, limit)
    rows = []
    for _ in range(repeats):  # interleaved, so drifting load hits every N alike
        for top_n in top_ns:
            result = find_circuit(lm, chosen, CircuitConfig(steps=steps, top_n=top_n, require_correct=False))
            st = result.stats
            rows.append({"facts": facts, "limit": limit, "top_n": "auto" if top_n is None else top_n,
                         "n_edges_kept": int(result.kept.sum()), "n_discovery": st["n_discovery"],
                         "n_evaluation": st["n_evaluation"], "seconds": st["seconds"],
                         **{f"{k}_seconds": st[f"{k}_seconds"] for k in STAGES},
                         "ratio": st["seconds"] / st["attribute_seconds"],
                         "faithfulness": result.metrics["faithfulness"]})
    return rows


def _print_end_to_end(rows: list[dict]) -> None:
    for r in rows:
        stages = ", ".join(f"{k} {r[f'{k}_seconds']:.1f}" for k in STAGES)
        print(f"smollm2-135m circuit  {r['facts']} x{r['limit']} ({r['n_discovery']}+{r['n_evaluation']} pairs), "
              f"N {r['top_n']} ({r['n_edges_kept']} kept): {r['seconds']:.1f} s [{stages}] -> "
              f"total / attribution {r['ratio']:.2f} (target <= 2)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--facts", default="country_capital_city", help="Fact spec the pairs come from.")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--ig-rule", dest="ig_rule", default="right", help="right | left | trapezoid")
    ap.add_argument("--ablation", default="corrupted", help="corrupted | zero | mean (what the scores use)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None)
    ap.add_argument("--parts", default="attribution,circuit",
                    help="attribution | circuit | completeness (comma-separated)")
    ap.add_argument("--completeness-rules", dest="completeness_rules", default=",".join(COMPLETENESS_STEPS))
    ap.add_argument("--completeness-target", dest="completeness_target", type=float, default=0.01)
    ap.add_argument("--circuit-facts", dest="circuit_facts", default="person_mother")
    ap.add_argument("--circuit-limit", dest="circuit_limit", type=int, default=200)
    ap.add_argument("--top-n", dest="top_n", default="5000", help="Ns besides the automatic one (comma-separated)")
    ap.add_argument("--circuit-repeats", dest="circuit_repeats", type=int, default=1)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: measure one model here
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(measure(args.one, args.batch, args.facts, args.steps, args.repeats, args.device,
                                 args.ig_rule, args.ablation)))
        return
    parts = set(args.parts.split(","))
    if "attribution" in parts:
        rows = _attribution(args)
    else:
        rows = []
    if "completeness" in parts:
        for name in args.models.split(","):
            found = completeness(name, args.batch, args.facts, args.completeness_rules.split(","),
                                 args.completeness_target, args.device)
            _print_completeness(found, args.completeness_target)
            rows = rows + found
    if "circuit" in parts:
        top_ns = [None] + [int(n) for n in args.top_n.split(",") if n]
        circuit_rows = end_to_end(args.circuit_facts, args.circuit_limit, args.steps, top_ns, args.circuit_repeats,
                                  args.device)
        _print_end_to_end(circuit_rows)
        rows = rows + circuit_rows
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


def _attribution(args) -> list[dict]:
    """The attribution benchmark, each model in its own process (see the module docstring)."""
    rows = []
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "TQDM_DISABLE": "1"}
    for name in args.models.split(","):
        cmd = [sys.executable, __file__, "--one", name] + [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in
                                                           ("batch", "facts", "steps", "ig_rule", "ablation", "repeats",
                                                            "threads", "device")]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"{name}: benchmark failed:\n{done.stderr[-2000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    for r in rows:
        print(f"{r['model']:>13}  {r['device']} x{r['threads']}  {r['batch']} pairs ({r['tokens']} tokens), m={r['steps']} "
              f"({r['ig_rule']}, {r['ablation']}): "
              f"EAP-IG {r['eap_ig_seconds_per_example']:.3f} s/example vs {r['passes']} plain fwd+bwd "
              f"{r['plain_seconds_per_example']:.3f} s/example -> {r['time_ratio']:.2f}x (target < 1.5); "
              f"peak extra memory {r['eap_ig_peak_extra_mib']:.0f} MiB vs one fwd+bwd "
              f"{r['plain_fwd_bwd_peak_extra_mib']:.0f} MiB -> {r['memory_ratio']:.2f}x (target < 1.5)")
    return rows


if __name__ == "__main__":
    main()
