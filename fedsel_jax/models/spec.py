"""The contract every model of fedsel_jax fulfils."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import flax.linen as nn
import numpy as np

from fedsel_jax.masks import LayerGroups

PyTree = Any


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """A Flax module together with what federated training needs to know.

  Attributes:
    name: registry name (``config.model.name``).
    module: ``module.apply({'params': p}, x, train=bool) -> f32[B, classes]``;
      ``x`` is float32 images ``[B, H, W, C]`` / features ``[B, D]`` or int32
      token ids ``[B, T]`` padded with the model's ``pad_token_id`` (0 for
      BERT/MiniLM, 1 for RoBERTa/XLM-R); attention masks derive from it.
      Training randomness (dropout) uses the ``'dropout'`` rng. With LoRA
      this is a :class:`fedsel_jax.models.lora.LoraModule` with the same
      ``init`` / ``apply`` (the adapter forward).
    groups: fixed / common / candidate parameter groups.
    example_input: a small batch (numpy) of the input kind for ``init``.
    load_pretrained: optional ``params -> params`` that overwrites the freshly
      initialised params with pretrained weights (encoder only; the head
      stays random). ``None`` when the model has no pretrained weights.
    lora_targets: ``{'attention': globs, 'mlp': globs}`` over module paths
      (``'*/query'``) of the block kernels LoRA may adapt
      (fedsel_jax/models/lora.py); empty = LoRA is not offered.
    eval_apply: the ``apply`` evaluation uses; None = ``module.apply``
      (LoRA: the base module on merged weights).
  """

  name: str
  module: nn.Module
  groups: LayerGroups
  example_input: np.ndarray
  load_pretrained: Callable[[PyTree], PyTree] | None = None
  lora_targets: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
  eval_apply: Callable[..., Any] | None = None

  @property
  def apply_for_eval(self) -> Callable[..., Any]:
    return self.module.apply if self.eval_apply is None else self.eval_apply
