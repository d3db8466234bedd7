"""Client chunks: the one way a round vectorises its clients.

``scan_client_chunks`` runs a per-client function vmapped over chunks of
``client_chunk`` clients inside a ``lax.scan`` (memory holds one chunk's
outputs), optionally choosing one of several static variants per chunk
(``lax.switch``). ``group_order`` and ``pick_variant`` put clients with equal
masks together and pick the cheapest variant covering a chunk's masks
(``fl.backprop_cut``). A :class:`Deferred` leaf is client data the scan builds
chunk by chunk (device_data gathers client rows from the device store so),
so a round never holds every slot's padded rows at once.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.struct
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np

from fedsel_jax import client as client_lib
from fedsel_jax.batches import CHUNK_AXIS

PyTree = Any


def padded_clients(m: int, chunk: int) -> int:
  """Number of client slots after padding M up to a multiple of the chunk."""
  chunk = m if chunk <= 0 else min(chunk, m)
  return -(-m // chunk) * chunk


def _chunks(tree: PyTree, chunk: int) -> PyTree:
  return jax.tree_util.tree_map(lambda a: a.reshape((-1, chunk) + a.shape[1:]), tree)


def identity(tree: PyTree) -> PyTree:
  return tree


def trace_once(fn: Callable, *args) -> tuple[Callable, PyTree]:
  """``(replay, shapes)``: ``fn`` traced once at ``args``, and its output shapes.

  Where a program needs a function's output shapes before it uses the
  function (a scan's output buffers, a cond's skipped branch),
  ``jax.eval_shape`` would trace it a second time, seconds for a
  transformer's gradient pass on every first call; ``replay(*args)`` binds
  the recorded program again instead (the same operations, so the same
  results). Its arguments must match the traced ones in structure, shapes
  and dtypes (a different structure is an error; static fields of pytree
  nodes keep their traced values).
  """
  closed, shapes = jax.make_jaxpr(fn, return_shape=True)(*args)
  in_tree = jax.tree_util.tree_structure(args)
  out_tree = jax.tree_util.tree_structure(shapes)
  run = jax.extend.core.jaxpr_as_fun(closed)

  def replay(*a):
    leaves, tree = jax.tree_util.tree_flatten(a)
    if tree != in_tree:
      raise TypeError(f"trace_once: replayed with {tree}, traced with {in_tree}")
    return jax.tree_util.tree_unflatten(out_tree, run(*leaves))

  return replay, shapes


@flax.struct.dataclass
class Deferred:
  """Per-slot client data built inside the chunk scan, one chunk at a time.

  Attributes:
    ids: int32[Mp], its only per-slot leaf (what chunks slice and permute).
    source: pytree read by every chunk, not per slot (e.g. the device store).
    build: static ``build(source, ids int32[C]) -> array [C, ...]``; hashable
      and compared by value (a frozen dataclass), so equal builds trace alike.
  """

  ids: jax.Array
  source: PyTree
  build: Callable = flax.struct.field(pytree_node=False)


def is_deferred(a: Any) -> bool:
  return isinstance(a, Deferred)


def scan_client_chunks(client_fns: Callable | Sequence[Callable], shared: PyTree,
                       clients: PyTree, chunk: int, *, init: PyTree = None,
                       combine: Callable | None = None, branch: Callable | None = None,
                       constrain: Callable = identity,
                       sizes_of: Callable | None = None,
                       order: jax.Array | None = None) -> tuple[PyTree, PyTree]:
  """``lax.scan`` over chunks of a per-client function vmapped over each chunk.

  The one place a round vectorises clients: memory holds one chunk's
  per-client outputs at a time, and ``combine`` folds them into a carry
  (aggregation sums) before the next chunk.

  Args:
    client_fns: ``fn(shared, client) -> out`` for ONE client, or a static
      list of variants of it (then ``branch`` picks one per chunk).
    shared: pytree read by every client (unbatched, e.g. theta^t).
    clients: pytree with leading axis Mp (client slots), Mp % chunk == 0;
      its :class:`Deferred` leaves are built for each chunk's slots inside
      the scan body (so only one chunk's arrays exist at a time).
    chunk: clients vmapped together.
    init: initial carry of ``combine``.
    combine: ``combine(carry, outs, chunk_clients) -> (carry, kept)`` with
      ``outs`` the chunk's outputs ``[C, ...]``; ``kept`` (leading axis C) is
      stacked over all slots. Default: keep ``outs``, carry unchanged.
    branch: ``branch(chunk_clients) -> int32`` index into ``client_fns``
      (chunk-level ``lax.switch``; unbatched, so only one variant runs).
    constrain: applied to each chunk's clients (sharding of the client axis).
    sizes_of: optional ``sizes_of(clients) -> int[Mp]``, the clients' real
      rows: with several chunks the clients are scanned in order of size
      (chunks of similar clients, so a pass whose loop stops at each
      client's last batch, ``batches.py``, runs each chunk only as long as
      its largest client needs).
    order: optional int[Mp], the order to scan the slots in (overrides
      ``sizes_of``); each chunk gathers its slots in the scan body and
      writes its kept outputs back to them, so ``kept`` is in slot order and
      ``combine`` sees the clients in ``order``.

  Returns:
    ``(carry, kept)`` with kept's leaves ``[Mp, ...]``.
  """
  fns = [client_fns] if callable(client_fns) else list(client_fns)
  combine = combine or (lambda carry, outs, _: (carry, outs))
  # Each variant combines its own outputs: variants may differ in what they
  # return (a client update's delta covers only the variant's leaves).
  chunk_fns = [lambda carry, c, f=jax.vmap(f, in_axes=(None, 0), axis_name=CHUNK_AXIS):
               combine(carry, f(shared, c), c) for f in fns]

  leaves, treedef = jax.tree_util.tree_flatten(clients, is_leaf=is_deferred)
  slots = [a.ids if is_deferred(a) else a for a in leaves]
  mp = slots[0].shape[0]

  def run_chunk(carry, xs):
    c = treedef.unflatten([a.build(a.source, x) if is_deferred(a) else x
                           for a, x in zip(leaves, xs)])
    c = constrain(c)
    if branch is None:
      return chunk_fns[0](carry, c)
    return jax.lax.switch(branch(c), chunk_fns, carry, c)

  if order is None and sizes_of is not None and mp > chunk:
    order = jnp.argsort(sizes_of(clients), stable=True)
  if order is None:
    carry, kept = jax.lax.scan(run_chunk, init, _chunks(slots, chunk))
    return carry, jax.tree_util.tree_map(lambda a: a.reshape((mp,) + a.shape[2:]), kept)
  # In ``order``: each chunk gathers its own slots and writes its kept
  # outputs back to them, so neither side is ever copied whole.
  pick = lambda idx: [jnp.asarray(x)[idx] for x in slots]  # noqa: E731
  order = jnp.asarray(order, jnp.int32).reshape(-1, chunk)
  chunk_fn, (_, shapes) = trace_once(run_chunk, init, pick(order[0]))
  out = jax.tree_util.tree_map(lambda a: jnp.zeros((mp,) + a.shape[1:], a.dtype), shapes)

  def body(state, idx):
    carry, out = state
    carry, kept = chunk_fn(carry, pick(idx))
    return (carry, jax.tree_util.tree_map(lambda o, k: o.at[idx].set(k), out, kept)), None

  (carry, kept), _ = jax.lax.scan(body, (init, out), order)
  return carry, kept


def variant_cost(table: np.ndarray) -> np.ndarray:
  """f32[V]: relative backward cost of each variant (table bool[V, K]).

  Backprop runs from the top down to the lowest trained group (one unit per
  group for the activation gradients) and computes weight gradients of the
  trained groups (one unit each).
  """
  k = table.shape[1]
  lowest = np.where(table.any(1), np.argmax(table, axis=1), k)
  return (k - lowest + table.sum(1)).astype(np.float32)


def pick_variant(table: np.ndarray, masks: jax.Array, weights: jax.Array) -> jax.Array:
  """int32: the cheapest variant whose groups cover every real client's mask.

  Args:
    table: static bool[V, K] (``RoundParts.variant_table``); some row must
      cover every mask (the all-groups row, or ``{c..K-1}`` for c = 0).
    masks: bool[C, K] the chunk's masks.
    weights: f32[C], 0 for padding slots (their masks are ignored).
  """
  union = jnp.any(masks & (weights > 0)[:, None], axis=0)
  covers = jnp.all(~union[None, :] | jnp.asarray(table), axis=1)
  return jnp.argmin(jnp.where(covers, jnp.asarray(variant_cost(table)), jnp.inf)).astype(
      jnp.int32)


def group_order(masks: jax.Array, valid: jax.Array) -> jax.Array:
  """int32[Mp]: client order that puts equal masks, then equal lowest layers, together.

  Sorted by (lowest selected layer, mask bits); padding slots go last, so a
  chunk's clients share as much of their masks as the round allows.
  """
  k = masks.shape[1]
  code = jnp.sum(masks.astype(jnp.int32) * (2 ** jnp.arange(k, dtype=jnp.int32)), axis=1)
  key = client_lib.lowest_selected(masks) * (2 ** k) + code
  return jnp.argsort(jnp.where(valid, key, (k + 1) * 2 ** k)).astype(jnp.int32)
