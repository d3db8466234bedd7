#!/usr/bin/env bash
# Copies a sweep's output directory into experiments/ without what is not
# committed: checkpoints, TensorBoard event files, locks and fingerprints.
#   bash experiments/copy_outputs.sh runs/lambda_sweep/digits experiments/lambda_sweep/digits
set -euo pipefail
SRC=${1:?source sweep directory}
DST=${2:?destination directory}
rm -rf "$DST"
mkdir -p "$DST"
tar -C "$SRC" --exclude=checkpoints --exclude=checkpoints.damaged --exclude='events.out.tfevents.*' \
  --exclude=.lock --exclude=fingerprint.json --exclude='*.tmp' -cf - . | tar -C "$DST" -xf -
