"""The diagnostics' share of round time, with and without the shared gradient pass.

    python experiments/convergence_bound/cost.py --config configs/digits.py --reps 30

In one process, on the same round data, times the jitted round (after
warm-up, interleaved repetitions; median and interquartile range) for:

* ``off``: diagnostics disabled;
* ``two passes``: diagnostics on, the score pass and the diagnostics pass
  separate (the structure before the shared pass);
* ``shared``: one gradient pass serves scores and diagnostics;
* ``shared + L``: as shared, plus ``--power_iters`` Hessian power iterations.

The share of diagnostics = (t - t_off) / t. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from configs import load_config  # noqa: E402
from fedsel_jax import client as client_lib  # noqa: E402
from fedsel_jax import federated  # noqa: E402
from fedsel_jax import train  # noqa: E402


@dataclasses.dataclass(frozen=True)
class TwoPassSettings(federated.RoundSettings):
  """The same round with the score pass and the diagnostics pass kept apart."""

  @property
  def shares_score_pass(self) -> bool:
    return False


def main():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default="configs/digits.py")
  p.add_argument("--reps", type=int, default=30)
  p.add_argument("--power_iters", type=int, default=10)
  args = p.parse_args()
  config = load_config(args.config)
  config.diagnostics.estimator = "full"
  config.diagnostics.power_iters = 0
  config.selection.sel_batches = 0
  setup = train.Setup(config)
  base = dataclasses.replace(setup.settings, diag_estimator="full", diag_power_iters=0)
  variants = {
      "off": dataclasses.replace(base, diagnostics=False),
      "two passes": TwoPassSettings(**dataclasses.asdict(base)),
      "shared": base,
      f"shared + L ({args.power_iters} power iterations)":
          dataclasses.replace(base, diag_power_iters=args.power_iters),
  }
  assert base.shares_score_pass and not variants["two passes"].shares_score_pass
  loss_fn = client_lib.make_loss_fn(setup.spec.module.apply)
  fns = {name: jax.jit(federated.make_round_fn(loss_fn, setup.index, setup.k, setup.client_opt,
                                               setup.server_opt, setup.costs, s))
         for name, s in variants.items()}
  rd = setup.round_data(0)          # round 0: scores and diagnostics both run
  key = jax.random.key(config.seed)
  state = setup.initial_state()
  compile_s = {}
  for name, fn in fns.items():
    t0 = time.perf_counter()
    jax.block_until_ready(fn(state, rd, key))
    compile_s[name] = time.perf_counter() - t0
  times = {name: [] for name in fns}
  for _ in range(args.reps):        # interleaved: load changes hit every variant alike
    for name, fn in fns.items():
      t0 = time.perf_counter()
      jax.block_until_ready(fn(state, rd, key))
      times[name].append(time.perf_counter() - t0)
  off = np.median(times["off"])
  load = os.getloadavg()
  print(f"{config.data.name}, {config.fl.clients_per_round} clients x {config.fl.local_steps} "
        f"steps x {config.fl.batch_size}, {args.reps} interleaved repetitions, load average "
        f"{load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
  print("| round | median ms | IQR ms | diagnostics' share | first call s |")
  print("|---|---|---|---|---|")
  for name, t in times.items():
    t = np.array(t) * 1e3
    q1, med, q3 = np.percentile(t, [25, 50, 75])
    share = "-" if name == "off" else f"{(med - off * 1e3) / med:.0%}"
    print(f"| {name} | {med:.2f} | {q1:.2f}-{q3:.2f} | {share} | {compile_s[name]:.1f} |")


if __name__ == "__main__":
  main()
