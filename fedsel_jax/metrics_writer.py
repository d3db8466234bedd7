"""TensorBoard event files mirroring a run's metrics.csv, in the run's directory.

``run_record.RunRecord`` owns metrics.csv, selection.npz and the checkpoints; at every
checkpoint it hands its rows to :class:`TensorBoardMirror`, which writes the
rows it has not written yet as scalars (tag = CSV column, step = round). A
resumed run starts the mirror at its first round: TensorBoard then discards
the events a killed run wrote for later rounds (``purge_step``), so the event
files say what the CSV says.
"""

from __future__ import annotations

import math


def _number(value) -> float | None:
  try:
    x = float(value)
  except (TypeError, ValueError):
    return None
  return x if math.isfinite(x) else None


class TensorBoardMirror:
  """Scalars of metrics.csv rows as TensorBoard events (tensorboardX).

  Args:
    workdir: the run's directory (the event files go next to metrics.csv).
    active: False for a process that writes no files (multihost.py).
  """

  def __init__(self, workdir: str, active: bool = True):
    self.workdir = workdir
    self.active = active
    self.next_round = 0
    self._writer = None

  def start(self, round_idx: int) -> None:
    """The run (re)starts at ``round_idx``: later events of earlier files are purged."""
    from tensorboardX import SummaryWriter
    self.close()
    self.next_round = round_idx
    if not self.active:
      return
    self._writer = SummaryWriter(logdir=self.workdir, purge_step=round_idx or None,
                                 flush_secs=3600)

  def write(self, rows: list[dict]) -> None:
    """Writes the rows with ``round >= next_round`` and flushes the files."""
    if not self.active:
      return
    if self._writer is None:
      self.start(self.next_round)
    for row in rows:
      t = int(row["round"])
      if t < self.next_round:
        continue
      for key, value in row.items():
        x = _number(value)
        if key != "round" and x is not None:
          self._writer.add_scalar(key, x, global_step=t)
      self.next_round = t + 1
    self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self._writer = None
