"""Causal tracing: seconds per fact of the batched grid against the one-forward-per-cell reference.

    .venv/bin/python benchmarks/bench_trace.py [--facts 2] [--threads 1] [--samples 1] [--window 10] [--json]

On SmolLM2-135M (30 layers) and the first ``--facts`` facts of the bundled ``country_capital_city``
relation (template 0), with one noise draw per fact (``fact_noise``, sigma = 3 x the std of the
subject tokens' embeddings): for each fact ``trace_grid`` (the batched grid, ``batch_size`` 96) and
``trace_plain`` (one full forward pass per cell: 3 kinds x 30 layers x T tokens) compute the same
grid on the same noise. Reported: wall and CPU seconds per fact of each, the speed-up (goal: >= 5x
on CPU) and the largest difference between the two grids (float32).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from engramlab.data.facts import load_facts, target_token_ids
from engramlab.locate import select
from engramlab.locate.trace.grid import trace_grid
from engramlab.locate.trace.noise import embedding_std, fact_noise
from engramlab.locate.trace.plain import trace_plain
from engramlab.locate.trace.span import subject_span
from engramlab.models.scoring import encode


def timed(fn):
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--facts", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--samples", type=int, default=1)
    ap.add_argument("--window", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=96)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    facts = list(select(load_facts("country_capital_city"), limit=args.facts))
    from engramlab.models import load_model

    lm = load_model("smollm2-135m")
    prepared = []
    for f in facts:
        prompt = f.prompt(0)
        ids = encode(lm, prompt)
        span, reason = subject_span(lm.tokenizer, ids, prompt, f.subject, f.template(0))
        if span is None:
            raise SystemExit(f"{f.subject}: {reason}")
        prepared.append((f, ids, span, target_token_ids(lm.tokenizer, prompt, f.object)[0]))
    sigma = 3.0 * embedding_std(lm, "subjects", [ids[b:e] for _, ids, (b, e), _ in prepared])
    rows = []
    for k, (f, ids, (b, e), answer) in enumerate(prepared):
        noise = fact_noise(0, k, args.samples, e - b, lm.adapter.d_model, sigma)
        fast, fw, fc = timed(lambda: trace_grid(lm, ids, (b, e), answer, noise, args.window, args.batch_size))
        plain, pw, pc = timed(lambda: trace_plain(lm, ids, (b, e), answer, noise, args.window))
        diff = float((fast.restored - plain.restored).abs().max())
        rows.append({"subject": f.subject, "tokens": len(ids), "subject_span": [b, e], "batched_wall_s": fw,
                     "batched_cpu_s": fc, "plain_wall_s": pw, "plain_cpu_s": pc, "max_abs_diff": diff,
                     "max_mlp_effect": float(fast.effect[1].max())})
        if not args.json:
            print(f"{f.subject:>16}: T={len(ids)} batched {fw:6.2f} s ({fc:6.2f} cpu)  plain {pw:7.2f} s ({pc:7.2f} cpu)"
                  f"  x{pw / fw:5.1f}  max|diff| {diff:.2e}")
    n = len(rows)
    out = {"model": "smollm2-135m", "threads": args.threads, "samples": args.samples, "window": args.window,
           "n_facts": n, "batched_s_per_fact": sum(r["batched_wall_s"] for r in rows) / n,
           "plain_s_per_fact": sum(r["plain_wall_s"] for r in rows) / n,
           "speedup_wall": sum(r["plain_wall_s"] for r in rows) / sum(r["batched_wall_s"] for r in rows),
           "speedup_cpu": sum(r["plain_cpu_s"] for r in rows) / sum(r["batched_cpu_s"] for r in rows),
           "max_abs_diff": max(r["max_abs_diff"] for r in rows), "facts": rows}
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        print(f"per fact: batched {out['batched_s_per_fact']:.2f} s, plain {out['plain_s_per_fact']:.2f} s; "
              f"speed-up x{out['speedup_wall']:.1f} wall, x{out['speedup_cpu']:.1f} cpu (goal >= 5); "
              f"max |batched - plain| = {out['max_abs_diff']:.2e}")


if __name__ == "__main__":
    main()
