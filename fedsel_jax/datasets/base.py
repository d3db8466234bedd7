"""The in-memory form every dataset source returns."""

from __future__ import annotations

import dataclasses

import numpy as np

from fedsel_jax.errors import UserError


class DataMissingError(UserError, RuntimeError):
  """Data or weights are not on disk; the message says what to put where."""


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A centralised dataset, before federated partitioning.

  Attributes:
    name: e.g. ``"digits"``.
    train_x: float32 ``[N, H, W, C]`` images (normalised), float32 ``[N, D]``
      features, or int32 ``[N, T]`` token ids with 0 = padding.
    train_y: int32 ``[N]`` labels in ``[0, num_classes)``.
    test_x, test_y: the same for the held-out split.
    num_classes: number of classes.
    train_groups: optional int32 ``[N]`` natural group of each training example
      (speaking role, domain, language); partitioners may use it.
    group_names: names of the natural groups, indexed by ``train_groups``.
    class_names: optional names of the classes.
    pad_id: the padding id of token inputs (0 for BERT/MiniLM; 1 for XLM-R,
      whose id 0 is ``<s>``); models derive attention masks as ``x != pad_id``.
  """

  name: str
  train_x: np.ndarray
  train_y: np.ndarray
  test_x: np.ndarray
  test_y: np.ndarray
  num_classes: int
  train_groups: np.ndarray | None = None
  group_names: tuple[str, ...] | None = None
  class_names: tuple[str, ...] | None = None
  pad_id: int = 0

  def __post_init__(self):
    for split in ("train", "test"):
      x, y = getattr(self, f"{split}_x"), getattr(self, f"{split}_y")
      if len(x) != len(y):
        raise ValueError(f"{self.name}: {split}_x has {len(x)} rows, {split}_y {len(y)}")
    if self.train_groups is not None and len(self.train_groups) != len(self.train_y):
      raise ValueError(f"{self.name}: train_groups must have one entry per example")
