"""The in-graph solver of problem P1 (defined in :mod:`fedsel_jax.selection`).

Given scores ``s: f32[M, K]``, layer costs ``c: f32[K]`` and budgets
``b: f32[M]``, P1 chooses masks ``m: bool[M, K]`` that

    maximise   sum_il m_il s_il  -  lam * sum_l S_l (M - S_l),   S_l = sum_i m_il
    subject to sum_l c_l m_il <= b_i   for every client i.

:func:`solve_p1` is a multi-start local search that is jittable and
vmappable. It is written as named steps over an explicit :class:`Problem`
value, each tested on its own: :func:`make_problem` (inputs), the moves
:func:`jacobi_step`, :func:`client_sweep`, :func:`layer_sweep`,
:func:`transfer_step` (one climbing step each, never lowering the
objective), :func:`ascend` (climb to a fixed point), the kicks
:func:`insert_kick` and :func:`ruin_kick`, and the driver :func:`solve`.
Each works on P starts side by side: ``masks bool[P, M, K]`` with their
counts ``i32[P, K]``. ``lam`` may have either sign (``lam < 0`` rewards
clients for covering different layers): every move evaluates its exact
objective change.

Host choices are made once, outside the trace: whether all costs are equal
(the exact top-b knapsack, no traced switch) and whether the joint client
step fits in memory. :func:`solve_p1` called from Python reuses one compiled
program per shapes and static settings.

Exact host solvers are in :mod:`fedsel_jax.exact`. Non-finite scores count
as 0 (:func:`sanitize_scores`); padding clients (``client_valid`` False) get
all-False masks and do not count in M.
"""

from __future__ import annotations

import functools

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


def client_gains(prob: Problem, held: jax.Array, counts: jax.Array):
  """Marginal objective of each client holding each layer, the others fixed.

  Adding layer l is worth ``s_il - lam (M - 1 - 2 S_{-i,l})``. The integer
  part (the pressure) stays exact so that layers with equal counts compare
  by score alone even when ``lam M`` dwarfs the scores.

  Args:
    prob: the problem.
    held: i32[..., M, K] current masks.
    counts: i32[..., K].

  Returns:
    ``(pressure i32[..., M, K], gain f32[..., M, K])``.
  """
  pressure = prob.num_valid - 1 - 2 * (counts[..., None, :] - held)
  return pressure, prob.scores - prob.lam * pressure.astype(jnp.float32)


def initial_starts(prob: Problem, num_starts: int) -> jax.Array:
  """bool[P, M, K]: the starting points, side by side.

  (1) each client's knapsack on ``(1 - a) s_i + a mean_j s_j`` for
  ``P - 2`` values of ``a`` in [0, 1] (``a = 0`` first: own top-b, exact
  at ``lam = 0``); (2) strict consensus: every client takes the set the
  mean scores pick under the smallest budget (large ``lam > 0``); (3)
  nothing (when ``lam M`` outweighs every score).
  """
  valid = prob.valid
  mean_scores = jnp.sum(jnp.where(valid[:, None], prob.scores, 0.0), axis=0) / (
      jnp.maximum(prob.num_valid, 1).astype(jnp.float32))
  num_blends = max(num_starts - 2, 1)
  alphas = jnp.linspace(0.0, 1.0, num_blends) if num_blends > 1 else jnp.zeros(1)
  blended = (1 - alphas[:, None, None]) * prob.scores + alphas[:, None, None] * mean_scores
  masks = prob.respond(blended, jnp.broadcast_to(prob.budgets, blended.shape[:2]))
  if num_starts > 1:
    common = prob.respond(mean_scores, jnp.min(jnp.where(valid, prob.budgets, jnp.inf)))
    masks = jnp.concatenate([masks, jnp.broadcast_to(common, masks[:1].shape)])
  if num_starts > 2:
    masks = jnp.concatenate([masks, jnp.zeros_like(masks[:1])])
  return masks & valid[None, :, None]


def joint_gain(prob: Problem, movers: jax.Array, delta: jax.Array, diff: jax.Array
               ) -> jax.Array:
  """f32[P]: exact objective change when the ``movers`` move together.

  Their own gains plus ``lam sum_l (D_l^2 - sum_i d_il^2)``, ``D_l = sum_i
  d_il``: moves in the same direction help each other if ``lam > 0`` and
  hurt each other if ``lam < 0``.

  Args:
    prob: the problem.
    movers: bool[P, M]; delta: f32[P, M] single gains; diff: i32[P, M, K].
  """
  diff = jnp.where(movers[..., None], diff, 0)
  moved = jnp.sum(diff, axis=1)
  cross = jnp.sum(moved * moved - jnp.sum(diff * diff, axis=1), axis=-1)
  return jnp.sum(jnp.where(movers, delta, 0.0), axis=-1) + prob.lam * cross.astype(jnp.float32)


def jacobi_step(prob: Problem, masks: jax.Array, counts: jax.Array):
  """All clients' best responses at once, as far as that still improves.

  A start takes all improving moves if together they improve; else the moves
  that agree, on every layer, with one direction (that of the best single
  move where it moves, else the one carrying more gain) if those improve;
  else the best single move alone. Each candidate set's change is exact
  (:func:`joint_gain`), so the objective never drops, and a step without
  movers is a fixed point of the client moves.

  Returns:
    ``(masks, counts, changed bool)``.
  """
  held = masks.astype(jnp.int32)
  pressure, gain = client_gains(prob, held, counts)
  new = prob.respond(gain, jnp.broadcast_to(prob.budgets, masks.shape[:2]))
  diff = new.astype(jnp.int32) - held
  delta = (jnp.sum(prob.scores * diff, axis=-1)
           - prob.lam * jnp.sum(pressure * diff, axis=-1).astype(jnp.float32))
  improve = prob.valid & (delta > 1e-7 * jnp.sum(jnp.abs(prob.scores), axis=-1))  # [P, M]
  weight = jnp.where(improve, delta, 0.0)
  up = jnp.sum(jnp.where(diff > 0, weight[..., None], 0.0), axis=1)  # [P, K]
  down = jnp.sum(jnp.where(diff < 0, weight[..., None], 0.0), axis=1)
  best_client = jnp.argmax(weight, axis=1)
  best = jnp.take_along_axis(diff, best_client[:, None, None], 1)
  direction = jnp.where(best != 0, best, jnp.where(up >= down, 1, -1)[:, None, :])
  agree = improve & jnp.all((diff == 0) | (diff == direction), axis=-1)
  single = improve & (jnp.arange(masks.shape[1]) == best_client[:, None])
  take = jnp.where((joint_gain(prob, agree, delta, diff) > 0)[:, None], agree, single)
  take = jnp.where((joint_gain(prob, improve, delta, diff) > prob.tol)[:, None], improve, take)
  masks = jnp.where(take[..., None], new, masks)
  return masks, counts_of(masks), jnp.any(take)


def client_sweep(prob: Problem, masks: jax.Array, counts: jax.Array):
  """Clients respond one after another (Gauss-Seidel), each seeing the
  others' latest masks; a response is kept only if it improves.

  Returns:
    ``(masks, counts, changed bool)``.
  """
  num_starts = masks.shape[0]

  def client_step(counts, xs):
    score_i, budget_i, valid_i, mask_i = xs  # [K], [], [], [P, K]
    held = mask_i.astype(jnp.int32)
    pressure = prob.num_valid - 1 - 2 * (counts - held)
    gain = score_i - prob.lam * pressure.astype(jnp.float32)
    new = prob.respond(gain, jnp.broadcast_to(budget_i, (num_starts,)))
    diff = new.astype(jnp.int32) - held
    delta = (jnp.sum(score_i * diff, axis=-1)
             - prob.lam * jnp.sum(pressure * diff, axis=-1).astype(jnp.float32))
    accept = valid_i & (delta > 1e-7 * jnp.sum(jnp.abs(score_i)))
    new = jnp.where(accept[:, None], new, mask_i)
    return counts - held + new.astype(jnp.int32), (new, accept)

  xs = (prob.scores, prob.budgets, prob.valid, jnp.swapaxes(masks, 0, 1))
  counts, (new, accepted) = jax.lax.scan(client_step, counts, xs)
  return jnp.swapaxes(new, 0, 1), counts, jnp.any(accepted)


def layer_sweep(prob: Problem, masks: jax.Array, counts: jax.Array):
  """Column moves, layer by layer with the others fixed: drop the layer from
  every client, or give it to every client that can afford it next to its
  other layers (consensus moves no single client can make alone).

  Returns:
    ``(masks, counts, changed bool)``.
  """
  del counts
  valid, budgets, m = prob.valid, prob.budgets, prob.num_valid

  def column_value(held, can, s_l):
    # held, can: bool[P, M]; s_l: f32[M] -> (new column, moved bool[P]).
    cur = jnp.sum(held, axis=-1, dtype=jnp.int32)
    cur_value = (jnp.sum(jnp.where(held, s_l, 0.0), axis=-1)
                 - prob.lam * (cur * (m - cur)).astype(jnp.float32))
    n_can = jnp.sum(can, axis=-1, dtype=jnp.int32)
    all_value = (jnp.sum(jnp.where(can, s_l, 0.0), axis=-1)
                 - prob.lam * (n_can * (m - n_can)).astype(jnp.float32))
    tol = 1e-6 * (1.0 + jnp.abs(cur_value))
    # Dropping is worth 0, so a take that is still negative never beats it.
    take_all = (all_value - cur_value > tol) & (all_value >= 0)
    drop_all = ~take_all & (-cur_value > tol)
    new_col = jnp.where(take_all[:, None], can, held & ~drop_all[:, None])
    return new_col, take_all | drop_all

  def layer_step(used, column):
    held, s_l, cost_l = column  # [P, M], [M], []
    used_other = used - jnp.where(held, cost_l, 0.0)
    can = valid & (used_other + cost_l <= budgets)
    new_col, moved = column_value(held, can, s_l)
    return used_other + jnp.where(new_col, cost_l, 0.0), (new_col, moved)

  if prob.depth:
    return _layer_sweep_depth(prob, masks, column_value)
  used = jnp.sum(jnp.where(masks, prob.costs, 0.0), axis=-1)
  columns = (jnp.moveaxis(masks, -1, 0), prob.scores.T, prob.costs)
  _, (new, accepted) = jax.lax.scan(layer_step, used, columns)
  masks = jnp.moveaxis(new, 0, -1)
  return masks, counts_of(masks), jnp.any(accepted)


def _layer_sweep_depth(prob: Problem, masks: jax.Array, column_value):
  """:func:`layer_sweep` under depth-aware budgets: whether a client can
  take layer l depends on its lowest block, so the masks are carried."""
  num_layers = masks.shape[-1]

  def layer_step(masks, l):
    is_l = jnp.arange(num_layers) == l
    held = masks[..., l]
    other = masks & ~is_l
    can = prob.valid & (prob.set_cost(other | is_l) <= prob.budgets)
    new_col, moved = column_value(held, can, prob.scores[:, l])
    masks = jnp.where(is_l, new_col[..., None], masks)
    return masks, moved

  masks, accepted = jax.lax.scan(layer_step, masks, jnp.arange(num_layers))
  return masks, counts_of(masks), jnp.any(accepted)


def _movers(prob: Problem, masks, used, source):
  """bool[P, M, K_b]: holders of ``source`` that can switch it to layer b.

  ``used`` f32[P, M] is the additive part of the masks' cost.
  """
  after = used[:, :, None] - prob.costs[source] + prob.costs
  if prob.depth:
    without = masks & (jnp.arange(masks.shape[-1]) != source)
    lowest = jnp.minimum(costs_lib.lowest_selected(without)[..., None],
                         jnp.arange(masks.shape[-1]))
    after = after + prob.backward[lowest]
  return (prob.valid[None, :, None] & masks[:, :, source, None] & ~masks
          & (after <= prob.budgets[None, :, None]))


def _transfer_terms_uniform(prob: Problem, masks):
  """Equal costs: every holder of a without b can switch, so the sums over
  movers are matrix products. Returns [P, K_a, K_b] terms."""
  h = (masks & prob.valid[:, None]).astype(jnp.float32)  # [P, M, K]
  hs = h * prob.scores
  both = jnp.einsum("pma,pmb->pab", h, h)
  moved = jnp.round(jnp.sum(h, axis=1)[:, :, None] - both).astype(jnp.int32)
  held_s = jnp.sum(hs, axis=1)[:, :, None]
  both_s_a = jnp.einsum("pma,pmb->pab", hs, h)
  both_s_b = jnp.einsum("pma,pmb->pab", h, hs)
  to_b = jnp.einsum("pma,mb->pab", h, prob.scores)
  moved_s_a = held_s - both_s_a
  return moved, (to_b - both_s_b) - moved_s_a, moved_s_a


def _transfer_terms_general(prob: Problem, masks):
  used = jnp.sum(jnp.where(masks, prob.costs, 0.0), axis=-1)  # [P, M]

  def per_source(source):
    movers = _movers(prob, masks, used, source)
    s_a = prob.scores[:, source, None]
    return (jnp.sum(movers, axis=1, dtype=jnp.int32),
            jnp.sum(jnp.where(movers, prob.scores - s_a, 0.0), axis=1),
            jnp.sum(jnp.where(movers, s_a, 0.0), axis=1))

  terms = jax.lax.map(per_source, jnp.arange(prob.costs.shape[0]))
  return jax.tree.map(lambda x: jnp.moveaxis(x, 0, 1), terms)


def transfer_step(prob: Problem, masks: jax.Array, counts: jax.Array):
  """Every holder of layer a that can afford b switches a -> b (optionally
  with everyone left on a dropping it), the best pair (a, b) per start: the
  coordinated moves that client and column moves cannot make.

  Returns:
    ``(masks, counts, changed bool)``.
  """
  m, lam = prob.num_valid, prob.lam
  num_starts, _, num_layers = masks.shape
  if prob.depth:
    moved, dscore, moved_s_a = _transfer_terms_general(prob, masks)
  elif prob.uniform is None:
    moved, dscore, moved_s_a = jax.lax.cond(
        jnp.all(prob.costs == prob.costs[0]), _transfer_terms_uniform,
        _transfer_terms_general, prob, masks)
  else:
    terms = _transfer_terms_uniform if prob.uniform else _transfer_terms_general
    moved, dscore, moved_s_a = terms(prob, masks)
  s_a, s_b = counts[:, :, None], counts[:, None, :]
  left = s_a - moved
  before = s_a * (m - s_a) + s_b * (m - s_b)
  after = left * (m - left) + (s_b + moved) * (m - s_b - moved)
  delta = dscore - lam * (after - before).astype(jnp.float32)
  held_s = jnp.sum(jnp.where(masks & prob.valid[:, None], prob.scores, 0.0), axis=1)
  drop = moved_s_a - held_s[:, :, None] + lam * (left * (m - left)).astype(jnp.float32)
  delta = jnp.where(moved > 0, delta + jnp.maximum(drop, 0.0), -jnp.inf)
  flat = delta.reshape(num_starts, -1)
  best = jnp.argmax(flat, axis=-1)
  best_delta = jnp.max(flat, axis=-1)
  source, target = best // num_layers, best % num_layers
  accept = best_delta > 1e-6 * (1.0 + jnp.abs(best_delta))
  used = jnp.sum(jnp.where(masks, prob.costs, 0.0), axis=-1)
  movers = jax.vmap(lambda mk, u, a, b: _movers(prob, mk[None], u[None], a)[0, :, b])(
      masks, used, source, target)  # [P, M]
  with_drop = drop.reshape(num_starts, -1)[jnp.arange(num_starts), best] > 0
  layer = jnp.arange(num_layers)
  leave = (movers | with_drop[:, None])[..., None] & (layer == source[:, None, None])
  join = movers[..., None] & (layer == target[:, None, None])
  masks = jnp.where(accept[:, None, None], (masks & ~leave) | join, masks)
  return masks, counts_of(masks), jnp.any(accept)


def sweep(prob: Problem, masks: jax.Array, counts: jax.Array):
  """One climbing step: client moves (joint where it fits in memory, else
  sequential), a column sweep, and transfers only at a fixed point of both.

  Returns:
    ``(masks, counts, changed bool)``.
  """
  step = jacobi_step if prob.use_jacobi else client_sweep
  masks, counts, changed_c = step(prob, masks, counts)
  masks, counts, changed_l = layer_sweep(prob, masks, counts)
  stuck = ~(changed_c | changed_l)
  masks, counts, changed_t = jax.lax.cond(
      stuck, transfer_step, lambda p, mk, c: (mk, c, jnp.bool_(False)), prob, masks, counts)
  return masks, counts, changed_c | changed_l | changed_t


def ascend(prob: Problem, masks: jax.Array, max_iters: int) -> jax.Array:
  """bool[P, M, K]: climb every start until no move improves or
  ``max_iters`` sweeps."""

  def body(carry):
    masks, counts, _, it = carry
    masks, counts, changed = sweep(prob, masks, counts)
    return masks, counts, changed, it + 1

  def keep_going(carry):
    return carry[2] & (carry[3] < max_iters)

  init = (masks, counts_of(masks), jnp.bool_(True), jnp.int32(0))
  return jax.lax.while_loop(keep_going, body, init)[0]


def best_of(prob: Problem, masks: jax.Array) -> jax.Array:
  """bool[M, K]: the start with the largest objective, entry 0 on ties.

  Compared to entry 0 so that the exact integer penalty difference is not
  lost next to a large penalty.
  """
  gains = jnp.sum(jnp.where(masks, prob.scores, 0.0), axis=(1, 2))
  pairs = disagreement_pairs(counts_of(masks), prob.num_valid)
  rel = (gains - gains[0]) - prob.lam * (pairs - pairs[0]).astype(jnp.float32)
  return masks[jnp.argmax(rel)]


def insert_kick(prob: Problem, best: jax.Array, forced: jax.Array) -> jax.Array:
  """bool[P, M, K]: start p forces layer ``forced[p]`` on every client that
  can afford it; to make room a client keeps its held layers by decreasing
  gain per cost, skipping those that no longer fit.

  This leaves fixed points where the cohort agrees on a wrong layer:
  reaching the better consensus needs many clients to switch at once, and
  every step on the way is worse.

  Args:
    prob: the problem.
    best: bool[M, K] the best answer so far.
    forced: i32[P] the layer each start forces.
  """
  costs, budgets, num_layers = prob.costs, prob.budgets, prob.costs.shape[0]
  _, gain = client_gains(prob, best.astype(jnp.int32), counts_of(best))
  rank = knap.rank_descending(jnp.where(best, gain / costs, -jnp.inf))  # [M, K]
  is_forced = jnp.arange(num_layers) == forced[:, None]  # [P, K]
  room = budgets - costs[forced][:, None]  # [P, M]

  def keep_next(used, r):
    # The held layer ranked r-th (none: cost 0) stays if it still fits.
    cost_r = jnp.sum(jnp.where(best & (rank == r), costs, 0.0), axis=-1)  # [M]
    keep = used + cost_r <= room
    return used + jnp.where(keep, cost_r, 0.0), keep

  _, keep = jax.lax.scan(keep_next, jnp.zeros_like(room), jnp.arange(num_layers))
  keep = jnp.moveaxis(keep, 0, -1)  # [P, M, rank]
  keep = jnp.take_along_axis(keep, jnp.broadcast_to(rank, keep.shape), axis=-1)
  inserted = (best[None] & keep) | is_forced[:, None, :]
  holds = jnp.any(best[None] & is_forced[:, None, :], axis=-1)  # [P, M]
  moves = prob.valid & (room >= 0) & ~holds
  if prob.depth:  # the kept layers fit their weight costs; check the whole set
    moves &= prob.set_cost(inserted) <= budgets
  return jnp.where(moves[..., None], inserted, best[None])


def ruin_kick(best: jax.Array, ruined: jax.Array) -> jax.Array:
  """bool[P, M, K]: start p clears layer ``ruined[p]`` from every client
  (ruin and recreate: leaves fixed points that need several clients to
  change several layers at once)."""
  return best[None] & (jnp.arange(best.shape[-1]) != ruined[:, None])[:, None, :]


def kick(prob: Problem, best: jax.Array, round_: jax.Array, num_starts: int) -> jax.Array:
  """bool[P, M, K]: perturbations of the best answer, one per start.

  The first ``ceil(P/2)`` insert one of the layers with the most score mass
  left out (:func:`insert_kick`), the others clear one of the most contested
  layers (:func:`ruin_kick`). Kick round r (from 1) tries the next layers.
  """
  num_layers = best.shape[-1]
  num_insert = (num_starts + 1) // 2
  start = jnp.arange(num_starts)
  shift = round_ - 1
  left_out = jnp.sum(jnp.where(prob.valid[:, None] & ~best, prob.scores, 0.0), axis=0)
  forced = knap.descending_order(left_out)[(start + shift * num_insert) % num_layers]
  counts = jnp.sum(best, axis=0, dtype=jnp.int32)
  contested = knap.descending_order(counts * (prob.num_valid - counts))
  ruined = contested[(start - num_insert + shift * (num_starts - num_insert)) % num_layers]
  return jnp.where((start < num_insert)[:, None, None], insert_kick(prob, best, forced),
                   ruin_kick(best, ruined))


def solve(prob: Problem, num_starts: int, max_iters: int, num_kicks: int) -> jax.Array:
  """bool[M, K]: the multi-start driver (see :func:`solve_p1`).

  Round 0 climbs from :func:`initial_starts`, rounds 1..num_kicks from
  kicks of the best so far, which is kept; one loop keeps a single copy of
  the ascent in the compiled program.
  """
  starts0 = initial_starts(prob, num_starts)

  def phase(round_, best):
    starts = jax.lax.cond(round_ == 0, lambda b: starts0,
                          lambda b: kick(prob, b, round_, num_starts), best)
    masks = jnp.concatenate([best[None], ascend(prob, starts, max_iters)])
    # Entry 0 (the previous best) is empty in round 0: skip it there.
    masks = jnp.where(round_ == 0, jnp.roll(masks, -1, axis=0), masks)
    return best_of(prob, masks)

  best = jax.lax.fori_loop(0, 1 + num_kicks, phase, jnp.zeros_like(starts0[0]))
  return best & prob.valid[:, None]


@functools.partial(jax.jit, static_argnames=("uniform", "num_starts", "max_iters",
                                             "num_kicks"))
def _solve_jit(scores, costs, budgets, lam, valid, backward, *, uniform, num_starts,
               max_iters, num_kicks):
  prob = make_problem(scores, costs, budgets, lam, valid, backward=backward,
                      uniform=uniform, num_starts=num_starts)
  return solve(prob, num_starts, max_iters, num_kicks)


def solve_p1(scores: jax.Array, costs: jax.Array, budgets: jax.Array, lam, *,
             client_valid: jax.Array | None = None, backward: jax.Array | None = None,
             num_starts: int = 5, max_iters: int = 30, num_kicks: int = 1) -> jax.Array:
  """Approximately solves P1 in-graph (jittable, vmappable, always feasible).

  P1 is an exact potential game: when client i changes its mask alone, the
  objective changes by its own gain, where adding layer l is worth
  ``s_il - lam (M - 1 - 2 S_{-i,l})``. The solver climbs with moves that
  each raise the objective (:func:`sweep`):

  * client moves: a client's best response is a knapsack over those gains
    (exact top-``floor(b/c)`` for equal costs, exact enumeration for unequal
    costs and ``K <= ENUMERATE_MAX_LAYERS``, greedy + local improvement
    above), all clients at once where that still improves
    (:func:`jacobi_step`), else one by one (:func:`client_sweep`);
  * column moves: drop a layer from everyone, or give it to everyone who
    can afford it (:func:`layer_sweep`);
  * transfers at a fixed point of both: every holder of a that can afford
    it switches a -> b (:func:`transfer_step`).

  ``num_starts`` starts climb side by side (:func:`initial_starts`), then
  ``num_kicks`` times the best answer is perturbed once per start
  (:func:`kick`) and climbs again. The best answer is returned, start 0 on
  ties, so at ``lam = 0`` with equal costs the result is each client's
  top-b, identical to :func:`fedsel_jax.selection.select_topk_scores`.

  Called from Python (concrete arrays) it runs one jitted program per
  shapes and settings, so repeated calls do not recompile; the equal-cost
  switch is decided on the host from concrete ``costs`` (traced costs fall
  back to a traced switch).

  Quality and speed: experiments/selection/README.md. Precision: the
  integer part of the penalty is exact in int32 for ``M^2 K / 4 < 2^31``.

  Args:
    scores: f32[M, K], normally :func:`fedsel_jax.selection.normalize_scores`
      output; non-finite entries count as 0.
    costs: f32[K] > 0.
    budgets: f32[M].
    lam: finite scalar of either sign (may be traced: changing it does not
      recompile); ``lam < 0`` rewards disagreement.
    client_valid: bool[M] or None; padding clients get all-False masks and
      do not count in M.
    backward: f32[K + 1] or None: depth-aware budgets (``costs`` are then
      weight-gradient costs; :class:`fedsel_jax.costs.DepthCosts`). A best
      response enumerates the client's lowest block (K knapsacks).
    num_starts: static number of starts, P (work grows linearly in P).
    max_iters: static cap on sweeps per climb.
    num_kicks: static number of kick rounds.

  Returns:
    bool[M, K] feasible masks.
  """
  scores = jnp.asarray(scores, jnp.float32)
  valid = valid_or_all(client_valid, scores.shape[0])
  return _solve_jit(scores, jnp.asarray(costs, jnp.float32),
                    jnp.asarray(budgets, jnp.float32), jnp.asarray(lam, jnp.float32),
                    valid, None if backward is None else jnp.asarray(backward, jnp.float32),
                    uniform=knap.costs_uniform_host(costs), num_starts=num_starts,
                    max_iters=max_iters, num_kicks=num_kicks)
