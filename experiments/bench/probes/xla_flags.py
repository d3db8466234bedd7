"""Cold compile, warm-cache load and round time of a config's round under XLA flag sets.

    PYTHONPATH=. python experiments/bench/probes/xla_flags.py CONFIG "FLAGS_A|FLAGS_B|..." \
        [FIELD=VALUE ...]

For each flag set (``|``-separated; an empty set is XLA's defaults) two fresh
processes share one new persistent cache: the first compiles ``Setup.round_fn``
(cold), the second loads it (warm). Each prints trace + lower, compile (or
load) seconds and the median of 6 rounds on consensus top-2 masks (the bench's
given-masks round data).
"""
import json
import os
import subprocess
import sys
import tempfile
import time

CHILD = r'''
import json, statistics, sys, time
import jax
from fedsel_jax import bench, cli, compile_cache, train
compile_cache.enable(sys.argv[1])
config = cli.load_config(sys.argv[2]); cli.apply_overrides(config, sys.argv[3:])
setup = train.Setup(config)
rd, key = setup.round_data(0), jax.random.key(0)
t0 = time.perf_counter()
lowered = setup.round_fn.trace(setup.initial_state(), rd, key).lower()
t1 = time.perf_counter()
compiled = lowered.compile()
t2 = time.perf_counter()
make_state, rdd = bench.given_masks_inputs(setup, rd, bench.bench_masks(setup, "top2", rd, key))
rdd = jax.device_put(rdd)
times = []
for _ in range(7):
  s = make_state(); a = time.perf_counter()
  jax.block_until_ready(compiled(s, rdd, key)[0].params); times.append(time.perf_counter() - a)
print("RESULT " + json.dumps(dict(trace_lower_s=t1 - t0, compile_s=t2 - t1,
                                  round_s=statistics.median(times[1:]))))
'''


def main() -> None:
  config, flag_sets, fields = sys.argv[1], sys.argv[2].split("|"), sys.argv[3:]
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__)))))
  print(f"# {config} {' '.join(fields)}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
        f"load {os.getloadavg()}", flush=True)
  for flags in flag_sets:
    cache = tempfile.mkdtemp(prefix="fedsel_jax_flags_")
    env = dict(os.environ, PYTHONPATH=root, XLA_FLAGS=flags)
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    rows = []
    for _ in ("cold", "warm"):
      proc = subprocess.run([sys.executable, "-c", CHILD, cache, config, *fields], cwd=root,
                            env=env, capture_output=True, text=True)
      line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
      rows.append(json.loads(line[-1][7:]) if line else {"error": proc.stderr[-300:]})
    cold, warm = rows
    print(f"XLA_FLAGS={flags!r}: cold {json.dumps(cold)}; warm {json.dumps(warm)}", flush=True)
  print(f"# load after {os.getloadavg()}")


if __name__ == "__main__":
  main()
