"""Shared test helpers (fixtures live in conftest.py)."""

import jax
import numpy as np

from configs import digits as digits_config
from fedsel_jax import masks as masks_lib


def smoke_config(data_dir, **overrides):
  """``configs/digits.py:smoke`` on ``data_dir`` with dotted-field overrides."""
  c = digits_config.get_config("smoke")
  c.data.data_dir = data_dir
  for k, v in overrides.items():
    node = c
    *path, last = k.split(".")
    for p in path:
      node = node[p]
    node[last] = v
  return c


def xla_grad_flops(spec, params, index, mask, x, num_classes):
  """XLA's FLOPs of one gradient w.r.t. the selected blocks and the common leaves
  (the ideal gradient: the other leaves are arguments, so nothing constant-folds)."""
  flat, treedef = jax.tree_util.tree_flatten(params)
  trained = [g == masks_lib.COMMON or (g >= 0 and mask[g])
             for g in jax.tree_util.tree_leaves(index)]
  batch = len(x)
  y = np.arange(batch) % num_classes

  def loss(train_leaves, frozen_leaves, x):
    it, fr = iter(train_leaves), iter(frozen_leaves)
    leaves = [next(it) if t else next(fr) for t in trained]
    logits = spec.module.apply({"params": jax.tree_util.tree_unflatten(treedef, leaves)}, x)
    return -jax.numpy.mean(jax.nn.log_softmax(logits)[np.arange(batch), y])

  train = [p for p, t in zip(flat, trained) if t]
  frozen = [p for p, t in zip(flat, trained) if not t]
  cost = jax.jit(jax.grad(loss)).lower(train, frozen, x).compile().cost_analysis()
  return float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])
