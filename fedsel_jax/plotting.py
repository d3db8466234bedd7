"""Results tables and figures of finished runs and sweeps, from saved files only.

A *series* is one line of a figure: the runs (one per seed) of one
combination of the other fields. Figures (matplotlib, headless):

* ``accuracy.png``, ``loss.png``: test accuracy / train and test loss per
  round, mean over seeds and a +-1 std band;
* ``selection.png``: per series, the share of the sampled clients training
  each layer in each round (layers x rounds), one panel per series;
* ``errors.png``: E1, E2, the E2 bound and ||grad f||^2, markers at the
  diagnosed rounds only;
* ``lambda.png`` (sweeps over ``selection.lam``): accuracy, E1, E2 and
  disagreement against lambda with std error bars, lambda = 0 on a symlog axis.

``main.py``, ``sweep.py`` and ``python -m fedsel_jax.plot`` call the same code.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os

import numpy as np

LAM = "selection.lam"
MARKERS = ("o", "s", "^", "v", "D", "P", "X", "*", "<", ">", "h", "p")
LINESTYLES = ("-", "--", "-.", ":")
ERROR_TERMS = (("e1", "E1"), ("e2", "E2"), ("e2_bound", "E2 bound"),
               ("grad_sq", "||grad f||^2"))


@dataclasses.dataclass
class Series:
  label: str
  dirs: list[str]                 # one run directory per seed
  values: dict                    # the series' field values (sweeps)


def read_metrics(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.csv")) as f:
    return list(csv.DictReader(f))


def results_table(results: list[dict]) -> str:
  """A Markdown table of final test accuracy per strategy."""
  lines = ["| strategy | rounds | test accuracy | test loss | s/round (median) |",
           "|---|---|---|---|---|"]
  def num(x, digits: int) -> str:   # NaN or null (final.json): not computed
    return "-" if x is None or not np.isfinite(x) else f"{x:.{digits}f}"

  for r in results:
    lines.append(f"| {r['strategy']} | {r['rounds']} | {num(r['test_accuracy'], 4)} | "
                 f"{num(r['test_loss'], 4)} | {num(r['median_seconds_per_round'], 3)} |")
  return "\n".join(lines)


def _column(rows, name) -> tuple[np.ndarray, np.ndarray]:
  """(1-based rounds, values) where the column was measured."""
  xs = [(int(r["round"]) + 1, float(r[name])) for r in rows if r.get(name, "") not in ("", None)]
  return np.array([x for x, _ in xs], int), np.array([y for _, y in xs], float)


def sweep_series(workdir: str, prefix: str = "") -> list[Series]:
  """The series of a sweep directory: members grouped over seeds."""
  from fedsel_jax import stats
  axes, _, members = stats.load_spec(workdir)
  fields = [f for f, vals in axes if f != stats.SEED]
  out: dict[tuple, Series] = {}
  for m in members:
    key = tuple(m["values"][f] for f in fields)
    if key not in out:
      label = ", ".join(f"{f.split('.')[-1]}={v}" for f, v in zip(fields, key)) or "all seeds"
      out[key] = Series(prefix + label, [], dict(zip(fields, key)))
    out[key].dirs.append(os.path.join(workdir, m["name"]))
  return list(out.values())


def load_series(dirs: list[str]) -> list[Series]:
  """Series of sweep directories (sweep.json) or single runs (metrics.csv)."""
  series = []
  for d in dirs:
    prefix = f"{os.path.basename(os.path.normpath(d))}: " if len(dirs) > 1 else ""
    if os.path.exists(os.path.join(d, "sweep.json")):
      series += sweep_series(d, prefix)
    else:
      runs = [d] + sorted(os.path.join(d, "compare", s) for s in
                          (os.listdir(os.path.join(d, "compare"))
                           if os.path.isdir(os.path.join(d, "compare")) else []))
      for r in runs:
        if not os.path.exists(os.path.join(r, "metrics.csv")):
          continue   # local-only and probe rows have no per-round metrics
        with open(os.path.join(r, "config.json")) as f:
          strategy = json.load(f)["selection"]["strategy"]
        series.append(Series(prefix + strategy, [r], {"selection.strategy": strategy}))
  return series


def style(i: int) -> dict:
  """Distinct colour, marker and dash for series i (tab20: 20 colours)."""
  import matplotlib
  colours = matplotlib.colormaps["tab20"].colors   # 10 dark, then their 10 light partners
  colour = colours[(2 * i) % 20 + (i // 10) % 2]
  return dict(color=colour, marker=MARKERS[i % len(MARKERS)],
              linestyle=LINESTYLES[(i // len(MARKERS)) % len(LINESTYLES)])


def _runs_curve(dirs: list[str], name: str) -> tuple[np.ndarray, np.ndarray]:
  """(rounds int[T], values f64[runs, T]) at the rounds every run measured."""
  cols = [_column(read_metrics(d), name) for d in dirs]
  common = sorted(set.intersection(*(set(x.tolist()) for x, _ in cols))) if cols else []
  if not common:
    return np.array([], int), np.zeros((len(dirs), 0))
  return np.array(common), np.array([[dict(zip(x.tolist(), y))[t] for t in common]
                                     for x, y in cols])


def _mean_curve(dirs: list[str], name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(rounds, mean, std with ddof 1; 0 for a single run) over runs."""
  x, ys = _runs_curve(dirs, name)
  sd = ys.std(0, ddof=1) if len(dirs) > 1 else np.zeros(ys.shape[1])
  return x, ys.mean(0), sd


def _num_rounds(series: list[Series]) -> int:
  return max(int(read_metrics(d)[-1]["round"]) + 1 for s in series for d in s.dirs)


def _legend(ax, n: int) -> None:
  """Outside the last panel: never over the data, room for 16+ series."""
  ax.legend(fontsize=8, ncol=2 if n > 12 else 1, loc="upper left", bbox_to_anchor=(1.02, 1),
            framealpha=0.9)


def _integer_rounds(ax, num_rounds: int) -> None:
  from matplotlib.ticker import MaxNLocator
  ax.set_xlim(0.5, num_rounds + 0.5)
  ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def curve_figure(series: list[Series], names: list[tuple[str, str]], path: str,
                 title: str) -> str | None:
  """One panel per metric name: mean over seeds with a +-1 std band per series."""
  import matplotlib.pyplot as plt
  if not any(len(_mean_curve(s.dirs, n)[0]) for s in series for n, _ in names):
    return None
  fig, axes = plt.subplots(1, len(names), figsize=(6.5 * len(names), 4.5), squeeze=False)
  for ax, (name, label) in zip(axes[0], names):
    for i, s in enumerate(series):
      x, m, sd = _mean_curve(s.dirs, name)
      if not len(x):
        continue
      st = style(i)
      every = max(1, len(x) // 12)
      ax.plot(x, m, label=f"{s.label} (n={len(s.dirs)})", markevery=every, markersize=5,
              linewidth=1.4, **st)
      ax.fill_between(x, m - sd, m + sd, color=st["color"], alpha=0.15, linewidth=0)
    ax.set(xlabel="round", ylabel=label, title=f"{label} (mean ± std over seeds)")
    _integer_rounds(ax, _num_rounds(series))
    ax.grid(alpha=0.3)
  _legend(axes[0][-1], len(series))
  if len(names) > 1:
    fig.suptitle(title)
  return _save(fig, path)


def _save(fig, path: str) -> str:
  import matplotlib.pyplot as plt
  fig.savefig(path, dpi=120, bbox_inches="tight")
  plt.close(fig)
  return path


def layer_share(run_dir: str) -> np.ndarray | None:
  """f32[rounds, K]: share of the sampled clients training each layer."""
  path = os.path.join(run_dir, "selection.npz")
  if not os.path.exists(path):
    return None
  with np.load(path) as f:
    return f["masks"].mean(axis=1)


def selection_figure(series: list[Series], path: str) -> str | None:
  """One heat map (layers x rounds) per series, averaged over its seeds."""
  import matplotlib.pyplot as plt
  panels = []
  for s in series:
    shares = [layer_share(d) for d in s.dirs]
    if shares and all(x is not None for x in shares):
      panels.append((s, np.mean(np.stack(shares), axis=0)))
  if not panels:
    return None
  names = [c[2:] for c in read_metrics(panels[0][0].dirs[0])[0] if c.startswith("S_")]
  cols = min(3, len(panels))
  rows = -(-len(panels) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 0.35 * len(names) * rows + 1.9 * rows),
                           squeeze=False, constrained_layout=True)
  im = None
  for ax, (s, share) in zip(axes.flat, panels):
    r = share.shape[0]
    im = ax.imshow(share.T, aspect="auto", origin="lower", cmap="viridis", vmin=0, vmax=1,
                   interpolation="nearest", extent=(0.5, r + 0.5, -0.5, len(names) - 0.5))
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_title(f"{s.label} (n={len(s.dirs)})", fontsize=9)
    ax.set_xlabel("round")
    _integer_rounds(ax, r)
  for ax in list(axes.flat)[len(panels):]:
    ax.axis("off")
  for ax in axes[:, 0]:
    ax.set_ylabel("layer (input -> output)")
  fig.colorbar(im, ax=axes, label="share of sampled clients training the layer", shrink=0.9)
  fig.suptitle("Share of the sampled clients training each layer (mean over the n seeds)")
  return _save(fig, path)


def _y_scale(ax, values: list[np.ndarray]) -> None:
  """Log where all values are positive and within 4 decades; else symlog whose
  linear part (up to 1e-3 of the largest) shows exact and numerical zeros at 0."""
  v = np.concatenate([x for x in values if len(x)]) if values else np.array([])
  v = v[np.isfinite(v)]
  if not len(v) or np.max(v) <= 0:
    return
  if np.all(v > 0) and np.max(v) / np.min(v) < 1e4:
    ax.set_yscale("log")
  else:
    ax.set_yscale("symlog", linthresh=float(np.max(v)) * 1e-3, linscale=0.5)


def errors_figure(series: list[Series], path: str) -> str | None:
  """E1, E2, its bound and ||grad f||^2: markers at the measured rounds only."""
  import matplotlib.pyplot as plt
  curves = {n: [_runs_curve(s.dirs, n) for s in series] for n, _ in ERROR_TERMS}
  if not any(ys.size for cs in curves.values() for _, ys in cs):
    return None
  bound = [_mean_curve(s.dirs, "bound_rhs") for s in series]
  with_bound = any(len(x) for x, _, _ in bound)
  fig, axes = plt.subplots(1, 5 if with_bound else 4, figsize=(25 if with_bound else 20, 4.5),
                           squeeze=False)
  if with_bound:
    _bound_panel(axes[0][4], series, bound)
  for ax, (name, label) in zip(axes[0], ERROR_TERMS):
    for i, (s, (x, ys)) in enumerate(zip(series, curves[name])):
      if len(x):
        st = style(i)
        m = ys.mean(0)
        gap = float(np.min(np.diff(x))) if len(x) > 1 else 1.
        x = x + (i - (len(series) - 1) / 2) * min(0.8 * gap / len(series), 0.4)  # dodge
        span = np.stack([m - ys.min(0), ys.max(0) - m]) if len(ys) > 1 else None
        ax.errorbar(x, m, yerr=span, linestyle="none", marker=st["marker"], color=st["color"],
                    markersize=5, capsize=2, elinewidth=0.8, label=f"{s.label} (n={len(s.dirs)})")
    _y_scale(ax, [ys.ravel() for _, ys in curves[name]])
    ax.set(xlabel="round", title=f"{label} (mean, min-max over seeds)")
    _integer_rounds(ax, _num_rounds(series))
    ax.grid(alpha=0.3)
  _legend(axes[0][-1], len(series))
  fig.suptitle("Selection error terms, at the diagnosed rounds only (diagnostics.every)")
  return _save(fig, path)


def _bound_panel(ax, series: list[Series], bound) -> None:
  """The theorem's two sides: running mean of ||grad f||^2 (solid) against the
  right-hand side (dashed; dotted with f* = 0), defined at every round."""
  values = []
  for i, (s, (x, rhs, _)) in enumerate(zip(series, bound)):
    if not len(x):
      continue
    st = style(i)
    xa, lhs, _ = _mean_curve(s.dirs, "grad_sq_avg")
    ax.plot(xa, lhs, color=st["color"], ls="-", label=f"{s.label}: (1/T) sum ||grad f||^2")
    ax.plot(x, rhs, color=st["color"], ls="--", label=f"{s.label}: right-hand side")
    x0, rhs0, _ = _mean_curve(s.dirs, "bound_rhs_fstar0")
    if len(x0):
      ax.plot(x0, rhs0, color=st["color"], ls=":", lw=1)
    values += [lhs, rhs]
  _y_scale(ax, values)
  ax.set(xlabel="round T", title="Bound: running mean vs right-hand side")
  _integer_rounds(ax, _num_rounds(series))
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)


def lambda_figure(series: list[Series], path: str) -> str | None:
  """Final accuracy, mean E1, E2 and disagreement against lambda (std error bars)."""
  import matplotlib.pyplot as plt
  from matplotlib.ticker import FixedLocator, NullLocator
  from fedsel_jax import stats
  series = [s for s in series if LAM in s.values]   # a single run beside a sweep has no lambda
  if not series:
    return None
  lines: dict[tuple, list[Series]] = {}
  for s in series:
    key = tuple((k, v) for k, v in s.values.items() if k != LAM)
    lines.setdefault(key, []).append(s)
  panels = (("test_accuracy", "final test accuracy"), ("e1", "mean E1"), ("e2", "mean E2"),
            ("disagreement", "disagreeing client pairs / round"))
  fig, axes = plt.subplots(1, 4, figsize=(20, 4.5), squeeze=False)
  lams = sorted({float(s.values[LAM]) for s in series if LAM in s.values})
  positive = [x for x in lams if x > 0]
  for i, (key, ss) in enumerate(lines.items()):
    ss = sorted(ss, key=lambda s: float(s.values[LAM]))
    rows = [[stats.member_row(d, {}) for d in s.dirs] for s in ss]
    x = [float(s.values[LAM]) for s in ss]
    label = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in key) or "mean over seeds"
    st = style(i)
    for ax, (name, title) in zip(axes[0], panels):
      ms = [stats.mean_std_ci([float(r[name]) if r[name] != "" else None for r in rs])
            for rs in rows]
      ax.errorbar(x, [m for m, _, _ in ms], yerr=[0 if not np.isfinite(s) else s
                                                  for _, s, _ in ms],
                  capsize=3, label=f"{label} (n={len(ss[0].dirs)})", markersize=5,
                  **st)
      ax.set(title=title, xlabel="lambda")
  for ax in axes[0]:
    if positive:   # linear below the smallest positive lambda: 0 sits where it is
      ax.set_xscale("symlog", linthresh=positive[0], linscale=0.5)
      ax.set_xlabel(f"lambda (symlog axis, linear below {positive[0]:g})")
    ax.xaxis.set_major_locator(FixedLocator(lams))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([f"{v:g}" for v in lams], rotation=45, ha="right")
    ax.grid(alpha=0.3)
  _legend(axes[0][-1], len(lines))
  fig.suptitle("Lambda: accuracy, error terms and consistency (error bars: std over seeds)")
  return _save(fig, path)


def write_plots(dirs: list[str], out_dir: str) -> list[str]:
  """Every figure of the runs or sweeps in ``dirs``, into ``out_dir``; the paths."""
  import matplotlib
  matplotlib.use("Agg")
  series = load_series(dirs)
  os.makedirs(out_dir, exist_ok=True)
  paths = [
      curve_figure(series, [("test_accuracy", "test accuracy")],
                   os.path.join(out_dir, "accuracy.png"), "Test accuracy"),
      curve_figure(series, [("train_loss", "train loss"), ("test_loss", "test loss")],
                   os.path.join(out_dir, "loss.png"), "Loss"),
      selection_figure(series, os.path.join(out_dir, "selection.png")),
      errors_figure(series, os.path.join(out_dir, "errors.png")),
      lambda_figure(series, os.path.join(out_dir, "lambda.png")),
  ]
  return [p for p in paths if p]


def write_sweep_plots(workdir: str) -> list[str]:
  return write_plots([workdir], workdir)
