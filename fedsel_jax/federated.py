"""Server state and the round factory: one jitted function per round.

``round_fn(state, round_data, key) -> (state, metrics)``:

1. scores: the sampled clients' per-layer scores at theta^t (score-based
   strategies, on re-selection rounds only);
2. selection: masks ``bool[M, K]`` from a baseline or the P1 solver;
3. local training: clients in chunks of ``client_chunk``, vmapped inside a
   ``lax.scan`` over chunks, each chunk's deltas added straight into the
   aggregation sums (memory does not grow with M); with ``backprop_cut``
   clients are sorted by their lowest selected layer and each chunk runs a
   variant whose backward pass stops below its lowest layer;
4. per-layer masked aggregation and the server optimizer;
5. diagnostics: E1/E2 from the clients' gradients at theta^t (optional).

Masks, lambda, budgets and client data are arrays in ``round_data``: new
values never recompile. The client axis of each chunk can be sharded over a
device mesh (``client_sharding``); XLA then runs the chunk's clients on
different devices and turns the aggregation sums into all-reduces.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedsel_jax import aggregate
from fedsel_jax import client as client_lib
from fedsel_jax import diagnostics
from fedsel_jax import masks as masks_lib
from fedsel_jax import scores as scores_lib
from fedsel_jax import selection

PyTree = Any

# strategy -> (score kind or None, solve P1 with the penalty)
STRATEGIES: dict[str, tuple[str | None, bool]] = {
    "full": (None, False), "head": (None, False), "top": (None, False),
    "bottom": (None, False), "both": (None, False), "random": (None, False),
    "gradnorm": ("gradnorm", False), "rgn": ("rgn", False), "snr": ("snr", False),
    "proposed": ("gradnorm", True), "rgn_p1": ("rgn", True), "snr_p1": ("snr", True),
}


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


@dataclasses.dataclass(frozen=True)
class RoundSettings:
  """Static settings of a round (changing one recompiles)."""

  strategy: str
  score: str = "gradnorm"
  local_steps: int = 5
  batch_size: int = 32
  sel_batches: int = 0
  client_chunk: int = 0          # 0 = all sampled clients in one vmap
  backprop_cut: bool = False
  diagnostics: bool = True
  solver_starts: int = 4
  unroll: bool = False           # unroll each client's step/batch loops (client.py)

  def __post_init__(self):
    if self.strategy not in STRATEGIES:
      raise ValueError(f"selection.strategy must be one of {list(STRATEGIES)}, "
                       f"got {self.strategy!r}")
    if self.score not in scores_lib.SCORES:
      raise ValueError(f"selection.score must be one of {list(scores_lib.SCORES)}, "
                       f"got {self.score!r}")

  @property
  def score_kind(self) -> str | None:
    kind, _ = STRATEGIES[self.strategy]
    if self.strategy == "proposed" or (kind == "snr" and self.score in scores_lib.VARIANCE):
      return self.score
    return kind


def padded_clients(m: int, chunk: int) -> int:
  """Number of client slots after padding M up to a multiple of the chunk."""
  chunk = m if chunk <= 0 else min(chunk, m)
  return -(-m // chunk) * chunk


def _chunks(tree: PyTree, chunk: int) -> PyTree:
  return jax.tree_util.tree_map(lambda a: a.reshape((-1, chunk) + a.shape[1:]), tree)


def select_masks(settings: RoundSettings, scores: jax.Array | None, costs: jax.Array,
                 budgets: jax.Array, lam: jax.Array, valid: jax.Array,
                 key: jax.Array, client_ids: jax.Array) -> jax.Array:
  """bool[M, K] masks of the sampled clients for the configured strategy."""
  name = settings.strategy
  if name == "head":
    return jnp.zeros((budgets.shape[0], costs.shape[0]), bool)
  if name == "random":
    return selection.select_random(costs, budgets, key, client_ids=client_ids,
                                   client_valid=valid)
  if name in ("full", "top", "bottom", "both"):
    return getattr(selection, f"select_{name}")(costs, budgets, client_valid=valid)
  normalised = selection.normalize_scores(scores)
  if STRATEGIES[name][1]:
    out = selection.solve_p1(normalised, costs, budgets, lam, client_valid=valid,
                             num_starts=settings.solver_starts)
  else:
    out = selection.select_topk_scores(normalised, costs, budgets, client_valid=valid)
  return out & valid[:, None]


def make_round_fn(loss_fn: Callable, index: PyTree, num_candidates: int,
                  client_opt: optax.GradientTransformation,
                  server_opt: optax.GradientTransformation, costs: np.ndarray,
                  settings: RoundSettings, *,
                  client_sharding: jax.sharding.Sharding | None = None) -> Callable:
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

  Returns:
    ``round_fn(state, round_data, key) -> (state, metrics)`` where
    round_data holds, for Mp client slots (M real + padding):
    ``client_ids int32[Mp]`` (padding slots: N, out of range),
    ``valid bool[Mp]``, ``x [Mp, n_max, ...]``, ``y int32[Mp, n_max]``,
    ``mask bool[Mp, n_max]``, ``num_examples int32[Mp]``,
    ``budgets f32[Mp]``, ``lam f32``, ``reselect bool`` and optionally
    ``diagnose bool`` (estimate E1/E2 this round; default True).
  """
  k = num_candidates
  costs = jnp.asarray(costs, jnp.float32)
  # `head` trains no candidate layer: a static cut at K skips the encoder's
  # backward pass entirely, whatever backprop_cut says.
  cuts = range(k + 1) if settings.backprop_cut else (k if settings.strategy == "head" else 0,)
  updates = [client_lib.make_client_update(loss_fn, client_opt, index,
                                           local_steps=settings.local_steps,
                                           batch_size=settings.batch_size, cut=c,
                                           unroll=settings.unroll) for c in cuts]
  chunk_updates = [jax.vmap(u, in_axes=(None, 0, 0, 0)) for u in updates]
  score_kind = settings.score_kind

  def constrain(tree):
    if client_sharding is None:
      return tree
    return jax.tree_util.tree_map(lambda a: jax.lax.with_sharding_constraint(a, client_sharding),
                                  tree)

  def stats_fn(n_max, variance):
    fn = scores_lib.make_grad_stats_fn(
        loss_fn, index, k, batch_size=settings.batch_size,
        num_batches=scores_lib.num_score_batches(n_max, settings.batch_size,
                                                 settings.sel_batches),
        variance=variance, unroll=settings.unroll)
    return jax.vmap(fn, in_axes=(None, 0, 0))

  def round_fn(state: ServerState, rd: dict, key: jax.Array):
    ids, valid = rd["client_ids"], rd["valid"]
    mp = ids.shape[0]
    chunk = mp if settings.client_chunk <= 0 else min(settings.client_chunk, mp)
    if mp % chunk:
      raise ValueError(f"{mp} client slots do not split into chunks of {chunk}; "
                       "pad with federated.padded_clients")
    data = {f: rd[f] for f in ("x", "y", "mask", "num_examples")}
    sel_key, train_key, score_key = jax.random.split(jax.random.fold_in(key, state.round), 3)
    client_keys = jax.vmap(lambda i: jax.random.fold_in(train_key, i))(ids)
    weights = jnp.where(valid, rd["num_examples"], 0).astype(jnp.float32)
    p = weights / jnp.maximum(jnp.sum(weights), 1.)
    params = state.params

    # 1-2. Scores and selection.
    old = jnp.take(state.client_masks, ids, axis=0, mode="fill", fill_value=False)
    seen = jnp.take(state.seen, ids, mode="fill", fill_value=False)
    need = (rd["reselect"] | ~seen) & valid
    metrics: dict[str, jax.Array] = {}
    if score_kind is not None:
      score_clients = stats_fn(rd["mask"].shape[1], scores_lib.VARIANCE.get(score_kind))
      score_keys = jax.vmap(lambda i: jax.random.fold_in(score_key, i))(ids)

      def compute_scores(_):
        def body(_, inputs):
          d, kk = inputs
          stats = score_clients(params, constrain(d), kk)
          return None, jax.vmap(lambda s: scores_lib.scores_from_stats(
              score_kind, s, params, index, k))(stats)
        _, out = jax.lax.scan(body, None, (_chunks(data, chunk), _chunks(score_keys, chunk)))
        return out.reshape(mp, k)

      scores = jax.lax.cond(jnp.any(need), compute_scores,
                            lambda _: jnp.zeros((mp, k), jnp.float32), None)
      metrics["scores"] = scores
    else:
      scores = None
    fresh = select_masks(settings, scores, costs, rd["budgets"], rd["lam"], valid, sel_key,
                         ids)
    masks = jnp.where(need[:, None], fresh, old) & valid[:, None]
    if scores is not None:
      normalised = selection.normalize_scores(scores)
      metrics["objective"] = selection.p1_objective(masks, normalised, rd["lam"],
                                                    client_valid=valid)
    metrics["penalty"] = selection.p1_penalty(masks, rd["lam"], client_valid=valid)
    # Disagreeing client pairs, sum_l S_l (M - S_l): comparable across lambdas.
    metrics["disagreement"] = selection.p1_penalty(masks, 1.0, client_valid=valid)

    # 3. Local training, streamed into the aggregation.
    lowest = client_lib.lowest_selected(masks)
    order = jnp.argsort(jnp.where(valid, lowest, k + 1)) if settings.backprop_cut else \
        jnp.arange(mp)
    train = dict(data=jax.tree_util.tree_map(lambda a: a[order], data), masks=masks[order],
                 keys=client_keys[order], weights=weights[order])

    def train_chunk(agg, c):
      d = constrain(c["data"])
      if settings.backprop_cut:
        cut = jnp.min(jnp.where(c["weights"] > 0, client_lib.lowest_selected(c["masks"]), k))
        res = jax.lax.switch(cut, chunk_updates, params, d, c["masks"], c["keys"])
      else:
        res = chunk_updates[0](params, d, c["masks"], c["keys"])
      agg = aggregate.accumulate(agg, res.delta, c["masks"], c["weights"], index)
      return agg, res.loss

    agg, losses = jax.lax.scan(train_chunk, aggregate.init_aggregation(params, k),
                               _chunks(train, chunk))
    losses = losses.reshape(mp)[jnp.argsort(order)]

    # 4. Aggregation and server step.
    mean_delta, covered = aggregate.finalize(agg, index)
    new_params, opt_state = aggregate.server_step(params, state.opt_state, mean_delta,
                                                  covered, server_opt)

    # 5. Diagnostics at theta^t.
    if settings.diagnostics:
      grad_clients = stats_fn(rd["mask"].shape[1], None)

      def diag_chunk(sums, c):
        stats = grad_clients(params, constrain(c["data"]), c["keys"])
        return diagnostics.accumulate_grads(sums, stats["mean_grad"], c["masks"], c["p"],
                                            index), None

      def diagnose(_):
        sums, _ = jax.lax.scan(diag_chunk, diagnostics.init_grad_sums(params, k),
                               _chunks(dict(data=data, masks=masks, p=p, keys=client_keys),
                                       chunk))
        return diagnostics.error_terms(sums, index)

      # NaN marks rounds without diagnostics (``diagnose`` False saves a pass).
      skipped = jax.tree_util.tree_map(lambda s: jnp.full(s.shape, jnp.nan, s.dtype),
                                       jax.eval_shape(diagnose, None))
      metrics.update(jax.lax.cond(rd.get("diagnose", True), diagnose, lambda _: skipped, None))

    metrics.update(train_loss=jnp.sum(p * losses), client_loss=losses, masks=masks,
                   coverage=agg.coverage)
    new_state = ServerState(
        params=new_params, opt_state=opt_state, round=state.round + 1,
        client_masks=state.client_masks.at[ids].set(masks, mode="drop"),
        seen=state.seen.at[ids].set(True, mode="drop"))
    return new_state, metrics

  return round_fn


def make_sweep_fn(round_fn: Callable) -> Callable:
  """Vectorises a round over L values of lambda: one program, L runs.

  ``sweep_fn(states, round_data, lams f32[L], key) -> (states, metrics)``
  where ``states`` has a leading axis L (see :func:`stack_states`) and every
  metric gains a leading axis L. All runs see the same clients, data and
  keys; only lambda (and therefore the masks and the models) differ. Build
  ``round_fn`` with ``backprop_cut=False``: under vmap the per-chunk switch
  would run every branch.
  """

  def one(state, rd, lam, key):
    return round_fn(state, dict(rd, lam=lam), key)

  return jax.vmap(one, in_axes=(0, None, 0, None))


def stack_states(state: ServerState, num: int) -> ServerState:
  """``num`` copies of ``state`` along a new leading axis (for sweeps)."""
  return jax.tree_util.tree_map(lambda a: jnp.broadcast_to(a, (num,) + jnp.shape(a)), state)
