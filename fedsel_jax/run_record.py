"""A run's host-side record: metrics rows, selection history and the files they make.

``RunRecord`` owns a workdir's ``metrics.csv``, ``selection.npz``,
``diagnostics.npz``, TensorBoard events and checkpoints; ``record_round``
turns one round's device metrics into its row (costs included) and history;
``DivergenceGuard`` stops a run after ``fl.max_bad_rounds`` rounds in a row
that changed nothing. A single run (``train``) and the vmapped runs of a
sweep (``vmap_runs``) use the same pieces, so their files are the same.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from fedsel_jax import accounting
from fedsel_jax import bound as bound_lib
from fedsel_jax import checkpoints as checkpoints_lib
from fedsel_jax import errors
from fedsel_jax import local_only
from fedsel_jax import metrics_writer
from fedsel_jax import selection
from fedsel_jax import signals
from fedsel_jax import workdir as workdir_lib


def rows_csv(rows: list[dict]) -> str:
  """The metrics rows as CSV text (the content of metrics.csv)."""
  out = io.StringIO()
  fields = list(dict.fromkeys(k for r in rows for k in r))
  w = csv.DictWriter(out, fieldnames=fields, lineterminator="\n")
  w.writeheader()
  w.writerows(rows)
  return out.getvalue() if rows else ""


def parse_rows(text: str) -> list[dict]:
  return list(csv.DictReader(io.StringIO(text))) if text else []


def write_atomic(path: str, write) -> None:
  tmp = path + ".tmp"
  write(tmp)
  os.replace(tmp, path)


def record_diverged(workdir: str, error: errors.DivergedError) -> str:
  """Marks ``workdir`` as a diverged run: ``diverged.json`` holds the one-line
  reason (a sweep's summary reports it and a rerun keeps the verdict), and the
  ``error:`` line is printed. Returns the reason."""
  message = str(error)

  def write(tmp):
    with open(tmp, "w") as f:
      json.dump({"diverged": message}, f, indent=2)
  write_atomic(os.path.join(workdir, "diverged.json"), write)
  print(f"error: {message}", flush=True)
  return message


def metrics_row(round_idx: int, metrics: dict, seconds: float, names: tuple[str, ...],
                ev: dict | None) -> dict:
  row: dict[str, Any] = {"round": round_idx, "train_loss": float(metrics["train_loss"]),
                         "test_loss": "" if ev is None else ev["loss"],
                         "test_accuracy": "" if ev is None else ev["accuracy"],
                         "seconds": round(seconds, 4),
                         "clients_nonfinite": int(metrics["clients_nonfinite"]),
                         "round_skipped": int(bool(metrics["round_skipped"]))}
  for key in ("penalty", "disagreement", "objective", "e1", "e2", "e2_bound", "grad_sq",
              "grad_sq_cand", "f_diag", "lipschitz", "update_sq") + bound_lib.SAMPLED_COLUMNS:
    if key in metrics:
      value = float(metrics[key])
      row[key] = "" if np.isnan(value) else value
  for name, s in zip(names, np.asarray(metrics["coverage"])):
    row[f"S_{name}"] = int(s)
  return row


class RunRecord:
  """The mutable host-side record of a run: rows, selection history, files."""

  def __init__(self, workdir: str, config: ml_collections.ConfigDict, primary: bool = True):
    """``primary``: whether this process writes the run's files (multihost.py:
    the other processes of a multi-process run keep rows in memory only)."""
    self.workdir = workdir
    self.config = config
    self.primary = primary
    self.fingerprint = workdir_lib.fingerprint(config)["sha256"]
    self.ckpts = checkpoints_lib.RunCheckpoints(workdir, config.checkpoint_keep,
                                                active=primary)
    self.rows: list[dict] = []
    self.history: dict[str, list] = {"masks": [], "scores": []}
    self.layer_names: tuple[str, ...] = ()   # candidate names, for diagnostics.npz
    self.tensorboard = metrics_writer.TensorBoardMirror(workdir, active=primary)

  def resume(self, initial: Any, quiet: bool):
    """(first round to run, state) after restoring the newest intact checkpoint."""
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, initial)
    got = self.ckpts.restore_latest(abstract)
    if got is None:
      return 0, initial
    start, state, rows_csv, history = got
    if start > self.config.fl.num_rounds:
      raise errors.ConfigError(f"fl.num_rounds={self.config.fl.num_rounds} is below the {start} "
                        f"rounds already done in {self.workdir}; raise it, or use --restart "
                        "or another --workdir")
    self.rows = parse_rows(rows_csv)
    self.history = {k: list(v) for k, v in history.items()}
    self.history.setdefault("scores", [])
    if not quiet:
      print(f"resuming {self.workdir} from round {start}", flush=True)
    # The checkpoint is the source of truth: files written after it are redone.
    self.write_files()
    # Uncommitted arrays: a sharded round (fl.shard_clients) places them itself.
    return start, jax.tree_util.tree_map(lambda a: jnp.asarray(np.asarray(a)), state)

  def history_arrays(self) -> dict[str, np.ndarray]:
    return {k: np.stack(v) for k, v in self.history.items() if v}

  def write_files(self) -> None:
    if not self.primary:
      return
    if self.config.diagnostics.enabled:   # running columns, recomputed from all rows
      bound_lib.add_bound_columns(self.rows, bound_lib.effective_step(
          self.config.fl.local_steps, self.config.client_optim.lr, self.config.server_optim.lr))
    text = rows_csv(self.rows)

    def write_csv(tmp):
      with open(tmp, "w", newline="") as f:
        f.write(text)
    write_atomic(os.path.join(self.workdir, "metrics.csv"), write_csv)
    arrays, layers = bound_lib.split_history(self.history_arrays(), self.layer_names)
    if layers:   # the per-layer terms ride in the checkpointed history too
      def write_layers(tmp):
        with open(tmp, "wb") as f:
          np.savez(f, **layers)
      write_atomic(os.path.join(self.workdir, "diagnostics.npz"), write_layers)
    sel = os.path.join(self.workdir, "selection.npz")
    if arrays:
      def write_npz(tmp):
        with open(tmp, "wb") as f:
          np.savez(f, **arrays)
      write_atomic(sel, write_npz)

  def checkpoint(self, step: int, state: Any) -> None:
    if not self.primary:
      return
    with signals.critical():
      self.write_files()
      self.tensorboard.write(self.rows)
      self.ckpts.save(step, state, rows_csv(self.rows), self.history_arrays(),
                      self.fingerprint)


LOSS_BLOWUP = 100.0   # a finite train loss this many times the first one (and > this) warns


class DivergenceGuard:
  """Counts rounds in a row that changed nothing because every update was
  non-finite (they stop the run), and warns once when the train loss blows
  up while staying finite (it may still recover, so it does not stop)."""

  def __init__(self, config: ml_collections.ConfigDict, setup, workdir: str):
    self.config, self.setup, self.workdir = config, setup, workdir
    self.bad_in_a_row = 0
    self.warned = False
    self.first_loss = None   # (round, loss) of the first finite train loss seen
    self.warned_loss = False
    self.last_saved = None

  def observe(self, t: int, metrics: dict, quiet: bool) -> None:
    self._watch_loss(t, float(metrics["train_loss"]), quiet)
    bad_clients = int(metrics["clients_nonfinite"])
    if bad_clients and not self.warned and not quiet:
      self.warned = True
      print(f"warning: round {t}: {bad_clients} of {self.config.fl.clients_per_round} clients "
            "returned a non-finite loss or update and were left out of the aggregate "
            "(counted per round in metrics.csv, clients_nonfinite)", file=sys.stderr, flush=True)
    self.bad_in_a_row = self.bad_in_a_row + 1 if bool(metrics["round_skipped"]) else 0
    limit = self.config.fl.max_bad_rounds
    if self.bad_in_a_row >= limit:
      saved = f"round {self.last_saved}" if self.last_saved is not None else "none yet"
      raise errors.DivergedError(
          f"training diverged: rounds {t - limit + 1}-{t} changed nothing (every update "
          f"non-finite, fl.max_bad_rounds={limit}); likely cause: {self.cause(metrics)}; "
          f"the last checkpoint ({saved}) in {self.workdir}/checkpoints holds finite weights")

  def seed_loss(self, rows: list[dict]) -> None:
    """Takes the loss reference from the rows of the rounds already done (a resume)."""
    for r in rows:
      try:
        loss = float(r.get("train_loss", "nan"))
      except (TypeError, ValueError):
        continue
      if math.isfinite(loss):
        self.first_loss = (int(r["round"]), loss)
        return

  def _watch_loss(self, t: int, loss: float, quiet: bool) -> None:
    if not math.isfinite(loss):
      return
    if self.first_loss is None:
      self.first_loss = (t, loss)
      return
    t0, ref = self.first_loss
    if loss > LOSS_BLOWUP * max(ref, 1.0) and not self.warned_loss and not quiet:
      self.warned_loss = True
      c = self.config
      print(f"warning: round {t}: train loss {loss:.3g} is over {LOSS_BLOWUP:g}x round {t0}'s "
            f"({ref:.3g}): the run is likely diverging (client_optim.lr={c.client_optim.lr:g}, "
            f"server_optim.lr={c.server_optim.lr:g}); only non-finite updates stop it "
            "(fl.max_bad_rounds)", file=sys.stderr, flush=True)

  def cause(self, metrics: dict) -> str:
    c = self.config
    if self.setup.nonfinite_rows:
      return (f"{self.setup.nonfinite_rows} training examples hold NaN or inf "
              f"(data.name={c.data.name!r})")
    lrs = (f"client_optim.lr={c.client_optim.lr:g} ({c.client_optim.name}), "
           f"server_optim.lr={c.server_optim.lr:g} ({c.server_optim.name})")
    if int(metrics["clients_nonfinite"]) == 0:
      return f"the server step overflowed: server_optim.lr too large ({lrs})"
    return f"a learning rate too large for this model ({lrs})"

  @property
  def in_streak(self) -> bool:
    """True while rounds change nothing: no checkpoint then, so the last one
    written before the streak survives ``checkpoint_keep``."""
    return self.bad_in_a_row > 0


def record_round(run: RunRecord, setup, t: int, metrics: dict, rd: dict, seconds: float,
                 ev: dict | None) -> dict:
  """Appends round ``t``'s row (costs included) and history; returns the row.

  ``metrics``: the round's host metrics; ``rd``: its round data (``valid``
  and ``num_examples`` per client slot); ``ev``: the evaluation, if any.
  """
  row = metrics_row(t, metrics, seconds, setup.spec.groups.names, ev)
  row.update(selection.round_costs(setup.run_costs, metrics["masks"], rd["valid"],
                                   metrics["scored"], rd["num_examples"]))
  if setup.memory is not None:   # selection.cost='memory'
    row["train_memory_mb"] = accounting.peak_memory_mb(setup.memory, metrics["masks"], rd["valid"])
  run.rows.append(row)
  _record_selection(run, setup, setup.config, rd, metrics)
  bound_lib.append_layer_terms(run.history, t, metrics)
  return row


def final_metrics(setup, run: RunRecord, ev: dict, params) -> dict[str, Any]:
  """final.json's content: accuracy, loss, median round time, cost totals."""
  config = setup.config
  final = {"strategy": config.selection.strategy, "rounds": config.fl.num_rounds,
           "test_accuracy": ev["accuracy"], "test_loss": ev["loss"],
           "median_seconds_per_round": float(np.median([float(r["seconds"]) for r in run.rows]))
           if run.rows else float("nan"), **selection.cost_totals(run.rows)}
  if setup.holdout is not None:
    final["client_holdout_accuracy"] = local_only.federated_holdout(setup, params)
  final["client_data"] = setup.data_report()   # where the data lived, its padding (device_data.py)
  if setup.chunk_report:   # fl.client_chunk="auto": what it chose
    final["client_chunk"] = setup.chunk
    final["client_chunk_report"] = setup.chunk_report
  return final


def read_final(workdir: str) -> dict[str, Any] | None:
  """final.json of a finished run, or None (absent or unreadable)."""
  try:
    with open(os.path.join(workdir, "final.json")) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


write_final = workdir_lib.write_final


def _record_selection(run: RunRecord, setup, config, rd: dict, metrics: dict) -> None:
  valid = rd["valid"]
  run.history["masks"].append(np.asarray(metrics["masks"])[valid])
  if "scores" in metrics:
    run.history["scores"].append(np.asarray(metrics["scores"])[valid])
  if config.selection.check_exact and "scores" in metrics:
    run.rows[-1].update(_exact_gap(setup, rd, metrics))


def _exact_gap(setup, rd: dict, metrics: dict) -> dict[str, float]:
  """The in-graph solver's gap to the exact MILP on this round's scores."""
  valid = rd["valid"]
  scores = np.asarray(selection.normalize_scores(jnp.asarray(metrics["scores"])))[valid]
  lam = float(rd["lam"])
  _, info = selection.solve_p1_exact(scores, setup.costs, rd["budgets"][valid], lam,
                                     backward=setup.backward)
  got = float(selection.p1_objective(jnp.asarray(metrics["masks"])[valid], scores, lam))
  best = float(info["objective"])
  return {"exact_objective": best, "solver_gap": best - got}
