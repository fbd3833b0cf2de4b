#!/usr/bin/env bash
# Building the model with trainer.init_device=cpu and meta, 3 times each at 2 CPU ranks, interleaved.
#   bash experiments/scale_out/run_init.sh && python experiments/scale_out/report.py
set -euo pipefail
cd "$(dirname "$0")/../.."
out=experiments/scale_out/init_results.jsonl
rm -f "$out"
for repeat in 1 2 3; do
  for init_device in cpu meta; do
    OMP_NUM_THREADS=1 PYTHONPATH=$PWD torchrun --standalone --nproc_per_node=2 \
      experiments/scale_out/measure_init.py --init-device "$init_device" --out "$out" 2>/dev/null
  done
done
