"""Training memory of a layer set, measured: ``selection.cost='memory'``.

Memory is the second resource a client's budget can be spent in (FLOPs,
``costs.budget_costs``, is the first). It is depth-aware in the same way
(``costs.DepthCosts``): a set S costs

    constant + sum_{l in S} weight[l] + backward[lowest(S)]

* ``backward[j]``: the activations that backprop down to block j must keep,
  measured as XLA's temporary buffer size (``memory_analysis``) of one
  batch's gradient with respect to the common layers and every block
  ``>= j`` (the blocks below are not differentiated, so autodiff keeps none
  of their activations), minus that of the common layers alone
  (``backward[K] = 0``); made non-increasing in j (a deeper cut never needs
  less);
* ``weight[l]``: float32 bytes of block l's gradient, its update (delta)
  and the client optimizer's state (0 slots for SGD, 1 for momentum, 2 for
  Adam/AdamW): ``4 n_l (2 + slots)``; blocks a client does not train have
  none of these (``client.differentiable_leaves``);
* ``constant``: the common layers' share of the same, the model itself and
  the common-only gradient's temporaries.

Budgets are in units of the cheapest non-empty set (one block alone), like
``selection.cost='flops'``; the bytes are kept for the logs. Measuring
compiles K + 1 gradients of the model once per run set-up.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from fedsel_jax import client as client_lib
from fedsel_jax import costs as costs_lib
from fedsel_jax import masks as masks_lib

PyTree = Any
OPTIMIZER_SLOTS = {"sgd": 0, "momentum": 1, "adam": 2, "adamw": 2}


def gradient_temp_bytes(loss_fn: Callable, params: PyTree, index: PyTree, cut: int,
                        x: np.ndarray, y: np.ndarray) -> float:
  """XLA temporary bytes of one batch's gradient w.r.t. the common layers and blocks >= cut.

  Args:
    loss_fn: ``loss(params, x, y, weights, key)``.
    params: the model's parameters.
    index: static leaf -> group table.
    cut: the lowest differentiated block (K: the common layers only).
    x, y: one batch.
  """
  keep = client_lib.differentiable_leaves(index, cut=cut)
  kept, other = client_lib.split_leaves(params, keep)
  w = jnp.ones((len(y),), jnp.float32)

  def grad(kept, other, x, y):
    return jax.grad(lambda kk: loss_fn(client_lib.merge_leaves(kk, other, keep), x, y, w,
                                       jax.random.key(0)))(kept)

  compiled = jax.jit(grad).lower(kept, other, x, y).compile()
  mem = compiled.memory_analysis()
  if mem is None:
    raise ValueError("selection.cost='memory' needs XLA's memory analysis, which this "
                     f"backend ({jax.default_backend()}) does not provide")
  return float(mem.temp_size_in_bytes)


def memory_depth_costs(loss_fn: Callable, params: PyTree, index: PyTree, num_candidates: int,
                       x: np.ndarray, y: np.ndarray, optimizer: str) -> costs_lib.DepthCosts:
  """The memory cost model in bytes per client (module docstring)."""
  if optimizer not in OPTIMIZER_SLOTS:
    raise ValueError(f"client_optim.name must be one of {list(OPTIMIZER_SLOTS)}, "
                     f"got {optimizer!r}")
  k = num_candidates
  temp = np.array([gradient_temp_bytes(loss_fn, params, index, j, x, y) for j in range(k + 1)])
  backward = np.maximum.accumulate((temp - temp[k])[::-1])[::-1]   # non-increasing in j
  per_param = 4.0 * (2 + OPTIMIZER_SLOTS[optimizer])
  sizes = np.asarray(masks_lib.group_sizes(params, index, k), np.float64)
  leaves = zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(index))
  common = sum(p.size for p, g in leaves if g == masks_lib.COMMON)
  model = 4.0 * sum(p.size for p in jax.tree_util.tree_leaves(params))
  return costs_lib.DepthCosts(weight=per_param * sizes, backward=backward,
                              constant=model + per_param * common + temp[k])


def budget_costs(model: costs_lib.DepthCosts) -> tuple[np.ndarray, np.ndarray]:
  """``(costs f32[K], backward f32[K + 1])`` in units of the cheapest one-block set."""
  if not np.all(model.weight + model.backward[:-1] > 0):
    raise ValueError("selection.cost='memory': every block must need memory to train, got "
                     f"{(model.weight + model.backward[:-1]).tolist()} bytes")
  unit = model.scaled(model.cheapest_set)
  return unit.weight.astype(np.float32), unit.backward.astype(np.float32)
