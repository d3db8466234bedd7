"""Problem P1 as an explicit value for the in-graph solver (:mod:`fedsel_jax.solver`).

:class:`Problem` holds the scores, costs, budgets, lambda and the padding
mask, plus the host choices made once outside the trace (equal costs: the
exact top-b knapsack; whether the joint client step fits in memory).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from fedsel_jax import costs as costs_lib
from fedsel_jax import knapsack as knap
from fedsel_jax.knapsack import ENUMERATE_MAX_LAYERS

# Largest batch of knapsack cells the joint step may use with unequal costs.
JACOBI_MAX_CELLS = 2 ** 26


def sanitize_scores(scores: jax.Array) -> jax.Array:
  """f32[M, K] with NaN and +-inf replaced by 0 (the solvers' rule; see
  :func:`fedsel_jax.selection.normalize_scores`)."""
  scores = jnp.asarray(scores, jnp.float32)
  return jnp.where(jnp.isfinite(scores), scores, 0.0)


def valid_or_all(client_valid, num_clients: int) -> jax.Array:
  """bool[M]: ``client_valid`` or all True."""
  if client_valid is None:
    return jnp.ones((num_clients,), bool)
  return jnp.asarray(client_valid, bool)


def disagreement_pairs(counts: jax.Array, num_valid: jax.Array) -> jax.Array:
  """i32[...]: sum_l S_l (M - S_l), exact in int32 for M*M*K/4 < 2**31."""
  return jnp.sum(counts * (num_valid - counts), axis=-1)


@flax.struct.dataclass
class Problem:
  """One P1 instance as the solver sees it.

  Attributes:
    scores: f32[M, K], sanitised.
    costs: f32[K] > 0.
    budgets: f32[M].
    lam: f32 scalar, either sign.
    valid: bool[M].
    num_valid: i32, M without padding.
    backward: f32[K + 1] or None: depth-aware budgets, a set S costs
      ``sum_{l in S} costs[l] + backward[lowest(S)]``
      (:class:`fedsel_jax.costs.DepthCosts`, without its constant).
    uniform: static; all costs equal (host decision), None if unknown.
    use_jacobi: static; the joint client step fits :data:`JACOBI_MAX_CELLS`.
  """

  scores: jax.Array
  costs: jax.Array
  budgets: jax.Array
  lam: jax.Array
  valid: jax.Array
  num_valid: jax.Array
  backward: jax.Array | None = None
  uniform: bool | None = flax.struct.field(pytree_node=False, default=None)
  use_jacobi: bool = flax.struct.field(pytree_node=False, default=True)

  @property
  def depth(self) -> bool:
    return self.backward is not None

  def set_cost(self, masks: jax.Array) -> jax.Array:
    """f32[...]: the cost of each mask ``bool[..., K]``."""
    if self.depth:
      return costs_lib.depth_set_cost(masks, self.costs, self.backward)
    return jnp.sum(jnp.where(masks, self.costs, 0.0), axis=-1)

  def respond(self, values: jax.Array, budget: jax.Array) -> jax.Array:
    """Best response ``bool[..., K]`` to gains ``values f32[..., K]``.

    Additive costs: the knapsack. Depth-aware: for every possible lowest
    block j the knapsack over blocks >= j with the budget left after the
    backward pass down to j; the best of them (ties to the higher j).
    """
    if not self.depth:
      return knap.knapsack(values, self.costs, budget, self.uniform)
    k = self.costs.shape[0]
    allowed = jnp.arange(k)[None, :] >= jnp.arange(k)[:, None]  # [j, K]
    vals = jnp.where(allowed, values[..., None, :], -1e30)
    budget_j = budget[..., None] - self.backward[:k]
    masks = knap.knapsack(vals, self.costs, budget_j, self.uniform)  # [..., j, K]
    worth = jnp.sum(jnp.where(masks, values[..., None, :], 0.0), axis=-1)
    pick = k - 1 - jnp.argmax(worth[..., ::-1], axis=-1)
    best = jnp.take_along_axis(masks, pick[..., None, None], axis=-2)[..., 0, :]
    return best & (jnp.max(worth, axis=-1) > 0)[..., None]

  @property
  def tol(self) -> jax.Array:
    """Smallest objective change that counts as progress (float32 noise)."""
    return 1e-7 * jnp.sum(jnp.abs(self.scores))


def make_problem(scores, costs, budgets, lam, client_valid=None, *, backward=None,
                 uniform: bool | None = None, num_starts: int = 1) -> Problem:
  """Builds a :class:`Problem`; ``uniform`` None decides it from concrete costs.

  ``backward`` (f32[K + 1]) makes the budgets depth-aware; ``costs`` are then
  the weight-gradient costs.
  """
  scores = sanitize_scores(scores)
  costs = jnp.asarray(costs, jnp.float32)
  valid = valid_or_all(client_valid, scores.shape[0])
  if uniform is None:
    uniform = knap.costs_uniform_host(costs)
  num_clients, num_layers = scores.shape
  per_client = (2 ** num_layers if num_layers <= ENUMERATE_MAX_LAYERS
                else (num_layers + 1) ** 2)
  if backward is not None:
    per_client *= num_layers  # one knapsack per possible lowest block
    backward = jnp.asarray(backward, jnp.float32)
  use_jacobi = ((bool(uniform) and backward is None)
                or num_starts * num_clients * per_client <= JACOBI_MAX_CELLS)
  budgets = jnp.asarray(budgets, jnp.float32)
  budgets = budgets + costs_lib.BUDGET_SLACK * jnp.abs(budgets)
  return Problem(scores=scores, costs=costs, budgets=budgets,
                 lam=jnp.asarray(lam, jnp.float32), valid=valid,
                 num_valid=jnp.sum(valid, dtype=jnp.int32), backward=backward,
                 uniform=uniform, use_jacobi=use_jacobi)


def counts_of(masks: jax.Array) -> jax.Array:
  """i32[P, K] layer counts of ``masks bool[P, M, K]``."""
  return jnp.sum(masks, axis=-2, dtype=jnp.int32)
