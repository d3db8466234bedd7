"""Test-set evaluation of the global model."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from fedsel_jax.client import cross_entropy


def make_eval_fn(apply_fn: Callable, batch_size: int) -> Callable:
  """Builds ``evaluate(params, x, y) -> {'loss', 'accuracy'}`` (host floats).

  The test set is cut into batches of ``batch_size``; the last one is padded
  and its padding weighs 0, so every example counts exactly once and only one
  shape is compiled.
  """

  @jax.jit
  def batch_sums(params, x, y, w):
    logits = apply_fn({"params": params}, x, train=False)
    loss = cross_entropy(logits, y, w) * jnp.sum(w)
    correct = jnp.sum((jnp.argmax(logits, -1) == y) * w)
    return loss, correct

  def evaluate(params, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    n = len(y)
    pad = (-n) % batch_size
    xp = np.concatenate([x, x[:pad]]) if pad else x
    yp = np.concatenate([y, y[:pad]]) if pad else y
    w = (np.arange(n + pad) < n).astype(np.float32)
    loss = correct = 0.
    for s in range(0, n + pad, batch_size):
      sl = slice(s, s + batch_size)
      l, c = batch_sums(params, xp[sl], yp[sl].astype(np.int32), w[sl])
      loss, correct = loss + float(l), correct + float(c)
    return {"loss": loss / n, "accuracy": correct / n}

  return evaluate
