"""A lambda sweep in ONE program: every lambda trains its own model, vmapped.

    python experiments/lambda_sweep/run_sweep.py --config configs/digits.py \
        --lams 0,0.02,0.05,0.1,0.2,0.4,0.8,1.6 --workdir runs/lam_sweep

All runs see the same sampled clients, data and keys (common random
numbers), so differences come from lambda alone. Writes ``sweep.csv`` (one
row per lambda and round: train loss, penalty, E1, E2, E2 bound, ||grad f||^2,
test accuracy at the end) and ``sweep.png`` (mean penalty, E2 and final
accuracy against lambda), and prints a table.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from configs import load_config  # noqa: E402
from fedsel_jax import client as client_lib  # noqa: E402
from fedsel_jax import federated  # noqa: E402
from fedsel_jax import train  # noqa: E402


def main():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default="configs/digits.py")
  p.add_argument("--lams", default="0,0.02,0.05,0.1,0.2,0.4,0.8,1.6")
  p.add_argument("--workdir", default="runs/lam_sweep")
  p.add_argument("--rounds", type=int, default=0, help="override fl.num_rounds")
  args = p.parse_args()
  config = load_config(args.config)
  if args.rounds:
    config.fl.num_rounds = args.rounds
  lams = np.array([float(v) for v in args.lams.split(",")], np.float32)
  for lam in lams:
    train.validate_config(dict_with_lam(config, float(lam)))
  os.makedirs(args.workdir, exist_ok=True)

  setup = train.Setup(config)
  settings = dataclasses.replace(setup.settings, backprop_cut=False)
  round_fn = federated.make_round_fn(client_lib.make_loss_fn(setup.spec.module.apply),
                                     setup.index, setup.k, setup.client_opt, setup.server_opt,
                                     setup.costs, settings)
  sweep = jax.jit(federated.make_sweep_fn(round_fn), donate_argnums=0)
  states = federated.stack_states(setup.initial_state(), len(lams))
  key = jax.random.key(config.seed)
  rows = []
  for t in range(config.fl.num_rounds):
    t0 = time.perf_counter()
    states, m = sweep(states, setup.round_data(t), jnp.asarray(lams), key)
    m = jax.device_get(m)
    print(f"round {t + 1}/{config.fl.num_rounds}  {time.perf_counter() - t0:.2f}s  "
          f"loss {np.round(m['train_loss'], 3)}", flush=True)
    for j, lam in enumerate(lams):
      rows.append({"lam": float(lam), "round": t, "train_loss": float(m["train_loss"][j]),
                   **{k: float(m[k][j]) for k in ("penalty", "disagreement", "e1", "e2", "e2_bound",
                                            "grad_sq")
                      if k in m}})
  finals = []
  for j, lam in enumerate(lams):
    params = jax.tree_util.tree_map(lambda a: a[j], states.params)
    ev = setup.evaluate(params, setup.test_x, setup.test_y)
    finals.append(ev["accuracy"])
  with open(os.path.join(args.workdir, "sweep.csv"), "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
  print("| lambda | disagreeing client pairs per round | mean E2 | mean E1 | "
        "final test accuracy |")
  print("|---|---|---|---|---|")
  summary = []
  for j, lam in enumerate(lams):
    r = [x for x in rows if x["lam"] == float(lam)]
    # sum_l S_l (M - S_l): disagreeing client pairs, comparable across lambdas
    pairs = np.mean([x["disagreement"] for x in r])
    # rounds without diagnostics (config.diagnostics.every) hold NaN
    e2, e1 = np.nanmean([x["e2"] for x in r]), np.nanmean([x["e1"] for x in r])
    summary.append((lam, pairs, e2, e1, finals[j]))
    print(f"| {lam:g} | {pairs:.1f} | {e2:.3e} | {e1:.3e} | {finals[j]:.4f} |")
  plot(summary, os.path.join(args.workdir, "sweep.png"))


def dict_with_lam(config, lam):
  c = config.copy_and_resolve_references()
  c.selection.lam = lam
  return c


def plot(summary, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  lam, pairs, e2, e1, acc = map(np.array, zip(*summary))
  fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
  x = np.maximum(lam, lam[lam > 0].min() / 2) if (lam > 0).any() else lam
  axes[0].plot(x, e2, "o-", label="E2")
  axes[0].plot(x, e1, "s-", label="E1")
  axes[0].set(xscale="log", yscale="symlog", xlabel="lambda (0 plotted at left edge)",
              title="mean error terms")
  axes[0].legend()
  axes[1].plot(x, pairs, "o-")
  axes[1].set(xscale="log", xlabel="lambda (0 plotted at left edge)",
              title="disagreeing client pairs / round")
  axes[2].plot(x, acc, "o-")
  axes[2].set(xscale="log", xlabel="lambda", title="final test accuracy")
  for a in axes:
    a.grid(alpha=0.3)
  fig.savefig(path, dpi=120, bbox_inches="tight")
  plt.close(fig)


if __name__ == "__main__":
  main()
