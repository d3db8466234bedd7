"""First call of a config's round, cold and from the commands' persistent cache.

    python experiments/bench/cache_rerun.py --config configs/default.py \
        [--set fl.backprop_cut=True ...] [--fused] [--json PATH]

Runs two fresh processes one after the other on one new cache directory
(``fedsel_jax.compile_cache.enable``, what ``fedsel_jax.main`` and
``fedsel_jax.sweep`` do): the first compiles and writes the cache, the second
is a rerun of the same config. Each times ``trace + lower`` and ``compile``
of the programs a run calls for round 0, on the data path the run uses (the
device store or host data): the round and, when the diagnostics are a
program of their own (``fedsel_jax/round_programs.py``), the diagnostics
(round 0 is diagnosed), and says whether JAX reported a persistent-cache hit
for each. ``--fused``: the round with the diagnostics compiled in
(``Setup.fused_round_body``), as runs did before the split.
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
from fedsel_jax import cli, compile_cache, device_data, train
hits = []
class H(logging.Handler):
  def emit(self, r):
    if "cache hit" in r.getMessage():
      hits.append(r.getMessage())
log = logging.getLogger("jax._src.compiler"); log.setLevel(logging.DEBUG); log.addHandler(H())
compile_cache.enable(sys.argv[1])
fused = sys.argv[3] == "fused"
config = cli.load_config(sys.argv[2])
cli.apply_overrides(config, sys.argv[4:])
setup = train.Setup(config)
key, state = jax.random.key(0), setup.initial_state()
if setup.uses_store:
  rd, extra = setup.round_data(0, clients=False), (device_data.place(setup.clients),)
  fns = [setup.device_round_fn, setup.device_diagnose_fn]
  wrap = lambda body: device_data.with_gather(body, setup.clients.mask.shape[1])
else:
  rd, extra = setup.round_data(0), ()
  fns = [setup.round_fn, setup.diagnose_fn]
  wrap = lambda body: body
if fused:
  from fedsel_jax import round_programs
  sharding = round_programs.client_sharding(config, setup.chunk)
  fns = [jax.jit(wrap(setup.fused_round_body(sharding=sharding)), donate_argnums=0), None]
def diagnostics_args():   # after the round is timed: eval_shape reuses its trace
  from fedsel_jax import round_programs
  out = jax.eval_shape(fns[0], state, rd, *extra, key)[1]
  return round_programs.diagnose_args(state.params, state.round, rd, extra, out, key)
calls = [("round", fns[0], lambda: (state, rd, *extra, key))]
if fns[1] is not None:
  calls.append(("diagnostics", fns[1], diagnostics_args))
row = dict(program="store" if setup.uses_store else "host", fused=fused, programs=[])
for name, fn, args_of in calls:
  args = args_of()
  before = len(hits)
  t0 = time.perf_counter()
  lowered = fn.trace(*args).lower()
  t1 = time.perf_counter()
  lowered.compile()
  t2 = time.perf_counter()
  row["programs"].append(dict(name=name, trace_lower_s=t1 - t0, compile_s=t2 - t1,
                              cache_hit=len(hits) > before))
row["trace_lower_s"] = sum(p["trace_lower_s"] for p in row["programs"])
row["compile_s"] = sum(p["compile_s"] for p in row["programs"])
row["first_call_s"] = row["trace_lower_s"] + row["compile_s"]
row["cache_hit"] = all(p["cache_hit"] for p in row["programs"])
print("RESULT " + json.dumps(row))
"""


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", required=True)
  parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE")
  parser.add_argument("--fused", action="store_true",
                      help="the round with the diagnostics compiled in")
  parser.add_argument("--json", default="")
  args = parser.parse_args()
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  cache = tempfile.mkdtemp(prefix="fedsel_jax_rerun_cache_")
  env = dict(os.environ, PYTHONPATH=root)
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                          text=True).stdout.strip()
  out = dict(config=args.config, set=args.set, fused=args.fused, load=os.getloadavg(),
             commit=commit, host=os.uname().nodename,
             date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), rows=[])
  for what in ("first run (cold cache)", "rerun (warm cache)"):
    proc = subprocess.run([sys.executable, "-c", CHILD, cache, args.config,
                           "fused" if args.fused else "run", *args.set],
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
