"""Host-side exact solvers of P1: the ground truth for tests and benchmarks.

* :func:`solve_p1_exact`: a MILP for scipy.optimize.milp (HiGHS);
* :func:`solve_p1_brute`: exhaustive search by dynamic programming over the
  layer counts (M and K small);
* :func:`p1_objective_np`: the objective in float64.

Both solvers accept ``lam`` of either sign (``lam < 0`` rewards
disagreement); non-finite scores count as 0 and padding clients
(``client_valid`` False) get all-False masks.
"""

from __future__ import annotations

import itertools
import time
from typing import Any

import numpy as np


# Above this many MILP variables solve_p1_exact runs HiGHS in a child process
# that it kills at the wall-clock limit: HiGHS can overrun its own time limit
# (147 s against 30 s at M = 10,000, K = 48, before it found an incumbent).
ISOLATE_MIN_VARIABLES = 100_000


def _p1_milp(s: np.ndarray, costs: np.ndarray, b: np.ndarray, lam: float, backward=None):
  """MILP data of P1 for the valid clients: ``(c, constraints, integrality, num_m)``.

  Variables: binary ``m_il`` and one-hot ``z_{l,s}`` (s = 0..M) with
  ``sum_s z_{l,s} = 1`` and ``sum_i m_il = sum_s s z_{l,s}``, so the penalty
  ``lam sum_l sum_s s (M - s) z_{l,s}`` is linear for either sign of lam.

  Depth-aware budgets (``backward`` given): ``u_il`` in [0, 1] says "client
  i's backward pass reaches block l", with ``u_il <= u_i,l+1`` and
  ``m_il <= u_il``; the backward cost is ``sum_l d_l u_il`` with ``d_l =
  backward[l] - backward[l+1] >= 0``. At an integer m the smallest feasible
  u is the step at the lowest selected block, so the budget row
  ``sum_l c_l m_il + sum_l d_l u_il <= b_i`` is exactly the depth-aware
  constraint, and u needs no integrality (one variable per possible lowest
  layer).
  """
  from scipy import optimize, sparse  # pylint: disable=g-import-not-at-top
  m, k = s.shape
  n_m, n_z = m * k, k * (m + 1)
  levels = np.arange(m + 1, dtype=np.float64)
  # milp minimises: -sum m s + lam sum_l sum_s s (M - s) z_{l,s}.
  c = np.concatenate([-s.ravel(), np.tile(lam * levels * (m - levels), k)])
  m_index = np.arange(n_m).reshape(m, k)
  z_index = n_m + np.arange(n_z).reshape(k, m + 1)
  budget_rows = sparse.csr_array(  # sum_l c_l m_il <= b_i
      (np.tile(costs, m), (np.repeat(np.arange(m), k), m_index.ravel())),
      shape=(m, n_m + n_z))
  onehot_rows = sparse.csr_array(  # sum_s z_{l,s} = 1
      (np.ones(n_z), (np.repeat(np.arange(k), m + 1), z_index.ravel())),
      shape=(k, n_m + n_z))
  link_rows = sparse.csr_array(  # sum_i m_il - sum_s s z_{l,s} = 0
      (np.concatenate([np.ones(n_m), -np.tile(levels, k)]),
       (np.concatenate([np.tile(np.arange(k), m), np.repeat(np.arange(k), m + 1)]),
        np.concatenate([m_index.ravel(), z_index.ravel()]))),
      shape=(k, n_m + n_z))
  constraints = [optimize.LinearConstraint(onehot_rows, 1.0, 1.0),
                 optimize.LinearConstraint(link_rows, 0.0, 0.0)]
  integrality = np.ones(n_m + n_z)
  if backward is None:
    constraints.append(optimize.LinearConstraint(budget_rows, -np.inf, b))
    return c, constraints, integrality, n_m
  d = -np.diff(np.asarray(backward, np.float64))  # [K]
  if np.any(d < -1e-9 * np.abs(backward).max()):
    raise ValueError("backward costs must not increase with the block index")
  n = n_m + n_z + n_m
  u_index = n_m + n_z + m_index
  widen = lambda rows: sparse.hstack(  # noqa: E731 (append the u columns)
      [rows, sparse.csr_array((rows.shape[0], n_m))]).tocsr()
  budget_rows = sparse.hstack([budget_rows, sparse.csr_array(
      (np.tile(np.maximum(d, 0.0), m), (np.repeat(np.arange(m), k), m_index.ravel())),
      shape=(m, n_m))]).tocsr()
  r = np.arange(n_m)
  below_rows = sparse.csr_array(  # m_il - u_il <= 0
      (np.concatenate([np.ones(n_m), -np.ones(n_m)]),
       (np.concatenate([r, r]), np.concatenate([m_index.ravel(), u_index.ravel()]))),
      shape=(n_m, n))
  lo, hi = u_index[:, :-1].ravel(), u_index[:, 1:].ravel()
  r = np.arange(lo.size)
  monotone_rows = sparse.csr_array(  # u_il - u_i,l+1 <= 0
      (np.concatenate([np.ones(lo.size), -np.ones(lo.size)]),
       (np.concatenate([r, r]), np.concatenate([lo, hi]))), shape=(lo.size, n))
  constraints = [optimize.LinearConstraint(widen(onehot_rows), 1.0, 1.0),
                 optimize.LinearConstraint(widen(link_rows), 0.0, 0.0),
                 optimize.LinearConstraint(budget_rows, -np.inf, b),
                 optimize.LinearConstraint(below_rows, -np.inf, 0.0),
                 optimize.LinearConstraint(monotone_rows, -np.inf, 0.0)]
  c = np.concatenate([c, np.zeros(n_m)])
  return c, constraints, np.concatenate([integrality, np.zeros(n_m)]), n_m


def _run_milp(c, constraints, integrality, options) -> dict[str, Any]:
  """scipy.optimize.milp over [0, 1] variables; a plain dict (picklable)."""
  from scipy import optimize  # pylint: disable=g-import-not-at-top
  res = optimize.milp(c, constraints=constraints, integrality=integrality,
                      bounds=optimize.Bounds(0, 1), options=options)
  bound, gap = getattr(res, "mip_dual_bound", None), getattr(res, "mip_gap", None)
  return {"x": res.x, "status": {0: "optimal", 1: "time_limit"}.get(
              res.status, f"status_{res.status}"),
          "message": str(res.message),
          "bound": -float(bound) if bound is not None else float("nan"),
          "gap": float(gap) if gap is not None else float("nan")}


def _milp_child(conn, c, constraints, integrality, options) -> None:
  conn.send(_run_milp(c, constraints, integrality, options))
  conn.close()


def _run_milp_isolated(c, constraints, integrality, options, wall_limit: float
                       ) -> dict[str, Any]:
  """:func:`_run_milp` in a spawned process, killed after ``wall_limit`` s."""
  import multiprocessing  # pylint: disable=g-import-not-at-top
  ctx = multiprocessing.get_context("spawn")
  parent, child = ctx.Pipe(duplex=False)
  proc = ctx.Process(target=_milp_child, args=(child, c, constraints, integrality, options), daemon=True)
  proc.start()
  child.close()
  try:
    if parent.poll(wall_limit):
      return parent.recv()
  except EOFError:  # the child died without an answer
    pass
  finally:
    if proc.is_alive():
      proc.kill()
    proc.join()
    parent.close()
  return {"x": None, "status": "killed", "bound": float("nan"), "gap": float("nan"),
          "message": f"HiGHS gave no answer within the wall-clock limit of {wall_limit:g} s"}


def solve_p1_exact(scores, costs, budgets, lam, *, client_valid=None,
                   time_limit: float = 10.0, mip_rel_gap: float = 1e-9,
                   isolate: bool | None = None, wall_limit: float | None = None,
                   backward=None) -> tuple[np.ndarray | None, dict[str, Any]]:
  """Solves P1 as a MILP with scipy.optimize.milp (HiGHS); host side.

  Never raises on a hard instance: after ``time_limit`` it returns HiGHS'
  best incumbent (status ``"time_limit"``), or ``None`` masks with status
  ``"no_incumbent"`` (HiGHS stopped without a feasible point) or
  ``"killed"`` (isolated and past ``wall_limit``); their objective is NaN.

  Args:
    scores: f32[M, K]; non-finite entries count as 0.
    costs: f32[K] > 0 (weight costs when ``backward`` is given).
    budgets: f32[M].
    lam: finite scalar, either sign.
    client_valid: bool[M] or None; padding clients get all-False masks.
    time_limit: seconds for HiGHS.
    mip_rel_gap: relative gap at which HiGHS stops.
    isolate: run HiGHS in a child process that is killed at ``wall_limit``
      (costs ~1 s to start); None: iff the MILP has more than
      ``ISOLATE_MIN_VARIABLES`` variables.
    wall_limit: hard limit when isolated; default ``1.25 time_limit + 5``.
    backward: f32[K + 1] or None: depth-aware budgets
      (:class:`fedsel_jax.costs.DepthCosts`; see :func:`_p1_milp`).

  Returns:
    ``(masks bool[M, K] or None, info)``; info holds ``objective`` (P1 value
    of the returned masks, float64), ``bound`` (HiGHS' upper bound on the
    optimum), ``gap`` (relative MIP gap), ``status`` (``"optimal"``,
    ``"time_limit"``, ``"no_incumbent"``, ``"killed"``, ...), ``message``,
    ``seconds``.
  """
  scores = np.nan_to_num(np.asarray(scores, np.float64), nan=0.0, posinf=0.0,
                         neginf=0.0)
  costs, budgets = np.asarray(costs, np.float64), np.asarray(budgets, np.float64)
  lam = float(lam)
  num_clients, num_layers = scores.shape
  valid = (np.ones(num_clients, bool) if client_valid is None
           else np.asarray(client_valid, bool))
  ids = np.flatnonzero(valid)
  c, constraints, integrality, n_m = _p1_milp(scores[ids], costs, budgets[ids], lam,
                                              backward)
  options = {"time_limit": float(time_limit), "mip_rel_gap": mip_rel_gap, "disp": False}
  if isolate is None:
    isolate = c.shape[0] > ISOLATE_MIN_VARIABLES
  start = time.perf_counter()
  if isolate:
    wall = 1.25 * time_limit + 5.0 if wall_limit is None else wall_limit
    res = _run_milp_isolated(c, constraints, integrality, options, wall)
  else:
    res = _run_milp(c, constraints, integrality, options)
  seconds = time.perf_counter() - start
  masks, objective = None, float("nan")
  if res["x"] is not None:
    masks = np.zeros((num_clients, num_layers), bool)
    masks[ids] = res["x"][:n_m].reshape(len(ids), num_layers) > 0.5
    objective = p1_objective_np(masks, scores, lam, valid)
  elif res["status"] != "killed":
    res["status"] = "no_incumbent"
  info = {"objective": objective, "bound": res["bound"], "gap": res["gap"],
          "status": res["status"], "message": res["message"], "seconds": seconds}
  return masks, info


def p1_objective_np(masks, scores, lam, client_valid=None) -> float:
  """float64 host twin of :func:`fedsel_jax.selection.p1_objective`."""
  masks = np.asarray(masks, bool)
  valid = (np.ones(masks.shape[0], bool) if client_valid is None
           else np.asarray(client_valid, bool))
  m = masks & valid[:, None]
  s = np.nan_to_num(np.asarray(scores, np.float64), nan=0.0, posinf=0.0, neginf=0.0)
  counts = m.sum(0).astype(np.float64)
  return float(np.where(m, s, 0.0).sum() - lam * np.sum(counts * (valid.sum() - counts)))


def set_costs_np(subsets: np.ndarray, costs: np.ndarray, backward=None) -> np.ndarray:
  """f64[n]: cost of each subset ``bool[n, K]``; additive, or depth-aware
  (``costs`` = weight costs, ``backward`` f[K + 1], see
  :class:`fedsel_jax.costs.DepthCosts`)."""
  subsets = np.asarray(subsets, bool)
  total = (subsets * np.asarray(costs, np.float64)).sum(-1)
  if backward is not None:
    k = subsets.shape[-1]
    lowest = np.where(subsets.any(-1), subsets.argmax(-1), k)
    total = total + np.asarray(backward, np.float64)[lowest]
  return total


def _feasible_subsets(costs: np.ndarray, budget: float, backward=None) -> np.ndarray:
  """bool[n, K]: every subset of layers within ``budget`` (incl. empty)."""
  k = costs.shape[0]
  subsets = np.array(list(itertools.product([False, True], repeat=k)), bool)
  return subsets[set_costs_np(subsets, costs, backward) <= budget]


def solve_p1_brute(scores, costs, budgets, lam, *, client_valid=None, backward=None
                   ) -> tuple[np.ndarray, float]:
  """Exhaustive P1 solver for tests (host side, M and K small).

  Enumerates every feasible subset of every client and combines them by
  dynamic programming over the count vector ``S in {0..M}^K`` (the penalty
  depends on the masks only through S): ``best[S]`` = the largest score sum
  of the clients so far with counts S. Exact; memory ``(M + 1)^K``.

  Args:
    scores: f32[M, K]; non-finite entries count as 0.
    costs: f32[K] (weight costs when ``backward`` is given).
    budgets: f32[M].
    lam: finite scalar, either sign.
    client_valid: bool[M] or None.
    backward: f32[K + 1] or None: depth-aware costs (:func:`set_costs_np`).

  Returns:
    ``(masks bool[M, K], objective float64)``.
  """
  scores = np.nan_to_num(np.asarray(scores, np.float64), nan=0.0, posinf=0.0,
                         neginf=0.0)
  costs = np.asarray(costs, np.float64)
  num_clients, k = scores.shape
  valid = (np.ones(num_clients, bool) if client_valid is None
           else np.asarray(client_valid, bool))
  ids = np.flatnonzero(valid)
  m = len(ids)
  if (m + 1) ** k > 5_000_000:
    raise ValueError(f"solve_p1_brute: (M+1)^K = {(m + 1) ** k} states is too many")
  shape = (m + 1,) * k
  best = np.full(shape, -np.inf)
  best[(0,) * k] = 0.0
  choices = []
  for i in ids:
    subsets = _feasible_subsets(costs, float(budgets[i]), backward)
    new = np.full(shape, -np.inf)
    arg = np.zeros(shape, np.int32)
    for u, subset in enumerate(subsets):
      src = tuple(slice(0, m) if t else slice(None) for t in subset)
      dst = tuple(slice(1, m + 1) if t else slice(None) for t in subset)
      cand = best[src] + scores[i][subset].sum()
      better = cand > new[dst]
      new[dst] = np.where(better, cand, new[dst])
      arg[dst] = np.where(better, u, arg[dst])
    best = new
    choices.append((subsets, arg))
  grid = np.indices(shape).reshape(k, -1).T.astype(np.float64)
  total = best.reshape(-1) - lam * np.sum(grid * (m - grid), axis=1)
  flat = int(np.argmax(total))
  state = np.array(np.unravel_index(flat, shape))
  masks = np.zeros((num_clients, k), bool)
  for i, (subsets, arg) in zip(ids[::-1], choices[::-1]):
    subset = subsets[arg[tuple(state)]]
    masks[i] = subset
    state = state - subset
  return masks, float(total[flat])
