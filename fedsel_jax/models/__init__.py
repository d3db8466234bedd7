"""Model registry: ``config.model.name`` -> :class:`ModelSpec`."""

from __future__ import annotations

from fedsel_jax.models import lora
from fedsel_jax.models.spec import ModelSpec

SMALL = ("mlp", "cnn", "vit")
TEXT = ("minilm", "bert", "roberta", "xlmr")
VISION = ("clip_vit",)
MODELS = SMALL + TEXT + VISION


def build_model(model_cfg, num_classes: int, input_shape: tuple[int, ...]) -> ModelSpec:
  """Builds the model named by ``model_cfg.name``, with LoRA adapters when
  ``model_cfg.lora.rank > 0`` (fedsel_jax/models/lora.py).

  Args:
    model_cfg: ``config.model`` (ml_collections.ConfigDict).
    num_classes: size of the classification head.
    input_shape: one example's shape without the batch axis (used by the
      small models to make an init batch).
  """
  spec = _build_base(model_cfg, num_classes, input_shape)
  settings = lora.settings_from_config(model_cfg.get("lora"))
  return spec if settings is None else lora.wrap(spec, settings)


def _build_base(model_cfg, num_classes: int, input_shape: tuple[int, ...]) -> ModelSpec:
  name = model_cfg.name
  if name in SMALL:
    from fedsel_jax.models import small
    return small.build(model_cfg, num_classes, input_shape)
  if name in TEXT:
    from fedsel_jax.models import bert
    return bert.build(model_cfg, num_classes)
  if name in VISION:
    from fedsel_jax.models import clip
    return clip.build(model_cfg, num_classes)
  raise ValueError(f"model.name must be one of {list(MODELS)}, got {name!r}")
