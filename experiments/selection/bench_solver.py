"""Speed and quality of the in-graph P1 solver (fedsel_jax.selection.solve_p1).

For each size (M clients, K layers) it draws normalised scores (gamma(0.5)
per entry, rows summing to 1), the paper's budgets (round(truncnorm) on
[1, 4], mean 2, std 1) and unit or unequal costs, then reports

* compile time (lower + compile of the jitted solver) and the median / min
  wall time of the compiled call over --repeats runs (fewer, but >= 3, once
  they add up to 30 s; block_until_ready), and the 1-minute load average
  (other processes on the machine inflate the times);
* where the MILP (solve_p1_exact, HiGHS) runs within --milp-time-limit:
  the exact or best-found objective, HiGHS' bound and the solver's gap.

lam is given as lam * (M - 1) (the penalty weight a client feels from the
whole cohort), so sizes are comparable.

  /tmp/venv0/bin/python experiments/selection/bench_solver.py

prints a Markdown table and writes experiments/selection/results.json.

  /tmp/venv0/bin/python experiments/selection/bench_solver.py --quality-seeds 20

instead checks solve_p1 against brute force on 500 random small instances
(M, K <= 6, as tests/test_selection.py) per seed and prints the summary.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import numpy as np

from fedsel_jax import exact
from fedsel_jax import selection as sel

HERE = os.path.dirname(os.path.abspath(__file__))


def make_instance(num_clients, num_layers, costs_kind, seed):
  rng = np.random.default_rng(seed)
  scores = np.asarray(sel.normalize_scores(rng.gamma(0.5, size=(num_clients, num_layers))))
  budgets = sel.draw_budgets("truncnorm", num_clients, seed, low=1, high=4,
                             mean=2.0, std=1.0)
  backward = None
  if costs_kind == "unit":
    costs = sel.layer_costs("unit", param_counts=np.ones(num_layers))
  elif costs_kind == "depth":
    # selection.cost='flops' on a stack of equal blocks (a transformer): training
    # block l pays backprop through every block above it; units = the top block alone.
    costs, backward = sel.budget_costs("flops", np.ones(num_layers),
                                       (0.0, np.ones(num_layers), 0.1))
  else:  # unequal, e.g. stages of a CNN: parameter counts within 3x
    costs = sel.layer_costs("params", param_counts=rng.uniform(1.0, 3.0, num_layers))
  sel.check_budgets(budgets, costs, backward)
  return scores, costs, budgets, backward


def time_solver(scores, costs, budgets, lam, repeats, backward=None):
  # Costs are a constant of the round (as in federated.make_round_fn), so the
  # equal-cost path is chosen on the host.
  solve = jax.jit(lambda s, b, l: sel.solve_p1(s, costs, b, l, backward=backward))
  start = time.perf_counter()
  compiled = solve.lower(scores, budgets, lam).compile()
  compile_s = time.perf_counter() - start
  masks = compiled(scores, budgets, lam).block_until_ready()
  times = []
  while len(times) < repeats and (len(times) < 3 or sum(times) < 30.0):
    start = time.perf_counter()
    compiled(scores, budgets, lam).block_until_ready()
    times.append(time.perf_counter() - start)
  return np.asarray(masks), compile_s, float(np.median(times)), float(np.min(times))


def small_instance(rng, lam_range=(0.0, 2.0)):
  """The instance family of tests/test_selection.py (M, K <= 6); lam uniform
  in ``lam_range`` (10% exactly 0)."""
  m, k = int(rng.integers(1, 7)), int(rng.integers(1, 7))
  scores = rng.gamma(0.5, size=(m, k)) + 1e-9
  scores = (scores / scores.sum(1, keepdims=True)).astype(np.float32)  # rows sum to 1
  kind = rng.integers(3)
  costs = (np.ones(k) if kind == 0 else rng.integers(1, 4, k) if kind == 1
           else rng.uniform(0.3, 2.5, k)).astype(np.float32)
  budgets = rng.integers(1, k + 1, m).astype(np.float32)
  lam = 0.0 if rng.random() < 0.1 else float(rng.uniform(*lam_range))
  return scores, costs, budgets, lam


def quality(num_seeds, pad=6, lam_range=(0.0, 2.0)):
  """Optimal fraction and worst gaps of solve_p1 vs brute force.

  The gap relative to U (the lam = 0 optimum) is reported only when no lam
  is negative: U bounds P1 from above only for lam >= 0.
  """
  solve = jax.jit(jax.vmap(lambda s, c, b, l, v: sel.solve_p1(s, c, b, l, client_valid=v)))
  opt, value, bound = [], [], []
  for seed in range(num_seeds):
    rng = np.random.default_rng(seed)
    instances = [small_instance(rng, lam_range) for _ in range(500)]
    batch = [np.zeros((500, pad, pad), np.float32), np.full((500, pad), 1e9, np.float32),
             np.zeros((500, pad), np.float32), np.zeros(500, np.float32),
             np.zeros((500, pad), bool)]
    for r, (s, c, b, lam) in enumerate(instances):
      m, k = s.shape
      batch[0][r, :m, :k], batch[1][r, :k], batch[2][r, :m] = s, c, b
      batch[3][r], batch[4][r, :m] = lam, True
    out = np.asarray(solve(*batch))
    for (s, c, b, lam), masks in zip(instances, out):
      m, k = s.shape
      opt.append(sel.solve_p1_brute(s, c, b, lam)[1])
      value.append(sel.p1_objective_np(masks[:m, :k], s, lam))
      # U: the lam = 0 optimum, an upper bound on P1 (see the README).
      subsets = [exact._feasible_subsets(c.astype(np.float64), bi) for bi in b]
      bound.append(sum(float(np.max(u @ si)) for u, si in zip(subsets, s.astype(np.float64))))
  opt, value, bound = map(np.asarray, (opt, value, bound))
  loss = opt - value
  out = dict(instances=len(opt),
             optimal=int(np.sum(loss <= 1e-6 * np.maximum(1.0, np.abs(opt)))),
             max_gap_rel_opt=float(np.max(loss / np.maximum(opt, 1e-12))))
  if min(lam_range) >= 0:
    out["max_gap_rel_U"] = float(np.max(loss / np.maximum(bound, 1e-12)))
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--sizes", default="20x12,1000x24,10000x48")
  parser.add_argument("--lam-cohort", default="0.05,0.5",
                      help="values of lam * (M - 1)")
  parser.add_argument("--costs", default="unit,unequal,depth")
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--milp-max-clients", type=int, default=1000)
  parser.add_argument("--milp-time-limit", type=float, default=60.0)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default=os.path.join(HERE, "results.json"))
  parser.add_argument("--quality-seeds", type=int, default=0,
                      help="if > 0: only the small-instance check, this many seeds")
  parser.add_argument("--quality-lam", default="0,2",
                      help="LO,HI: the small instances' lam range (10%% exactly 0)")
  args = parser.parse_args()
  if args.quality_seeds:
    lam_range = tuple(float(v) for v in args.quality_lam.split(","))
    print(json.dumps(quality(args.quality_seeds, lam_range=lam_range)))
    return

  rows = []
  for size in args.sizes.split(","):
    m, k = (int(v) for v in size.split("x"))
    for costs_kind in args.costs.split(","):
      for lam_cohort in (float(v) for v in args.lam_cohort.split(",")):
        lam = lam_cohort / max(m - 1, 1)
        scores, costs, budgets, backward = make_instance(m, k, costs_kind, args.seed)
        masks, compile_s, median_s, min_s = time_solver(
            scores, costs, budgets, lam, args.repeats, backward)
        assert np.all(np.asarray(sel.is_feasible(masks, costs, budgets, backward=backward)))
        row = dict(M=m, K=k, costs=costs_kind, lam_cohort=lam_cohort, lam=lam,
                   compile_s=compile_s, median_ms=1e3 * median_s, min_ms=1e3 * min_s,
                   loadavg_1min=os.getloadavg()[0],
                   objective=sel.p1_objective_np(masks, scores, lam),
                   layers_per_client=float(masks.sum(1).mean()),
                   distinct_masks=len({r.tobytes() for r in masks}))
        if m <= args.milp_max_clients:
          _, info = sel.solve_p1_exact(scores, costs, budgets, lam,
                                       time_limit=args.milp_time_limit,
                                       mip_rel_gap=1e-6, backward=backward)
          if info["objective"] is None:      # HiGHS stopped without an incumbent
            row.update(milp_status=info["status"], milp_s=info["seconds"])
            rows.append(row)
            print(json.dumps(row), flush=True)
            continue
          row.update(milp_status=info["status"], milp_s=info["seconds"],
                     milp_objective=info["objective"], milp_bound=info["bound"])
          # Gap of solve_p1 to the MILP's best answer and to its bound,
          # relative to the MILP bound (> 0 here).
          row["gap_to_milp"] = (info["objective"] - row["objective"]) / abs(info["bound"])
          row["gap_to_bound"] = (info["bound"] - row["objective"]) / abs(info["bound"])
        rows.append(row)
        print(json.dumps(row), flush=True)

  machine = dict(
      nproc=os.cpu_count(), cpu=_cpu_model(), jax=jax.__version__,
      backend=jax.default_backend(), python=platform.python_version())
  with open(args.out, "w") as f:
    json.dump(dict(machine=machine, args=vars(args), rows=rows), f, indent=1)
  print(markdown(rows))


def _cpu_model():
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor()


def markdown(rows):
  head = ("| M | K | costs | lam*(M-1) | compile s | median ms | min ms | objective "
          "| MILP status (s) | MILP objective | MILP bound | gap to MILP | gap to bound |")
  lines = [head, "|" + "---|" * (head.count("|") - 1)]
  for r in rows:
    milp = ("| {milp_status} ({milp_s:.1f}) | {milp_objective:.4f} | {milp_bound:.4f} "
            "| {gap_to_milp:.2e} | {gap_to_bound:.2e} |".format(**r)
            if "milp_objective" in r else
            "| {milp_status} ({milp_s:.1f}) | none | | | |".format(**r)
            if "milp_status" in r else "| not run | | | | |")
    lines.append("| {M} | {K} | {costs} | {lam_cohort} | {compile_s:.1f} | {median_ms:.1f} "
                 "| {min_ms:.1f} | {objective:.4f} ".format(**r) + milp)
  return "\n".join(lines)


if __name__ == "__main__":
  main()
