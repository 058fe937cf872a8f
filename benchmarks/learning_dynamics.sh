#!/usr/bin/env bash
# Reproduces the learning-dynamics figures in the README (issue 3) on a CPU.
# Usage: benchmarks/learning_dynamics.sh OUT_DIR     (about 40 minutes on 2 idle cores)
set -euo pipefail
OUT=${1:-runs/dynamics}
E="${ENGRAM:-.venv/bin/engram}"
mkdir -p "$OUT"

# 1. Plateau end vs population size N (constant lr, each run stops at its plateau end).
$E sweep --out "$OUT/sweep_n" --grid n_people=250,500,1000,2000,4000 \
  --steps 6000 --lr 3e-3 --eval-every 25 --eval-people 60 --eval-templates 1

# 2. Data distribution at fixed N: uniform vs power law vs warm-up curriculum.
$E sweep --out "$OUT/sweep_sampler" --grid n_people=2000 \
  --grid 'sampler=uniform|powerlaw:alpha=0.7|warmup:size=250,epochs=40' \
  --steps 6000 --lr 3e-3 --eval-every 25 --eval-people 60 --eval-templates 1

# 3. Three phases on the tiny preset, trained to high accuracy (N=1000).
$E world --preset tiny --n-people 1000 --out "$OUT/world_a"
$E train --world "$OUT/world_a" --out "$OUT/base" --steps 2000 --lr 3e-3 --eval-every 50

# 4. Fine-tuning on new people (disjoint names, same pools), without and with replay.
$E world --preset tiny --n-people 1000 --seed 1 --disjoint-from "$OUT/world_a" --out "$OUT/world_b"
$E train --world "$OUT/world_b" --init "$OUT/base" --out "$OUT/finetune" --steps 600 --lr 1e-3 \
  --eval-every 25 --checkpoints none
$E train --world "$OUT/world_b" --init "$OUT/base" --out "$OUT/finetune_replay" --steps 600 --lr 1e-3 \
  --eval-every 25 --checkpoints none --sampler replay:weight=0.3

# 5. Attention patching: a twin from the same initial weights with the base run's final patterns.
#    The first run stops at its plateau end (fine-grained evaluations); the second trains the
#    twin to the end for its final loss and accuracy (patched evaluations throughout).
$E train --world "$OUT/world_a" --out "$OUT/patched" --steps 2000 --lr 3e-3 --eval-every 25 \
  --patch-attention-from "$OUT/base:2000" --stop-at-plateau-end --checkpoints none
$E train --world "$OUT/world_a" --out "$OUT/patched_full" --steps 2000 --lr 3e-3 --eval-every 100 \
  --patch-attention-from "$OUT/base:2000" --checkpoints none
