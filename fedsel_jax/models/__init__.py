"""Model registry: ``config.model.name`` -> :class:`ModelSpec`."""

from __future__ import annotations

import dataclasses

from fedsel_jax import masks as masks_lib
from fedsel_jax.models import lora
from fedsel_jax.models.spec import ModelSpec

SMALL = ("mlp", "cnn", "vit")
TEXT = ("minilm", "bert", "roberta", "xlmr")
VISION = ("clip_vit",)
MODELS = SMALL + TEXT + VISION
EMBEDDINGS = ("auto", "fixed", "trained")

# model.sub_blocks: each block's attention and MLP as separate candidates
# (sub-prefixes in forward order; the norm before or after each goes with it).
SUB_BLOCKS = {
    "vit": (("attn", ("ln1", "attn")), ("mlp", ("ln2", "mlp1", "mlp2"))),
    "clip_vit": (("attn", ("layer_norm1", "q_proj", "k_proj", "v_proj", "out_proj")),
                 ("mlp", ("layer_norm2", "fc1", "fc2"))),
    **{name: (("attn", ("query", "key", "value", "attention_output", "attention_norm")),
              ("mlp", ("intermediate", "output", "output_norm"))) for name in TEXT},
}


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
  spec = dataclasses.replace(spec, groups=configure_groups(spec.groups, model_cfg))
  settings = lora.settings_from_config(model_cfg.get("lora"))
  return spec if settings is None else lora.wrap(spec, settings)


def configure_groups(groups: masks_lib.LayerGroups, model_cfg) -> masks_lib.LayerGroups:
  """Applies ``model.embeddings`` and ``model.sub_blocks`` to a model's groups.

  ``model.embeddings``: ``"fixed"`` keeps the model's fixed groups (the
  paper's frozen embeddings), ``"trained"`` makes them common (every client
  trains them), ``"auto"`` = fixed for a pretrained model, trained for one
  trained from scratch (``model.pretrained = ''``), so that ``full`` is
  textbook FedAvg there. ``model.sub_blocks``: attention and MLP of each
  block as separate candidates (:data:`SUB_BLOCKS`). Both fields are
  declared in configs/default.py; a bare model config without them (tests,
  benchmarks) keeps the model's own declaration.
  """
  embeddings = model_cfg.get("embeddings", "fixed")
  if embeddings not in EMBEDDINGS:
    raise ValueError(f"model.embeddings must be one of {list(EMBEDDINGS)}, got {embeddings!r}")
  if embeddings == "trained" or (embeddings == "auto" and not model_cfg.get("pretrained", "")):
    groups = masks_lib.train_fixed(groups)
  if model_cfg.get("sub_blocks", False):
    if model_cfg.name not in SUB_BLOCKS:
      raise ValueError(f"model.sub_blocks needs a transformer ({sorted(SUB_BLOCKS)}), "
                       f"got model.name={model_cfg.name!r}")
    groups = masks_lib.split_candidates(groups, SUB_BLOCKS[model_cfg.name])
  return groups


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
