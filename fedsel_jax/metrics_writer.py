"""One run's metrics on disk: metrics.csv, selection.npz and TensorBoard events.

A run (``train.train_and_evaluate`` or one member of a vmapped sweep) owns
one :class:`RunWriter`. Rows accumulate in memory and are written at every
checkpoint (``flush``), so the files on disk always describe the rounds the
last checkpoint holds; a resumed writer keeps the rows before its start
round and TensorBoard discards the events a killed run wrote after it
(``purge_step``).
"""

from __future__ import annotations

import csv
import json
import math
import os
from typing import Any

import numpy as np

# Per-round scalars a round may return (NaN = not measured this round).
ROUND_SCALARS = ("penalty", "disagreement", "objective", "e1", "e2", "e2_bound", "grad_sq")


def metrics_row(round_idx: int, metrics: dict, seconds: float, names: tuple[str, ...],
                ev: dict | None) -> dict[str, Any]:
  """One metrics.csv row from a round's host metrics.

  Args:
    round_idx: the round (0-based).
    metrics: host arrays of ``round_fn``; ``coverage`` int[K] per layer.
    seconds: wall time of the round.
    names: the K candidate layer names.
    ev: ``{'loss', 'accuracy'}`` on the test set, or None (not evaluated).
  """
  row: dict[str, Any] = {"round": round_idx, "train_loss": float(metrics["train_loss"]),
                         "test_loss": "" if ev is None else ev["loss"],
                         "test_accuracy": "" if ev is None else ev["accuracy"],
                         "seconds": round(seconds, 4)}
  for key in ROUND_SCALARS:
    if key in metrics:
      value = float(metrics[key])
      row[key] = "" if np.isnan(value) else value
  for name, s in zip(names, np.asarray(metrics["coverage"])):
    row[f"S_{name}"] = int(s)
  return row


def read_rows(path: str, upto: int) -> list[dict]:
  """Rows of an existing metrics.csv with round < upto (the part a resume keeps)."""
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [r for r in csv.DictReader(f) if int(r["round"]) < upto]


def write_rows(path: str, rows: list[dict]) -> None:
  """Writes ``rows`` as a CSV atomically (a kill never leaves half a file)."""
  fields = list(dict.fromkeys(k for r in rows for k in r))
  tmp = path + ".tmp"
  with open(tmp, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=fields)
    w.writeheader()
    w.writerows(rows)
  os.replace(tmp, path)


def _numeric(value) -> float | None:
  try:
    x = float(value)
  except (TypeError, ValueError):
    return None
  return x if math.isfinite(x) else None


class RunWriter:
  """metrics.csv + selection.npz + TensorBoard event files of one run directory.

  Args:
    workdir: the run's directory (created if missing).
    names: the K candidate layer names (``S_<name>`` columns).
    start: the round the run (re)starts from; rows and masks of earlier
      rounds are kept from the files already there.
    tensorboard: also write TensorBoard event files into ``workdir``.
  """

  def __init__(self, workdir: str, names: tuple[str, ...], start: int = 0,
               tensorboard: bool = True):
    os.makedirs(workdir, exist_ok=True)
    self.workdir, self.names = workdir, tuple(names)
    self.csv_path = os.path.join(workdir, "metrics.csv")
    self.sel_path = os.path.join(workdir, "selection.npz")
    self.rows = read_rows(self.csv_path, start)
    self.history: dict[str, list] = {"masks": [], "scores": []}
    if start and os.path.exists(self.sel_path):
      with np.load(self.sel_path) as f:
        self.history = {k: list(f[k][:start]) for k in f.files}
    self._tb = None
    if tensorboard:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(logdir=workdir, purge_step=start if start else None,
                               flush_secs=3600)

  def add_round(self, round_idx: int, metrics: dict, seconds: float, ev: dict | None,
                valid: np.ndarray, extra: dict | None = None) -> dict:
    """Records one round; ``valid`` bool[Mp] marks the real client slots.

    Returns the row (``extra`` columns, e.g. the solver gap, included).
    """
    row = metrics_row(round_idx, metrics, seconds, self.names, ev)
    row.update(extra or {})
    self.rows.append(row)
    self.history["masks"].append(np.asarray(metrics["masks"])[valid])
    if "scores" in metrics:
      self.history["scores"].append(np.asarray(metrics["scores"])[valid])
    if self._tb is not None:
      for key, value in row.items():
        x = _numeric(value)
        if key not in ("round",) and x is not None:
          self._tb.add_scalar(key, x, global_step=round_idx)
    return row

  def flush(self) -> None:
    """Writes metrics.csv, selection.npz and the event files (at a checkpoint)."""
    write_rows(self.csv_path, self.rows)
    arrays = {k: np.stack(v) for k, v in self.history.items() if v}
    np.savez(self.sel_path + ".tmp.npz", **arrays)
    os.replace(self.sel_path + ".tmp.npz", self.sel_path)
    if self._tb is not None:
      self._tb.flush()

  def write_final(self, final: dict) -> None:
    """Writes final.json (atomically) and closes the event files."""
    tmp = os.path.join(self.workdir, "final.json.tmp")
    with open(tmp, "w") as f:
      json.dump(final, f, indent=2)
    os.replace(tmp, os.path.join(self.workdir, "final.json"))
    self.close()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None

  def median_seconds(self) -> float:
    return float(np.median([float(r["seconds"]) for r in self.rows])) if self.rows \
        else float("nan")
