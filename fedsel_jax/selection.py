"""Layer selection: problem P1, the baselines and the cost model.

Problem P1 (SPEC.md, "One round", step 2). Given scores ``s: f32[M, K]`` of M
sampled clients for K candidate layers, layer costs ``c: f32[K]`` and client
budgets ``b: f32[M]``, choose masks ``m: bool[M, K]`` that

    maximise   sum_il m_il s_il  -  lam * sum_l S_l (M - S_l),   S_l = sum_i m_il
    subject to sum_l c_l m_il <= b_i   for every client i.

The penalty equals ``lam * sum_l sum_{i<j} (m_il - m_jl)^2``: it pays for
disagreement between clients on a layer. ``lam`` has a portable scale only if
scores are normalised per client (:func:`normalize_scores`, each row sums to
1); the caller normalises, the solvers take scores as given.

Solvers live in :mod:`fedsel_jax.solver` and are re-exported here:

* :func:`solve_p1`: jittable, vmappable best-response ascent (used every
  round);
* :func:`solve_p1_exact`: host-side MILP (scipy / HiGHS), the ground truth;
* :func:`solve_p1_brute`: host-side exhaustive search for tests.

Baselines (all jittable, ``bool[M, K]``): :func:`select_full`,
:func:`select_top`, :func:`select_bottom`, :func:`select_both`,
:func:`select_random`, :func:`select_topk_scores`. With non-unit costs every
budgeted baseline walks its preference order and *skips* a layer that does not
fit the remaining budget, then continues with the next one; a budget is never
exceeded. With unit costs this is "the first ``floor(b_i)`` layers".

Costs are in units of the mean candidate layer (:func:`layer_costs`), so a
budget of 2 means "two average layers" for every cost kind.

Padding clients (``client_valid`` False) get all-False masks from the solvers
and do not count in M.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fedsel_jax.solver import _costs_uniform
from fedsel_jax.solver import _disagreement_pairs
from fedsel_jax.solver import _knapsack_unequal
from fedsel_jax.solver import _knapsack_uniform
from fedsel_jax.solver import _score_inputs
from fedsel_jax.solver import _valid_or_all
# Re-exported: callers use them as selection.solve_p1 etc.
from fedsel_jax.solver import ENUMERATE_MAX_LAYERS  # pylint: disable=unused-import
from fedsel_jax.solver import JACOBI_MAX_CELLS  # pylint: disable=unused-import
from fedsel_jax.solver import p1_objective_np  # pylint: disable=unused-import
from fedsel_jax.solver import sanitize_scores
from fedsel_jax.solver import solve_p1  # pylint: disable=unused-import
from fedsel_jax.solver import solve_p1_brute  # pylint: disable=unused-import
from fedsel_jax.solver import solve_p1_exact  # pylint: disable=unused-import

# Relative slack of :func:`is_feasible`: float32 sums of the same costs in a
# different order may differ in the last bits.
FEASIBILITY_RTOL = 1e-5

BUDGET_KINDS = ("fixed", "uniform", "truncnorm")
COST_KINDS = ("unit", "params", "flops")

# Budgets draw from their own stream of the run seed, so adding other uses of
# the seed (partitions, sampling) never changes them.
_BUDGET_STREAM = 0xB0D6E7


# ----------------------------------------------------------------------------
# Scores and the objective.


def count_nonfinite(scores: jax.Array) -> jax.Array:
  """i32[M]: number of NaN/inf scores per client (log it; see below).

  Args:
    scores: f32[M, K] raw scores.
  """
  return jnp.sum(~jnp.isfinite(jnp.asarray(scores, jnp.float32)), axis=-1,
                 dtype=jnp.int32)


def normalize_scores(scores: jax.Array) -> jax.Array:
  """Per-client normalisation to sum 1: the portable scale of ``lam``.

  Safe fallback, never a silent garbage mask: non-finite entries (NaN, +-inf,
  e.g. from a diverged local gradient) and negative entries are set to 0
  before normalising, and a row whose sum is then 0 (all zero, all NaN)
  becomes uniform ``1/K``, i.e. "no preference": that client follows the
  others under the penalty and picks the lowest-index layers at ``lam = 0``.
  Use :func:`count_nonfinite` on the raw scores to report how often it
  happened.

  Args:
    scores: f32[M, K] raw importance scores (>= 0 for every strategy).

  Returns:
    f32[M, K], each row non-negative and summing to 1.
  """
  s = jnp.maximum(sanitize_scores(scores), 0.0)
  total = jnp.sum(s, axis=-1, keepdims=True)
  uniform = jnp.full_like(s, 1.0 / s.shape[-1])
  return jnp.where(total > 0, s / jnp.where(total > 0, total, 1.0), uniform)


def p1_penalty(masks: jax.Array, lam, client_valid: jax.Array | None = None
               ) -> jax.Array:
  """f32: ``lam * sum_l S_l (M - S_l)`` over the valid clients.

  Args:
    masks: bool[M, K].
    lam: non-negative scalar.
    client_valid: bool[M] or None (all valid).
  """
  valid = _valid_or_all(client_valid, masks.shape[0])
  m = jnp.asarray(masks, bool) & valid[:, None]
  counts = jnp.sum(m, axis=0, dtype=jnp.int32)
  pairs = _disagreement_pairs(counts, jnp.sum(valid, dtype=jnp.int32))
  return jnp.asarray(lam, jnp.float32) * pairs.astype(jnp.float32)


def p1_objective(masks: jax.Array, scores: jax.Array, lam,
                 client_valid: jax.Array | None = None) -> jax.Array:
  """f32: P1 objective ``sum m s - lam sum_l S_l (M - S_l)`` (valid clients).

  Non-finite scores count as 0 (:func:`sanitize_scores`).

  Args:
    masks: bool[M, K].
    scores: f32[M, K].
    lam: non-negative scalar.
    client_valid: bool[M] or None (all valid).
  """
  valid = _valid_or_all(client_valid, masks.shape[0])
  m = jnp.asarray(masks, bool) & valid[:, None]
  gain = jnp.sum(jnp.where(m, sanitize_scores(scores), 0.0))
  return gain - p1_penalty(m, lam, valid)


def mask_costs(masks: jax.Array, costs: jax.Array) -> jax.Array:
  """f32[M]: total cost of each client's selected layers."""
  return jnp.sum(jnp.where(masks, jnp.asarray(costs, jnp.float32), 0.0), axis=-1)


def is_feasible(masks: jax.Array, costs: jax.Array, budgets: jax.Array,
                client_valid: jax.Array | None = None) -> jax.Array:
  """bool[M]: client within budget (relative slack ``FEASIBILITY_RTOL``).

  A padding client is feasible iff its mask is empty.

  Args:
    masks: bool[M, K].
    costs: f32[K].
    budgets: f32[M].
    client_valid: bool[M] or None (all valid).
  """
  masks = jnp.asarray(masks, bool)
  valid = _valid_or_all(client_valid, masks.shape[0])
  budgets = jnp.asarray(budgets, jnp.float32)
  within = mask_costs(masks, costs) <= budgets + FEASIBILITY_RTOL * jnp.abs(budgets)
  return jnp.where(valid, within, ~jnp.any(masks, axis=-1))


# ----------------------------------------------------------------------------
# Baselines. Each returns bool[M, K]; padding clients get all-False rows.


def _fill_in_order(order: jax.Array, costs: jax.Array, budget: jax.Array,
                   eligible: jax.Array) -> jax.Array:
  """Walks ``order`` and takes every eligible layer that still fits.

  Args:
    order: i32[..., K] a permutation of the layers, most preferred first.
    costs: f32[K].
    budget: f32[...].
    eligible: bool[..., K] layers that may be taken.

  Returns:
    bool[..., K]; a layer that does not fit is skipped and the walk goes on.
  """
  cost_sorted = jnp.moveaxis(costs[order], -1, 0)
  elig_sorted = jnp.moveaxis(jnp.take_along_axis(eligible, order, axis=-1), -1, 0)

  def step(used, item):
    cost, elig = item
    take = elig & (used + cost <= budget)
    return used + jnp.where(take, cost, 0.0), take

  _, taken = jax.lax.scan(step, jnp.zeros(budget.shape, jnp.float32),
                          (cost_sorted, elig_sorted))
  taken = jnp.moveaxis(taken, 0, -1)
  return jnp.take_along_axis(taken, jnp.argsort(order, axis=-1), axis=-1)

def _fill_clients(order: jax.Array, costs: jax.Array, budgets: jax.Array,
                  client_valid) -> jax.Array:
  """Every client walks ``order`` ([K] shared or [M, K]) and skips misfits."""
  costs = jnp.asarray(costs, jnp.float32)
  budgets = jnp.asarray(budgets, jnp.float32)
  valid = _valid_or_all(client_valid, budgets.shape[0])
  shape = budgets.shape + costs.shape
  order = jnp.broadcast_to(jnp.asarray(order, jnp.int32), shape)
  masks = _fill_in_order(order, costs, budgets, jnp.ones(shape, bool))
  return masks & valid[:, None]


def both_ends_order(num_layers: int) -> np.ndarray:
  """i32[K]: top, bottom, next top, next bottom, ... (each layer once)."""
  order, low, high = [], 0, num_layers - 1
  while low <= high:
    order.append(high)
    if low != high:
      order.append(low)
    low, high = low + 1, high - 1
  return np.asarray(order, np.int32)


def select_full(costs: jax.Array, budgets: jax.Array, *,
                client_valid: jax.Array | None = None) -> jax.Array:
  """Every candidate layer for every valid client; budgets are ignored.

  Args:
    costs: f32[K] (only its length is used).
    budgets: f32[M] (only its length is used).
    client_valid: bool[M] or None.

  Returns:
    bool[M, K].
  """
  valid = _valid_or_all(client_valid, jnp.shape(budgets)[0])
  return jnp.broadcast_to(valid[:, None], (valid.shape[0], jnp.shape(costs)[0]))


def select_top(costs: jax.Array, budgets: jax.Array, *,
               client_valid: jax.Array | None = None) -> jax.Array:
  """Layers nearest the output first (K-1, K-2, ...), skipping misfits.

  With unit costs: the top ``floor(b_i)`` layers. With unequal costs a layer
  that does not fit the remaining budget is skipped and the walk continues
  downwards, so the budget is used as far as the order allows.

  Args:
    costs: f32[K], layers ordered input -> output.
    budgets: f32[M].
    client_valid: bool[M] or None.

  Returns:
    bool[M, K] within budget.
  """
  order = np.arange(jnp.shape(costs)[0])[::-1]
  return _fill_clients(order, costs, budgets, client_valid)


def select_bottom(costs: jax.Array, budgets: jax.Array, *,
                  client_valid: jax.Array | None = None) -> jax.Array:
  """Layers nearest the input first (0, 1, ...), skipping misfits.

  Args:
    costs: f32[K], layers ordered input -> output.
    budgets: f32[M].
    client_valid: bool[M] or None.

  Returns:
    bool[M, K] within budget.
  """
  order = np.arange(jnp.shape(costs)[0])
  return _fill_clients(order, costs, budgets, client_valid)


def select_both(costs: jax.Array, budgets: jax.Array, *,
                client_valid: jax.Array | None = None) -> jax.Array:
  """Alternates from both ends (:func:`both_ends_order`), skipping misfits.

  With unit costs and budget b: the top ``ceil(b/2)`` and bottom
  ``floor(b/2)`` layers, each layer at most once.

  Args:
    costs: f32[K], layers ordered input -> output.
    budgets: f32[M].
    client_valid: bool[M] or None.

  Returns:
    bool[M, K] within budget.
  """
  return _fill_clients(both_ends_order(jnp.shape(costs)[0]), costs, budgets,
                       client_valid)


def select_random(costs: jax.Array, budgets: jax.Array, key: jax.Array, *,
                  client_ids: jax.Array | None = None,
                  client_valid: jax.Array | None = None) -> jax.Array:
  """Each client walks its own uniformly random layer order, skipping misfits.

  With unit costs: a uniformly random ``floor(b_i)``-subset per client. The
  order of client i depends only on ``fold_in(key, client_ids[i])``, so a
  client's mask does not depend on who else was sampled.

  Args:
    costs: f32[K].
    budgets: f32[M].
    key: PRNG key (e.g. the round key).
    client_ids: i32[M] global client ids; default ``arange(M)``.
    client_valid: bool[M] or None.

  Returns:
    bool[M, K] within budget.
  """
  num_clients, num_layers = jnp.shape(budgets)[0], jnp.shape(costs)[0]
  if client_ids is None:
    client_ids = jnp.arange(num_clients)
  order = jax.vmap(lambda i: jax.random.permutation(
      jax.random.fold_in(key, i), num_layers))(jnp.asarray(client_ids))
  return _fill_clients(order, costs, budgets, client_valid)


def select_topk_scores(scores: jax.Array, costs: jax.Array, budgets: jax.Array,
                       *, client_valid: jax.Array | None = None) -> jax.Array:
  """Per-client best layers by score alone (P1 with lam = 0).

  Equal costs: the ``floor(b_i)`` highest scores (ties to the lower layer).
  Unequal costs: the best-response knapsack of :func:`solve_p1` (exact for
  K <= ``ENUMERATE_MAX_LAYERS``). Layers with negative scores are never
  taken; non-finite scores count as 0.

  Args:
    scores: f32[M, K] (grad-norm, RGN, SNR, ...).
    costs: f32[K].
    budgets: f32[M].
    client_valid: bool[M] or None.

  Returns:
    bool[M, K] within budget.
  """
  scores, costs, budgets, valid = _score_inputs(scores, costs, budgets, client_valid)
  masks = jax.lax.cond(_costs_uniform(costs), _knapsack_uniform, _knapsack_unequal,
                       scores, costs, budgets)
  return masks & valid[:, None]


# ----------------------------------------------------------------------------
# Budgets and costs (host side; called once per run, from the config).


def _is_int(x) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _require(ok: bool, field: str, allowed: str, got) -> None:
  if not ok:
    raise ValueError(f"selection.budget.{field} must be {allowed}, got {got!r}")


def draw_budgets(kind: str, num_clients: int, seed: int, *, value=None,
                 low=None, high=None, mean=None, std=None) -> np.ndarray:
  """Per-client budgets (in cost units), a pure function of ``seed``.

  Drawn once per run from a stream of ``seed`` reserved for budgets, so a
  client keeps its budget for the whole run and changes elsewhere in the
  code never change them.

  Args:
    kind: ``"fixed"`` (every client ``value``), ``"uniform"`` (integers
      uniform on ``[low, high]``) or ``"truncnorm"`` (the paper's:
      ``round(x)``, ``x`` normal(``mean``, ``std``) truncated to
      ``[low, high]``).
    num_clients: N >= 1.
    seed: the run seed.
    value: fixed budget > 0.
    low, high: integers, ``1 <= low <= high`` (uniform, truncnorm).
    mean, std: finite, ``std > 0`` (truncnorm).

  Returns:
    f32[N] budgets.

  Raises:
    ValueError: naming the offending ``selection.budget.*`` field.
  """
  _require(kind in BUDGET_KINDS, "kind", f"one of {BUDGET_KINDS}", kind)
  _require(_is_int(num_clients) and num_clients >= 1, "num_clients",
           "an integer >= 1", num_clients)
  rng = np.random.default_rng([int(seed), _BUDGET_STREAM])
  if kind == "fixed":
    _require(value is not None and np.isfinite(value) and value > 0, "value",
             "a finite number > 0", value)
    return np.full((num_clients,), value, np.float32)
  _require(_is_int(low) and low >= 1, "low", "an integer >= 1", low)
  _require(_is_int(high) and high >= low, "high",
           f"an integer >= selection.budget.low ({low})", high)
  if kind == "uniform":
    return rng.integers(low, high, endpoint=True, size=num_clients).astype(np.float32)
  _require(mean is not None and np.isfinite(mean), "mean", "a finite number", mean)
  _require(std is not None and np.isfinite(std) and std > 0, "std",
           "a finite number > 0", std)
  from scipy import stats  # pylint: disable=g-import-not-at-top
  x = stats.truncnorm.rvs((low - mean) / std, (high - mean) / std, loc=mean,
                          scale=std, size=num_clients, random_state=rng)
  return np.clip(np.rint(x), low, high).astype(np.float32)


def layer_costs(kind: str = "unit", *, param_counts=None, flops=None
                ) -> np.ndarray:
  """Candidate layer costs, in units of the mean candidate layer.

  Dividing by the mean keeps budgets portable: a budget of 2 means "two
  average layers" for every kind, and ``"unit"`` is the paper's setting.

  Args:
    kind: ``"unit"`` (all 1), ``"params"`` (parameter count) or ``"flops"``
      (training FLOPs per sample, proportional to forward FLOPs under the
      convention of :func:`training_flops_per_sample`).
    param_counts: int[K] parameters per candidate layer (gives K for unit).
    flops: f32[K] forward FLOPs per sample per candidate layer.

  Returns:
    f32[K] > 0 with mean 1.

  Raises:
    ValueError: naming ``selection.cost`` for an unknown kind or a missing
      or non-positive input.
  """
  if kind not in COST_KINDS:
    raise ValueError(f"selection.cost must be one of {COST_KINDS}, got {kind!r}")
  source = {"unit": param_counts if param_counts is not None else flops,
            "params": param_counts, "flops": flops}[kind]
  if source is None:
    need = "param_counts or flops" if kind == "unit" else (
        "param_counts" if kind == "params" else "flops")
    raise ValueError(f"selection.cost={kind!r} needs {need}")
  source = np.asarray(source, np.float64)
  if source.ndim != 1 or source.size == 0:
    raise ValueError(f"selection.cost={kind!r}: expected one value per candidate "
                     f"layer, got shape {source.shape}")
  if kind == "unit":
    return np.ones(source.shape, np.float32)
  if not np.all(np.isfinite(source) & (source > 0)):
    raise ValueError(f"selection.cost={kind!r}: every layer's {kind} must be > 0, "
                     f"got {source.tolist()}")
  return (source / source.mean()).astype(np.float32)


def check_lam(lam) -> float:
  """Returns ``float(lam)``; raises ValueError naming ``selection.lam``."""
  try:
    value = float(lam)
  except (TypeError, ValueError):
    value = float("nan")
  if not (np.isfinite(value) and value >= 0):
    raise ValueError(f"selection.lam must be a finite number >= 0, got {lam!r}")
  return value


def check_budgets(budgets, costs) -> None:
  """Raises ValueError (naming ``selection.budget``) if a client can afford
  no candidate layer at all, i.e. some budget < the cheapest layer's cost.

  Args:
    budgets: f32[N].
    costs: f32[K].
  """
  budgets = np.asarray(budgets, np.float64)
  cheapest = float(np.min(costs))
  if not np.all(np.isfinite(budgets)) or np.min(budgets) < cheapest:
    bad = np.flatnonzero(~(budgets >= cheapest))
    raise ValueError(
        f"selection.budget: every budget must be >= the cheapest layer's cost "
        f"({cheapest:g}); clients {bad[:10].tolist()} have "
        f"{budgets[bad[:10]].tolist()}")


# ----------------------------------------------------------------------------
# Cost model (SPEC.md, "Cost model").


def training_flops_per_sample(forward_flops: jax.Array, head_forward_flops,
                              masks: jax.Array, *, fixed_forward_flops=0.0
                              ) -> jax.Array:
  """f32[M]: training FLOPs per example of one local step, per client.

  Convention: FLOPs = 2 x MACs; backward through a layer costs 2x its
  forward, split equally into activation gradients (1x) and weight
  gradients (1x). With ``l_min`` the client's lowest selected block:

  * forward through everything: fixed + all blocks + head;
  * head: weight gradients always; activation gradients if any block is
    selected (they are what reaches the blocks);
  * activation gradients for every block ``l >= l_min`` (backprop stops
    below ``l_min``); weight gradients only for selected blocks.

  So all blocks selected costs ``fixed + 3 (blocks + head)``, nothing
  selected ``fixed + blocks + 2 head``.

  Args:
    forward_flops: f32[K] forward FLOPs per example of each candidate block.
    head_forward_flops: scalar, forward FLOPs of the common layers.
    masks: bool[M, K].
    fixed_forward_flops: scalar, forward FLOPs of the fixed layers.

  Returns:
    f32[M].
  """
  f = jnp.asarray(forward_flops, jnp.float32)
  head = jnp.asarray(head_forward_flops, jnp.float32)
  masks = jnp.asarray(masks, bool)
  any_selected = jnp.any(masks, axis=-1)
  # Blocks at or above the lowest selected block: a cumulative OR.
  above_lowest = jnp.cumsum(masks, axis=-1) > 0
  forward = fixed_forward_flops + jnp.sum(f) + head
  activation_grads = (jnp.sum(jnp.where(above_lowest, f, 0.0), axis=-1)
                      + jnp.where(any_selected, head, 0.0))
  weight_grads = jnp.sum(jnp.where(masks, f, 0.0), axis=-1) + head
  return forward + activation_grads + weight_grads


def communication_bytes(param_counts: jax.Array, masks: jax.Array, *,
                        common_params, fixed_params, bytes_per_param: int = 4,
                        score_bytes: int = 4, sends_scores: bool = True
                        ) -> tuple[jax.Array, jax.Array]:
  """Bytes moved per client in one round (float32 counts; ~1e-7 relative).

  Down: the full model (fixed + common + all candidates). Up: the K scores
  (when the round selects) plus the deltas of the common layers and of the
  selected candidates.

  Args:
    param_counts: int[K] parameters per candidate layer.
    masks: bool[M, K].
    common_params: parameters in the common layers.
    fixed_params: parameters in the fixed layers.
    bytes_per_param: 4 for float32, 2 for bfloat16.
    score_bytes: bytes per uploaded score.
    sends_scores: whether this round uploads scores.

  Returns:
    ``(down f32[M], up f32[M])``.
  """
  counts = jnp.asarray(param_counts, jnp.float32)
  masks = jnp.asarray(masks, bool)
  full = jnp.float32(fixed_params) + jnp.float32(common_params) + jnp.sum(counts)
  down = jnp.full(masks.shape[:1], full * bytes_per_param)
  selected = jnp.sum(jnp.where(masks, counts, 0.0), axis=-1)
  scores_up = counts.shape[0] * score_bytes if sends_scores else 0
  up = (selected + jnp.float32(common_params)) * bytes_per_param + scores_up
  return down, up
