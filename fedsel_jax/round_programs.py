"""A run's round as jitted programs: the training round and, apart, the diagnostics.

The E1/E2 diagnostics (diagnostics.py) run on diagnosed rounds only
(``diagnostics.every``), yet compiled into the round they more than double
the program a run compiles, or loads from the persistent cache, before its
first round (experiments/bench/notes.md). So unless they share the round's
score pass (``RoundSettings.shares_score_pass``: then one pass serves both
and they stay in the round), they are a program of their own
(``federated.make_diagnostics_fn``), called after the round on the params
the round started from; rounds that are not diagnosed neither run nor load
it and get the NaN rows a fused round gives them. The two programs' metrics
equal the fused round's (``tests/test_round_programs.py``), and the training
never depends on whether the diagnostics are on. A diagnosed round keeps a
copy of the params beside the round (the round donates its state), which
``fl.client_chunk='auto'`` counts (:func:`compiled_mb`). Vmapped sweep groups
(vmap_runs.py) keep the fused round.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from fedsel_jax import auto_chunk
from fedsel_jax import device_data
from fedsel_jax import federated
from fedsel_jax.errors import ConfigError


def separate(settings: federated.RoundSettings) -> bool:
  """Whether the diagnostics are a program of their own for these settings."""
  return settings.diagnostics and not settings.shares_score_pass


def round_settings(settings: federated.RoundSettings) -> federated.RoundSettings:
  """The settings the training round is built with (no diagnostics when separate)."""
  return dataclasses.replace(settings, diagnostics=False) if separate(settings) else settings


def client_sharding(config, chunk: int) -> jax.sharding.Sharding | None:
  """Shards each chunk's clients over all devices when ``fl.shard_clients``.

  Uses every device JAX sees: one host's GPUs/TPU cores, or all hosts' after
  ``jax.distributed.initialize()``. ``fl.client_chunk`` must be a multiple
  of the device count.
  """
  if not config.fl.get("shard_clients", False):
    return None
  n = jax.device_count()
  chunk = chunk or config.fl.clients_per_round
  if chunk % n:
    raise ConfigError(f"fl.client_chunk={chunk} must be a multiple of the {n} devices "
                      "when fl.shard_clients=True")
  mesh = jax.make_mesh((n,), ("clients",), axis_types=(jax.sharding.AxisType.Auto,))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("clients"))


def bodies(loss_fn: Callable, index, k: int, client_opt, server_opt, costs: np.ndarray,
           settings: federated.RoundSettings, sharding, backward
           ) -> tuple[Callable, Callable | None]:
  """The unjitted ``(round_fn, diagnose_fn or None)`` of a run's settings."""
  kw = dict(client_sharding=sharding, backward=backward)
  round_fn = federated.make_round_fn(loss_fn, index, k, client_opt, server_opt, costs,
                                     round_settings(settings), **kw)
  if not separate(settings):
    return round_fn, None
  return round_fn, federated.make_diagnostics_fn(loss_fn, index, k, client_opt, costs,
                                                 settings, **kw)


def jit_programs(round_body: Callable, diagnose_body: Callable | None, out=None
                 ) -> tuple[Callable, Callable | None]:
  """Jitted round (donates its state) and diagnostics; ``out``: both outputs' sharding."""
  round_fn = jax.jit(round_body, donate_argnums=0, out_shardings=out)
  return round_fn, None if diagnose_body is None else jax.jit(diagnose_body, out_shardings=out)


def on_store(round_body: Callable, diagnose_body: Callable | None, n_max: int
             ) -> tuple[Callable, Callable | None]:
  """The jitted programs on the device store (``device_data.with_gather``)."""
  return jit_programs(device_data.with_gather(round_body, n_max),
                      None if diagnose_body is None else
                      device_data.with_gather(diagnose_body, n_max))


def compiled_mb(round_fn: Callable, diagnose_fn: Callable | None, state, rd: dict,
                key: jax.Array) -> float:
  """Peak MB (XLA memory analysis) of a run's round, or of a diagnosed round
  with separate diagnostics: the round next to the params copy kept for the
  diagnostics, then the diagnostics next to the new state."""
  mb = auto_chunk.compiled_mb(round_fn.lower(state, rd, key).compile())
  if diagnose_fn is None:
    return mb
  metrics = jax.eval_shape(round_fn, state, rd, key)[1]
  diag = diagnose_fn.lower(*diagnose_args(state.params, state.round, rd, (), metrics,
                                          key)).compile()
  size = lambda tree: sum(x.size * x.dtype.itemsize  # noqa: E731
                          for x in jax.tree_util.tree_leaves(tree)) / 2**20
  return max(mb + size(state.params), auto_chunk.compiled_mb(diag) + size(state))


def diagnose_args(params, round_idx, rd: dict, extra: tuple, metrics: dict,
                  key: jax.Array) -> tuple:
  """The diagnostics program's arguments: theta^t and t (the state before the
  round), the round data (and ``extra``, the device store) and the round's
  masks and aggregated clients from its ``metrics`` (arrays or shapes)."""
  return (params, rd, *extra, metrics["masks"], metrics["client_aggregated"], key, round_idx)


def trace(round_fn: Callable, diagnose_fn: Callable | None, state, rd: dict, key: jax.Array,
          extra: tuple = ()) -> None:
  """Traces a run's programs on round ``rd`` without compiling them (``--check_only``)."""
  metrics = jax.eval_shape(round_fn, state, rd, *extra, key)[1]
  if diagnose_fn is not None:
    jax.eval_shape(diagnose_fn, *diagnose_args(state.params, state.round, rd, extra, metrics,
                                               key))


def run(round_fn: Callable, diagnose_fn: Callable | None, state, rd: dict, key: jax.Array,
        diagnose: bool, extra: tuple = (), nan_shapes: dict | None = None
        ) -> tuple[Any, dict]:
  """``(state, metrics)`` of one round: the round, then (``diagnose``) its diagnostics.

  ``extra``: what both programs take after the round data (the device store).
  Without a separate diagnostics program this is ``round_fn`` alone. On a
  round that is not diagnosed the diagnostics' metrics are NaN, as in a
  fused round; ``nan_shapes`` (a dict the caller keeps) holds their shapes
  once traced. On host round data both programs copy ``rd`` to the device
  (the fused round copied it once); putting it there first would give the
  round a second signature, and so a second compile, on diagnosed rounds.
  """
  if diagnose_fn is None:
    return round_fn(state, rd, *extra, key)
  before = None
  if diagnose:   # the round donates its state: keep theta^t and t for the diagnostics
    before = jax.tree_util.tree_map(jnp.copy, (state.params, state.round))
  new_state, metrics = round_fn(state, rd, *extra, key)
  metrics = dict(metrics)
  if diagnose:
    metrics.update(diagnose_fn(*diagnose_args(*before, rd, extra, metrics, key)))
    return new_state, metrics
  nan_shapes = {} if nan_shapes is None else nan_shapes
  if "shapes" not in nan_shapes:   # traced once, never compiled
    nan_shapes["shapes"] = jax.eval_shape(diagnose_fn, *diagnose_args(
        new_state.params, new_state.round, rd, extra, metrics, key))
  metrics.update(jax.tree_util.tree_map(lambda s: np.full(s.shape, np.nan, s.dtype),
                                        nan_shapes["shapes"]))
  return new_state, metrics
