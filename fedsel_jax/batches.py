"""Loops over a client's minibatches that stop at its last non-empty one.

A full-data pass (``selection.sel_batches=0``, ``diagnostics.estimator='full'``)
has a static ``ceil(n_max / B)`` batches, sized by the federation's largest
client; a client with ``n_i`` real rows needs only ``ceil(n_i / B)`` of them
(its real rows come first, so the rest are empty: weight 0, contributing
exact zeros). :func:`scan_first` runs the body for the first ``count``
batches only. Under ``vmap`` a chunk runs as many iterations as its largest
client needs, so the round's passes sort clients by size
(``chunks.scan_client_chunks(sizes=...)``): chunks of similar clients, and
padding work bounded by one chunk's spread of sizes instead of the
federation's.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

PyTree = Any
CHUNK_AXIS = "fedsel_chunk_clients"   # the vmap axis of a chunk's clients


def scan_first(body: Callable, init: PyTree, xs: PyTree, count: jax.Array,
               unroll: bool = False) -> PyTree:
  """The carry of ``lax.scan(body, init, xs)`` after the first ``count`` steps only.

  Equal to the full scan when the skipped steps leave the carry unchanged
  (empty batches add exact zeros). ``body(carry, x) -> (carry, None)``.
  With ``unroll`` (XLA:CPU convolutions, client.py) or a single step it is
  the static full scan: a dynamic loop cannot be unrolled.
  """
  n = jax.tree_util.tree_leaves(xs)[0].shape[0]
  if unroll or n <= 1:
    return jax.lax.scan(body, init, xs, unroll=unroll)[0]

  def step(i, carry):
    return body(carry, jax.tree_util.tree_map(lambda a: a[i], xs))[0]

  return jax.lax.fori_loop(0, jnp.clip(chunk_max(count), 0, n), step, init)


def chunk_max(count: jax.Array) -> jax.Array:
  """The largest ``count`` of the chunk this client is vmapped in (itself outside one).

  ``chunks.scan_client_chunks`` vmaps over :data:`CHUNK_AXIS`; an unbatched
  trip count keeps the loop's predicate unbatched, so vmap does not select
  every carry leaf per client per iteration (the clients past their own last
  batch add exact zeros from empty batches instead).
  """
  try:
    return jax.lax.pmax(count, CHUNK_AXIS)
  except NameError:        # not inside a chunk's vmap (a single client, a test)
    return count


def sizes_of(num_batches: int, unroll: bool) -> Callable | None:
  """``scan_client_chunks(sizes_of=...)`` for a pass of ``num_batches`` batches per
  client: by size when its loop stops early (several batches, not unrolled)."""
  return (lambda c: c["data"]["num_examples"]) if num_batches > 1 and not unroll else None


def nonempty_batches(num_rows: jax.Array, batch_size: int) -> jax.Array:
  """int32: batches holding at least one of ``num_rows`` real rows (real rows first)."""
  return ((num_rows.astype(jnp.int32) + batch_size - 1) // batch_size).astype(jnp.int32)
