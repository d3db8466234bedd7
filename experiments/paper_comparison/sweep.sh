#!/usr/bin/env bash
# The paper's strategy comparison on digits: 12 strategies x 3 seeds at fixed budgets of
# 1 and 2 blocks and at heterogeneous budgets (truncnorm, 1-2 blocks, mean 1.5, std 0.5,
# the paper's), 30 rounds, paired differences against `proposed`. The two sweeps are
# independent (run them side by side on two cores: `sweep.sh OUT fixed & sweep.sh OUT hetero`). Committed output:
# experiments/paper_comparison/digits_fixed and digits_hetero (checkpoints and event files
# left out).
set -euo pipefail
PY=${PY:-.venv/bin/python}
OUT=${1:-runs/paper_comparison}
WHICH=${2:-both}
S=full,top,bottom,both,random,gradnorm,rgn,snr,rgn_p1,snr_p1,proposed,head
if [[ $WHICH != hetero ]]; then
"$PY" -m fedsel_jax.sweep --config configs/digits.py --workdir "$OUT/digits_fixed" \
  --config.fl.num_rounds=30 --sweep selection.budget.value=1,2 --sweep selection.strategy=$S --sweep seed=0,1,2 \
  --baseline selection.strategy=proposed
fi
if [[ $WHICH != fixed ]]; then
"$PY" -m fedsel_jax.sweep --config configs/digits.py --workdir "$OUT/digits_hetero" \
  --config.fl.num_rounds=30 --config.selection.budget.kind=truncnorm \
  --sweep selection.strategy=$S --sweep seed=0,1,2 --baseline selection.strategy=proposed
fi
# The flagship at its heterogeneous budget (about 4 min per run on an idle 2-core machine:
# 36 runs, about 2.5 h; not run here):
#   "$PY" -m fedsel_jax.sweep --config configs/default.py --workdir "$OUT/flagship" \
#     --sweep selection.strategy=$S --sweep seed=0,1,2 --baseline selection.strategy=proposed
