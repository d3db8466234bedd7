#!/usr/bin/env bash
# The GPU rows of ../../shared/BENCH.md (ViT-B/32 size, tiny ViT, 2,000 clients per
# round) as one command for the device machine, each row the bench command on
# configs/bench_vit.py (synthetic images, no dataset or checkpoint) against the
# authors' PyTorch pattern (experiments/bench/torch_peer.py, on the same GPU).
#
#   experiments/bench/gpu_rows.sh [ROW ...]     # rows: tiny b32 tiny2000 (default: all)
#
# Writes ROW.json (the bench's report), ROW.log and device.txt to $OUT (the device
# tool's output folder), else runs/gpu_rows/. Each row runs under its own time
# limit (ROW_LIMIT_S below), so one slow compile cannot eat the others.
#
# The device image has jax, flax, optax, orbax, torch and transformers but not
# ml-collections. Once, here, in the repository root:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp -d .whl ml-collections==1.1.0
# and call the device tool with carry=[".whl"] and the command
#   experiments/bench/gpu_rows.sh tiny b32 tiny2000
# (at most 520 s and the set-up; give it timeout_s=600). A row that runs out of its limit keeps
# the modes it finished (ROW.json says "complete": false); rerun that row alone
# with a longer limit (ROW_LIMIT_S below) if device time is left, or with
# --masks config for the masks the selection picks.
# Wheels found in .whl/ are installed into /tmp/site first. GPU_ROWS_SMOKE=1 runs
# every row on the CPU-sized configs/bench_vit.py:smoke instead (a check of this script; tests do it), and
# GPU_ROWS_PRINT=1 prints each row's arguments (tests parse them).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT_DIR=${OUT:-runs/gpu_rows}
[[ -z "${GPU_ROWS_PRINT:-}" ]] && mkdir -p "$OUT_DIR"
if [[ -z "${GPU_ROWS_PRINT:-}" ]] && compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl || { echo "error: installing .whl/ failed" >&2; exit 1; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
if [[ -z "${GPU_ROWS_PRINT:-}" ]]; then   # what the device is; exit 3 below without a GPU
  { date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
    $PY -c "import jax, sys, torch; print('jax', jax.__version__, jax.devices()); print('torch', torch.__version__, torch.cuda.is_available()); sys.exit(0 if jax.default_backend() == 'gpu' and torch.cuda.is_available() else 3)" 2>&1
  } > "$OUT_DIR/device.txt"
  gpu=$?
fi

# Limits sum to 520 s: all three rows fit one device call (timeout_s=600). Consensus
# top-2 masks (every client trains the top 2 blocks: lambda > 0's case) and only
# the cut levels they use (0 is always added), so each round compiles 2 variants.
declare -A ROW_LIMIT_S=([tiny]=180 [b32]=230 [tiny2000]=110)
declare -A ROW_ARGS=(
  # 200 clients x 10 x 32; one torch round takes ~14 s (BENCH.md: 4,694 samples/s).
  [tiny]="--config configs/bench_vit.py:tiny --masks top2 --repeats 3 --torch_threads 1
          --config.fl.cut_levels=4"
  # 20 clients x 5 x 64.
  [b32]="--config configs/bench_vit.py:b32 --masks top2 --repeats 3 --torch_threads 1
         --config.fl.cut_levels=10"
  # the memory row: the round alone (the sequential peer and the per-client loop
  # would take minutes at 2,000 clients).
  [tiny2000]="--config configs/bench_vit.py:tiny2000 --masks top2 --repeats 3 --torch_peer=
              --no_loop --config.fl.cut_levels=4"
)
# JAX may take all but what the row's torch peer needs (none in the memory row).
declare -A ROW_MEM_FRACTION=([tiny]=0.75 [b32]=0.75 [tiny2000]=0.95)
set -f                                   # row names are words, never file patterns
rows="${*:-tiny b32 tiny2000}"
for r in $rows; do                       # every name checked before any row runs
  if [[ -z "${ROW_ARGS[$r]+x}" ]]; then
    echo "error: unknown row '$r'; rows: ${!ROW_ARGS[*]}" >&2; exit 2
  fi
done
if [[ -z "${GPU_ROWS_PRINT:-}${GPU_ROWS_SMOKE:-}" && ${gpu:-0} -ne 0 ]]; then   # a GPU on both sides
  echo "error: jax or torch sees no GPU (device.txt says what they see)" >&2; exit 3
fi
status=0
summary=""
for r in $rows; do
  args=${ROW_ARGS[$r]}
  limit=${ROW_LIMIT_S[$r]}
  if [[ -n "${GPU_ROWS_PRINT:-}" ]]; then   # the rows' arguments, one line each (tests)
    echo "$r" $args; continue
  fi
  if [[ -n "${GPU_ROWS_SMOKE:-}" ]]; then
    args="--config configs/bench_vit.py:smoke --masks top2 --repeats 1 --torch_threads 1"
    [[ $r == tiny2000 ]] && args="$args --torch_peer= --no_loop"
    limit=300
  fi
  echo "== $r: python -m fedsel_jax.bench $args (limit ${limit} s)"
  # shellcheck disable=SC2086
  XLA_PYTHON_CLIENT_MEM_FRACTION=${ROW_MEM_FRACTION[$r]} \
      timeout -k 10 "$limit" $PY -m fedsel_jax.bench $args --json "$OUT_DIR/$r.json" 2>&1 \
      | tee "$OUT_DIR/$r.log"
  rc=${PIPESTATUS[0]}
  echo "== $r: exit $rc"
  summary="$summary $r=$rc"
  [[ $rc -ne 0 ]] && status=4             # not 124: the device tool reads that as its own limit
done
[[ -n "${GPU_ROWS_PRINT:-}" ]] && exit 0
echo "== rows (exit codes; 124 = stopped at its limit, its JSON keeps what it finished):$summary"
exit $status
