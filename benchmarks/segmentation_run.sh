#!/bin/bash
# Segmentation benchmark at the bar's work (ResNet-18 from scratch, 128 px, 4 epochs, batch 8, one torch thread),
# then masks for the validation and test splits, scored.
# usage: benchmarks/segmentation_run.sh NAME [--set KEY=VALUE ...]
# Needs runs/bench/isic_seg_3000.csv (see BENCHMARKS.md); writes runs/bench/NAME*, log in runs/bench/logs/NAME.log.
set -euo pipefail
cd "$(dirname "$0")/.."
name=$1; shift
B=runs/bench
mkdir -p $B/logs
python segmentation/train.py --manifest $B/isic_seg_3000.csv --out $B/$name --epochs 4 --device cpu \
  --set model.encoder=resnet18 --set model.encoder_weights=null --set data.image_size=128 \
  --set train.batch_size=8 --set train.lr=0.002 --set run.cache_dir=$B/cache --set run.threads=1 "$@" > $B/logs/$name.log 2>&1
for split in val test; do
  python segmentation/predict.py --manifest $B/isic_seg_3000.csv --split $split --run $B/$name \
    --out $B/${name}_$split --masks --device cpu --set predict.crop_size=64 --set run.cache_dir=$B/cache \
    --set run.threads=1 >> $B/logs/$name.log 2>&1
  python benchmarks/segmentation_quality.py score --manifest $B/isic_seg_3000.csv --split $split \
    --pred $B/${name}_$split/masks | tee $B/${name}_$split.score
done
