"""Checkpoints that restore exactly or not at all (orbax, with checksums).

Every checkpoint (``DIR/checkpoints/<round>/``) holds three orbax items:

* ``state``: the ServerState;
* ``history``: every round's masks (and scores) so far, ``selection.npz``'s content;
* ``meta``: the metrics rows so far (the text of ``metrics.csv``), the
  config fingerprint, and a CRC-32 of every array of ``state`` and
  ``history`` and of the rows.

So a resume rebuilds ``metrics.csv`` and ``selection.npz`` from the
checkpoint itself: a deleted or newer metrics file loses nothing.
:meth:`RunCheckpoints.restore_latest` tries checkpoints newest first; one
that fails to load or whose checksums differ is moved to
``DIR/checkpoints.damaged/`` with a warning and the previous one is used.
Saves are synchronous: a save either completes (orbax commits a checkpoint
by renaming its folder) or leaves a temporary folder orbax ignores.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
import zlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from fedsel_jax.errors import WorkdirError

PyTree = Any


def tree_checksums(tree: PyTree) -> dict[str, int]:
  """CRC-32 of every leaf's bytes, keyed by its path."""
  out = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    a = np.ascontiguousarray(np.asarray(leaf))
    out[jax.tree_util.keystr(path)] = zlib.crc32(a.tobytes()) ^ zlib.crc32(
        f"{a.dtype}{a.shape}".encode())
  return out


def _warn(message: str) -> None:
  print(f"warning: {message}", file=sys.stderr, flush=True)


class RunCheckpoints:
  """The checkpoints of one workdir."""

  def __init__(self, workdir: str, keep: int, active: bool = True):
    """``active=False``: a process that writes no files (multihost.py): no
    checkpoints to list, restore or save."""
    self.dir = os.path.join(workdir, "checkpoints")
    self.damaged_dir = os.path.join(workdir, "checkpoints.damaged")
    self.keep = keep
    self._mngr = self._manager() if active else None

  def _manager(self) -> ocp.CheckpointManager:
    options = dict(max_to_keep=self.keep, create=True, enable_async_checkpointing=False)
    try:
      if jax.process_count() > 1:   # a multi-process run: only this process (the primary) saves
        os.makedirs(self.dir, exist_ok=True)   # orbax creates nothing with active_processes
        options.update(create=False, multiprocessing_options=ocp.options.MultiprocessingOptions(
            primary_host=jax.process_index(), active_processes={jax.process_index()}))
      return ocp.CheckpointManager(self.dir,
                                   options=ocp.CheckpointManagerOptions(**options))
    except Exception as e:   # orbax reads every step's metadata on start
      raise WorkdirError(f"cannot open the checkpoints in {self.dir}: {type(e).__name__}: "
                         f"{e}; use --restart to start over") from e

  def steps(self) -> list[int]:
    if self._mngr is None:
      return []
    try:
      return sorted(self._mngr.all_steps())
    except Exception:   # a damaged step folder: list what parses
      return sorted(int(n) for n in os.listdir(self.dir) if n.isdigit())

  def save(self, step: int, state: PyTree, rows_csv: str, history: dict[str, np.ndarray],
           fingerprint: str) -> None:
    if self._mngr is None:
      return
    state = jax.device_get(state)
    meta = {"round": step, "rows_csv": rows_csv, "fingerprint": fingerprint,
            "state_crc": tree_checksums(state), "history_crc": tree_checksums(history),
            "rows_crc": zlib.crc32(rows_csv.encode())}
    self._mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), history=ocp.args.StandardSave(history),
        meta=ocp.args.JsonSave(meta)), force=True)
    self._mngr.wait_until_finished()

  def _restore(self, step: int, abstract: PyTree) -> tuple[PyTree, str, dict[str, np.ndarray]]:
    got = self._mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), history=ocp.args.StandardRestore(),
        meta=ocp.args.JsonRestore()))
    meta, state, history = got["meta"], got["state"], dict(got["history"])
    if int(meta["round"]) != step:
      raise ValueError(f"its metadata says round {meta['round']}")
    if tree_checksums(jax.device_get(state)) != meta["state_crc"]:
      raise ValueError("the state's checksums differ from those saved")
    if tree_checksums(history) != meta["history_crc"]:
      raise ValueError("the selection history's checksums differ from those saved")
    if zlib.crc32(meta["rows_csv"].encode()) != meta["rows_crc"]:
      raise ValueError("the metrics rows' checksum differs from the one saved")
    return state, meta["rows_csv"], history

  def _set_aside(self, step: int) -> None:
    os.makedirs(self.damaged_dir, exist_ok=True)
    dest = os.path.join(self.damaged_dir, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
    src = os.path.join(self.dir, str(step))
    if os.path.exists(src):
      shutil.move(src, dest)
    self._mngr.close()
    self._mngr = self._manager()

  def restore_latest(self, abstract: PyTree):
    """``(round, state, rows_csv, history)`` of the newest intact checkpoint.

    Returns None when there is no checkpoint. Damaged checkpoints are set
    aside with a warning line each.

    Raises:
      WorkdirError: checkpoints exist but none is intact.
    """
    damaged = []
    for step in reversed(self.steps()):
      try:
        state, rows, history = self._restore(step, abstract)
      except Exception as e:   # any failure to read or verify: try the previous one
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        damaged.append((step, reason))
        continue
      for bad, reason in damaged:
        _warn(f"checkpoint of round {bad} in {self.dir} is damaged ({reason}); moved to "
              f"{self.damaged_dir}; resuming from the intact one of round {step}")
        self._set_aside(bad)
      return step, state, rows, history
    if damaged:   # left in place: nothing is deleted or silently restarted
      raise WorkdirError(f"no intact checkpoint in {self.dir} (round {damaged[0][0]}: "
                         f"{damaged[0][1]}; {len(damaged)} tried); use --restart to move the "
                         "run aside and start over")
    return None

  def close(self) -> None:
    if self._mngr is not None:
      self._mngr.close()
