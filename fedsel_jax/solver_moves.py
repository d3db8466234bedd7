"""The P1 solver's climbing moves (driven by :mod:`fedsel_jax.solver`).

Each move takes P starts side by side (``masks bool[P, M, K]``, counts
``i32[P, K]``) and returns masks whose P1 objective is never lower, computed
from its exact objective change (``lam`` of either sign):
:func:`jacobi_step` (every client's best response at once, kept where the
joint change pays), :func:`client_sweep` (one client at a time),
:func:`layer_sweep` (one layer for everyone), :func:`transfer_step` (holders
of a layer switching it for another), :func:`handover_step` (a layer passed
from one client to another) and :func:`swap_step` (two clients trading
layers), both for ``lam < 0``, and :func:`sweep` (all of them in turn).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedsel_jax import costs as costs_lib
from fedsel_jax.solver_problem import Problem
from fedsel_jax.solver_problem import counts_of

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
  return _apply(masks, accept, leave, join)


def handover_step(prob: Problem, masks: jax.Array, counts: jax.Array):
  """Layer l passes from the holder who values it least to the non-holder
  who values it most and can afford it next to its other layers, the best
  l per start. S_l does not change, so neither does the penalty: the
  change is ``s_jl - s_il``, a move no single client can make.

  At a fixed point of the client moves it cannot pay when ``lam >= 0``:
  there j's adding l is worth ``s_jl - lam (M - 1 - 2 S_l) <= 0`` and i's
  keeping it ``s_il - lam (M + 1 - 2 S_l) >= 0``, so ``s_jl - s_il <= -2
  lam``; :func:`sweep` tries it only for ``lam < 0``.

  Returns:
    ``(masks, counts, changed bool)``.
  """
  del counts
  num_layers = masks.shape[-1]
  valid = prob.valid[None, :, None]
  # with_l[p, j, l]: client j's cost holding its masks plus l (set_cost's
  # additive part, plus depth-aware: the backward pass down to the new lowest).
  with_l = jnp.sum(jnp.where(masks, prob.costs, 0.0), axis=-1)[..., None] + prob.costs
  if prob.depth:
    lowest = costs_lib.lowest_selected(masks)[..., None]  # [P, M, 1], K if none
    with_l = with_l + prob.backward[jnp.minimum(lowest, jnp.arange(num_layers))]
  receivers = valid & ~masks & (with_l <= prob.budgets[None, :, None])
  givers = valid & masks
  take = jnp.where(receivers, prob.scores, -jnp.inf)
  give = jnp.where(givers, prob.scores, jnp.inf)
  receiver, giver = jnp.argmax(take, axis=1), jnp.argmin(give, axis=1)  # [P, K]
  delta = jnp.max(take, axis=1) - jnp.min(give, axis=1)
  layer = jnp.argmax(delta, axis=-1)  # [P]
  best = jnp.max(delta, axis=-1)
  accept = best > 1e-6 * (1.0 + jnp.abs(best))
  pick = lambda a: jnp.take_along_axis(a, layer[:, None], axis=-1)[:, 0]
  clients = jnp.arange(masks.shape[1])[None, :, None]
  column = (jnp.arange(num_layers) == layer[:, None])[:, None, :]
  leave = column & (clients == pick(giver)[:, None, None])
  join = column & (clients == pick(receiver)[:, None, None])
  return _apply(masks, accept, leave, join)


def swap_step(prob: Problem, masks: jax.Array, counts: jax.Array):
  """Client i trades layer a for b and client j trades b for a, the best
  pair per start: S_a and S_b do not change, so neither does the penalty,
  and the change ``(s_ib - s_ia) + (s_ja - s_jb)`` splits into one term per
  client. The exchange a handover cannot make when the receiver's budget is
  full.

  At a fixed point of the client moves it cannot pay when ``lam >= 0``
  (each trade alone is a client move, so the sum is at most ``-4 lam``);
  :func:`sweep` tries it only for ``lam < 0``.

  Returns:
    ``(masks, counts, changed bool)``.
  """
  del counts
  num_starts, num_clients, num_layers = masks.shape
  used = jnp.sum(jnp.where(masks, prob.costs, 0.0), axis=-1)  # [P, M]

  def trades_from(a):
    # The best client trading a -> b, for every b: (gain f32[P, K], client i32[P, K]).
    movers = _movers(prob, masks, used, a)  # [P, M, K]
    gain = jnp.where(movers, prob.scores - prob.scores[:, a, None], -jnp.inf)
    return jnp.max(gain, axis=1), jnp.argmax(gain, axis=1)

  gain, who = jax.tree.map(lambda x: jnp.moveaxis(x, 0, 1),
                           jax.lax.map(trades_from, jnp.arange(num_layers)))  # [P, a, b]
  delta = (gain + jnp.swapaxes(gain, 1, 2)).reshape(num_starts, -1)
  best = jnp.argmax(delta, axis=-1)
  best_delta = jnp.max(delta, axis=-1)
  accept = best_delta > 1e-6 * (1.0 + jnp.abs(best_delta))
  a, b = best // num_layers, best % num_layers
  starts = jnp.arange(num_starts)
  i, j = who[starts, a, b], who[starts, b, a]
  clients = jnp.arange(num_clients)[None, :, None]
  layer = jnp.arange(num_layers)[None, None, :]
  col_a, col_b = layer == a[:, None, None], layer == b[:, None, None]
  at_i, at_j = clients == i[:, None, None], clients == j[:, None, None]
  return _apply(masks, accept, (at_i & col_a) | (at_j & col_b), (at_i & col_b) | (at_j & col_a))


def _apply(masks: jax.Array, accept: jax.Array, leave: jax.Array, join: jax.Array):
  """A coordinated move's result: the cells in ``leave`` dropped and those in
  ``join`` taken, in the starts that ``accept`` it (bool[P]).

  Returns:
    ``(masks, counts, changed bool)``.
  """
  masks = jnp.where(accept[:, None, None], (masks & ~leave) | join, masks)
  return masks, counts_of(masks), jnp.any(accept)


def _coordinated_moves(prob: Problem, masks: jax.Array, counts: jax.Array):
  """Transfers, then (``lam < 0`` only, see :func:`handover_step`) a
  handover, or else a swap."""
  masks, counts, moved = transfer_step(prob, masks, counts)
  return jax.lax.cond((prob.lam < 0) & ~moved, _spreading_moves,
                      lambda p, mk, c: (mk, c, moved), prob, masks, counts)


def _spreading_moves(prob: Problem, masks: jax.Array, counts: jax.Array):
  masks, counts, handed = handover_step(prob, masks, counts)
  return jax.lax.cond(handed, lambda p, mk, c: (mk, c, handed), swap_step,
                      prob, masks, counts)


def _no_move(prob: Problem, masks: jax.Array, counts: jax.Array):
  del prob
  return masks, counts, jnp.bool_(False)


def sweep(prob: Problem, masks: jax.Array, counts: jax.Array):
  """One climbing step: client moves (joint where it fits in memory, else
  sequential), a column sweep, and coordinated moves (transfers; handovers
  and swaps when ``lam < 0``) only at a fixed point of both.

  Returns:
    ``(masks, counts, changed bool)``.
  """
  step = jacobi_step if prob.use_jacobi else client_sweep
  masks, counts, changed_c = step(prob, masks, counts)
  masks, counts, changed_l = layer_sweep(prob, masks, counts)
  stuck = ~(changed_c | changed_l)
  masks, counts, changed_t = jax.lax.cond(
      stuck, _coordinated_moves, _no_move, prob, masks, counts)
  return masks, counts, changed_c | changed_l | changed_t
