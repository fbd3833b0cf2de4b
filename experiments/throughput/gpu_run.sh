#!/bin/bash
# Issue 18's GPU measurements in one call: the suite (every target, met / NOT met) and the CUDA tests.
#
# Here, once, from the project root (downloads timm, hydra, omegaconf and wandb wheels into .whl/, ignored by git):
#     bash ../shared/gpu/wheels.sh
# Then, with the device tool, one call (about 9 minutes of the 15 a task is lent), on an H200: Soft MoE B/16's
# training step holds 66 GB of weights, gradients, AdamW moments and bf16 copies before its activations at batch
# 256, likely more than an 80 GB H100 has (unmeasured; there that section would fail, and the rest be measured):
#     run(command="bash experiments/throughput/gpu_run.sh", carry=[".whl"], kind="nvidia-h200", timeout_s=590)
# Its files come back under $OUT: results_gpu_suite.json, gpu_suite.log, gpu_pytest.log, gpu.txt. The JSON is
# rewritten after each section ("partial": true until the end), so a run cut short keeps what it measured.
# The benchmark itself needs only torch and timm (no Hydra, no W&B); the CUDA tests need the rest.
set -uo pipefail
[ -d .whl ] || { echo "no .whl/: run 'bash ../shared/gpu/wheels.sh' here first and carry .whl"; exit 2; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .site .whl/*.whl || exit 1
export PYTHONPATH=$PWD/.site:$PWD WANDB_MODE=offline PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/softmoe_gpu}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, timm; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'timm', timm.__version__)" \
  | tee -a "$OUT/gpu.txt"
# the suite: S/16 and B/16 at batch 256, 224 px, eager and inductor; compiles nothing after 150 s (listed as skipped)
timeout 330 python3 -m softmoe.benchmark --suite gpu --out "$OUT/results_gpu_suite.json" 2>&1 | tee "$OUT/gpu_suite.log"
echo "suite exit status: ${PIPESTATUS[0]}"
timeout 230 python3 -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py 2>&1 | tail -40 | tee "$OUT/gpu_pytest.log"
