"""``engram plan``'s predicted peak memory against the measured one on SmolLM2-135M: IG, EAP-IG, tracing.

    .venv/bin/python benchmarks/bench_plan.py [--facts country_capital_city] [--limit 2]
        [--ig 5:auto,10:4] [--eap 8:5,16:5] [--trace 96,24] [--threads 1] [--json out.json]

Each setting is measured in its own process (so one cannot inflate another's figures), on CPU:

* IG (``--ig STEPS:BATCH_LAYERS,...``; BATCH_LAYERS ``auto`` for the automatic size): the batched
  integrated gradients of every prompt of the first ``--limit`` facts (``attribute_prompt`` with
  a ``NeuronConfig``, what ``engram neurons`` runs per paraphrase), the largest peak over them;
* EAP-IG (``--eap PAIRS:STEPS,...``): ``attribute_batch`` on the first PAIRS clean/corrupted pairs
  of ``--facts`` (right rule, corrupted ablation; the shared prompt prefix runs once);
* causal tracing (``--trace BATCH,...``): ``trace_grid`` of each of the first ``--limit`` facts
  (one noise draw, window 10, ``batch_size`` BATCH), the largest peak; passes are the model's
  forward calls, counted with a hook.

Measured: the extra resident memory at the peak over what is resident before the call (VmHWM
after a reset through /proc/self/clear_refs, minus VmRSS; glibc told to return large blocks at
once with MALLOC_MMAP_THRESHOLD_ = 16 KiB, lower than bench_circuits.py's 64 KiB: the tensors of a
small EAP-IG batch are tens of KiB, and below the threshold they reuse freed heap unseen by
VmHWM), after one warm-up call;
the measured peak is that plus the loaded model's weights. Predicted: ``engramlab.plan`` from the
model's config and the same token ids. Target: within +-25%.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys

import torch

MODEL = "smollm2-135m"


def _rss_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", open("/proc/self/status").read()).group(1))


def _peak_extra_mib(fn) -> float:
    """Extra resident memory (MiB) ``fn`` needs at its peak over what is resident before it."""
    import gc

    gc.collect()
    before = _rss_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark to the current resident set
    fn()
    return (_rss_kib("VmHWM") - before) / 1024


def measure_ig(facts: str, limit: int, steps: int, batch_layers: int | None) -> dict:
    from engramlab.data.facts import load_facts, target_token_ids
    from engramlab.locate.neurons.config import NeuronConfig
    from engramlab.locate.neurons.screen import attribute_prompt
    from engramlab.models import load_model
    from engramlab.models.scoring import encode
    from engramlab.plan import Shapes, plan_neurons

    lm = load_model(MODEL)
    config = NeuronConfig(steps=steps, batch_layers=batch_layers)
    fs = load_facts(facts)[:limit]
    prompts = [(f.prompt(j), f.object) for f in fs for j in range(len(f.templates))]
    encoded = [(encode(lm, p), target_token_ids(lm.tokenizer, p, o)) for p, o in prompts]
    attribute_prompt(lm, *encoded[0], config)  # warm-up
    measured, passes = 0.0, 0
    for ids, target in encoded:
        box = {}
        measured = max(measured, _peak_extra_mib(lambda: box.update(got=attribute_prompt(lm, ids, target, config))))
        passes += box["got"].n_passes
    plan = plan_neurons(Shapes.from_spec(MODEL), [(len(i), len(t)) for i, t in encoded], config)
    return _row("IG", f"{len(encoded)} prompts, m={steps}, batch_layers={batch_layers or 'auto'} "
                      f"({plan.settings['batch_layers']})", lm, plan, measured, passes)


def measure_eap(facts: str, pairs: int, steps: int) -> dict:
    from engramlab.data.facts import corrupted_pairs, load_facts
    from engramlab.locate.circuits import CircuitGraph, attribute_batch
    from engramlab.locate.circuits.config import CircuitConfig
    from engramlab.locate.circuits.data import encode_pairs
    from engramlab.models import load_model
    from engramlab.plan import Shapes, plan_circuit

    lm = load_model(MODEL)
    graph = CircuitGraph.from_model(lm)
    batch = encode_pairs(lm, corrupted_pairs(load_facts(facts), lm.tokenizer)[:pairs])
    run = lambda: attribute_batch(lm, graph, batch, "eap-ig", steps)  # noqa: E731
    run()  # warm-up
    measured = _peak_extra_mib(run)
    lengths = batch.mask.sum(1).tolist()
    rows = [ids[:n].tolist() for side in (batch.clean_ids, batch.corrupt_ids) for ids, n in zip(side, lengths)]
    rows = [r for pair in zip(rows[:pairs], rows[pairs:]) for r in pair]
    plan = plan_circuit(Shapes.from_spec(MODEL), [rows], CircuitConfig(steps=steps, batch_size=pairs),
                        cache_runs=False)
    # attribute_batch counts no passes: only the plan's count is shown
    return _row("EAP-IG", f"{pairs} pairs x {max(lengths)} tokens, m={steps}", lm, plan, measured, None)


def measure_trace(facts: str, limit: int, batch_size: int) -> dict:
    from engramlab.data.facts import load_facts, target_token_ids
    from engramlab.locate.trace.config import TraceConfig
    from engramlab.locate.trace.grid import trace_grid
    from engramlab.locate.trace.noise import fact_noise
    from engramlab.locate.trace.span import subject_span
    from engramlab.models import load_model
    from engramlab.models.scoring import encode
    from engramlab.plan import Shapes, plan_trace

    lm = load_model(MODEL)
    config = TraceConfig(batch_size=batch_size)
    jobs = []
    for k, fact in enumerate(load_facts(facts)[:limit]):
        prompt = fact.prompt(config.template)
        ids = encode(lm, prompt)
        span, _ = subject_span(lm.tokenizer, ids, prompt, fact.subject, fact.template(config.template))
        if span is not None:  # the noise's scale does not change the memory: sigma 1
            noise = fact_noise(config.seed, k, config.samples, span[1] - span[0], lm.adapter.d_model, 1.0)
            jobs.append((ids, span, target_token_ids(lm.tokenizer, prompt, fact.object)[0], noise))
    grid = lambda ids, span, answer, noise: trace_grid(lm, ids, span, answer, noise, config.window,  # noqa: E731
                                                       config.batch_size)
    grid(*jobs[0])  # warm-up
    calls = []
    handle = lm.model.register_forward_pre_hook(lambda *args: calls.append(1))
    measured = max(_peak_extra_mib(lambda job=job: grid(*job)) for job in jobs)
    handle.remove()
    plan = plan_trace(Shapes.from_spec(MODEL), [(len(ids), span[0]) for ids, span, _, _ in jobs], config)
    return _row("trace", f"{len(jobs)} facts, batch_size={batch_size}", lm, plan, measured, len(calls))


def _row(kind: str, setting: str, lm, plan, measured_extra_mib: float, passes: int | None) -> dict:
    weights = sum(p.numel() * p.element_size() for p in lm.model.parameters()) / 2**20
    return {"kind": kind, "setting": setting, "weights_mib": weights,
            "predicted_extra_mib": plan.activations / 2**20, "measured_extra_mib": measured_extra_mib,
            "predicted_peak_mib": plan.peak / 2**20, "measured_peak_mib": weights + measured_extra_mib,
            "peak_ratio": plan.peak / 2**20 / (weights + measured_extra_mib),
            "extra_ratio": plan.activations / 2**20 / measured_extra_mib,
            "predicted_passes": plan.n_passes, "measured_passes": passes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--facts", default="country_capital_city")
    ap.add_argument("--limit", type=int, default=2, help="IG: facts (each with its templates)")
    ap.add_argument("--ig", default="5:auto,10:4", help="STEPS:BATCH_LAYERS settings (comma-separated)")
    ap.add_argument("--eap", default="8:5,16:5", help="PAIRS:STEPS settings (comma-separated)")
    ap.add_argument("--trace", default="96,24", help="causal tracing: batch sizes (comma-separated)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # "ig:STEPS:BL" | "eap:PAIRS:STEPS" | "trace:BATCH"
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.one:
        kind, a, b = (args.one.split(":") + [""])[:3]
        row = (measure_ig(args.facts, args.limit, int(a), None if b == "auto" else int(b)) if kind == "ig"
               else measure_eap(args.facts, int(a), int(b)) if kind == "eap"
               else measure_trace(args.facts, args.limit, int(a)))
        print(json.dumps(row))
        return
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "16384", "TQDM_DISABLE": "1", "OMP_NUM_THREADS": str(args.threads)}
    jobs = [f"ig:{s}" for s in args.ig.split(",") if s] + [f"eap:{s}" for s in args.eap.split(",") if s] + \
        [f"trace:{s}" for s in args.trace.split(",") if s]
    rows = []
    for job in jobs:
        cmd = [sys.executable, __file__, "--one", job, f"--facts={args.facts}", f"--limit={args.limit}",
               f"--threads={args.threads}"]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"{job}: benchmark failed:\n{done.stderr[-2000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"{r['kind']:>6}  {r['setting']}: extra predicted {r['predicted_extra_mib']:.0f} MiB vs measured "
              f"{r['measured_extra_mib']:.0f} MiB ({r['extra_ratio']:.2f}x); peak {r['predicted_peak_mib']:.0f} vs "
              f"{r['measured_peak_mib']:.0f} MiB ({r['peak_ratio']:.2f}x, target 0.75-1.25); passes "
              f"{r['predicted_passes']} vs {'not counted' if r['measured_passes'] is None else r['measured_passes']}",
              flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
