"""Importance accumulation speed against plain loops over the same batches (not a timed test).

    .venv/bin/python benchmarks/bench_regions.py [--threads 1] [--repeats 3] [--smollm2] [--json]

Compared, in tokens per second (n_chunks * seq_len / seconds), on the same chunks and batches:
  * plain forward + backward: every parameter trainable, ``model(ids, labels=ids).loss.backward()``
    and ``zero_grad`` per batch (how a training loop without a step looks);
  * ``importance(..., "snip")`` and ``"snip-abs"``: target >= 0.9x the plain forward + backward;
  * plain forward under ``no_grad``;
  * ``importance(..., "wanda")``: target >= 0.9x the plain forward.

Models: a tiny random Llama (4 layers, d_model 128, vocab 512; 32 chunks of 128 tokens, batches of
4) and, with ``--smollm2``, SmolLM2-135M (``--smollm2-chunks`` chunks of ``--smollm2-seq`` random
token ids, batch 1). Timings are medians of ``--repeats`` interleaved rounds after a warm-up;
wall and this process's CPU seconds are both reported (on a shared machine, with one thread, the
CPU seconds are the steadier figure).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from engramlab.locate.regions import importance
from engramlab.models import load_model, tiny_model, wrap_model


def plain_forward_backward(model, chunks, batch_size):
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.requires_grad_(True)
    try:
        for start in range(0, len(chunks), batch_size):
            ids = chunks[start: start + batch_size]
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
            model.zero_grad(set_to_none=True)
    finally:
        for p, f in flags:
            p.requires_grad_(f)


def plain_forward(model, chunks, batch_size):
    with torch.no_grad():
        for start in range(0, len(chunks), batch_size):
            model(input_ids=chunks[start: start + batch_size], use_cache=False)


def measure(lm, chunks, batch_size, repeats):
    runs = {
        "plain fwd+bwd": lambda: plain_forward_backward(lm.model, chunks, batch_size),
        "snip": lambda: importance(lm, chunks, "snip", batch_size),
        "snip-abs": lambda: importance(lm, chunks, "snip-abs", batch_size),
        "plain forward": lambda: plain_forward(lm.model, chunks, batch_size),
        "wanda": lambda: importance(lm, chunks, "wanda", batch_size),
    }
    wall = {k: [] for k in runs}
    cpu = {k: [] for k in runs}
    for fn in runs.values():  # warm-up
        fn()
    for _ in range(repeats):
        for k, fn in runs.items():
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall[k].append(time.perf_counter() - w0)
            cpu[k].append(time.process_time() - c0)
    tokens = chunks.numel()
    out = {}
    for k in runs:
        w, c = statistics.median(wall[k]), statistics.median(cpu[k])
        out[k] = {"wall_s": w, "cpu_s": c, "tokens_per_s_wall": tokens / w, "tokens_per_s_cpu": tokens / c}
    for k, base in (("snip", "plain fwd+bwd"), ("snip-abs", "plain fwd+bwd"), ("wanda", "plain forward")):
        out[k]["ratio_wall"] = out[base]["wall_s"] / out[k]["wall_s"]
        out[k]["ratio_cpu"] = out[base]["cpu_s"] / out[k]["cpu_s"]
    return out


def show(title, res):
    print(f"\n{title}")
    print(f"  {'method':<15}{'tok/s (wall)':>14}{'tok/s (cpu)':>13}{'x plain (wall)':>16}{'x plain (cpu)':>15}")
    for k, r in res.items():
        ratio = (f"{r['ratio_wall']:>16.2f}{r['ratio_cpu']:>15.2f}") if "ratio_wall" in r else ""
        print(f"  {k:<15}{r['tokens_per_s_wall']:>14.0f}{r['tokens_per_s_cpu']:>13.0f}{ratio}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--smollm2", action="store_true", help="also SmolLM2-135M (loads in ~20-50 s)")
    ap.add_argument("--smollm2-chunks", type=int, default=2)
    ap.add_argument("--smollm2-seq", type=int, default=256)
    ap.add_argument("--json", action="store_true", help="print the figures as JSON too")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    results = {}

    lm = wrap_model(tiny_model("llama", seed=0, vocab_size=512, d_model=128, n_layers=4, d_mlp=512, max_pos=256))
    chunks = torch.randint(0, 512, (32, 128), generator=g)
    results["tiny-llama"] = measure(lm, chunks, 4, args.repeats)
    show("tiny llama (4 layers, d_model 128), 32 chunks x 128 tokens, batch 4", results["tiny-llama"])

    if args.smollm2:
        lm = load_model("smollm2-135m")
        chunks = torch.randint(0, lm.adapter.vocab_size, (args.smollm2_chunks, args.smollm2_seq), generator=g)
        results["smollm2-135m"] = measure(lm, chunks, 1, args.repeats)
        show(f"smollm2-135m, {args.smollm2_chunks} chunks x {args.smollm2_seq} tokens, batch 1",
             results["smollm2-135m"])
    if args.json:
        print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
