"""Test-set evaluation of the global model."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from fedsel_jax.client import cross_entropy


def make_eval_fn(apply_fn: Callable, batch_size: int) -> Callable:
  """Builds ``evaluate(params, x, y) -> {'loss', 'accuracy'}`` (host floats).

  The test set is cut into batches of ``min(batch_size, n)``; the last one
  is padded with zeros that weigh 0, so every example counts exactly once
  and one shape is compiled per test-set size (any size >= 1 works).
  """

  @jax.jit
  def batch_sums(params, x, y, w):
    logits = apply_fn({"params": params}, x, train=False)
    loss = cross_entropy(logits, y, w) * jnp.sum(w)
    correct = jnp.sum((jnp.argmax(logits, -1) == y) * w)
    return loss, correct

  def evaluate(params, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    n = len(y)
    if n == 0:
      raise ValueError("the test set is empty")
    size = min(batch_size, n)
    pad = (-n) % size
    xp = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)]) if pad else x
    yp = np.concatenate([y, np.zeros((pad,), y.dtype)]) if pad else y
    w = (np.arange(n + pad) < n).astype(np.float32)
    loss = correct = 0.
    for s in range(0, n + pad, size):
      sl = slice(s, s + size)
      l, c = batch_sums(params, xp[sl], yp[sl].astype(np.int32), w[sl])
      loss, correct = loss + float(l), correct + float(c)
    return {"loss": loss / n, "accuracy": correct / n}

  return evaluate
