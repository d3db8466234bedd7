"""Dataset sources. Each ``load(data_cfg) -> fedsel_jax.datasets.base.Dataset``.

``data_cfg`` is the ``data`` ConfigDict of a run; ``data_cfg.name`` picks the
source, the other fields are documented in each source's module.
"""

from __future__ import annotations

import importlib
from typing import Callable

from fedsel_jax.datasets.base import DataMissingError, Dataset

# name -> (module, loader, check). Modules are imported on first use, so a
# run on synthetic data needs neither tensorflow-datasets nor a tokenizer.
_REGISTRY: dict[str, tuple[str, str, str]] = {
    "digits": ("digits", "load", "check_available"),
    "shakespeare": ("shakespeare", "load", "check_available"),
    "cifar10": ("tfds_image", "load_cifar10", "check_cifar10"),
    "mnist": ("tfds_image", "load_mnist", "check_mnist"),
    "domainnet": ("tfds_image", "load_domainnet", "check_domainnet"),
    "xglue": ("xglue", "load", "check_available"),
    "synthetic": ("synthetic", "load", "check_available"),
}
SOURCES: tuple[str, ...] = tuple(_REGISTRY)


def _function(name: str, which: int) -> Callable[..., object]:
  module = importlib.import_module(f"fedsel_jax.datasets.{_REGISTRY[name][0]}")
  return getattr(module, _REGISTRY[name][which])


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
  _function(_source_name(data_cfg), 2)(data_cfg)


def load_dataset(data_cfg) -> Dataset:
  """Loads the source named by ``data_cfg.name`` (preparing local builders on first use)."""
  return _function(_source_name(data_cfg), 1)(data_cfg)
