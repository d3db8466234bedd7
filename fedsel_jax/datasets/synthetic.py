"""Synthetic labelled images, for benchmarks that need no dataset on disk.

``../shared/BENCH.md``: "synthetic data and random initialisation are fine
for speed where the model is not pretrained (never all-zero inputs)". Each
class has a fixed random prototype image; an example is
``0.5 * prototype[y] + N(0, 1)`` noise, so the task is learnable (a model
can beat chance) and no input is constant. The dataset is a fixed one, like
a real dataset: it depends only on its fields, not on the run's seed (the
partition over clients uses the seed, as for any source).

Config fields (``data_cfg.synthetic``, a group; every field optional):
  size: image side in pixels (default 32; models that expect another size
    resize in the graph, as for CIFAR-10).
  channels: default 3.
  classes: default 10.
  train: training examples (default 20,000).
  test: held-out examples (default 1,000).
"""

from __future__ import annotations

import numpy as np

from fedsel_jax.datasets.base import Dataset

DEFAULTS = dict(size=32, channels=3, classes=10, train=20_000, test=1_000)
SEED = 20_261_207          # fixed: the dataset does not change with the run's seed
SIGNAL = 0.5


def fields(data_cfg) -> dict[str, int]:
  """The source's fields with their defaults filled in."""
  group = data_cfg.get("synthetic", None) or {}
  return {k: int(group.get(k, v)) for k, v in DEFAULTS.items()}


def check_available(data_cfg) -> None:
  """Always available: nothing is read from disk."""
  del data_cfg


def make_images(num: int, size: int, channels: int, prototypes: np.ndarray,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """(float32[num, size, size, channels], int32[num]) drawn from ``rng``."""
  y = rng.integers(0, len(prototypes), num).astype(np.int32)
  x = rng.standard_normal((num, size, size, channels), dtype=np.float32)
  x += SIGNAL * prototypes[y]
  return x, y


def load(data_cfg) -> Dataset:
  """The synthetic dataset of ``data_cfg.synthetic`` (module docstring)."""
  f = fields(data_cfg)
  # one stream each: the test set does not change with the training set's size
  protos, train_rng, test_rng = (np.random.default_rng([SEED, i]) for i in range(3))
  prototypes = protos.standard_normal((f["classes"], f["size"], f["size"], f["channels"]),
                                      dtype=np.float32)
  train_x, train_y = make_images(f["train"], f["size"], f["channels"], prototypes, train_rng)
  test_x, test_y = make_images(f["test"], f["size"], f["channels"], prototypes, test_rng)
  return Dataset(name="synthetic", train_x=train_x, train_y=train_y, test_x=test_x,
                 test_y=test_y, num_classes=f["classes"],
                 class_names=tuple(str(c) for c in range(f["classes"])))
