"""First call of a config's round, cold and from the commands' persistent cache.

    python experiments/bench/cache_rerun.py --config configs/default.py \
        [--set fl.backprop_cut=True ...] [--json PATH]

Runs two fresh processes one after the other on one new cache directory
(``fedsel_jax.compile_cache.enable``, what ``fedsel_jax.main`` and
``fedsel_jax.sweep`` do): the first compiles the round and writes the cache,
the second is a rerun of the same config. Each times ``trace + lower`` and
``compile`` of ``Setup.round_fn`` on round 0's data, and says whether JAX
reported a persistent-cache hit for the round.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

CHILD = r"""
import json, logging, sys, time
import jax
from fedsel_jax import cli, compile_cache, train
hits = []
class H(logging.Handler):
  def emit(self, r):
    if "cache hit" in r.getMessage() and "round_fn" in r.getMessage():
      hits.append(True)
log = logging.getLogger("jax._src.compiler"); log.setLevel(logging.DEBUG); log.addHandler(H())
compile_cache.enable(sys.argv[1])
config = cli.load_config(sys.argv[2])
cli.apply_overrides(config, sys.argv[3:])
setup = train.Setup(config)
rd, key = setup.round_data(0), jax.random.key(0)
t0 = time.perf_counter()
lowered = setup.round_fn.trace(setup.initial_state(), rd, key).lower()
t1 = time.perf_counter()
lowered.compile()
t2 = time.perf_counter()
print("RESULT " + json.dumps(dict(trace_lower_s=t1 - t0, compile_s=t2 - t1, first_call_s=t2 - t0,
                                  cache_hit=bool(hits))))
"""


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", required=True)
  parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE")
  parser.add_argument("--json", default="")
  args = parser.parse_args()
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  cache = tempfile.mkdtemp(prefix="fedsel_jax_rerun_cache_")
  env = dict(os.environ, PYTHONPATH=root)
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                          text=True).stdout.strip()
  out = dict(config=args.config, set=args.set, load=os.getloadavg(), commit=commit,
             date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), rows=[])
  for what in ("first run (cold cache)", "rerun (warm cache)"):
    proc = subprocess.run([sys.executable, "-c", CHILD, cache, args.config, *args.set],
                          cwd=root, env=env, capture_output=True, text=True, check=True)
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    out["rows"].append(dict(variant=what, **json.loads(line[len("RESULT "):])))
    print(out["rows"][-1], flush=True)
  out["load_after"] = os.getloadavg()
  if args.json:
    with open(args.json, "w") as f:
      json.dump(out, f, indent=2)


if __name__ == "__main__":
  main()
