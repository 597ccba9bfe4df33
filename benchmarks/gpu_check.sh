#!/usr/bin/env bash
# Every GPU check in one script, for a CUDA machine with nothing but this repository and `make install`
# (under 8 minutes on one GPU):
#
#   bash benchmarks/gpu_check.sh [OUT]        (default OUT: runs/bench/gpu)
#
# 1. the GPU-marked tests (tests/test_gpu.py): bfloat16 and float16 autocast, channels_last, torch.compile, and DDP
#    over NCCL on the GPUs present;
# 2. batch prediction throughput of the whole pipeline (U-Net at 256 px, the five default backbones at their native
#    sizes, random weights, synthetic 512 px JPEGs) against the floor (the six networks' bare forwards on the same
#    batches), with the share of the time decoding alone takes;
# 3. one timed training run of each stage's networks: classification images per second against a bare timm loop.
# The figures go to OUT/*.json and OUT/summary.txt, for BENCHMARKS.md's GPU table.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${1:-runs/bench/gpu}
mkdir -p "$OUT"
{
  date -u +"%Y-%m-%d %H:%M UTC"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpus', torch.cuda.device_count())"
} | tee "$OUT/summary.txt"
"$PY" -m pytest -m gpu -p no:cacheprovider -q tests/test_gpu.py 2>&1 | tail -5 | tee -a "$OUT/summary.txt"
"$PY" benchmarks/pipeline_throughput.py --device cuda --images 512 --batch 64 --seg-size 256 \
  --json "$OUT/pipeline.json" | tee -a "$OUT/summary.txt"
"$PY" benchmarks/classification_training_throughput.py --device cuda --batch-size 64 --steps 20 --repeats 2 \
  --models resnet50 densenet169 inception_v3 inception_resnet_v2 xception \
  --json "$OUT/classification_training.json" | tee -a "$OUT/summary.txt"
echo "wrote $OUT" | tee -a "$OUT/summary.txt"
