#!/usr/bin/env bash
# The quick start sequence (docs/quickstart.md, README.md) on a real HAM10000-layout sample, each command timed
# (BENCHMARKS.md, "Quick start").
#
#   python benchmarks/ham_layout.py --root ../shared/data/isic_real --out runs/bench/quickstart/HAM10000 --n 300
#   bash benchmarks/quickstart_real.sh runs/bench/quickstart
#
# Runs in WORKDIR exactly the quick start's commands (HAM10000 from WORKDIR/HAM10000, photos/ = 40 of its test images),
# with the CPU-sized settings below added through --set: every network from scratch (no download), small inputs,
# few epochs. Writes WORKDIR/times.tsv (seconds per command) and leaves the run root in WORKDIR/runs/ham.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PY:-$REPO/.venv/bin/python}
cd "$1"
SEG="--epochs 6 --set model.encoder=resnet18 --set model.encoder_weights=null --set data.image_size=128"
CLS="--epochs 4 --set model.pretrained=false --set data.image_size=96"
: > times.tsv
timed() {
  local start=$SECONDS
  "$@"
  printf '%s\t%s\n' "$((SECONDS - start))" "$*" >> times.tsv
}
timed "$PY" "$REPO/data/convert.py" --format ham10000 --root HAM10000 --out runs/ham.csv
timed "$PY" "$REPO/segmentation/train.py" --manifest runs/ham.csv --root runs/ham $SEG
timed "$PY" "$REPO/segmentation/predict.py" --manifest runs/ham.csv --root runs/ham
for b in resnet50 densenet169 inception_v3 inception_resnet_v2 xception; do
  timed "$PY" "$REPO/classification/train.py" --backbone $b --root runs/ham $CLS
done
timed "$PY" "$REPO/ensemble/vote.py" --root runs/ham
mkdir -p photos
"$PY" - <<'PYEOF'
import os
from pathlib import Path
from dermpipe.data.manifest import Manifest
for row in Manifest.read("runs/ham.csv").select("test").rows[:40]:
    link = Path("photos") / Path(row["image_path"]).name
    if not link.is_symlink():
        os.symlink(Path(row["image_path"]).resolve(), link)
PYEOF
timed "$PY" "$REPO/ensemble/predict.py" --input photos/ --root runs/ham --output predictions.csv
rm -rf ham-v1 ham-v1.tar.gz from-bundle from-bundle-cache
timed "$REPO/.venv/bin/dermpipe" bundle --root runs/ham --out ham-v1
# a cold cache of its own (without run.cache_dir, prediction from a bundle caches in the user's cache folder)
timed "$REPO/.venv/bin/dermpipe" predict --model ham-v1 --input photos/ --out from-bundle --set run.cache_dir=from-bundle-cache
timed "$REPO/.venv/bin/dermpipe" run --manifest runs/ham.csv --root runs/ham \
  $(for x in $SEG; do case $x in --set) printf -- '--set ';; --epochs) printf -- '--set segmentation.train.epochs=';; [0-9]*) printf '%s ' "$x";; *) printf 'segmentation.%s ' "$x";; esac; done) \
  $(for x in $CLS; do case $x in --set) printf -- '--set ';; --epochs) printf -- '--set classification.train.epochs=';; [0-9]*) printf '%s ' "$x";; *) printf 'classification.%s ' "$x";; esac; done)
cat times.tsv
