"""Figures of the convergence-bound study from its committed outputs.

    python experiments/convergence_bound/plot.py experiments/convergence_bound/results

Reads ``summary.csv`` and each run's ``metrics.csv`` / ``diagnostics.npz``
and writes ``terms.png`` (per lambda, seed 0: E1, E2, ||grad f||^2 as markers
on the diagnosed rounds only, values below 1e-3 drawn at 1e-3; running
average and right-hand sides as lines),
``lambda.png`` (mean E1 and E2 and the final LHS/RHS against lambda, mean ±
std over seeds) and ``layers.png`` (per-layer E1_l and E2_l, seed 0).
"""

from __future__ import annotations

import csv
import os
import sys

import numpy as np

FLOOR = 1e-3   # terms below (exact zeros: E1 with every layer covered, E2 with consensus) sit here


def _read(path):
  with open(path) as f:
    return list(csv.DictReader(f))


def _col(rows, name):
  pts = [(int(r["round"]), float(r[name])) for r in rows if r.get(name, "") != ""]
  return np.array([p[0] for p in pts]), np.array([p[1] for p in pts])


def _ratio(a: float, b: float) -> float:
  """a / b, NaN where the bound is 0 (consensus: E2 and its bound both vanish)."""
  return a / b if b else float("nan")


def write_tightness(out: str, summary: list[dict], lams: list[float]) -> str:
  """tightness.md: how loose the bound is at the last round and which term makes it."""
  def ms(fn, lam):
    v = np.array([fn(r) for r in summary if float(r["lam"]) == lam])
    return f"{v.mean():.3g} ± {v.std():.2g}"

  f = lambda key: (lambda r: float(r[key]))
  lines = ["At the last round, mean ± std over seeds (from summary.csv):", "",
           "| lambda | RHS / LHS | share of RHS: L-term | share: E1 + E2 | share: 2(f0 - f*)/(eta T) "
           "| E2 / E2 bound |", "|---|---|---|---|---|---|"]
  for lam in lams:
    lines.append(
        f"| {lam:g} | {ms(lambda r: f('final_rhs')(r) / f('final_lhs')(r), lam)} | "
        f"{ms(lambda r: f('final_eta')(r) / f('final_rhs')(r), lam)} | "
        f"{ms(lambda r: f('final_err')(r) / f('final_rhs')(r), lam)} | "
        f"{ms(lambda r: f('final_opt')(r) / f('final_rhs')(r), lam)} | "
        f"{ms(lambda r: _ratio(f('mean_e2')(r), f('mean_e2_bound')(r)), lam)} |")
  worst = 0.0   # the layer-wise bound E2_l <= (1/P_l - 1) kappa_l^2, every layer and round
  for r in summary:
    with np.load(os.path.join(out, f"seed{r['seed']}_lam{float(r['lam']):g}",
                              "diagnostics.npz")) as f:
      p, kappa, e2 = f["p_layers"], f["kappa_sq"], f["e2_layers"]
    bound = np.where(p > 0, (1 / np.maximum(p, 1e-30) - 1) * kappa, 0)
    if np.any(e2 > bound * (1 + 1e-4) + 1e-9):
      raise AssertionError(f"E2_l above its bound in seed {r['seed']} lambda {r['lam']}")
    worst = max(worst, float(np.max(np.where(bound > 0, e2 / np.maximum(bound, 1e-30), 0))))
  lines += ["", f"E2_l <= (1/P_l - 1) kappa_l^2 on every layer and diagnosed round of every run; "
            f"the largest ratio E2_l / bound_l is {worst:.3g}."]
  path = os.path.join(out, "tightness.md")
  with open(path, "w") as fh:
    fh.write("\n".join(lines) + "\n")
  return path


def main(out: str) -> list[str]:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  summary = _read(os.path.join(out, "summary.csv"))
  lams = sorted({float(r["lam"]) for r in summary})
  seed = min(int(r["seed"]) for r in summary)
  paths = [write_tightness(out, summary, lams)]

  fig, axes = plt.subplots(1, len(lams), figsize=(3.6 * len(lams), 3.4), sharey=True)
  for ax, lam in zip(np.atleast_1d(axes), lams):
    rows = _read(os.path.join(out, f"seed{seed}_lam{lam:g}", "metrics.csv"))
    for name, style in (("e1", "s"), ("e2", "^"), ("e2_sampled", "v"), ("grad_sq", "o")):
      x, y = _col(rows, name)
      ax.plot(x + 1, np.maximum(y, FLOOR), style, ms=3, ls="", label=name)
    for name, style in (("grad_sq_avg", "-"), ("bound_rhs", "-"), ("bound_rhs_fstar0", "--")):
      x, y = _col(rows, name)
      ax.plot(x + 1, y, style, label=name)
    ax.set(yscale="log", xlabel="round", title=f"lambda = {lam:g} (seed {seed})",
           ylim=(FLOOR / 2, None))
    ax.grid(alpha=0.3)
  np.atleast_1d(axes)[0].legend(fontsize=7)
  paths.append(os.path.join(out, "terms.png"))
  fig.savefig(paths[-1], dpi=110, bbox_inches="tight")
  plt.close(fig)

  fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
  x = np.array(lams)
  xs = np.maximum(x, x[x > 0].min() / 3) if (x > 0).any() else x
  for key, label in (("mean_e1", "E1"), ("mean_e2", "E2"), ("mean_e2_bound", "E2 bound"),
                     ("mean_e2_sampled", "E2, sampled clients as reference")):
    v = np.array([[float(r[key]) for r in summary if float(r["lam"]) == lam] for lam in lams])
    axes[0].errorbar(xs, v.mean(1), v.std(1), marker="o", capsize=3, label=label)
  axes[0].set(xscale="log", yscale="symlog", xlabel="lambda (0 at the left edge)",
              title="error terms (mean over diagnosed rounds)")
  axes[0].legend()
  for key, label in (("final_lhs", "LHS (1/T) sum ||grad f||^2"), ("final_rhs", "RHS, f* = min f"),
                     ("final_rhs_fstar0", "RHS, f* = 0")):
    v = np.array([[float(r[key]) for r in summary if float(r["lam"]) == lam] for lam in lams])
    axes[1].errorbar(xs, v.mean(1), v.std(1), marker="o", capsize=3, label=label)
  axes[1].set(xscale="log", yscale="log", xlabel="lambda (0 at the left edge)",
              title="bound at the last round")
  axes[1].legend(fontsize=7)
  for ax in axes:
    ax.grid(alpha=0.3)
  paths.append(os.path.join(out, "lambda.png"))
  fig.savefig(paths[-1], dpi=110, bbox_inches="tight")
  plt.close(fig)

  fig, axes = plt.subplots(2, len(lams), figsize=(3.2 * len(lams), 5), sharex=True)
  axes = np.asarray(axes).reshape(2, len(lams))
  for j, lam in enumerate(lams):
    with np.load(os.path.join(out, f"seed{seed}_lam{lam:g}", "diagnostics.npz")) as f:
      names, rounds = list(f["names"]), f["round"]
      for i, key in enumerate(("e1_layers", "e2_layers")):
        im = axes[i, j].imshow(np.log10(np.maximum(f[key].T, 1e-8)), aspect="auto",
                               origin="lower", vmin=-8, vmax=0, cmap="magma",
                               extent=(rounds[0] - 0.5, rounds[-1] + 0.5, -0.5, len(names) - 0.5))
        axes[i, j].set_yticks(range(len(names)), names if j == 0 else [""] * len(names),
                              fontsize=7)
        axes[i, j].set_title(f"log10 {key[:2].upper()}_l, lambda {lam:g}", fontsize=8)
  fig.colorbar(im, ax=axes, shrink=0.6)
  paths.append(os.path.join(out, "layers.png"))
  fig.savefig(paths[-1], dpi=110, bbox_inches="tight")
  plt.close(fig)
  return paths


if __name__ == "__main__":
  print("\n".join(main(sys.argv[1] if len(sys.argv) > 1 else
                       os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))))
