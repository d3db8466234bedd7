"""Results tables and PNG plots of finished runs (matplotlib, headless)."""

from __future__ import annotations

import csv
import os

import numpy as np


def read_metrics(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.csv")) as f:
    return list(csv.DictReader(f))


def results_table(results: list[dict]) -> str:
  """A Markdown table of final test accuracy per strategy."""
  lines = ["| strategy | rounds | test accuracy | test loss | s/round (median) |",
           "|---|---|---|---|---|"]
  for r in results:
    lines.append(f"| {r['strategy']} | {r['rounds']} | {r['test_accuracy']:.4f} | "
                 f"{r['test_loss']:.4f} | {r['median_seconds_per_round']:.3f} |")
  return "\n".join(lines)


def _column(rows, name):
  xs = [(int(r["round"]), float(r[name])) for r in rows if r.get(name, "") not in ("", None)]
  return np.array([x for x, _ in xs]), np.array([y for _, y in xs])


def write_run_plots(out_dir: str, workdirs: list[str], labels: list[str]) -> list[str]:
  """Writes accuracy.png (all runs), and for the first run selection.png
  (share of sampled clients training each layer, per round) and errors.png
  (E1, E2, its bound and ||grad f||^2 per round). Returns the paths."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  paths = []
  fig, ax = plt.subplots(figsize=(6, 4))
  for wd, label in zip(workdirs, labels):
    x, y = _column(read_metrics(wd), "test_accuracy")
    ax.plot(x + 1, y, marker="o", label=label)
  ax.set(xlabel="round", ylabel="test accuracy", title="Test accuracy")
  ax.legend()
  ax.grid(alpha=0.3)
  paths.append(os.path.join(out_dir, "accuracy.png"))
  fig.savefig(paths[-1], dpi=120, bbox_inches="tight")
  plt.close(fig)

  rows = read_metrics(workdirs[0])
  layer_cols = [k for k in rows[0] if k.startswith("S_")]
  sel_file = os.path.join(workdirs[0], "selection.npz")
  if layer_cols and os.path.exists(sel_file):
    with np.load(sel_file) as f:
      share = f["masks"].mean(axis=1)              # [rounds, K]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    im = ax.imshow(share.T, aspect="auto", origin="lower", cmap="viridis", vmin=0, vmax=1,
                   interpolation="nearest")
    ax.set_yticks(range(len(layer_cols)), [c[2:] for c in layer_cols])
    ax.set(xlabel="round", ylabel="layer (input -> output)",
           title=f"Share of sampled clients training each layer ({labels[0]})")
    fig.colorbar(im, ax=ax)
    paths.append(os.path.join(out_dir, "selection.png"))
    fig.savefig(paths[-1], dpi=120, bbox_inches="tight")
    plt.close(fig)

  if "e1" in rows[0] and any(r["e1"] for r in rows):
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in ("e1", "e2", "e2_bound", "grad_sq", "grad_sq_avg", "bound_rhs"):
      x, y = _column(rows, name)
      running = name in ("grad_sq_avg", "bound_rhs")   # defined every round; others where measured
      ax.plot(x + 1, np.maximum(y, 1e-12), label=name, ls="-" if running else "",
              marker="" if running else "o", ms=3)
    ax.set(xlabel="round", yscale="log", title=f"Selection error terms ({labels[0]})")
    ax.legend()
    ax.grid(alpha=0.3)
    paths.append(os.path.join(out_dir, "errors.png"))
    fig.savefig(paths[-1], dpi=120, bbox_inches="tight")
    plt.close(fig)
  return paths
