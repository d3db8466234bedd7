"""A sweep's summary: one row per member, statistics over seeds, paired differences.

``summary.csv`` holds one row per member (its swept field values and final
metrics); ``summary.md`` the mean, standard deviation (ddof 1) and a 95%
Student-t interval over seeds of every other combination, and, with a
baseline, the paired per-seed differences against it. ``sweep.json`` records
the axes so that plots and summaries regenerate from saved files only.
"""

from __future__ import annotations

import csv
import json
import math
import os
from typing import Any

import numpy as np

SEED = "seed"
FINAL_METRICS = ("test_accuracy", "test_loss")
# Cost totals of the run (final.json; fedsel_jax/costs.py), per round in summary.md.
COST_TOTALS = ("total_train_flops", "total_score_flops", "total_bytes_up", "total_bytes_down")
# Means over the rounds where a round measured them (diagnostics rounds for E1/E2).
ROUND_MEANS = ("disagreement", "penalty", "e1", "e2", "e2_bound", "grad_sq")
MD_COLUMNS = (("test_accuracy", "test accuracy"), ("test_loss", "test loss"),
              ("disagreement", "disagreeing pairs / round"), ("e1", "mean E1"),
              ("e2", "mean E2"))
# (final.json total, label, unit) of the cost columns, shown per round.
COST_COLUMNS = (("total_train_flops", "train GFLOP / round", 1e9),
                ("total_score_flops", "score GFLOP / round", 1e9),
                ("total_bytes_up", "MB up / round", 1e6),
                ("total_bytes_down", "MB down / round", 1e6))


def mean_std_ci(values) -> tuple[float, float, float]:
  """(mean, std with ddof 1, half-width of the 95% t interval); NaN where n < 2."""
  from scipy import stats as st
  x = np.asarray([v for v in values if v is not None and np.isfinite(v)], np.float64)
  if x.size == 0:
    return math.nan, math.nan, math.nan
  if x.size == 1:
    return float(x[0]), math.nan, math.nan
  std = float(np.std(x, ddof=1))
  return float(np.mean(x)), std, float(st.t.ppf(0.975, x.size - 1) * std / math.sqrt(x.size))


def _floats(rows: list[dict], key: str) -> list[float]:
  return [float(r[key]) for r in rows if r.get(key, "") not in ("", None)]


def member_row(member_dir: str, values: dict[str, Any]) -> dict[str, Any]:
  """The summary row of one finished (or diverged) member directory.

  A diverged member (``diverged.json``) has empty final metrics, the rounds
  it logged and its reason in ``diverged``; statistics leave it out.
  """
  diverged = os.path.join(member_dir, "diverged.json")
  final: dict[str, Any] = {}
  if os.path.exists(diverged):
    with open(diverged) as f:
      reason = json.load(f)["diverged"]
  else:
    reason = ""
    with open(os.path.join(member_dir, "final.json")) as f:
      final = json.load(f)
  with open(os.path.join(member_dir, "metrics.csv")) as f:
    rounds = list(csv.DictReader(f))
  row: dict[str, Any] = dict(values)
  row["member"] = os.path.basename(member_dir)
  for k in FINAL_METRICS + COST_TOTALS:
    row[k] = "" if final.get(k) is None else final[k]   # null: not computed
  row["rounds"] = final.get("rounds", len(rounds))
  row["diverged"] = reason
  for k in ROUND_MEANS:
    xs = _floats(rounds, k)
    row[k] = float(np.mean(xs)) if xs else ""
  return row


def write_summary(workdir: str, axes, members, baseline) -> list[dict]:
  """Writes sweep.json, summary.csv and summary.md; returns the summary rows."""
  spec = {"axes": [[a.field, list(a.values)] for a in axes],
          "baseline": list(baseline) if baseline else None,
          "members": [{"name": m.name, "values": m.values} for m in members]}
  with open(os.path.join(workdir, "sweep.json"), "w") as f:
    json.dump(spec, f, indent=2)
  return write_tables(workdir)


def load_spec(workdir: str) -> tuple[list[tuple[str, list]], tuple | None, list[dict]]:
  """(axes, baseline, members ``{'name', 'values'}``) of a sweep directory."""
  with open(os.path.join(workdir, "sweep.json")) as f:
    spec = json.load(f)
  return ([tuple(a) for a in spec["axes"]],
          tuple(spec["baseline"]) if spec["baseline"] else None, spec["members"])


def write_tables(workdir: str) -> list[dict]:
  """summary.csv and summary.md from sweep.json and the member directories."""
  axes, baseline, members = load_spec(workdir)
  fields = [f for f, _ in axes]
  rows = [member_row(os.path.join(workdir, m["name"]), m["values"]) for m in members]
  cols = list(dict.fromkeys(k for r in rows for k in r))
  with open(os.path.join(workdir, "summary.csv"), "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=cols)
    w.writeheader()
    w.writerows(rows)
  with open(os.path.join(workdir, "summary.md"), "w") as f:
    f.write(markdown_summary(rows, fields, baseline) + "\n")
  return rows


def combos(rows: list[dict], fields: list[str]) -> dict[tuple, list[dict]]:
  """Rows grouped by every field but the seed, in first-seen order."""
  out: dict[tuple, list[dict]] = {}
  for r in rows:
    out.setdefault(tuple(r[f] for f in fields), []).append(r)
  return out


def _fmt(mean: float, std: float, digits: int) -> str:
  if not np.isfinite(mean):
    return "-"
  return f"{mean:.{digits}f}" if not np.isfinite(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def _ci(mean: float, half: float, digits: int) -> str:
  return "-" if not np.isfinite(half) else \
      f"[{mean - half:.{digits}f}, {mean + half:.{digits}f}]"


def _digits(key: str) -> int:
  return 4 if key.startswith("test") else 3


def markdown_summary(rows: list[dict], fields, baseline) -> str:
  """Mean ± std and 95% t interval over seeds per combination; paired differences."""
  fields = [f if isinstance(f, str) else f.field for f in fields]
  others = [f for f in fields if f != SEED]
  groups = combos(rows, others)
  costs = [(k, label, scale) for k, label, scale in COST_COLUMNS
           if any(r.get(k, "") not in ("", None) for r in rows)]
  head = others + ["seeds"] + [label for _, label in MD_COLUMNS[:1]] + ["95% CI"] + \
      [label for _, label in MD_COLUMNS[1:]] + [label for _, label, _ in costs]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for key, rs in groups.items():
    failed = sum(bool(r.get("diverged")) for r in rs)
    cells = [str(v) for v in key] + [f"{len(rs)}" + (f" ({failed} diverged)" if failed else "")]
    for i, (k, _) in enumerate(MD_COLUMNS):
      m, s, h = mean_std_ci([float(r[k]) if r[k] != "" else None for r in rs])
      d = _digits(k) if k != "disagreement" else 1
      cells.append(_fmt(m, s, d) if k != "e1" and k != "e2" else _fmt_sci(m, s))
      if i == 0:
        cells.append(_ci(m, h, d))
    for k, _, scale in costs:   # per round, mean over seeds
      m, _, _ = mean_std_ci([float(r[k]) / float(r["rounds"]) / scale
                             if r.get(k, "") not in ("", None) else None for r in rs])
      cells.append("-" if not np.isfinite(m) else f"{m:.4g}")
    lines.append("| " + " | ".join(cells) + " |")
  text = "\n".join(lines)
  if baseline:
    text += "\n\n" + paired_table(rows, others, baseline)
  return text


def _fmt_sci(mean: float, std: float) -> str:
  if not np.isfinite(mean):
    return "-"
  return f"{mean:.3e}" if not np.isfinite(std) else f"{mean:.3e} ± {std:.1e}"


def paired_differences(rows: list[dict], others: list[str], baseline, key="test_accuracy"):
  """Per combination: (key tuple, per-seed differences against the baseline's)."""
  bfield, bvalue = baseline
  out = []
  index = {tuple(r[f] for f in others) + (r.get(SEED),): r for r in rows}
  for combo, rs in combos(rows, others).items():
    if combo[others.index(bfield)] == bvalue:
      continue
    diffs = []
    for r in rs:
      ref = dict(zip(others, combo), **{bfield: bvalue})
      b = index.get(tuple(ref[f] for f in others) + (r.get(SEED),))
      if b is not None and r[key] != "" and b[key] != "":   # diverged members: no pair
        diffs.append(float(r[key]) - float(b[key]))
    out.append((combo, diffs))
  return out


def paired_table(rows: list[dict], others: list[str], baseline) -> str:
  bfield, bvalue = baseline
  head = others + ["pairs", f"Δ test accuracy vs {bfield}={bvalue} (mean ± std)", "95% CI",
                   "seeds better"]
  lines = [f"Paired differences (same seed) against {bfield}={bvalue}:", "",
           "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for combo, diffs in paired_differences(rows, others, baseline):
    m, s, h = mean_std_ci(diffs)
    better = f"{sum(d > 0 for d in diffs)}/{len(diffs)}"
    lines.append("| " + " | ".join([str(v) for v in combo] + [
        str(len(diffs)), _fmt(m, s, 4), _ci(m, h, 4), better]) + " |")
  return "\n".join(lines)
