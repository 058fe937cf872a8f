"""Trainer throughput against a minimal plain PyTorch loop over the same HF model and batch.

    .venv/bin/python benchmarks/bench_train.py [--model-config tiny] [--steps 60] [--n-people 1000]
        [--device cpu|cuda] [--precision fp32|tf32|bf16] [--compile] [--grad-accum 1] [--threads N]

The plain loop is the floor of what any trainer must do per step: forward, token cross-entropy,
backward, AdamW step, on one pre-encoded batch. The trainer additionally draws the batch
(sampler + biographies + tokenization) every step, clips gradients and sets the learning rate.
Target: trainer tokens/s >= 0.9 x plain loop tokens/s. Figures go in the README.

On CUDA the plain loop runs at the trainer's --precision (the same autocast), so the ratio compares
loops, not precisions; the trainer's model FLOPs utilisation (6 * params * tokens/s / peak, the
peak of ``engramlab.train.speed``'s table for the device and precision) is printed as ``mfu``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch
import torch.nn.functional as F

from engramlab.data.world import build_world
from engramlab.data.wordtok import encode_biographies
from engramlab.train.model_configs import build_model
from engramlab.train.trainer import Population, TrainConfig, Trainer, _batch_rng


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plain_loop(model, ids, am, steps: int, lr: float, precision: str = "fp32") -> float:
    """tokens/s of the textbook loop on a fixed batch."""
    from engramlab.train import speed

    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    targets = ids[:, 1:].masked_fill(am[:, 1:] == 0, -100)
    n_tokens = int(am.sum())

    def step():
        with speed.autocast(precision, ids.device):
            logits = model(input_ids=ids, attention_mask=am).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(5):
        step()
    _sync(ids.device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(ids.device)
    return n_tokens * steps / (time.perf_counter() - t0)


def trainer_loop(trainer: Trainer, steps: int, start: int) -> float:
    """tokens/s of the trainer's own loop (batch drawn per step, prefetched, clipped, scheduled)."""
    for step, batch in trainer.batches(start, start + 5):
        trainer.train_step(step, batch)
    tokens = 0
    t0 = time.perf_counter()
    for step, batch in trainer.batches(start + 5, start + 5 + steps):
        tokens += trainer.train_step(step, batch)[1]
    return tokens / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-config", default="tiny")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--n-people", type=int, default=1000)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--precision", default="fp32", help="fp32 | tf32 | bf16 (CUDA only for the last two)")
    ap.add_argument("--compile", action="store_true", help="the trainer's --compile")
    ap.add_argument("--grad-accum", dest="grad_accum", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    world = build_world("tiny", n_people=args.n_people)
    cfg = TrainConfig(steps=10**6, batch_size=args.batch_size, model_config=args.model_config, checkpoints="none",
                      eval_people=2, eval_templates=1, device=args.device, precision=args.precision,
                      compile=args.compile, grad_accum=args.grad_accum)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, world, tmp)
        pop = Population(world)
        batch = encode_biographies(trainer.tokenizer, pop.batch(trainer.sampler.indices(0, args.batch_size),
                                                               _batch_rng(0, 0)))
        dev = trainer.device
        ids, am = batch["input_ids"].to(dev), batch["attention_mask"].to(dev)
        plain_model = build_model(args.model_config, len(trainer.tokenizer), trainer.max_len, 0,
                                  trainer.tokenizer).to(dev)
        plain, ours = [], []
        for r in range(args.repeats):  # interleave, so machine noise hits both alike
            plain.append(plain_loop(plain_model, ids, am, args.steps, cfg.lr, args.precision))
            ours.append(trainer_loop(trainer, args.steps, start=r * (args.steps + 5)))
    from engramlab.train import speed
    from engramlab.train.model_configs import count_parameters

    n_params = count_parameters(trainer.model)[0]
    peak = speed.peak_tflops(trainer.device, args.precision)
    result = {
        "model_config": args.model_config, "batch_size": args.batch_size, "device": args.device,
        "device_name": torch.cuda.get_device_name(trainer.device) if trainer.device.type == "cuda" else "cpu",
        "precision": args.precision, "compile": args.compile, "grad_accum": args.grad_accum, "n_params": n_params,
        "plain_tokens_per_s": max(plain), "trainer_tokens_per_s": max(ours),
        "ratio": max(ours) / max(plain), "threads": torch.get_num_threads(), "peak_tflops": peak,
        "mfu": speed.mfu(n_params, int(max(ours)), 1.0, peak),
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
