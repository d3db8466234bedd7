"""Dataset sources. Each ``load(data_cfg) -> fedsel_jax.datasets.base.Dataset``.

``data_cfg`` is the ``data`` ConfigDict of a run; ``data_cfg.name`` picks the
source, the other fields are documented in each source's module.
"""

from __future__ import annotations

from typing import Callable

from fedsel_jax.datasets import digits
from fedsel_jax.datasets import shakespeare
from fedsel_jax.datasets import tfds_image
from fedsel_jax.datasets import xglue
from fedsel_jax.datasets.base import DataMissingError, Dataset

SOURCES: dict[str, Callable[..., Dataset]] = {
    "digits": digits.load,
    "shakespeare": shakespeare.load,
    "cifar10": tfds_image.load_cifar10,
    "mnist": tfds_image.load_mnist,
    "domainnet": tfds_image.load_domainnet,
    "xglue": xglue.load,
}

_CHECKS: dict[str, Callable[..., None]] = {
    "digits": digits.check_available,
    "shakespeare": shakespeare.check_available,
    "cifar10": tfds_image.check_cifar10,
    "mnist": tfds_image.check_mnist,
    "domainnet": tfds_image.check_domainnet,
    "xglue": xglue.check_available,
}

__all__ = ["SOURCES", "DataMissingError", "Dataset", "check_available", "load_dataset"]


def _source_name(data_cfg) -> str:
  name = data_cfg.get("name", None)
  if name not in SOURCES:
    raise ValueError(f"data.name must be one of {sorted(SOURCES)}, got {name!r}")
  return name


def check_available(data_cfg) -> None:
  """Fast existence checks only (no loading, well under a second).

  Raises:
    ValueError: unknown ``data_cfg.name``.
    DataMissingError: the data (or tokenizer) is not on disk; the message says
      what to run or where to put which file.
  """
  _CHECKS[_source_name(data_cfg)](data_cfg)


def load_dataset(data_cfg) -> Dataset:
  """Loads the source named by ``data_cfg.name`` (preparing local builders on first use)."""
  return SOURCES[_source_name(data_cfg)](data_cfg)
