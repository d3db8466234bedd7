"""The static pieces a round's steps share (:class:`RoundParts`) and their factory.

``federated.make_round_fn`` builds them once: the round settings, the loss,
the leaf -> group table, the layer costs and one client-update variant per
set of trainable groups (``fl.backprop_cut``), plus the pass factories
(scores, diagnostics) the steps call.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedsel_jax import batches as batches_lib
from fedsel_jax import client as client_lib
from fedsel_jax import diagnostics
from fedsel_jax import scores as scores_lib
from fedsel_jax.chunks import identity
from fedsel_jax.chunks import scan_client_chunks
from fedsel_jax.strategies import RoundSettings

PyTree = Any


@dataclasses.dataclass(frozen=True)
class RoundParts:
  """Static pieces a round's steps share (built once by ``federated.make_round_fn``).

  Attributes:
    settings: the static round settings.
    loss_fn: ``loss(params, x, y, weights, key)``.
    index: static leaf -> group table.
    k: number of candidate layers K.
    costs: f32[K] layer costs.
    backward: f32[K + 1] or None: depth-aware budgets (``costs`` are then
      weight-gradient costs; see selection).
    variants: static candidate-group sets, one per client-update variant;
      with ``backprop_cut`` the sets ``{c, ..., K-1}`` for c in
      ``settings.cut_levels`` (default 0..K; 0 is always included), else the
      single set of every group (none for ``head``). Fewer levels compile
      faster; a chunk then runs the cheapest level at or below its lowest
      layer.
    updates: per-client ``client_update`` of each variant: it trains only
      the common leaves and its set (``client.make_client_update(blocks=)``).
    constrain: sharding constraint of a chunk's client axis.
    client_opt: the local optimizer the updates were built with.
  """

  settings: RoundSettings
  loss_fn: Callable
  index: PyTree
  k: int
  costs: jax.Array
  variants: tuple[tuple[int, ...], ...]
  updates: tuple[Callable, ...]
  constrain: Callable = identity
  backward: jax.Array | None = None
  client_opt: optax.GradientTransformation | None = None

  def variant_table(self) -> np.ndarray:
    """bool[V, K]: the candidate groups each variant trains."""
    table = np.zeros((len(self.variants), self.k), bool)
    for v, blocks in enumerate(self.variants):
      table[v, list(blocks)] = True
    return table

  def chunk_size(self, mp: int) -> int:
    chunk = mp if self.settings.client_chunk <= 0 else min(self.settings.client_chunk, mp)
    if mp % chunk:
      raise ValueError(f"{mp} client slots do not split into chunks of {chunk}; "
                       "pad with federated.padded_clients")
    return chunk

  def diagnose_fns(self, n_max: int) -> tuple[Callable, Callable]:
    """``diagnostics.make_diagnose_fn`` for this round's settings.

    With the ``score`` estimator the gradients come from the score pass; the
    power iteration's Hessian-vector products then use a ``sampled`` draw of
    as many batches as the scores (docs/diagnostics.md).
    """
    s = self.settings
    estimator, batches = s.diag_estimator, s.diag_batches
    if estimator == "score":
      estimator = "sampled"
      batches = scores_lib.num_score_batches(n_max, s.batch_size, s.sel_batches)
    return diagnostics.make_diagnose_fn(
        self.loss_fn, self.index, self.k,
        scan=functools.partial(scan_client_chunks, constrain=self.constrain),
        batch_size=s.batch_size, n_max=n_max, estimator=estimator,
        batches=batches, power_iters=s.diag_power_iters, unroll=s.unroll)

  def score_sizes(self, n_max: int) -> Callable | None:
    """The score pass's ``sizes_of`` for :func:`scan_client_chunks` (batches.py)."""
    s = self.settings
    return batches_lib.sizes_of(scores_lib.num_score_batches(n_max, s.batch_size,
                                                             s.sel_batches), s.unroll)

  def grad_stats_fn(self, n_max: int, variance: str | None) -> Callable:
    """One client's ``grad_stats(params, data, key)`` (scores.make_grad_stats_fn)."""
    s = self.settings
    return scores_lib.make_grad_stats_fn(
        self.loss_fn, self.index, self.k, batch_size=s.batch_size,
        num_batches=scores_lib.num_score_batches(n_max, s.batch_size, s.sel_batches),
        variance=variance, unroll=s.unroll)


def make_round_parts(loss_fn: Callable, index: PyTree, num_candidates: int,
                     client_opt: optax.GradientTransformation, costs: np.ndarray,
                     settings: RoundSettings,
                     client_sharding: jax.sharding.Sharding | None = None,
                     backward: np.ndarray | None = None) -> RoundParts:
  """The static :class:`RoundParts` of ``federated.make_round_fn``."""
  k = num_candidates
  # `head` trains no candidate layer: the empty variant skips the encoder's
  # backward pass entirely, whatever backprop_cut says.
  if settings.strategy == "head":
    variants = ((),)
  elif settings.backprop_cut:
    levels = settings.cut_levels or tuple(range(k + 1))
    if any(not 0 <= int(c) <= k for c in levels):
      raise ValueError(f"fl.cut_levels must be integers in [0, {k}], got {levels!r}")
    # Level 0 (every group) covers any mask, so every chunk has a variant.
    variants = tuple(tuple(range(c, k)) for c in sorted({0, *map(int, levels)}))
  else:
    variants = (tuple(range(k)),)
  updates = tuple(client_lib.make_client_update(loss_fn, client_opt, index,
                                                local_steps=settings.local_steps,
                                                batch_size=settings.batch_size, blocks=v,
                                                unroll=settings.unroll, dense_delta=False,
                                                gate=settings.grad_gates)
                  for v in variants)

  def constrain(tree):
    return jax.tree_util.tree_map(
        lambda a: jax.lax.with_sharding_constraint(a, client_sharding), tree)

  return RoundParts(settings=settings, loss_fn=loss_fn, index=index, k=k,
                    costs=jnp.asarray(costs, jnp.float32), variants=variants, updates=updates,
                    constrain=identity if client_sharding is None else constrain,
                    backward=None if backward is None else jnp.asarray(backward, jnp.float32),
                    client_opt=client_opt)
