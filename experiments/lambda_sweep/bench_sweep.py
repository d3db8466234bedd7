"""The 8-lambda x 3-seed digits sweep against the 24 separate CLI runs it replaces.

    .venv/bin/python experiments/lambda_sweep/bench_sweep.py --out runs/lambda_bench

End to end, back to back on one machine: the sweep command (one process,
one vmapped program) three times, interleaved with the 24 ``fedsel_jax.main``
runs (two halves of 12), each a fresh process as a user would start it.
Records wall times and the load average before and after every phase in
``bench.json``, and checks that every CLI run's final accuracy equals its
sweep member's. The sweep's first repetition is the committed lambda-sweep
result (``experiments/lambda_sweep/digits``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time

LAMS = "0,0.001,0.002,0.003,0.005,0.01,0.03,0.1"
SEEDS = "0,1,2"
CONFIG = "configs/digits.py"


def timed(cmd: list[str], log: str) -> dict:
  load = os.getloadavg()
  t0 = time.perf_counter()
  with open(log, "w") as f:
    subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT)
  return {"seconds": time.perf_counter() - t0, "load_before": load,
          "load_after": os.getloadavg()}


def sweep_cmd(workdir: str) -> list[str]:
  return [sys.executable, "-m", "fedsel_jax.sweep", "--config", CONFIG, "--workdir", workdir,
          "--sweep", f"selection.lam={LAMS}", "--sweep", f"seed={SEEDS}"]


def cli_cmd(workdir: str, lam: str, seed: str) -> list[str]:
  return [sys.executable, "-m", "fedsel_jax.main", "--config", CONFIG, "--workdir", workdir,
          f"--config.selection.lam={lam}", f"--config.seed={seed}"]


def main():
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--out", default="runs/lambda_bench")
  args = p.parse_args()
  shutil.rmtree(args.out, ignore_errors=True)
  os.makedirs(args.out)
  runs = [(lam, seed) for lam in LAMS.split(",") for seed in SEEDS.split(",")]
  result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores", "sweeps": [],
            "cli": []}
  halves = [runs[:12], runs[12:], []]
  for rep, half in enumerate(halves):
    wd = os.path.join(args.out, f"sweep{rep}")
    result["sweeps"].append(timed(sweep_cmd(wd), wd + ".log"))
    print(f"sweep {rep}: {result['sweeps'][-1]['seconds']:.1f} s", flush=True)
    for lam, seed in half:
      wd = os.path.join(args.out, "cli", f"lam={lam},seed={seed}")
      os.makedirs(wd)
      result["cli"].append(dict(timed(cli_cmd(wd, lam, seed), wd + "/stdout.log"), lam=lam,
                                seed=seed))
      print(f"cli lam={lam} seed={seed}: {result['cli'][-1]['seconds']:.1f} s", flush=True)
  diffs = []
  for r in result["cli"]:
    with open(os.path.join(args.out, "cli", f"lam={r['lam']},seed={r['seed']}",
                           "final.json")) as f:
      a = json.load(f)["test_accuracy"]
    with open(os.path.join(args.out, "sweep0", f"selection.lam={float(r['lam'])!r},"
                           f"seed={r['seed']}", "final.json")) as f:
      b = json.load(f)["test_accuracy"]
    diffs.append(abs(a - b))
  sweeps = sorted(s["seconds"] for s in result["sweeps"])
  cli_total = sum(r["seconds"] for r in result["cli"])
  result.update(sweep_median_s=sweeps[1], sweep_min_s=sweeps[0], sweep_max_s=sweeps[-1],
                cli_total_s=cli_total,
                cli_per_run_median_s=statistics.median(r["seconds"] for r in result["cli"]),
                speedup=cli_total / sweeps[1], max_abs_accuracy_diff=max(diffs))
  with open(os.path.join(args.out, "bench.json"), "w") as f:
    json.dump(result, f, indent=2)
  print(json.dumps({k: v for k, v in result.items() if k not in ("sweeps", "cli")}, indent=2))


if __name__ == "__main__":
  main()
