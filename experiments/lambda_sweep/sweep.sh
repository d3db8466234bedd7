#!/usr/bin/env bash
# The digits lambda sweep: 8 lambdas from 0 to where every client agrees, 3 seeds,
# 24 runs in one vmapped program. Writes OUT/summary.{csv,md}, OUT/*.png and one
# run directory per member. experiments/lambda_sweep/digits holds its committed
# output (checkpoints and event files left out); bench_sweep.py times it.
set -euo pipefail
PY=${PY:-.venv/bin/python}
OUT=${1:-runs/lambda_sweep/digits}
"$PY" -m fedsel_jax.sweep --config configs/digits.py --workdir "$OUT" \
  --sweep selection.lam=0,0.001,0.002,0.003,0.005,0.01,0.03,0.1 --sweep seed=0,1,2 \
  --baseline selection.lam=0
# The flagship (MiniLM on the Shakespeare pronoun cloze; about 4 min per run on an idle
# 2-core machine, so about 1.6 h for these 24 runs; not run here):
#   "$PY" -m fedsel_jax.sweep --config configs/default.py --workdir runs/lambda_sweep/flagship \
#     --sweep selection.lam=0,0.01,0.05,0.1,0.3,1 --sweep seed=0,1,2
