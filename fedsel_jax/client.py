"""One client's local update: tau optimizer steps on its own layers only.

Written for ONE client; ``federated`` vectorises it (vmap over a chunk of
clients inside a scan over chunks) in exactly one place.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax

from fedsel_jax import masks as masks_lib

PyTree = Any


@flax.struct.dataclass
class ClientResult:
  """What a client sends back.

  Attributes:
    delta: pytree like params; ``theta_i^{t,tau} - theta^t`` on the client's
      trained leaves, exactly 0 elsewhere.
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


def differentiable_leaves(index: PyTree, cut: int) -> PyTree:
  """Static bool pytree: leaves a client whose lowest layer is ``cut`` may train.

  Common leaves and candidate groups ``>= cut`` are differentiated; fixed
  leaves and candidates below ``cut`` are not, so autodiff never runs the
  backward pass through the blocks below ``cut`` (SPEC.md, cost model).
  """
  return jax.tree_util.tree_map(lambda k: k == masks_lib.COMMON or k >= cut, index)


def freeze(params: PyTree, diff: PyTree) -> PyTree:
  """Stops gradients at the leaves that ``diff`` (static bools) marks False."""
  return jax.tree_util.tree_map(lambda d, p: p if d else jax.lax.stop_gradient(p), diff, params)


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
                       cut: int = 0, unroll: bool = False) -> Callable:
  """Builds ``client_update(params, data, mask, key) -> ClientResult``.

  Args:
    loss_fn: from :func:`make_loss_fn`.
    optimizer: the local optax optimizer (fresh state every round).
    index: static leaf -> group table (``masks.group_index``).
    local_steps: tau.
    batch_size: B.
    cut: static lowest candidate layer any client using this function trains
      (0 = no cut). Layers below it must be unselected in every mask passed
      in; backprop stops there.
    unroll: unroll the local-step loop. XLA:CPU runs convolutions inside a
      loop body about 17x slower than unrolled (a small CNN, 5 steps: 374 ms
      rolled, 22 ms unrolled); it only helps where no outer loop remains
      (a single chunk). Dense and attention models do not need it.

  The returned function takes:
    params: the server model theta^t.
    data: dict with ``x [n_max, ...]``, ``y int[n_max]``, ``mask bool[n_max]``,
      ``num_examples int32``.
    mask: bool[K] the client's selected candidate layers.
    key: PRNG key of this client and round.
  """
  diff = differentiable_leaves(index, cut)
  grad_fn = jax.value_and_grad(lambda p, *a: loss_fn(freeze(p, diff), *a))

  def client_update(params, data, mask, key):
    data = jax.tree_util.tree_map(jnp.asarray, data)
    trainable = masks_lib.mask_tree(mask, index)
    batch_key, dropout_key = jax.random.split(key)
    rows = batch_positions(batch_key, data["mask"], local_steps, batch_size)
    ones = jnp.ones((batch_size,), jnp.float32)

    def step(carry, inputs):
      local, opt_state = carry
      idx, k = inputs
      loss, grads = grad_fn(local, data["x"][idx], data["y"][idx], ones, k)
      grads = jax.tree_util.tree_map(lambda t, g: jnp.where(t, g, 0), trainable, grads)
      updates, opt_state = optimizer.update(grads, opt_state, local)
      # Mask the update, not only the gradient: momentum and weight decay
      # must not move frozen leaves; `where` keeps them bit-identical.
      local = jax.tree_util.tree_map(
          lambda t, p, u: jnp.where(t, p + u.astype(p.dtype), p), trainable, local, updates)
      return (local, opt_state), loss

    keys = jax.random.split(dropout_key, local_steps)
    (local, _), losses = jax.lax.scan(step, (params, optimizer.init(params)), (rows, keys),
                                      unroll=unroll)
    delta = jax.tree_util.tree_map(lambda t, new, old: jnp.where(t, new - old, 0),
                                   trainable, local, params)
    return ClientResult(delta=delta, num_examples=data["num_examples"].astype(jnp.int32),
                        loss=jnp.mean(losses))

  return client_update


def lowest_selected(masks: jax.Array) -> jax.Array:
  """int32[M]: index of each client's lowest selected layer (K if none). masks bool[M, K]."""
  k = masks.shape[-1]
  return jnp.min(jnp.where(masks, jnp.arange(k), k), axis=-1).astype(jnp.int32)
