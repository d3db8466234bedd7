"""The whole round (scores, P1, training, E1/E2) of an earlier commit against today's.

    python experiments/bench/full_round.py --config configs/digits.py --rev 116560e \
        [--set FIELD=VALUE ...] [--repeats 5] [--pairs 2] [--json PATH]

Unlike ``fedsel_jax.bench`` (training, aggregation and the server step on
given masks), this times ``Setup.round_fn`` on round 0's host data with
re-selection and diagnostics on: the score pass, the solver, training and the
diagnostics' gradient and Hessian passes (where the diagnostics are their
own program, ``round_programs.py``, both programs: compile time and seconds
are the two's). Each side is a fresh process (today's
tree, and a ``git worktree`` of ``--rev``), run alternately ``--pairs`` times;
each reports its compile time and the median of ``--repeats`` rounds after
the first call. Outputs of the two sides are compared (the round's scores,
masks and E1/E2 as max relative difference).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

CHILD = r"""
import json, statistics, sys, time
import jax, numpy as np
from fedsel_jax import cli, train
config = cli.load_config(sys.argv[1])
cli.apply_overrides(config, sys.argv[3:])
setup = train.Setup(config)
rd, key = setup.round_data(0), jax.random.key(0)
rd = dict(rd, reselect=np.bool_(True), diagnose=np.bool_(True))
# Since 5c324b7 a run's diagnostics may be a program of their own
# (round_programs.py): then the whole round is the two, the second on the
# params the round started from.
split = getattr(setup, "diagnose_fn", None) is not None
t0 = time.perf_counter()
compiled = setup.round_fn.lower(setup.initial_state(), rd, key).compile()
if split:
  from fedsel_jax import round_programs
  s0 = setup.initial_state()
  out = jax.eval_shape(setup.round_fn, s0, rd, key)[1]
  diagnose = setup.diagnose_fn.lower(*round_programs.diagnose_args(
      s0.params, s0.round, rd, (), out, key)).compile()
compile_s = time.perf_counter() - t0
times = []
for i in range(int(sys.argv[2]) + 1):
  state = setup.initial_state()
  t0 = time.perf_counter()
  if split:
    params0, round0 = jax.tree_util.tree_map(jax.numpy.copy, (state.params, state.round))
  _, metrics = compiled(state, rd, key)
  if split:
    metrics = dict(metrics, **diagnose(*round_programs.diagnose_args(
        params0, round0, rd, (), metrics, key)))
  jax.block_until_ready(metrics)
  times.append(time.perf_counter() - t0)
keep = {k: np.asarray(metrics[k]).tolist() for k in ("scores", "masks", "e1", "e2", "lipschitz")
        if k in metrics}
print("RESULT " + json.dumps(dict(compile_s=compile_s, first_s=times[0],
                                  median_s=statistics.median(times[1:]), outputs=keep)))
"""


def run_side(root: str, args) -> dict:
  env = dict(os.environ, PYTHONPATH=root)
  proc = subprocess.run([sys.executable, "-c", CHILD, args.config, str(args.repeats), *args.set],
                        cwd=root, env=env, capture_output=True, text=True)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
  if proc.returncode or not lines:
    raise SystemExit(f"error: the round at {root} failed:\n{proc.stderr[-2000:]}")
  return json.loads(lines[-1][len("RESULT "):])


def max_rel(a, b) -> float:
  import numpy as np
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-30))) if a.size else 0.0


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", required=True)
  parser.add_argument("--rev", required=True)
  parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--pairs", type=int, default=2)
  parser.add_argument("--json", default="")
  args = parser.parse_args()
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  old = tempfile.mkdtemp(prefix="fedsel_jax_rev_")
  subprocess.run(["git", "worktree", "add", "--detach", old, args.rev], cwd=root, check=True,
                 capture_output=True)
  head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                        text=True).stdout.strip()
  dirty = bool(subprocess.run(["git", "status", "--porcelain", "fedsel_jax"], cwd=root,
                              capture_output=True, text=True).stdout.strip())
  report = dict(command="python experiments/bench/full_round.py " + " ".join(sys.argv[1:]),
                today=head + ("+uncommitted" if dirty else ""), rev=args.rev,
                load=os.getloadavg(), date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                cpus=os.cpu_count(), runs=[])
  try:
    for _ in range(args.pairs):
      for name, where in (("rev", old), ("today", root)):
        res = run_side(where, args)
        report["runs"].append(dict(side=name, **res))
        print(f"{name:<6} compile {res['compile_s']:6.1f} s  round {res['median_s']:.3f} s  "
              f"(first {res['first_s']:.3f} s)", flush=True)
  finally:
    subprocess.run(["git", "worktree", "remove", "--force", old], cwd=root, capture_output=True)
    shutil.rmtree(old, ignore_errors=True)
  sides = {s: [r for r in report["runs"] if r["side"] == s] for s in ("rev", "today")}
  med = {s: sorted(r["median_s"] for r in runs)[len(runs) // 2] for s, runs in sides.items()}
  report["speedup"] = med["rev"] / med["today"]
  a, b = sides["today"][0]["outputs"], sides["rev"][0]["outputs"]
  report["max_rel_diff"] = {k: max_rel(a[k], b[k]) for k in a if k in b}
  report["load_after"] = os.getloadavg()
  print(f"today vs {args.rev}: {report['speedup']:.2f}x; outputs max rel diff "
        f"{report['max_rel_diff']}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(report, f, indent=1)


if __name__ == "__main__":
  main()
