"""The in-graph solver of problem P1 (defined in :mod:`fedsel_jax.selection`).

Given scores ``s: f32[M, K]``, layer costs ``c: f32[K]`` and budgets
``b: f32[M]``, P1 chooses masks ``m: bool[M, K]`` that

    maximise   sum_il m_il s_il  -  lam * sum_l S_l (M - S_l),   S_l = sum_i m_il
    subject to sum_l c_l m_il <= b_i   for every client i.

:func:`solve_p1` is a multi-start local search that is jittable and
vmappable. It is written as named steps over an explicit :class:`Problem`
value, each tested on its own: :func:`make_problem` (inputs), the moves
:func:`jacobi_step`, :func:`client_sweep`, :func:`layer_sweep`,
:func:`transfer_step`, :func:`handover_step`, :func:`swap_step` (one
climbing step each, never lowering the objective), :func:`ascend` (climb to a fixed point), the kicks
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

import jax
import jax.numpy as jnp

from fedsel_jax import knapsack as knap
# The problem value and the moves; re-exported (tests and callers use solver.X).
from fedsel_jax.solver_moves import client_gains  # noqa: F401
from fedsel_jax.solver_moves import client_sweep  # noqa: F401
from fedsel_jax.solver_moves import handover_step  # noqa: F401
from fedsel_jax.solver_moves import jacobi_step  # noqa: F401
from fedsel_jax.solver_moves import joint_gain  # noqa: F401
from fedsel_jax.solver_moves import layer_sweep  # noqa: F401
from fedsel_jax.solver_moves import swap_step  # noqa: F401
from fedsel_jax.solver_moves import sweep
from fedsel_jax.solver_moves import transfer_step  # noqa: F401
from fedsel_jax.solver_problem import JACOBI_MAX_CELLS  # noqa: F401
from fedsel_jax.solver_problem import Problem
from fedsel_jax.solver_problem import counts_of
from fedsel_jax.solver_problem import disagreement_pairs  # noqa: F401
from fedsel_jax.solver_problem import make_problem
from fedsel_jax.solver_problem import sanitize_scores  # noqa: F401
from fedsel_jax.solver_problem import valid_or_all  # noqa: F401

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
