"""Server state and the round factory: one jitted function per round.

``round_fn(state, round_data, key) -> (state, metrics)`` is a sequence of
named top-level steps, each vectorising clients through
:func:`scan_client_chunks` (a ``lax.scan`` over chunks of ``client_chunk``
clients, vmapped inside):

1. :func:`scores_step`: the sampled clients' per-layer scores at theta^t
   (score-based strategies, on re-selection rounds only; :func:`score_pass_step`
   runs it or the pass shared with the diagnostics);
2. :func:`selection_step`: masks ``bool[M, K]`` from a baseline or the P1
   solver;
3. :func:`train_step`: local training, each chunk's deltas added straight
   into the aggregation sums (memory does not grow with M). A client update
   works on its variant's trainable subtree only (common leaves + candidate
   groups); with ``backprop_cut`` clients are grouped by mask and each chunk
   runs the cheapest variant covering its masks, whose backward pass stops
   below the chunk's lowest layer;
4. :func:`server_update_step`: per-layer masked aggregation
   (``aggregate.finalize``) and the server optimizer;
5. :func:`diagnostics_step`: the convergence bound's terms at theta^t
   (optional; diagnostics.py). With ``shares_score_pass`` one gradient pass
   (:func:`shared_grads_step`) serves the scores and the diagnostics.
   Otherwise runs compile them as a program of their own
   (:func:`make_diagnostics_fn`, round_programs.py), called on diagnosed
   rounds only, and build the round with ``diagnostics=False``.

The static pieces the steps share (settings, loss, variants, pass factories)
are a :class:`round_parts.RoundParts`, built once by ``make_round_parts``.

Masks, lambda, budgets and client data are arrays in ``round_data``: new
values never recompile. The client axis of each chunk can be sharded over a
device mesh (``client_sharding``); XLA then runs the chunk's clients on
different devices and turns the aggregation sums into all-reduces.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedsel_jax import aggregate
# Re-exported: the round's chunk machinery (callers use federated.scan_client_chunks).
from fedsel_jax.chunks import group_order
from fedsel_jax.chunks import padded_clients  # noqa: F401
from fedsel_jax.chunks import pick_variant
from fedsel_jax.chunks import scan_client_chunks
from fedsel_jax.chunks import trace_once
from fedsel_jax.chunks import variant_cost  # noqa: F401
from fedsel_jax import diagnostics
from fedsel_jax import scores as scores_lib
from fedsel_jax import selection
# Re-exported: the round's static parts (callers use federated.RoundParts, ...).
from fedsel_jax.round_parts import make_round_parts
from fedsel_jax.round_parts import RoundParts
# Re-exported: the strategy table and the static settings (callers use federated.*).
from fedsel_jax.strategies import RoundSettings
from fedsel_jax.strategies import select_masks
from fedsel_jax.strategies import selection_mode  # noqa: F401
from fedsel_jax.strategies import STRATEGIES  # noqa: F401

PyTree = Any

@flax.struct.dataclass
class ServerState:
  """Everything a run carries from round to round (arrays only).

  Attributes:
    params: the global model theta^t (float32).
    opt_state: the server optimizer's state.
    round: int32 scalar, rounds done.
    client_masks: bool[N, K], each client's last mask (kept between
      re-selections, ``selection.sel_gap``).
    seen: bool[N], whether the client has a mask yet.
  """

  params: PyTree
  opt_state: Any
  round: jax.Array
  client_masks: jax.Array
  seen: jax.Array


def init_server_state(params: PyTree, server_opt: optax.GradientTransformation,
                      num_clients: int, num_candidates: int) -> ServerState:
  return ServerState(params=params, opt_state=server_opt.init(params),
                     round=jnp.zeros((), jnp.int32),
                     client_masks=jnp.zeros((num_clients, num_candidates), bool),
                     seen=jnp.zeros((num_clients,), bool))


def _client_data(rd: dict) -> dict:
  return {f: rd[f] for f in ("x", "y", "mask", "num_examples")}


def client_weights(rd: dict) -> jax.Array:
  """f32[Mp]: each slot's n_i (0 for padding slots), the aggregation's weights."""
  return jnp.where(rd["valid"], rd["num_examples"], 0).astype(jnp.float32)


def scores_step(parts: RoundParts, params: PyTree, rd: dict, need: jax.Array,
                score_key: jax.Array) -> jax.Array | None:
  """f32[Mp, K] per-layer scores at theta^t (None for strategies without scores).

  Skipped (zeros) when no sampled client needs a new mask this round.
  """
  kind = parts.settings.score_kind
  if kind is None:
    return None
  ids = rd["client_ids"]
  mp, k = ids.shape[0], parts.k
  stats_fn = parts.grad_stats_fn(rd["mask"].shape[1], scores_lib.VARIANCE.get(kind))

  def client_scores(p, c):
    stats = stats_fn(p, c["data"], c["key"])
    return scores_lib.scores_from_stats(kind, stats, p, parts.index, k)

  def compute(_):
    keys = jax.vmap(lambda i: jax.random.fold_in(score_key, i))(ids)
    _, out = scan_client_chunks(client_scores, params, dict(data=_client_data(rd), key=keys),
                                parts.chunk_size(mp), constrain=parts.constrain,
                                sizes_of=parts.score_sizes(rd["mask"].shape[1]))
    return out

  return jax.lax.cond(jnp.any(need), compute, lambda _: jnp.zeros((mp, k), jnp.float32), None)


def selection_step(parts: RoundParts, state: ServerState, rd: dict, scores: jax.Array | None,
                   need: jax.Array, sel_key: jax.Array) -> tuple[jax.Array, dict]:
  """Masks bool[Mp, K] of the round (fresh where needed, else kept) and their metrics."""
  ids, valid = rd["client_ids"], rd["valid"]
  old = jnp.take(state.client_masks, ids, axis=0, mode="fill", fill_value=False)
  fresh = select_masks(parts.settings, scores, parts.costs, rd["budgets"], rd["lam"], valid,
                       sel_key, ids, parts.backward)
  masks = jnp.where(need[:, None], fresh, old) & valid[:, None]
  metrics: dict[str, jax.Array] = {}
  if scores is not None:
    metrics["scores"] = scores
    metrics["objective"] = selection.p1_objective(masks, selection.normalize_scores(scores),
                                                  rd["lam"], client_valid=valid)
  metrics["scored"] = need & (scores is not None)  # clients that sent scores
  metrics["penalty"] = selection.p1_penalty(masks, rd["lam"], client_valid=valid)
  # Disagreeing client pairs, sum_l S_l (M - S_l): comparable across lambdas.
  metrics["disagreement"] = selection.p1_penalty(masks, 1.0, client_valid=valid)
  return masks, metrics


def train_step(parts: RoundParts, params: PyTree, rd: dict, masks: jax.Array,
               client_keys: jax.Array,
               weights: jax.Array) -> tuple[aggregate.AggState, jax.Array, jax.Array]:
  """Local training of every client, streamed chunk by chunk into the aggregation.

  With several client-update variants (``backprop_cut``) the clients are
  grouped by :func:`group_order` and each chunk runs the cheapest variant
  that covers its masks (:func:`pick_variant`): its backward pass stops
  below the chunk's lowest layer and only its groups get gradients.

  A client whose loss or delta is not finite is left out of the sums
  (:func:`aggregate.drop_nonfinite`).

  Returns:
    ``(agg, losses f32[Mp], finite bool[Mp])``: aggregation sums, each slot's
    mean loss and whether its update was finite (and so aggregated).
  """
  k, mp = parts.k, masks.shape[0]
  several = len(parts.updates) > 1
  clients = dict(data=_client_data(rd), masks=masks, keys=client_keys, weights=weights)
  fns = [lambda p, c, u=u: u(p, c["data"], c["masks"], c["keys"]) for u in parts.updates]

  def combine(agg, res, c):
    ok = aggregate.finite_clients(res.delta, res.loss)
    delta, chunk_masks, chunk_weights = aggregate.drop_nonfinite(res.delta, c["masks"],
                                                                 c["weights"], ok)
    agg = aggregate.accumulate(agg, delta, chunk_masks, chunk_weights, parts.index)
    return agg, (res.loss, ok)

  table = parts.variant_table()
  agg, (losses, ok) = scan_client_chunks(
      fns, params, clients, parts.chunk_size(mp), init=aggregate.init_aggregation(params, k),
      combine=combine, branch=(lambda c: pick_variant(table, c["masks"], c["weights"]))
      if several else None, constrain=parts.constrain,
      order=group_order(masks, rd["valid"]) if several else None)
  return agg, losses, ok


def shared_grads_step(parts: RoundParts, params: PyTree, rd: dict, need: jax.Array,
                      diag_key: jax.Array, score_key: jax.Array
                      ) -> tuple[jax.Array, PyTree, jax.Array] | None:
  """``(losses f32[Mp], grads [Mp, ...], scores f32[Mp, K])`` of the sampled clients at
  theta^t when one pass serves scores and diagnostics (``settings.shares_score_pass``),
  else None.

  With the ``score`` estimator the pass is the score pass itself (same
  batches, same keys, so the scores and the training do not depend on the
  diagnostics); otherwise the ``full`` estimator's pass, scored from its
  mean gradients. Skipped (zeros) on rounds that need neither; the scores
  are zeros on rounds where no client needs a new mask.
  """
  settings = parts.settings
  if not settings.shares_score_pass:
    return None
  ids = rd["client_ids"]
  chunk = parts.chunk_size(ids.shape[0])
  kind = settings.score_kind
  if settings.diag_estimator == "score":
    stats_fn = parts.grad_stats_fn(rd["mask"].shape[1], scores_lib.VARIANCE.get(kind))

    def client(p, c):
      stats = stats_fn(p, c["data"], c["key"])
      return (stats["loss"], stats["mean_grad"],
              scores_lib.scores_from_stats(kind, stats, p, parts.index, parts.k))

    keys = jax.vmap(lambda i: jax.random.fold_in(score_key, i))(ids)
    run = lambda _: scan_client_chunks(client, params, dict(data=_client_data(rd), key=keys),
                                       chunk, constrain=parts.constrain,
                                       sizes_of=parts.score_sizes(rd["mask"].shape[1]))[1]
  else:
    grads_fn, _ = parts.diagnose_fns(rd["mask"].shape[1])

    def run(_):
      losses, grads = grads_fn(params, rd, diagnostics.client_keys(diag_key, ids), chunk)
      scores = jax.vmap(lambda g: scores_lib.scores_from_stats(
          kind, {"mean_grad": g}, params, parts.index, parts.k))(grads)
      return losses, grads, scores
  run, shapes = trace_once(run, None)
  zeros = lambda _: jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  losses, grads, scores = jax.lax.cond(jnp.any(need) | rd.get("diagnose", True), run, zeros,
                                       None)
  return losses, grads, jnp.where(jnp.any(need), scores, 0.)


def score_pass_step(parts: RoundParts, params: PyTree, rd: dict, need: jax.Array,
                    diag_key: jax.Array, score_key: jax.Array
                    ) -> tuple[jax.Array | None, tuple | None]:
  """``(scores, shared)``: the round's scores (:func:`scores_step`, or the pass
  shared with the diagnostics, :func:`shared_grads_step`) and that shared
  pass's ``(losses, grads)`` for :func:`diagnostics_step` (None if not shared)."""
  shared = shared_grads_step(parts, params, rd, need, diag_key, score_key)
  if shared is None:
    return scores_step(parts, params, rd, need, score_key), None
  losses, grads, scores = shared
  return scores, (losses, grads)


def diagnostics_step(parts: RoundParts, params: PyTree, rd: dict, masks: jax.Array,
                     weights: jax.Array, diag_key: jax.Array,
                     shared: tuple | None, aggregated: jax.Array) -> dict:
  """The bound's terms at theta^t (diagnostics.py); NaN when ``rd['diagnose']`` is False.

  ``aggregated``: bool[Mp], the clients whose update entered the aggregate.
  """
  _, diagnose = parts.diagnose_fns(rd["mask"].shape[1])
  return diagnostics.diagnose_round(diagnose, params, rd, masks, weights, diag_key,
                                    parts.chunk_size(masks.shape[0]),
                                    population=parts.settings.diag_population, grads=shared,
                                    aggregated=aggregated)


def server_update_step(state: ServerState, agg: aggregate.AggState, finite: jax.Array,
                       valid: jax.Array, index: PyTree,
                       server_opt: optax.GradientTransformation
                       ) -> tuple[PyTree, Any, jax.Array, jax.Array]:
  """``(params, opt_state, applied, update_sq)`` after per-layer aggregation
  and the server step (``update_sq``: the squared norm of the model's change).

  A round with no finite client update (``finite & valid`` nowhere), or whose
  step would make the model non-finite, changes neither the model nor the
  server optimizer (``applied`` False).
  """
  mean_delta, covered = aggregate.finalize(agg, index)
  new_params, opt_state = aggregate.server_step(state.params, state.opt_state, mean_delta,
                                                covered, server_opt)
  (new_params, opt_state), applied = aggregate.keep_if_finite(
      (new_params, opt_state), (state.params, state.opt_state), jnp.any(finite & valid))
  update_sq = diagnostics.tree_sq_norm(
      jax.tree_util.tree_map(jnp.subtract, new_params, state.params))
  return new_params, opt_state, applied, update_sq


def next_state(state: ServerState, ids: jax.Array, masks: jax.Array, params: PyTree,
               opt_state: Any) -> ServerState:
  """The state after the round: new model, and the sampled clients' masks kept."""
  return ServerState(params=params, opt_state=opt_state, round=state.round + 1,
                     client_masks=state.client_masks.at[ids].set(masks, mode="drop"),
                     seen=state.seen.at[ids].set(True, mode="drop"))


def training_metrics(losses: jax.Array, p: jax.Array, good: jax.Array, valid: jax.Array,
                     finite: jax.Array) -> dict:
  """The round's loss metrics: ``train_loss`` (the p-weighted mean over the
  aggregated clients, NaN if none), per-slot losses and which slots were aggregated."""
  p_good = jnp.where(good, p, 0.)
  train_loss = jnp.where(jnp.any(good), jnp.sum(jnp.where(good, p * losses, 0.))
                         / jnp.maximum(jnp.sum(p_good), 1e-30), jnp.nan)
  return dict(train_loss=train_loss, client_loss=losses, client_aggregated=good,
              clients_nonfinite=jnp.sum(valid & ~finite))


def diagnostics_key(key: jax.Array, round_idx: jax.Array) -> jax.Array:
  """The diagnostics' key of round ``round_idx`` (fused or separate, the same)."""
  return jax.random.fold_in(jax.random.fold_in(key, round_idx), 0xD1A6)


def make_diagnostics_fn(loss_fn: Callable, index: PyTree, num_candidates: int,
                        client_opt: optax.GradientTransformation, costs: np.ndarray,
                        settings: RoundSettings, *,
                        client_sharding: jax.sharding.Sharding | None = None,
                        backward: np.ndarray | None = None) -> Callable:
  """The round's diagnostics as a function of their own (unjitted).

  ``diagnose_fn(params, round_data, masks, aggregated, key, round_idx) -> dict``
  gives what :func:`diagnostics_step` adds to a fused round's metrics, at
  theta^t = ``params`` (the state's params *before* the round), for the
  round's ``masks`` and ``aggregated`` (its metrics' ``masks`` and
  ``client_aggregated``), with the round's ``key`` and ``round_idx`` (the
  state's ``round`` before it). Compiled apart from a round built with
  ``diagnostics=False``, the two programs give a fused round's metrics, and
  only diagnosed rounds run (or load) the second one. Not for settings whose
  score pass the diagnostics share (``shares_score_pass``): that pass
  belongs to the round.
  """
  if settings.shares_score_pass:
    raise ValueError("the diagnostics share the score pass: compile them with the round")
  parts = make_round_parts(loss_fn, index, num_candidates, client_opt, costs, settings,
                           client_sharding, backward)

  def diagnose_fn(params: PyTree, rd: dict, masks: jax.Array, aggregated: jax.Array,
                  key: jax.Array, round_idx: jax.Array) -> dict:
    return diagnostics_step(parts, params, rd, masks, client_weights(rd),
                            diagnostics_key(key, round_idx), None, aggregated)

  return diagnose_fn


def make_round_fn(loss_fn: Callable, index: PyTree, num_candidates: int,
                  client_opt: optax.GradientTransformation,
                  server_opt: optax.GradientTransformation, costs: np.ndarray,
                  settings: RoundSettings, *,
                  client_sharding: jax.sharding.Sharding | None = None,
                  backward: np.ndarray | None = None) -> Callable:
  """Builds the (unjitted) round function.

  Args:
    loss_fn: ``client.make_loss_fn(module.apply)``.
    index: static leaf -> group table (``masks.group_index``).
    num_candidates: K.
    client_opt: local optimizer; server_opt: server optimizer.
    costs: f32[K] layer costs for the budgets.
    settings: static round settings.
    client_sharding: optional sharding of a chunk's client axis (a
      ``NamedSharding`` with ``PartitionSpec('clients')``).
    backward: f32[K + 1] or None: depth-aware budgets (``selection.cost =
      'flops'``; ``costs`` are then weight-gradient costs).

  Returns:
    ``round_fn(state, round_data, key) -> (state, metrics)`` where
    round_data holds, for Mp client slots (M real + padding):
    ``client_ids int32[Mp]`` (padding slots: N, out of range),
    ``valid bool[Mp]``, ``x [Mp, n_max, ...]``, ``y int32[Mp, n_max]`` (or
    ``chunks.Deferred`` slot ids that each chunk scan gathers, device_data),
    ``mask bool[Mp, n_max]``, ``num_examples int32[Mp]``,
    ``budgets f32[Mp]``, ``lam f32``, ``reselect bool`` and optionally
    ``diagnose bool`` (estimate E1/E2 this round; default True) and, in
    population mode, ``population`` (every client's data,
    :func:`diagnostics.diagnose_round`).
  """
  parts = make_round_parts(loss_fn, index, num_candidates, client_opt, costs, settings,
                           client_sharding, backward)

  def round_fn(state: ServerState, rd: dict, key: jax.Array):
    ids, valid = rd["client_ids"], rd["valid"]
    parts.chunk_size(ids.shape[0])
    sel_key, train_key, score_key = jax.random.split(jax.random.fold_in(key, state.round), 3)
    client_keys = jax.vmap(lambda i: jax.random.fold_in(train_key, i))(ids)
    weights = client_weights(rd)
    p = weights / jnp.maximum(jnp.sum(weights), 1.)
    seen = jnp.take(state.seen, ids, mode="fill", fill_value=False)
    need = (rd["reselect"] | ~seen) & valid

    diag_key = diagnostics_key(key, state.round)
    scores, shared = score_pass_step(parts, state.params, rd, need, diag_key, score_key)
    masks, metrics = selection_step(parts, state, rd, scores, need, sel_key)
    agg, losses, finite = train_step(parts, state.params, rd, masks, client_keys, weights)
    new_params, opt_state, applied, metrics["update_sq"] = server_update_step(
        state, agg, finite, valid, index, server_opt)
    if settings.diagnostics:
      metrics.update(diagnostics_step(parts, state.params, rd, masks, weights, diag_key, shared,
                                      finite & valid))
    good = finite & valid
    metrics.update(training_metrics(losses, p, good, valid, finite), masks=masks,
                   coverage=agg.coverage, round_skipped=~applied)
    return next_state(state, ids, masks, new_params, opt_state), metrics

  return round_fn
