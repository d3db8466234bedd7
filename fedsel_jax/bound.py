"""Host side of the convergence-bound diagnostics: the right-hand side and the per-layer file.

The implemented form (docs/diagnostics.md derives it from the descent lemma):

    (1/T) sum_{t<T} ||grad f(theta^t)||^2
        <= 2 (f(theta^0) - f*) / (eta T)  +  (1/T) sum_{t<T} (E1_t + E2_t)
           + L / (eta T) * sum_{t<T} ||theta^{t+1} - theta^t||^2

with eta = tau * client lr * server lr (:func:`effective_step`). It holds
exactly for tau = 1, full-batch local SGD and plain averaging when L bounds
the curvature along the path; otherwise the last term stands in for the
theorem's O(eta) remainder. Everything is measured, not assumed: E1, E2,
||grad f||^2, f(theta^t) and the local curvature L_t on diagnosed rounds,
||theta^{t+1} - theta^t||^2 every round (``update_sq``).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

BOUND_COLUMNS = ("grad_sq_avg", "bound_rhs", "bound_rhs_fstar0", "bound_opt", "bound_err",
                 "bound_eta", "f_star", "L_max")
LAYER_KEYS = ("e1_layers", "e2_layers", "kappa_sq", "grad_sq_layers", "p_layers")
OPTIONAL_LAYER_KEYS = ("e2_layers_sampled",)   # population mode only
SAMPLED_COLUMNS = ("e1_sampled", "e2_sampled", "e2_bound_sampled", "grad_sq_sampled")
PREFIX = "diag_"   # history keys of the per-layer terms


def effective_step(local_steps: int, client_lr: float, server_lr: float) -> float:
  """eta of the bound: the step one round takes along the averaged gradient.

  tau local SGD steps of size lr_c, then the server's SGD step of size lr_s
  on the averaged delta, move theta by about tau * lr_c * lr_s * grad.
  """
  return float(local_steps) * float(client_lr) * float(server_lr)


def _num(value: Any) -> float:
  if value in ("", None):
    return math.nan
  return float(value)


def bound_columns(rows: list[dict], eta: float) -> list[dict]:
  """The running left- and right-hand sides after every round, from metrics rows.

  Args:
    rows: metrics rows in round order (values may be strings, as read back
      from metrics.csv; '' = not measured that round). Reads ``grad_sq``,
      ``e1``, ``e2``, ``f_diag``, ``lipschitz`` (diagnosed rounds) and
      ``update_sq`` (every round).
    eta: :func:`effective_step`.

  Returns:
    One dict per row with :data:`BOUND_COLUMNS` ('' where undefined): after
    round t, T = t + 1 steps; averages run over the diagnosed rounds <= t;
    f(theta^0) is round 0's ``f_diag``; f* is the lowest ``f_diag`` so far
    (``bound_rhs``) or 0, a lower bound of cross-entropy (``bound_rhs_fstar0``);
    L is the largest local estimate so far (``bound_eta`` is '' without one).
  """
  out = []
  grad, err, f_vals, l_vals = [], [], [], []
  moved = 0.0
  f0 = math.nan
  for t, row in enumerate(rows):
    step_sq = _num(row.get("update_sq", ""))
    moved += 0.0 if math.isnan(step_sq) else step_sq
    g = _num(row.get("grad_sq", ""))
    if not math.isnan(g):
      grad.append(g)
      err.append(_num(row["e1"]) + _num(row["e2"]))
      f = _num(row.get("f_diag", ""))
      if not math.isnan(f):
        f_vals.append(f)
        if int(row["round"]) == 0:
          f0 = f
      lip = _num(row.get("lipschitz", ""))
      if not math.isnan(lip):
        l_vals.append(lip)
    cols = dict.fromkeys(BOUND_COLUMNS, "")
    steps = t + 1
    if grad and not math.isnan(f0) and eta > 0:
      f_star = min(f_vals)
      cols.update(grad_sq_avg=float(np.mean(grad)), bound_err=float(np.mean(err)),
                  f_star=f_star, bound_opt=2 * (f0 - f_star) / (eta * steps))
      extra = 0.0
      if l_vals:
        cols.update(L_max=max(l_vals), bound_eta=max(l_vals) * moved / (eta * steps))
        extra = cols["bound_eta"]
      cols["bound_rhs"] = cols["bound_opt"] + cols["bound_err"] + extra
      cols["bound_rhs_fstar0"] = 2 * f0 / (eta * steps) + cols["bound_err"] + extra
    out.append(cols)
  return out


def add_bound_columns(rows: list[dict], eta: float) -> None:
  """Writes :func:`bound_columns` into ``rows`` in place (recomputed from scratch,
  so a resumed run's columns equal the uninterrupted run's)."""
  for row, cols in zip(rows, bound_columns(rows, eta)):
    row.update(cols)


def append_layer_terms(history: dict[str, list], round_idx: int, metrics: dict) -> None:
  """Adds one round's per-layer terms to the run's history if it was diagnosed.

  The keys carry the prefix ``diag_``: the history is saved inside every
  checkpoint (checkpoints.py), so an exact resume restores these terms too.
  """
  if "e1_layers" not in metrics or np.isnan(np.asarray(metrics["e1"])):
    return
  history.setdefault(PREFIX + "round", []).append(np.int64(round_idx))
  history.setdefault(PREFIX + "lipschitz", []).append(np.float32(metrics["lipschitz"]))
  for k in LAYER_KEYS + tuple(k for k in OPTIONAL_LAYER_KEYS if k in metrics):
    history.setdefault(PREFIX + k, []).append(np.asarray(metrics[k], np.float32))


def split_history(arrays: dict[str, np.ndarray],
                  names: tuple[str, ...]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  """(selection.npz's arrays, diagnostics.npz's arrays) from the history arrays.

  diagnostics.npz: ``round int[R]``, ``names str[K+1]`` (candidates, then
  'common'), ``lipschitz f32[R]`` and per layer f32[R, K+1] ``e1_layers,
  e2_layers, kappa_sq, grad_sq_layers, p_layers`` (population mode: also
  ``e2_layers_sampled``, E2_l with the sampled clients as reference). Empty
  when no round was diagnosed.
  """
  selection = {k: v for k, v in arrays.items() if not k.startswith(PREFIX)}
  layers = {k[len(PREFIX):]: v for k, v in arrays.items() if k.startswith(PREFIX)}
  if layers:
    layers["names"] = np.array(list(names) + ["common"])
  return selection, layers
