"""The README's compact table: final test accuracy per strategy and budget.

    .venv/bin/python experiments/paper_comparison/table.py > experiments/paper_comparison/table.md
    .venv/bin/python experiments/paper_comparison/table.py --blocks flagship > experiments/paper_comparison/flagship/blocks.md
    .venv/bin/python experiments/paper_comparison/table.py --time flagship > experiments/paper_comparison/flagship/time.md
    .venv/bin/python experiments/paper_comparison/table.py --penalty flagship > experiments/paper_comparison/flagship/penalty.md

Reads the committed sweep outputs (``digits_fixed``, ``digits_hetero``,
``flagship``; a strategy a sweep did not run shows "not run"):
mean ± std over seeds, and in brackets the paired difference to ``proposed``
(same seed, in accuracy points) with its 95% t interval.
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

from fedsel_jax import stats  # noqa: E402

STRATEGY = "selection.strategy"
COLUMNS = (("digits_fixed", {"selection.budget.value": 1}, "digits, budget 1 block"),
           ("digits_fixed", {"selection.budget.value": 2}, "digits, budget 2 blocks"),
           ("digits_hetero", {}, "digits, heterogeneous 1-2 blocks"),
           ("flagship", {}, "flagship (MiniLM), heterogeneous 1-2 blocks"))


def rows_of(workdir: str) -> list[dict]:
  axes, _, members = stats.load_spec(workdir)
  return [stats.member_row(os.path.join(workdir, m["name"]), m["values"]) for m in members]


def cell(rows: list[dict], strategy: str, where: dict) -> str:
  pick = [r for r in rows if r[STRATEGY] == strategy and all(r[k] == v for k, v in where.items())]
  if not pick:
    return "not run"
  m, s, _ = stats.mean_std_ci([r["test_accuracy"] for r in pick])
  if strategy == "proposed":
    return f"{m:.4f} ± {s:.4f}"
  ref = {r["seed"]: r["test_accuracy"] for r in rows
         if r[STRATEGY] == "proposed" and all(r[k] == v for k, v in where.items())}
  d, _, h = stats.mean_std_ci([100 * (r["test_accuracy"] - ref[r["seed"]]) for r in pick])
  return f"{m:.4f} ± {s:.4f} ({d:+.2f} [{d - h:+.2f}, {d + h:+.2f}])"


def blocks(name: str) -> None:
  """Mean candidate blocks a sampled client trains per round, per strategy (selection.npz)."""
  import numpy as np
  workdir = os.path.join(HERE, name)
  _, _, members = stats.load_spec(workdir)
  per: dict[str, list[float]] = {}
  for m in members:
    with np.load(os.path.join(workdir, m["name"], "selection.npz")) as f:
      per.setdefault(m["values"][STRATEGY], []).append(float(f["masks"].sum(-1).mean()))
  print("| strategy | blocks per client and round (mean over seeds) | per seed |")
  print("|---|---|---|")
  for s, v in per.items():
    print(f"| {s} | {np.mean(v):.3f} | {', '.join(f'{x:.3f}' for x in v)} |")


def time_table(name: str) -> None:
  """Training time per strategy: the sum of each member's per-round seconds
  (metrics.csv; the first round includes the compile; evaluation not counted)."""
  import csv
  workdir = os.path.join(HERE, name)
  _, _, members = stats.load_spec(workdir)
  per: dict[str, list[float]] = {}
  for m in members:
    with open(os.path.join(workdir, m["name"], "metrics.csv")) as f:
      seconds = sum(float(r["seconds"]) for r in csv.DictReader(f))
    per.setdefault(m["values"][STRATEGY], []).append(seconds)
  print("| strategy | minutes of rounds, all seeds | per seed (s) |")
  print("|---|---|---|")
  for s, v in per.items():
    print(f"| {s} | {sum(v) / 60:.1f} | {', '.join(f'{x:.0f}' for x in v)} |")
  total = sum(sum(v) for v in per.values())
  print(f"| all {sum(len(v) for v in per.values())} runs | {total / 60:.1f} | |")


PENALISED = (("proposed", "gradnorm"), ("rgn_p1", "rgn"), ("snr_p1", "snr"))


def penalty_table(name: str) -> None:
  """Each penalised rule against its unpenalised twin (same scores, each client
  alone): paired differences over seeds, in accuracy points, 95% t interval."""
  rows = rows_of(os.path.join(HERE, name))
  acc = {(r[STRATEGY], r["seed"]): r["test_accuracy"] for r in rows}
  print("| penalised - unpenalised | pairs | Δ test accuracy (points, mean ± std) | 95% CI | "
        "seeds better |")
  print("|---|---|---|---|---|")
  for a, b in PENALISED:
    seeds = sorted(s for (st, s) in acc if st == a and (b, s) in acc)
    d = [100 * (acc[a, s] - acc[b, s]) for s in seeds]
    m, sd, h = stats.mean_std_ci(d)
    print(f"| {a} - {b} | {len(d)} | {m:+.2f} ± {sd:.2f} | [{m - h:+.2f}, {m + h:+.2f}] | "
          f"{sum(x > 0 for x in d)}/{len(d)} |")


def main() -> None:
  modes = {"--blocks": blocks, "--time": time_table, "--penalty": penalty_table}
  if len(sys.argv) == 3 and sys.argv[1] in modes:
    modes[sys.argv[1]](sys.argv[2])
    return
  data = {name: rows_of(os.path.join(HERE, name)) for name in {c[0] for c in COLUMNS}
          if os.path.exists(os.path.join(HERE, name, "sweep.json"))}
  columns = [c for c in COLUMNS if c[0] in data]
  strategies = list(dict.fromkeys(r[STRATEGY] for r in data["digits_fixed"]))
  print("| strategy | " + " | ".join(label for _, _, label in columns) + " |")
  print("|---|" + "---|" * len(columns))
  for s in strategies:
    print(f"| {s} | " + " | ".join(cell(data[n], s, w) for n, w, _ in columns) + " |")


if __name__ == "__main__":
  main()
