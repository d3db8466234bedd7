"""The convergence bound, measured: several lambdas x several seeds, one table, three figures.

    python experiments/convergence_bound/run.py --config configs/digits.py \
        --lams 0,0.001,0.003,0.01,0.1 --seeds 0,1,2 --workdir runs/convergence_bound \
        --out experiments/convergence_bound/results

Every run is a normal training run (``train.train_and_evaluate``) with
``diagnostics`` on (population mode, full estimator, power iteration for L),
so its ``metrics.csv`` holds E1, E2, ||grad f||^2, the running average and the
bound's right-hand side, and ``diagnostics.npz`` the per-layer terms. One
``train.Setup`` (one compilation) serves all lambdas of a seed: lambda is data.
Writes into ``--out``: each run's metrics.csv and diagnostics.npz,
``summary.csv``, ``summary.md`` and the figures (``plot.py``).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from configs import load_config  # noqa: E402
from fedsel_jax import train  # noqa: E402


def parse():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default="configs/digits.py")
  p.add_argument("--lams", default="0,0.001,0.003,0.01,0.1")
  p.add_argument("--seeds", default="0,1,2")
  p.add_argument("--rounds", type=int, default=0, help="override fl.num_rounds")
  p.add_argument("--every", type=int, default=2, help="diagnostics.every")
  p.add_argument("--power_iters", type=int, default=20)
  p.add_argument("--estimator", default="full")
  p.add_argument("--population", type=int, default=1)
  p.add_argument("--set", action="append", default=[], help="FIELD=VALUE config overrides")
  p.add_argument("--workdir", default="runs/convergence_bound")
  p.add_argument("--out", default="experiments/convergence_bound/results")
  p.add_argument("--from_sweep", default="",
                 help="summarise a finished fedsel_jax.sweep directory over selection.lam "
                      "(and seed) instead of training")
  return p.parse_args()


def from_sweep(args) -> None:
  """The study's outputs (per-run files, summary.csv/.md, figures) from a sweep directory.

  Larger models run as ``python -m fedsel_jax.sweep ... --sweep selection.lam=...
  --sweep seed=...`` (resumable, vmapped per program); this reads its members.
  """
  with open(os.path.join(args.from_sweep, "sweep.json")) as f:
    members = json.load(f)["members"]
  os.makedirs(args.out, exist_ok=True)
  table, lams = [], []
  for m in members:
    values = m["values"]
    s, lam = int(values.get("seed", 0)), float(values["selection.lam"])
    src = os.path.join(args.from_sweep, m["name"])
    with open(os.path.join(src, "metrics.csv")) as f:
      rows = list(csv.DictReader(f))
    out = os.path.join(args.out, f"seed{s}_lam{lam:g}")
    os.makedirs(out, exist_ok=True)
    for fname in ("metrics.csv", "diagnostics.npz"):
      shutil.copy(os.path.join(src, fname), os.path.join(out, fname))
    seconds = sum(float(r["seconds"]) for r in rows)
    table.append(dict(seed=s, lam=lam, **summarise(rows), seconds=round(seconds, 1)))
    lams.append(lam)
  with open(os.path.join(args.out, "summary.csv"), "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(table[0]))
    w.writeheader()
    w.writerows(table)
  write_markdown(args, table, sorted(set(lams)), sum(r["seconds"] for r in table))
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import plot  # noqa: E402  (plot.py beside this file)
  plot.main(args.out)


def configure(args, seed: int, lam: float):
  c = load_config(args.config)
  c.seed = seed
  c.selection.lam = lam
  if args.rounds:
    c.fl.num_rounds = args.rounds
  d = c.diagnostics
  d.enabled, d.every, d.power_iters = True, args.every, args.power_iters
  d.estimator, d.population = args.estimator, bool(args.population)
  c.checkpoint_every = c.fl.num_rounds
  for item in args.set:
    field, value = item.split("=", 1)
    node = c
    *path, last = field.split(".")
    for name in path:
      node = node[name]
    node[last] = type(node[last])(value) if not isinstance(node[last], bool) else value == "True"
  train.validate_config(c)
  return c


def summarise(rows: list[dict]) -> dict:
  """One run's bound numbers from its metrics rows."""
  diag = [r for r in rows if r["e1"] != ""]
  lhs = np.array([float(r["grad_sq_avg"]) for r in rows])
  rhs = np.array([float(r["bound_rhs"]) for r in rows])
  rhs0 = np.array([float(r["bound_rhs_fstar0"]) for r in rows])
  acc = [float(r["test_accuracy"]) for r in rows if r["test_accuracy"] != ""]
  return dict(
      mean_e1=np.mean([float(r["e1"]) for r in diag]),
      mean_e2=np.mean([float(r["e2"]) for r in diag]),
      mean_e2_bound=np.mean([float(r["e2_bound"]) for r in diag]),
      mean_e2_sampled=np.mean([float(r.get("e2_sampled") or "nan") for r in diag]),
      mean_e1_sampled=np.mean([float(r.get("e1_sampled") or "nan") for r in diag]),
      mean_grad_sq=np.mean([float(r["grad_sq"]) for r in diag]),
      final_lhs=lhs[-1], final_rhs=rhs[-1], final_rhs_fstar0=rhs0[-1],
      final_opt=float(rows[-1]["bound_opt"]), final_err=float(rows[-1]["bound_err"]),
      final_eta=float(rows[-1]["bound_eta"] or "nan"), L_max=float(rows[-1]["L_max"] or "nan"),
      rounds_held=float(np.mean(lhs <= rhs)), rounds_held_fstar0=float(np.mean(lhs <= rhs0)),
      worst_ratio=float(np.max(lhs / rhs)), final_accuracy=acc[-1] if acc else float("nan"),
      disagreement=np.mean([float(r["disagreement"]) for r in rows]))


def main():
  args = parse()
  if args.from_sweep:
    from_sweep(args)
    return
  lams = [float(v) for v in args.lams.split(",")]
  seeds = [int(v) for v in args.seeds.split(",")]
  for s in seeds:                       # every config valid before the first compute
    for lam in lams:
      configure(args, s, lam)
  os.makedirs(args.out, exist_ok=True)
  table = []
  t_start = time.time()
  for s in seeds:
    setup = train.Setup(configure(args, s, lams[0]))
    for lam in lams:
      c = configure(args, s, lam)
      setup.config = c                  # lambda is round data: the compiled round is reused
      name = f"seed{s}_lam{lam:g}"
      wd = os.path.join(args.workdir, name)
      shutil.rmtree(wd, ignore_errors=True)
      t0 = time.time()
      train.train_and_evaluate(c, wd, setup=setup, quiet=True)
      with open(os.path.join(wd, "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
      out = os.path.join(args.out, name)
      os.makedirs(out, exist_ok=True)
      for fname in ("metrics.csv", "diagnostics.npz"):
        shutil.copy(os.path.join(wd, fname), os.path.join(out, fname))
      table.append(dict(seed=s, lam=lam, **summarise(rows), seconds=round(time.time() - t0, 1)))
      print(f"seed {s} lambda {lam:g}: " + ", ".join(
          f"{k} {v:.4g}" for k, v in table[-1].items() if k not in ("seed", "lam")), flush=True)
  with open(os.path.join(args.out, "summary.csv"), "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(table[0]))
    w.writeheader()
    w.writerows(table)
  write_markdown(args, table, lams, time.time() - t_start)
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import plot  # noqa: E402  (plot.py beside this file)
  plot.main(args.out)


def write_markdown(args, table, lams, seconds):
  def ms(key, lam):
    v = np.array([r[key] for r in table if r["lam"] == lam])
    return f"{v.mean():.3g} ± {v.std():.2g}"

  load = os.getloadavg()
  lines = [f"Command: `python experiments/convergence_bound/run.py {' '.join(sys.argv[1:])}`",
           f"Machine: {platform.machine()} {os.cpu_count()} cores, load average "
           f"{load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f} at the end, "
           f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {seconds:.0f} s in all; "
           f"git {git_head()}.", "",
           "Mean ± std over seeds " + ", ".join(str(s) for s in sorted({r['seed'] for r in table}))
           + " (E1, E2, E2 bound: means over diagnosed rounds; LHS = (1/T) sum ||grad f||^2 and "
           "the right-hand sides at the last round; held = share of rounds with LHS <= RHS):", "",
           "| lambda | disagreeing pairs | E1 | E2 | E2 bound | E2, sampled clients as reference "
           "| LHS | RHS (f* = min f) | "
           "RHS (f* = 0) | held | held (f* = 0) | max LHS/RHS | L | test acc |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for lam in lams:
    lines.append(f"| {lam:g} | {ms('disagreement', lam)} | {ms('mean_e1', lam)} | "
                 f"{ms('mean_e2', lam)} | {ms('mean_e2_bound', lam)} | "
                 f"{ms('mean_e2_sampled', lam)} | {ms('final_lhs', lam)} | "
                 f"{ms('final_rhs', lam)} | {ms('final_rhs_fstar0', lam)} | "
                 f"{ms('rounds_held', lam)} | {ms('rounds_held_fstar0', lam)} | "
                 f"{ms('worst_ratio', lam)} | {ms('L_max', lam)} | {ms('final_accuracy', lam)} |")
  lines += ["", "RHS terms at the last round (mean over seeds): "
            "2(f0 - f*)/(eta T) | mean(E1 + E2) | L sum||dtheta||^2/(eta T)", ""]
  for lam in lams:
    lines.append(f"- lambda {lam:g}: {ms('final_opt', lam)} | {ms('final_err', lam)} | "
                 f"{ms('final_eta', lam)}")
  with open(os.path.join(args.out, "summary.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


def git_head() -> str:
  try:
    return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True).strip()
  except (OSError, subprocess.CalledProcessError):
    return "?"


if __name__ == "__main__":
  main()
