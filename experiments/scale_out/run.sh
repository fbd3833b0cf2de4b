#!/usr/bin/env bash
# Each layout 3 times at 4 CPU ranks, interleaved (a load change on the shared machine hits every layout alike).
#   bash experiments/scale_out/run.sh && python experiments/scale_out/report.py
set -euo pipefail
cd "$(dirname "$0")/../.."
out=experiments/scale_out/results.jsonl
rm -f "$out"
for repeat in 1 2 3; do
  for layout in ddp ep fsdp fsdp_ep; do
    OMP_NUM_THREADS=1 PYTHONPATH=$PWD torchrun --standalone --nproc_per_node=4 \
      experiments/scale_out/measure.py --layout "$layout" --out "$out" 2>/dev/null
  done
done
