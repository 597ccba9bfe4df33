#!/bin/bash
# Flip TTA against TTA over all eight flips and quarter turns, for one trained run and split, scored.
# usage: benchmarks/segmentation_tta.sh RUN_NAME SPLIT (RUN_NAME under runs/bench, e.g. made by segmentation_run.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
B=runs/bench; run=$1; split=$2
for rot in false true; do
  out=$B/${run}_${split}_rot$rot
  python segmentation/predict.py --manifest $B/isic_seg_3000.csv --split $split --run $B/$run --out $out --masks \
    --device cpu --set predict.crop_size=64 --set run.cache_dir=$B/cache --set run.threads=1 \
    --set predict.tta_rotations=$rot > $out.log 2>&1
  python benchmarks/segmentation_quality.py score --manifest $B/isic_seg_3000.csv --split $split --pred $out/masks | tee $out.score
done
