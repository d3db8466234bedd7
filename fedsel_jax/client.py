"""One client's local update: tau optimizer steps on its own layers only.

Written for ONE client; ``federated`` vectorises it (vmap over a chunk of
clients inside a scan over chunks) in exactly one place.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedsel_jax import grad_gates
from fedsel_jax import masks as masks_lib

PyTree = Any


@flax.struct.dataclass
class ClientResult:
  """What a client sends back.

  Attributes:
    delta: pytree like params; ``theta_i^{t,tau} - theta^t`` on the client's
      trained leaves, exactly 0 elsewhere (``None`` on the leaves outside
      the update's variant when built with ``dense_delta=False``).
    num_examples: int32 scalar, real examples the client holds.
    loss: f32 scalar, mean training loss over the local steps.
  """

  delta: PyTree
  num_examples: jax.Array
  loss: jax.Array


def cross_entropy(logits: jax.Array, labels: jax.Array, weights: jax.Array) -> jax.Array:
  """Weighted mean softmax cross-entropy. logits f32[B, C], labels int[B], weights f32[B]."""
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  return jnp.sum(losses * weights) / jnp.maximum(jnp.sum(weights), 1e-9)


def make_loss_fn(apply_fn: Callable) -> Callable:
  """``loss(params, x, y, weights, key) -> f32`` for a classifier.

  Args:
    apply_fn: ``module.apply``.
  """

  def loss_fn(params, x, y, weights, key):
    logits = apply_fn({"params": params}, x, train=True, rngs={"dropout": key})
    return cross_entropy(logits, y, weights)

  return loss_fn


def differentiable_leaves(index: PyTree, cut: int = 0,
                          blocks: Sequence[int] | None = None) -> PyTree:
  """Static bool pytree: the leaves a client update of this variant trains.

  Common leaves and the candidate groups in ``blocks`` (default: every group
  ``>= cut``) are trained; fixed leaves and the other candidates are not, so
  they get no gradient, no optimizer state and no delta, and autodiff never
  runs the backward pass below the lowest trained block (SPEC.md, cost model).
  """
  keep = None if blocks is None else frozenset(int(b) for b in blocks)
  return jax.tree_util.tree_map(
      lambda k: k == masks_lib.COMMON or (k >= 0 and (k >= cut if keep is None else k in keep)),
      index)


def split_leaves(tree: PyTree, keep: PyTree) -> tuple[list, list]:
  """(kept leaves, other leaves) of ``tree`` in flattening order; keep: static bools."""
  flags = jax.tree_util.tree_leaves(keep)
  leaves = jax.tree_util.tree_leaves(tree)
  return ([x for x, f in zip(leaves, flags) if f], [x for x, f in zip(leaves, flags) if not f])


def merge_leaves(kept: list, other: list, keep: PyTree) -> PyTree:
  """Inverse of :func:`split_leaves`: a pytree with the structure of ``keep``."""
  flags, treedef = jax.tree_util.tree_flatten(keep)
  kept, other = iter(kept), iter(other)
  return jax.tree_util.tree_unflatten(treedef, [next(kept) if f else next(other) for f in flags])


def batch_positions(key: jax.Array, mask: jax.Array, num_steps: int, batch_size: int) -> jax.Array:
  """int32[num_steps, B]: row indices of each local step's minibatch.

  The client's real rows are shuffled once and read in order, wrapping
  around, so every real example is used once per local epoch and padding
  rows are never read.

  Args:
    key: PRNG key of this client and round.
    mask: bool[n_max], True for real rows (they come first).
    num_steps: tau.
    batch_size: B.
  """
  n = jnp.maximum(jnp.sum(mask), 1)
  order = jnp.argsort(jnp.where(mask, jax.random.uniform(key, mask.shape), 2.0))
  pos = (jnp.arange(num_steps)[:, None] * batch_size + jnp.arange(batch_size)[None, :]) % n
  return order[pos]


def make_client_update(loss_fn: Callable, optimizer: optax.GradientTransformation,
                       index: PyTree, *, local_steps: int, batch_size: int,
                       cut: int = 0, blocks: Sequence[int] | None = None,
                       unroll: bool = False, dense_delta: bool = True,
                       gate: bool = False,
                       static_gates: Sequence[int] | None = None) -> Callable:
  """Builds ``client_update(params, data, mask, key) -> ClientResult``.

  The update works on the trainable subtree only (the common leaves and the
  variant's candidate groups); the other leaves are constants read from
  ``params``, with no gradient, optimizer state or delta.

  Args:
    loss_fn: from :func:`make_loss_fn`.
    optimizer: the local optax optimizer (fresh state every round), applied
      to the trainable subtree (so it must be elementwise or at least not
      couple leaves, as sgd/momentum/adam/adamw are, for the result to equal
      the full-tree optimizer's).
    index: static leaf -> group table (``masks.group_index``).
    local_steps: tau.
    batch_size: B.
    cut: static lowest candidate layer any client using this function trains
      (0 = no cut): the variant trains every group ``>= cut``.
    blocks: static candidate groups this variant trains (overrides ``cut``).
      Groups outside it must be unselected in every mask passed in.
    unroll: unroll the local-step loop (XLA:CPU runs convolutions in a loop
      body ~17x slower: a small CNN, 5 steps, 374 ms rolled, 22 ms unrolled;
      it helps only where no outer loop remains, a single chunk).
    dense_delta: return ``delta`` as a full pytree like params (zeros on the
      leaves outside the variant); False puts ``None`` there (the round's
      aggregation skips them, so no per-client zeros are materialised).
    gate: kernel gradients of a trained group only when some client of the
      chunk (the vmap over ``batches.CHUNK_AXIS``) selects it; same result
      (``grad_gates``).
    static_gates: with ``gate``, gates fixed at trace time to these groups
      (``flops`` counts a gated chunk's FLOPs this way).

  The returned function takes:
    params: the server model theta^t.
    data: dict with ``x [n_max, ...]``, ``y int[n_max]``, ``mask bool[n_max]``,
      ``num_examples int32``.
    mask: bool[K] the client's selected candidate layers.
    key: PRNG key of this client and round.
  """
  keep = differentiable_leaves(index, cut, blocks)
  grad_fn, gates_of = _gated_grad_fn(loss_fn, index, keep, gate, static_gates)

  def client_update(params, data, mask, key):
    data = jax.tree_util.tree_map(jnp.asarray, data)
    train, frozen = split_leaves(params, keep)
    selected, _ = split_leaves(masks_lib.mask_tree(mask, index), keep)
    batch_key, dropout_key = jax.random.split(key)
    rows = batch_positions(batch_key, data["mask"], local_steps, batch_size)
    local, losses = _local_steps(grad_fn, optimizer, train, frozen, selected, gates_of(mask),
                                 data, rows, jax.random.split(dropout_key, local_steps), unroll)
    delta = [jnp.where(t, new - old, 0) for t, new, old in zip(selected, local, train)]
    rest = [jnp.zeros(p.shape, p.dtype) if dense_delta else None for p in frozen]
    return ClientResult(delta=merge_leaves(delta, rest, keep),
                        num_examples=data["num_examples"].astype(jnp.int32),
                        loss=jnp.mean(losses))

  return client_update


def _local_steps(grad_fn: Callable, optimizer: optax.GradientTransformation, train: list,
                 frozen: list, selected: list, gates, data: dict, rows: jax.Array,
                 keys: jax.Array, unroll: bool) -> tuple[list, jax.Array]:
  """tau masked optimizer steps from ``train``: ``(trained leaves, losses f32[tau])``.

  ``rows[s]`` are step s's minibatch rows, ``keys[s]`` its dropout key;
  ``selected`` the per-leaf mask of the trained leaves.
  """
  ones = jnp.ones(rows.shape[1:], jnp.float32)

  def step(carry, inputs):
    local, opt_state = carry
    idx, k = inputs
    loss, grads = grad_fn(local, frozen, gates, data["x"][idx], data["y"][idx], ones, k)
    grads = [jnp.where(t, g, 0) for t, g in zip(selected, grads)]
    updates, opt_state = optimizer.update(grads, opt_state, local)
    # Mask the update, not only the gradient: momentum and weight decay
    # must not move unselected leaves; `where` keeps them bit-identical.
    local = [jnp.where(t, p + u.astype(p.dtype), p)
             for t, p, u in zip(selected, local, updates)]
    return (local, opt_state), loss

  (local, _), losses = jax.lax.scan(step, (train, optimizer.init(train)), (rows, keys),
                                    unroll=unroll)
  return local, losses


def _gated_grad_fn(loss_fn: Callable, index: PyTree, keep: PyTree, gate: bool,
                   static_gates: Sequence[int] | None) -> tuple[Callable, Callable]:
  """``(grad_fn, gates_of)`` of :func:`make_client_update`.

  ``grad_fn(train, frozen, gates, x, y, weights, key) -> (loss, grads of train)``
  runs the loss with the kernel-gradient gates of the variant's groups
  (``grad_gates``) when ``gate``; ``gates_of(mask)`` is what it takes: None
  without gates, the fixed ``static_gates`` as a numpy bool[K], else the
  chunk's union of masks.
  """
  trained = sorted({int(g) for g, t in zip(jax.tree_util.tree_leaves(index),
                                          jax.tree_util.tree_leaves(keep)) if t and g >= 0})
  groups = grad_gates.kernel_groups(index, trained) if gate else {}

  def loss_of(train, frozen, gates, *a):
    if not groups:
      return loss_fn(merge_leaves(train, frozen, keep), *a)
    with grad_gates.gated(groups, gates):
      return loss_fn(merge_leaves(train, frozen, keep), *a)

  def gates_of(mask):
    if not groups:
      return None
    if static_gates is not None:
      return np.isin(np.arange(mask.shape[-1]), list(static_gates))
    return grad_gates.chunk_gates(mask)

  return jax.value_and_grad(loss_of), gates_of


def lowest_selected(masks: jax.Array) -> jax.Array:
  """int32[M]: index of each client's lowest selected layer (K if none). masks bool[M, K]."""
  k = masks.shape[-1]
  return jnp.min(jnp.where(masks, jnp.arange(k), k), axis=-1).astype(jnp.int32)
