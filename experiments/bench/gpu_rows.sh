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
# (about 9 minutes; give it timeout_s=600). Wheels found in .whl/ are installed
# into /tmp/site first. GPU_ROWS_SMOKE=1 runs every row on the CPU-sized
# configs/bench_vit.py:smoke instead (a check of this script; tests do it).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT_DIR=${OUT:-runs/gpu_rows}
mkdir -p "$OUT_DIR"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl || { echo "error: installing .whl/ failed" >&2; exit 1; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  $PY -c "import jax, torch; print('jax', jax.__version__, jax.devices()); print('torch', torch.__version__, torch.cuda.is_available())" 2>&1
} > "$OUT_DIR/device.txt"

declare -A ROW_LIMIT_S=([tiny]=200 [b32]=280 [tiny2000]=90)
declare -A ROW_ARGS=(
  # 200 clients x 10 x 32; the torch peer takes ~14 s a round there, so two mask kinds.
  [tiny]="--config configs/bench_vit.py:tiny --masks config,top2 --repeats 3 --torch_threads 1"
  # 20 clients x 5 x 64; cut levels limited to keep the compile within the limit.
  [b32]="--config configs/bench_vit.py:b32 --masks config,top2 --repeats 3 --torch_threads 1
         --config.fl.cut_levels=0,6,9,10,11"
  # the memory row: the round alone (the sequential peer would take minutes).
  [tiny2000]="--config configs/bench_vit.py:tiny2000 --masks config --repeats 3 --torch_peer="
)
status=0
for row in "${@:-tiny b32 tiny2000}"; do
  for r in $row; do
    if [[ -z "${ROW_ARGS[$r]+x}" ]]; then
      echo "error: unknown row '$r'; rows: ${!ROW_ARGS[*]}" >&2; exit 2
    fi
    args=${ROW_ARGS[$r]}
    limit=${ROW_LIMIT_S[$r]}
    if [[ -n "${GPU_ROWS_SMOKE:-}" ]]; then
      args="--config configs/bench_vit.py:smoke --masks top2 --repeats 1 --torch_threads 1"
      [[ $r == tiny2000 ]] && args="$args --torch_peer="
      limit=300
    fi
    echo "== $r: python -m fedsel_jax.bench $args (limit ${limit} s)"
    # shellcheck disable=SC2086
    timeout "$limit" $PY -m fedsel_jax.bench $args --json "$OUT_DIR/$r.json" 2>&1 \
        | tee "$OUT_DIR/$r.log"
    rc=${PIPESTATUS[0]}
    echo "== $r: exit $rc"
    [[ $rc -ne 0 ]] && status=$rc
  done
done
exit $status
