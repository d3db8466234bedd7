"""Solvers of problem P1 (defined in :mod:`fedsel_jax.selection`).

Given scores ``s: f32[M, K]``, layer costs ``c: f32[K]`` and budgets
``b: f32[M]``, P1 chooses masks ``m: bool[M, K]`` that

    maximise   sum_il m_il s_il  -  lam * sum_l S_l (M - S_l),   S_l = sum_i m_il
    subject to sum_l c_l m_il <= b_i   for every client i.

* :func:`solve_p1`: jittable, vmappable best-response ascent (used every
  round);
* :func:`solve_p1_exact`: host-side MILP (scipy / HiGHS), the ground truth;
* :func:`solve_p1_brute`: host-side exhaustive search for tests.

The per-client knapsacks here are also the score-based baseline's
(:func:`fedsel_jax.selection.select_topk_scores`). Non-finite scores count as
0 (:func:`sanitize_scores`); padding clients (``client_valid`` False) get
all-False masks and do not count in M. :mod:`fedsel_jax.selection`
re-exports the public names.
"""

from __future__ import annotations

import itertools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# Up to this many layers a best response with unequal costs enumerates all
# 2^K subsets (exact); above it, greedy + local improvement.
ENUMERATE_MAX_LAYERS = 10
# Largest batch of knapsack cells the joint step may use with unequal costs.
JACOBI_MAX_CELLS = 2 ** 26


# ----------------------------------------------------------------------------
# Inputs and the integer part of the penalty.


def sanitize_scores(scores: jax.Array) -> jax.Array:
  """Non-finite scores -> 0 (the solvers' rule; see
  :func:`fedsel_jax.selection.normalize_scores`).

  Args:
    scores: f32[M, K].

  Returns:
    f32[M, K] with NaN and +-inf replaced by 0.
  """
  scores = jnp.asarray(scores, jnp.float32)
  return jnp.where(jnp.isfinite(scores), scores, 0.0)


def _valid_or_all(client_valid, num_clients: int) -> jax.Array:
  if client_valid is None:
    return jnp.ones((num_clients,), bool)
  return jnp.asarray(client_valid, bool)


def _score_inputs(scores, costs, budgets, client_valid):
  """Sanitised f32 scores, f32 costs and budgets, and bool[M] validity."""
  scores = sanitize_scores(scores)
  return (scores, jnp.asarray(costs, jnp.float32), jnp.asarray(budgets, jnp.float32),
          _valid_or_all(client_valid, scores.shape[0]))


def _disagreement_pairs(counts: jax.Array, num_valid: jax.Array) -> jax.Array:
  """i32[...]: sum_l S_l (M - S_l), exact in int32 for M*M*K/4 < 2**31."""
  return jnp.sum(counts * (num_valid - counts), axis=-1)


# ----------------------------------------------------------------------------
# One client's knapsack (values may be negative; only values >= 0 are taken).


def _descending_order(keys: jax.Array) -> jax.Array:
  """i32[..., K]: indices by decreasing key, ties to the lower index."""
  return jnp.argsort(-keys, axis=-1, stable=True)


def _rank_descending(keys: jax.Array) -> jax.Array:
  """i32[..., K]: how many layers come before each one (larger key first,
  ties to the lower index). A loop over K elementwise comparisons fuses into
  one pass; the [..., K, K] comparison tensor is 20x slower at M=10^4, K=48.
  """
  k = keys.shape[-1]
  layer = jnp.arange(k)
  rank = jnp.zeros(keys.shape, jnp.int32)
  for j in range(k):
    key_j = keys[..., j:j + 1]
    rank += ((key_j > keys) | ((key_j == keys) & (j < layer))).astype(jnp.int32)
  return rank


def _knapsack_uniform(values: jax.Array, costs: jax.Array, budget: jax.Array
                      ) -> jax.Array:
  """Exact when all costs are equal: the best ``floor(b/c)`` values >= 0.

  Args:
    values: f32[..., K].
    costs: f32[K] (all equal).
    budget: f32[...].

  Returns:
    bool[..., K].
  """
  eligible = values >= 0
  rank = _rank_descending(jnp.where(eligible, values, -jnp.inf))
  prefix_cost = (rank + 1).astype(jnp.float32) * costs
  return eligible & (prefix_cost <= budget[..., None])


def _knapsack_general(values: jax.Array, costs: jax.Array, budget: jax.Array,
                      num_improve: int = 3) -> jax.Array:
  """Heuristic 0/1 knapsack for arbitrary positive costs (no loops over K).

  The better of (a) the longest prefix of the layers by value/cost that fits
  and (b) the best single layer (together a 1/2-approximation), then
  ``num_improve`` rounds of the best improving move "drop at most one layer,
  add at most one layer" that stays within budget (an added layer fills what
  a prefix left over).

  Args:
    values: f32[..., K].
    costs: f32[K] > 0.
    budget: f32[...].
    num_improve: static number of improvement rounds.

  Returns:
    bool[..., K] within budget.
  """
  k = values.shape[-1]
  eligible = values >= 0
  rank = _rank_descending(jnp.where(eligible, values / costs, -jnp.inf))
  # Cost of each layer's prefix: the layers ranked at or before it.
  prefix_cost = jnp.zeros(values.shape, jnp.float32)
  for j in range(k):
    prefix_cost += jnp.where(rank[..., j:j + 1] <= rank, costs[j], 0.0)
  prefix = eligible & (prefix_cost <= budget[..., None])
  single_val = jnp.where(eligible & (costs <= budget[..., None]), values, -jnp.inf)
  best_single = jnp.argmax(single_val, axis=-1)
  single = (jnp.arange(k) == best_single[..., None]) & jnp.isfinite(
      jnp.max(single_val, axis=-1, keepdims=True))

  def total(mask):
    return jnp.sum(jnp.where(mask, values, 0.0), axis=-1)

  mask = jnp.where((total(single) > total(prefix))[..., None], single, prefix)
  # Moves (out, in) over {layers} + {nothing}; index k means "nothing".
  vals_ext = jnp.concatenate([values, jnp.zeros(values.shape[:-1] + (1,))], -1)
  costs_ext = jnp.concatenate([costs, jnp.zeros((1,))])
  delta = vals_ext[..., None, :] - vals_ext[..., :, None]  # [..., out, in]
  layer = jnp.arange(k)
  for _ in range(num_improve):
    used = jnp.sum(jnp.where(mask, costs, 0.0), axis=-1)
    sel_ext = jnp.concatenate([mask, jnp.ones(mask.shape[:-1] + (1,), bool)], -1)
    add_ext = jnp.concatenate([~mask & eligible,
                               jnp.ones(mask.shape[:-1] + (1,), bool)], -1)
    new_used = used[..., None, None] - costs_ext[:, None] + costs_ext[None, :]
    ok = (sel_ext[..., :, None] & add_ext[..., None, :]
          & (new_used <= budget[..., None, None]) & (delta > 0))
    flat = jnp.where(ok, delta, -jnp.inf).reshape(delta.shape[:-2] + (-1,))
    best = jnp.argmax(flat, axis=-1)
    improve = jnp.isfinite(jnp.max(flat, axis=-1))
    out_idx, in_idx = best // (k + 1), best % (k + 1)
    moved = (mask & (layer != out_idx[..., None])) | (layer == in_idx[..., None])
    mask = jnp.where(improve[..., None], moved, mask)
  return mask


def _knapsack_enumerate(values: jax.Array, costs: jax.Array, budget: jax.Array
                        ) -> jax.Array:
  """Exact 0/1 knapsack by enumerating all 2^K subsets (K small, static).

  Args:
    values: f32[..., K].
    costs: f32[K].
    budget: f32[...].

  Returns:
    bool[..., K]; ties go to the subset listed first (fewer, lower layers).
  """
  k = values.shape[-1]
  table = np.array(list(itertools.product([0, 1], repeat=k)), np.float32)
  table = jnp.asarray(table[np.argsort(table.sum(1), kind="stable")])
  subset_cost = table @ costs  # [2^K]
  # A negative item adds 0 here, so a subset holding one ties with the same
  # subset without it, which comes first (fewer layers) and wins the argmax.
  subset_value = jnp.einsum("...k,sk->...s", jnp.maximum(values, 0.0), table)
  fits = subset_cost <= budget[..., None]
  best = jnp.argmax(jnp.where(fits, subset_value, -jnp.inf), -1)
  return table[best] > 0.5


def _knapsack_unequal(values, costs, budget):
  if costs.shape[-1] <= ENUMERATE_MAX_LAYERS:
    return _knapsack_enumerate(values, costs, budget)
  return _knapsack_general(values, costs, budget)


def _costs_uniform(costs: jax.Array) -> jax.Array:
  return jnp.all(costs == costs[0])


# ----------------------------------------------------------------------------
# The in-graph solver.


def _best_response_solve(scores, costs, budgets, lam, valid, num_starts,
                         max_iters, num_kicks, uniform, use_jacobi, knapsack):
  """Multi-start local search for P1 (see :func:`solve_p1`)."""
  num_clients, num_layers = scores.shape
  num_valid = jnp.sum(valid, dtype=jnp.int32)
  # Starts, side by side: (1) per-client knapsack on a blend of own and mean
  # scores, alpha = 0 (own top-b, the exact answer at lam = 0) to alpha = 1;
  # (2) strict consensus: every client takes the set that the mean scores
  # pick under the smallest budget (the answer for large lam); (3) nothing
  # (the answer when lam * M outweighs every score).
  mean_scores = jnp.sum(jnp.where(valid[:, None], scores, 0.0), axis=0) / (
      jnp.maximum(num_valid, 1).astype(jnp.float32))
  num_blends = max(num_starts - 2, 1)
  alphas = jnp.linspace(0.0, 1.0, num_blends) if num_blends > 1 else jnp.zeros(1)
  blended = (1 - alphas[:, None, None]) * scores + alphas[:, None, None] * mean_scores
  masks0 = knapsack(blended, costs, jnp.broadcast_to(budgets, (num_blends, num_clients)))
  if num_starts > 1:
    min_budget = jnp.min(jnp.where(valid, budgets, jnp.inf))
    common = knapsack(mean_scores, costs, min_budget)
    masks0 = jnp.concatenate(
        [masks0, jnp.broadcast_to(common, masks0[:1].shape)])
  if num_starts > 2:
    masks0 = jnp.concatenate([masks0, jnp.zeros_like(masks0[:1])])
  masks0 = masks0 & valid[None, :, None]  # [P, M, K]

  def client_step(counts, xs):
    score_i, budget_i, valid_i, mask_i = xs  # [K], [], [], [P, K]
    others = counts - mask_i.astype(jnp.int32)  # S_{-i}: [P, K]
    # Marginal objective of adding layer l: s_il - lam (M - 1 - 2 S_{-i,l}).
    # The integer part is kept exact so that moves between layers with equal
    # counts compare scores only, even when lam * M dwarfs them.
    pressure = num_valid - 1 - 2 * others  # i32[P, K]
    gain = score_i - lam * pressure.astype(jnp.float32)
    new = knapsack(gain, costs, jnp.broadcast_to(budget_i, (num_starts,)))
    diff = new.astype(jnp.int32) - mask_i.astype(jnp.int32)
    delta = (jnp.sum(score_i * diff, axis=-1)
             - lam * jnp.sum(pressure * diff, axis=-1).astype(jnp.float32))
    accept = valid_i & (delta > 1e-7 * jnp.sum(jnp.abs(score_i)))
    new = jnp.where(accept[:, None], new, mask_i)
    return others + new.astype(jnp.int32), (new, accept)

  def joint_gain(improve, delta, diff):
    # Exact objective change of applying the moves of the `improve` clients
    # together: their own gains plus lam * sum_l (D_l^2 - sum_i d_il^2),
    # D_l = sum_i d_il (same-direction moves help each other).
    diff = jnp.where(improve[..., None], diff, 0)
    moved = jnp.sum(diff, axis=1)  # [P, K]
    cross = jnp.sum(moved * moved - jnp.sum(diff * diff, axis=1), axis=-1)
    return (jnp.sum(jnp.where(improve, delta, 0.0), axis=-1)
            + lam * cross.astype(jnp.float32))

  def jacobi_step(masks, counts):
    # All clients' best responses at once. A start takes all improving moves
    # if together they still improve; otherwise only the moves that agree,
    # on every layer, with one direction (add / drop): that of the best
    # single move where it moves, else the one carrying more gain. With no
    # opposite moves on a layer the joint gain is >= the sum of the single
    # gains > 0, so every step improves and a step without movers proves a
    # fixed point of the client moves.
    held = masks.astype(jnp.int32)
    pressure = num_valid - 1 - 2 * (counts[:, None, :] - held)  # [P, M, K]
    gain = scores - lam * pressure.astype(jnp.float32)
    new = knapsack(gain, costs, jnp.broadcast_to(budgets, masks.shape[:2]))
    diff = new.astype(jnp.int32) - held
    delta = (jnp.sum(scores * diff, axis=-1)
             - lam * jnp.sum(pressure * diff, axis=-1).astype(jnp.float32))
    improve = valid & (delta > 1e-7 * jnp.sum(jnp.abs(scores), axis=-1))  # [P, M]
    weight = jnp.where(improve, delta, 0.0)
    up = jnp.sum(jnp.where(diff > 0, weight[..., None], 0.0), axis=1)  # [P, K]
    down = jnp.sum(jnp.where(diff < 0, weight[..., None], 0.0), axis=1)
    # The best single move always agrees, so the agreeing set is never empty.
    best = jnp.take_along_axis(diff, jnp.argmax(weight, axis=1)[:, None, None], 1)
    direction = jnp.where(best != 0, best, jnp.where(up >= down, 1, -1)[:, None, :])
    agree = improve & jnp.all((diff == 0) | (diff == direction), axis=-1)
    tol = 1e-7 * jnp.sum(jnp.abs(scores))
    take = jnp.where((joint_gain(improve, delta, diff) > tol)[:, None], improve, agree)
    masks = jnp.where(take[..., None], new, masks)
    counts = jnp.sum(masks, axis=1, dtype=jnp.int32)
    return masks, counts, jnp.any(take), jnp.bool_(False)

  def client_sweep(masks, counts):
    xs = (scores, budgets, valid, jnp.swapaxes(masks, 0, 1))
    counts, (new, accepted) = jax.lax.scan(client_step, counts, xs)
    return jnp.swapaxes(new, 0, 1), counts, jnp.any(accepted)

  def layer_step(used, column):
    # Column move on one layer, the others fixed: drop it from every client,
    # or give it to every client that can afford it next to its other layers
    # (the consensus moves that single clients cannot make on their own).
    held, s_l, cost_l = column  # [P, M], [M], []
    used_other = used - jnp.where(held, cost_l, 0.0)
    can = valid & (used_other + cost_l <= budgets)  # [P, M]
    cur = jnp.sum(held, axis=-1, dtype=jnp.int32)
    cur_value = (jnp.sum(jnp.where(held, s_l, 0.0), axis=-1)
                 - lam * (cur * (num_valid - cur)).astype(jnp.float32))
    n_can = jnp.sum(can, axis=-1, dtype=jnp.int32)
    all_value = (jnp.sum(jnp.where(can, s_l, 0.0), axis=-1)
                 - lam * (n_can * (num_valid - n_can)).astype(jnp.float32))
    tol = 1e-6 * (1.0 + jnp.abs(cur_value))
    take_all = (all_value - cur_value > tol) & (all_value >= 0)
    drop_all = ~take_all & (-cur_value > tol)
    new_col = jnp.where(take_all[:, None], can, held & ~drop_all[:, None])
    return used_other + jnp.where(new_col, cost_l, 0.0), (new_col, take_all | drop_all)

  def layer_sweep(masks, counts):
    used = jnp.sum(jnp.where(masks, costs, 0.0), axis=-1)
    columns = (jnp.moveaxis(masks, -1, 0), scores.T, costs)
    _, (new, accepted) = jax.lax.scan(layer_step, used, columns)
    masks = jnp.moveaxis(new, 0, -1)
    return masks, jnp.sum(masks, axis=1, dtype=jnp.int32), jnp.any(accepted)

  def transfer_terms_uniform(masks):
    # Equal costs: every holder of a without b can switch, so the sums over
    # movers are matrix products. Returns [P, K_a, K_b] terms.
    h = (masks & valid[:, None]).astype(jnp.float32)  # [P, M, K]
    hs = h * scores
    both = jnp.einsum("pma,pmb->pab", h, h)
    moved = jnp.round(jnp.sum(h, axis=1)[:, :, None] - both).astype(jnp.int32)
    held_s = jnp.sum(hs, axis=1)[:, :, None]  # sum_i h_ia s_ia
    both_s_a = jnp.einsum("pma,pmb->pab", hs, h)  # sum_i h_ia h_ib s_ia
    both_s_b = jnp.einsum("pma,pmb->pab", h, hs)  # sum_i h_ia h_ib s_ib
    to_b = jnp.einsum("pma,mb->pab", h, scores)  # sum_i h_ia s_ib
    moved_s_a = held_s - both_s_a
    return moved, (to_b - both_s_b) - moved_s_a, moved_s_a

  def movers_for(masks, used, source):
    # bool[P, M, K_b]: holders of `source` that can switch it to layer b.
    return (valid[None, :, None] & masks[:, :, source, None] & ~masks
            & (used[:, :, None] - costs[source] + costs <= budgets[None, :, None]))

  def transfer_terms_general(masks):
    used = jnp.sum(jnp.where(masks, costs, 0.0), axis=-1)  # [P, M]

    def per_source(source):
      movers = movers_for(masks, used, source)
      s_a = scores[:, source, None]
      return (jnp.sum(movers, axis=1, dtype=jnp.int32),
              jnp.sum(jnp.where(movers, scores - s_a, 0.0), axis=1),
              jnp.sum(jnp.where(movers, s_a, 0.0), axis=1))

    terms = jax.lax.map(per_source, jnp.arange(num_layers))
    return jax.tree.map(lambda x: jnp.moveaxis(x, 0, 1), terms)

  def transfer_step(masks, counts):
    # Objective change when every holder of layer a that can afford b
    # switches a -> b, optionally with everyone left on a dropping it: the
    # coordinated moves that client and column moves cannot make.
    moved, dscore, moved_s_a = jax.lax.cond(
        uniform, transfer_terms_uniform, transfer_terms_general, masks)
    s_a, s_b = counts[:, :, None], counts[:, None, :]
    left = s_a - moved
    before = s_a * (num_valid - s_a) + s_b * (num_valid - s_b)
    after = left * (num_valid - left) + (s_b + moved) * (num_valid - s_b - moved)
    delta = dscore - lam * (after - before).astype(jnp.float32)
    held_s = jnp.sum(jnp.where(masks & valid[:, None], scores, 0.0), axis=1)
    drop = (moved_s_a - held_s[:, :, None]
            + lam * (left * (num_valid - left)).astype(jnp.float32))
    delta = jnp.where(moved > 0, delta + jnp.maximum(drop, 0.0), -jnp.inf)
    flat = delta.reshape(num_starts, -1)
    best = jnp.argmax(flat, axis=-1)
    best_delta = jnp.max(flat, axis=-1)
    source, target = best // num_layers, best % num_layers
    accept = best_delta > 1e-6 * (1.0 + jnp.abs(best_delta))
    # Each start makes its own best move.
    used = jnp.sum(jnp.where(masks, costs, 0.0), axis=-1)
    movers = jax.vmap(lambda m, u, a, b: movers_for(m[None], u[None], a)[0, :, b])(
        masks, used, source, target)  # [P, M]
    with_drop = drop.reshape(num_starts, -1)[jnp.arange(num_starts), best] > 0
    layer = jnp.arange(num_layers)
    leave = (movers | with_drop[:, None])[..., None] & (layer == source[:, None, None])
    join = movers[..., None] & (layer == target[:, None, None])
    new = (masks & ~leave) | join
    masks = jnp.where(accept[:, None, None], new, masks)
    return masks, jnp.sum(masks, axis=1, dtype=jnp.int32), jnp.any(accept)

  def no_move(masks, counts):
    return masks, counts, jnp.bool_(False)

  def sweep(carry):
    masks, counts, _, it = carry
    # Client moves: the vectorised joint step where its batch of knapsacks
    # fits (always with equal costs), else a sequential sweep.
    masks, counts, changed_j, pending = jax.lax.cond(
        use_jacobi, jacobi_step,
        lambda m, c: (m, c, jnp.bool_(False), jnp.bool_(True)), masks, counts)
    masks, counts, changed_s = jax.lax.cond(
        pending, client_sweep, no_move, masks, counts)
    changed_c = changed_j | changed_s
    masks, counts, changed_l = layer_sweep(masks, counts)
    # Coordinated transfers only at a fixed point of the cheaper moves.
    stuck = ~(changed_c | changed_l)
    masks, counts, changed_t = jax.lax.cond(
        stuck, transfer_step, no_move, masks, counts)
    return masks, counts, changed_c | changed_l | changed_t, it + 1

  def keep_going(carry):
    _, _, changed, it = carry
    return changed & (it < max_iters)

  def ascend(masks):
    counts = jnp.sum(masks, axis=1, dtype=jnp.int32)
    masks, counts, _, _ = jax.lax.while_loop(
        keep_going, sweep, (masks, counts, jnp.bool_(True), jnp.int32(0)))
    return masks, counts

  def best_of(masks, counts):
    # Compare to entry 0 (kept on ties) so that the exact integer penalty
    # difference is not lost next to a large penalty.
    gains = jnp.sum(jnp.where(masks, scores, 0.0), axis=(1, 2))
    pairs = _disagreement_pairs(counts, num_valid)
    rel = (gains - gains[0]) - lam * (pairs - pairs[0]).astype(jnp.float32)
    return masks[jnp.argmax(rel)]

  def insert_kick(best, forced):
    # Start p forces layer forced[p] on every client that can afford it; to
    # make room a client keeps its held layers by decreasing gain per cost,
    # skipping those that no longer fit. This leaves fixed points where the
    # cohort agrees on a wrong layer: reaching the better consensus needs
    # many clients to switch at once, and every step on the way is worse.
    # [P] -> [P, M, K].
    counts = jnp.sum(best, axis=0, dtype=jnp.int32)
    pressure = num_valid - 1 - 2 * (counts - best.astype(jnp.int32))  # [M, K]
    gain = scores - lam * pressure.astype(jnp.float32)
    rank = _rank_descending(jnp.where(best, gain / costs, -jnp.inf))  # [M, K]
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
    moves = valid & (room >= 0) & ~holds
    return jnp.where(moves[..., None], inserted, best[None])

  def kick(best, round_):
    # Perturbations of the best answer, one per start, to climb from again.
    # The first ceil(P/2) starts insert one of the layers with the most score
    # mass left out (insert_kick); the others clear one of the most contested
    # layers (ruin and recreate: fixed points that need several clients to
    # change several layers at once). Later rounds try the next layers.
    num_insert = (num_starts + 1) // 2
    start = jnp.arange(num_starts)
    shift = round_ - 1
    left_out = jnp.sum(jnp.where(valid[:, None] & ~best, scores, 0.0), axis=0)
    forced = _descending_order(left_out)[(start + shift * num_insert) % num_layers]
    counts = jnp.sum(best, axis=0, dtype=jnp.int32)
    contested = _descending_order(counts * (num_valid - counts))
    ruined = contested[(start - num_insert + shift * (num_starts - num_insert))
                       % num_layers]
    ruin = best[None] & (jnp.arange(num_layers) != ruined[:, None])[:, None, :]
    return jnp.where((start < num_insert)[:, None, None], insert_kick(best, forced),
                     ruin)

  def phase(round_, best):
    # Round 0 climbs from the starts, later rounds from kicks of the best so
    # far; one loop keeps a single copy of the ascent in the compiled code.
    starts = jax.lax.cond(round_ == 0, lambda b: masks0, lambda b: kick(b, round_),
                          best)
    masks, _ = ascend(starts)
    masks = jnp.concatenate([best[None], masks])
    counts = jnp.sum(masks, axis=1, dtype=jnp.int32)
    # Entry 0 (the previous best) is empty in round 0: skip it there.
    masks = jnp.where(round_ == 0, jnp.roll(masks, -1, axis=0), masks)
    counts = jnp.where(round_ == 0, jnp.roll(counts, -1, axis=0), counts)
    return best_of(masks, counts)

  return jax.lax.fori_loop(0, 1 + num_kicks, phase, jnp.zeros_like(masks0[0]))


def solve_p1(scores: jax.Array, costs: jax.Array, budgets: jax.Array, lam, *,
             client_valid: jax.Array | None = None, num_starts: int = 5,
             max_iters: int = 30, num_kicks: int = 1) -> jax.Array:
  """Approximately solves P1 in-graph (jittable, vmappable, always feasible).

  P1 is an exact potential game: when client i changes its mask alone, the
  objective changes by its own gain, where adding layer l is worth
  ``s_il - lam (M - 1 - 2 S_{-i,l})`` given the others' counts ``S_{-i,l}``.
  The solver climbs with moves that each strictly raise the objective:

  * client moves: a client's best response is a knapsack over those gains
    (exact top-``floor(b/c)`` for equal costs, exact enumeration for unequal
    costs and ``K <= ENUMERATE_MAX_LAYERS``, greedy + local improvement
    above). All clients respond at once when the joint move, or its part
    that agrees in direction on every layer, still improves (its exact
    value is known); otherwise a sequential (Gauss-Seidel) sweep;
  * column moves (sweep over the layers): drop a layer from everyone, or
    give it to everyone who can afford it;
  * transfers, when neither sweep changes anything: every holder of layer a
    that can afford it switches a -> b (optionally everyone drops a), the
    best pair (a, b).

  It stops at a fixed point or after ``max_iters`` sweeps. ``num_starts``
  starts climb side by side: each client's knapsack on
  ``(1 - a) s_i + a mean_j s_j`` for ``num_starts - 2`` values of ``a`` in
  ``[0, 1]`` (``a = 0`` first: own top-b), the set the mean scores pick
  under the smallest budget for every client (consensus), and the empty
  selection. Then ``num_kicks`` times: perturb the best answer, once per
  start, and climb again. Half of the kicks (rounded up) insert a layer the
  best answer leaves out (most score mass outside it first): every client
  that can afford it takes it and keeps its other layers by decreasing gain
  per cost while they fit. This leaves fixed points where the cohort agrees
  on the wrong layer, which no improving move can leave since each step
  towards the better consensus loses. The other kicks clear one of the most
  contested layers (ruin and recreate). Later kick rounds take the next
  layers. The best answer is returned, start 0 on ties, so at ``lam = 0``
  with equal costs the result is each client's top-b, identical to
  :func:`fedsel_jax.selection.select_topk_scores`.

  Quality and speed: see experiments/selection/README.md (optimal on all
  10,000 small random instances of the study; M = 1000, K = 24 in tens of
  ms on a CPU).
  Precision: the integer part of the penalty is kept exact in int32, valid
  for ``M^2 K / 4 < 2^31``.

  Args:
    scores: f32[M, K], normally :func:`fedsel_jax.selection.normalize_scores`
      output; non-finite entries count as 0.
    costs: f32[K] > 0.
    budgets: f32[M].
    lam: scalar >= 0 (may be traced: changing it does not recompile).
    client_valid: bool[M] or None; padding clients get all-False masks and do
      not count in M.
    num_starts: static number of starts, P (work grows linearly in P).
    max_iters: static cap on sweeps per climb.
    num_kicks: static number of kick rounds (perturb the best, climb again).

  Returns:
    bool[M, K] feasible masks.
  """
  scores, costs, budgets, valid = _score_inputs(scores, costs, budgets, client_valid)
  lam = jnp.asarray(lam, jnp.float32)
  uniform = _costs_uniform(costs)

  def knapsack(values, costs, budget):
    return jax.lax.cond(uniform, _knapsack_uniform, _knapsack_unequal,
                        values, costs, budget)

  # The joint (Jacobi) step solves all M knapsacks at once; with unequal
  # costs that needs P * M * (2^K or (K+1)^2) cells, so above a size it is
  # left to the sequential sweep.
  num_clients, num_layers = scores.shape
  per_client = (2 ** num_layers if num_layers <= ENUMERATE_MAX_LAYERS
                else (num_layers + 1) ** 2)
  use_jacobi = uniform | (num_starts * num_clients * per_client <= JACOBI_MAX_CELLS)
  return _best_response_solve(scores, costs, budgets, lam, valid, num_starts,
                              max_iters, num_kicks, uniform, use_jacobi, knapsack)


# ----------------------------------------------------------------------------
# Host-side exact solvers (ground truth for tests and benchmarks).


def solve_p1_exact(scores, costs, budgets, lam, *, client_valid=None,
                   time_limit: float = 10.0, mip_rel_gap: float = 1e-9
                   ) -> tuple[np.ndarray, dict[str, Any]]:
  """Solves P1 as a MILP with scipy.optimize.milp (HiGHS); host side.

  Variables: binary ``m_il`` and one-hot ``z_{l,s}`` (s = 0..M) with
  ``sum_s z_{l,s} = 1`` and ``sum_i m_il = sum_s s z_{l,s}``, so the penalty
  ``lam sum_l sum_s s (M - s) z_{l,s}`` is linear.

  Args:
    scores: f32[M, K]; non-finite entries count as 0.
    costs: f32[K] > 0.
    budgets: f32[M].
    lam: scalar >= 0.
    client_valid: bool[M] or None; padding clients get all-False masks.
    time_limit: seconds for HiGHS.
    mip_rel_gap: relative gap at which HiGHS stops.

  Returns:
    ``(masks bool[M, K], info)``; info holds ``objective`` (P1 value of the
    returned masks, float64), ``bound`` (HiGHS' upper bound on the optimum),
    ``gap`` (relative MIP gap), ``status`` (``"optimal"``, ``"time_limit"``,
    ...), ``seconds``.
  """
  from scipy import optimize, sparse  # pylint: disable=g-import-not-at-top

  scores = np.nan_to_num(np.asarray(scores, np.float64), nan=0.0, posinf=0.0,
                         neginf=0.0)
  costs = np.asarray(costs, np.float64)
  budgets = np.asarray(budgets, np.float64)
  num_clients, num_layers = scores.shape
  valid = (np.ones(num_clients, bool) if client_valid is None
           else np.asarray(client_valid, bool))
  ids = np.flatnonzero(valid)
  s, b = scores[ids], budgets[ids]
  m, k = s.shape
  n_m, n_z = m * k, k * (m + 1)
  levels = np.arange(m + 1, dtype=np.float64)
  # milp minimises: -sum m s + lam sum_l sum_s s (M - s) z_{l,s}.
  c = np.concatenate([-s.ravel(), np.tile(lam * levels * (m - levels), k)])
  m_index = np.arange(n_m).reshape(m, k)
  z_index = n_m + np.arange(n_z).reshape(k, m + 1)
  # Budget rows: sum_l c_l m_il <= b_i.
  budget_rows = sparse.csr_array(
      (np.tile(costs, m), (np.repeat(np.arange(m), k), m_index.ravel())),
      shape=(m, n_m + n_z))
  # One-hot rows: sum_s z_{l,s} = 1.
  onehot_rows = sparse.csr_array(
      (np.ones(n_z), (np.repeat(np.arange(k), m + 1), z_index.ravel())),
      shape=(k, n_m + n_z))
  # Link rows: sum_i m_il - sum_s s z_{l,s} = 0.
  link_rows = sparse.csr_array(
      (np.concatenate([np.ones(n_m), -np.tile(levels, k)]),
       (np.concatenate([np.tile(np.arange(k), m), np.repeat(np.arange(k), m + 1)]),
        np.concatenate([m_index.ravel(), z_index.ravel()]))),
      shape=(k, n_m + n_z))
  constraints = [
      optimize.LinearConstraint(budget_rows, -np.inf, b),
      optimize.LinearConstraint(onehot_rows, 1.0, 1.0),
      optimize.LinearConstraint(link_rows, 0.0, 0.0),
  ]
  start = time.perf_counter()
  res = optimize.milp(c, constraints=constraints, integrality=np.ones(n_m + n_z),
                      bounds=optimize.Bounds(0, 1),
                      options={"time_limit": time_limit, "mip_rel_gap": mip_rel_gap,
                               "disp": False})
  seconds = time.perf_counter() - start
  masks = np.zeros((num_clients, num_layers), bool)
  if res.x is not None:
    masks[ids] = res.x[:n_m].reshape(m, k) > 0.5
  status = {0: "optimal", 1: "time_limit"}.get(res.status, f"status_{res.status}")
  bound = getattr(res, "mip_dual_bound", None)
  info = {
      "objective": p1_objective_np(masks, scores, lam, valid),
      "bound": -float(bound) if bound is not None else float("nan"),
      "gap": float(getattr(res, "mip_gap", np.nan)),
      "status": status,
      "message": res.message,
      "seconds": seconds,
  }
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


def _feasible_subsets(costs: np.ndarray, budget: float) -> np.ndarray:
  """bool[n, K]: every subset of layers within ``budget`` (incl. empty)."""
  k = costs.shape[0]
  subsets = np.array(list(itertools.product([False, True], repeat=k)), bool)
  return subsets[(subsets * costs).sum(1) <= budget]


def solve_p1_brute(scores, costs, budgets, lam, *, client_valid=None
                   ) -> tuple[np.ndarray, float]:
  """Exhaustive P1 solver for tests (host side, M and K small).

  Enumerates every feasible subset of every client and combines them by
  dynamic programming over the count vector ``S in {0..M}^K`` (the penalty
  depends on the masks only through S): ``best[S]`` = the largest score sum
  of the clients so far with counts S. Exact; memory ``(M + 1)^K``.

  Args:
    scores: f32[M, K]; non-finite entries count as 0.
    costs: f32[K].
    budgets: f32[M].
    lam: scalar >= 0.
    client_valid: bool[M] or None.

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
    subsets = _feasible_subsets(costs, float(budgets[i]))
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
