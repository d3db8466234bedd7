"""The central frozen reference: a logistic regression on the head's input features.

``compare_strategies=(..., 'probe')`` (or ``experiments/frozen_probe/probe.py``)
fits a scikit-learn logistic regression, centrally, on the frozen initial
model's features (the input of its ``head`` module: BERT's pooled sentence
vector, CLIP's post-LN class token or projection, a small model's last
hidden layer) of the clients' training rows, the same rows the federated runs
train on (held-out rows excluded). It is the strong form of the ``head``
baseline (no federation, no drift, no round budget); with a random-init small
model it is a random-feature probe. The inverse regularisation C is chosen on
a seeded 10% of those rows, then the probe is refitted on all of them.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import numpy as np

from fedsel_jax import local_only
from fedsel_jax import workdir as workdir_lib

C_GRID = (0.01, 0.1, 1.0, 10.0)


def make_features_fn(apply_fn: Callable, head: str = "head") -> Callable:
  """``features(params, x) -> f32[B, D]``: the input of module ``head`` (eval mode).

  A Flax method interceptor records the argument of the head's ``__call__``,
  so every model family works without a ``features`` method.
  """

  @jax.jit
  def features(params, x):
    box = {}

    def interceptor(next_fun, args, kwargs, context):
      if context.method_name == "__call__" and context.module.path == (head,):
        box["features"] = args[0]
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
      apply_fn({"params": params}, x, train=False)
    return box["features"].astype(np.float32)

  return features


def batched(fn: Callable, params, x: np.ndarray, batch: int = 256) -> np.ndarray:
  """``fn(params, x)`` over ``x`` in batches (last one padded), float64 rows [len(x), D]."""
  pad = (-len(x)) % batch
  xp = x[np.resize(np.arange(len(x)), len(x) + pad)] if pad else x
  out = [np.asarray(fn(params, xp[s:s + batch]), np.float64) for s in range(0, len(xp), batch)]
  return np.concatenate(out)[:len(x)]


def fit_probe(feats: np.ndarray, labels: np.ndarray, seed: int, c_grid=C_GRID):
  """Logistic regression with C chosen on a seeded 10% split, refitted on all.

  Returns:
    ``(probe, {C: held-out accuracy}, best C)``.
  """
  from sklearn.linear_model import LogisticRegression  # pylint: disable=g-import-not-at-top
  # The split experiments/frozen_probe/results.json was measured with.
  perm = np.random.default_rng(seed).permutation(len(labels))
  n_val = max(1, len(labels) // 10)
  val, fit = perm[:n_val], perm[n_val:]
  scores = {}
  for c in c_grid:
    model = LogisticRegression(C=c, max_iter=3000).fit(feats[fit], labels[fit])
    scores[c] = float(model.score(feats[val], labels[val]))
  best = max(c_grid, key=lambda c: scores[c])
  return LogisticRegression(C=best, max_iter=3000).fit(feats, labels), scores, best


def train_and_evaluate(setup, workdir: str, quiet: bool = False) -> dict[str, Any]:
  """Fits the central probe of ``setup``; writes and returns final.json's dict."""
  os.makedirs(workdir, exist_ok=True)
  start = time.perf_counter()
  features = make_features_fn(setup.spec.apply_for_eval)
  cl = setup.clients
  x_train, y_train = cl.x[cl.mask], cl.y[cl.mask]
  probe, held, best = fit_probe(batched(features, setup.params, x_train), y_train,
                                setup.config.seed)
  test_feats = batched(features, setup.params, setup.test_x)
  proba = probe.predict_proba(test_feats)
  cols = {c: j for j, c in enumerate(probe.classes_)}
  p_true = np.array([proba[i, cols[c]] if c in cols else 0.0
                     for i, c in enumerate(setup.test_y)])
  final = {"strategy": "probe", "rounds": 0,
           "test_accuracy": float(probe.score(test_feats, setup.test_y)),
           "test_loss": float(-np.mean(np.log(np.maximum(p_true, 1e-12)))),
           "median_seconds_per_round": float("nan"),
           "num_train": int(len(y_train)), "best_C": best,
           "val_accuracy": {str(c): a for c, a in held.items()},
           "seconds": round(time.perf_counter() - start, 1)}
  if setup.holdout is not None:
    h = setup.holdout
    acc = [float(probe.score(batched(features, setup.params, h.x[i, :n]), h.y[i, :n]))
           if n else np.nan for i, n in enumerate(h.num_examples)]
    final["client_holdout_accuracy"] = local_only.spread(np.array(acc))
  if not quiet:
    print(f"probe: test accuracy {final['test_accuracy']:.4f} (C={best}, "
          f"{len(y_train)} rows, {final['seconds']} s)", flush=True)
  workdir_lib.write_final(workdir, final)
  return final
