"""CLIP ViT vision tower with a linear classification head.

Matches Hugging Face ``CLIPVisionModel``: patch convolution without bias, a
learned class token and position embedding, ``pre_layrnorm``, pre-LN blocks
(``hidden_act``, quick_gelu for OpenAI CLIP), ``post_layernorm`` on the class
token, optionally ``visual_projection``, then a Dense head.

Parameter tree (without the outer ``'params'`` key)::

  embeddings/     patch_embedding, class_embedding, position_embedding  (fixed)
  pre_layernorm/                                                        (fixed)
  layer_0 ... layer_{L-1}/  one block each                         (candidates)
  post_layernorm/, visual_projection/ (optional), head/classifier/     (common)

The groups follow SPEC.md: ``post_layernorm`` (CLIP's ``ln_post``), the
projection when present, and the head are *common* (every client trains them
every round, outside the budget); no config changes that. Whether the
projection exists is ``model.use_projection``: off by default here (the head
reads the 768-d post-LN class token, as ``CLIPVisionModel``), on in the
paper's configs (configs/cifar10_clip.py, configs/domainnet_clip.py: the head
reads CLIP's 512-d image embedding, as ``CLIPVisionModelWithProjection``).

Inputs are float32 NHWC images already normalised as the weights expect
(OpenAI CLIP: :data:`CLIP_MEAN`, :data:`CLIP_STD` on [0, 1] pixels); images
whose size differs from ``image_size`` are resized bilinearly in the graph.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fedsel_jax import weights
from fedsel_jax.masks import LayerGroups
from fedsel_jax.models.spec import ModelSpec
from fedsel_jax.models.transformer import ClassifierHead
from fedsel_jax.models.transformer import activation
from fedsel_jax.models.transformer import compute_dtype
from fedsel_jax.models.transformer import dense
from fedsel_jax.models.transformer import layer_norm
from fedsel_jax.models.transformer import pretrained_loader
from fedsel_jax.models.transformer import self_attention

PyTree = Any

# Block kernels LoRA may adapt (fedsel_jax/models/lora.py).
LORA_TARGETS = {"attention": ("*/q_proj", "*/k_proj", "*/v_proj", "*/out_proj"),
                "mlp": ("*/fc1", "*/fc2")}

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class ClipVisionConfig:
  """Vision tower architecture (HF ``CLIPVisionConfig`` field meanings).

  Attributes:
    projection_dim: width of ``visual_projection``; 0 = no projection (the
      head reads the post-LN class token directly).
  """

  image_size: int = 224
  patch_size: int = 32
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  intermediate_size: int = 3072
  layer_norm_eps: float = 1e-5
  hidden_act: str = "quick_gelu"
  num_channels: int = 3
  projection_dim: int = 0

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2


VARIANTS: dict[str, ClipVisionConfig] = {
    "B/32": ClipVisionConfig(),
    "B/16": ClipVisionConfig(patch_size=16),
    "L/14": ClipVisionConfig(patch_size=14, hidden_size=1024, num_layers=24,
                             num_heads=16, intermediate_size=4096),
    # ../shared/BENCH.md's tiny ViT (2.7M parameters), for benchmarks.
    "T/4": ClipVisionConfig(image_size=32, patch_size=4, hidden_size=192, num_layers=6,
                            num_heads=3, intermediate_size=768),
    "tiny": ClipVisionConfig(image_size=32, patch_size=8, hidden_size=32, num_layers=2,
                             num_heads=4, intermediate_size=64),
}


class ClipEmbeddings(nn.Module):
  """Patchify (conv, no bias) + class token + position embedding."""

  cfg: ClipVisionConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    """images: f32[B, S, S, C] with S = image_size -> dtype[B, 1 + N, D]."""
    cfg, d = self.cfg, self.cfg.hidden_size
    p = cfg.patch_size
    x = nn.Conv(d, (p, p), strides=(p, p), padding="VALID", use_bias=False,
                dtype=self.dtype, param_dtype=self.param_dtype,
                kernel_init=nn.initializers.normal(0.02), name="patch_embedding")(images)
    x = x.reshape(x.shape[0], -1, d)  # row-major patches, as HF's flatten(2)
    cls = self.param("class_embedding", nn.initializers.normal(d ** -0.5), (d,),
                     self.param_dtype)
    pos = self.param("position_embedding", nn.initializers.normal(0.02),
                     (cfg.num_patches + 1, d), self.param_dtype)
    cls = jnp.broadcast_to(cls.astype(self.dtype), (x.shape[0], 1, d))
    return jnp.concatenate([cls, x], axis=1) + pos.astype(self.dtype)


class ClipLayer(nn.Module):
  """Pre-LN block: h + attn(LN1(h)), then h + MLP(LN2(h))."""

  cfg: ClipVisionConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h: jax.Array) -> jax.Array:
    """h: dtype[B, T, D] -> dtype[B, T, D]."""
    cfg = self.cfg
    d = h.shape[-1]
    linear = lambda n, name: dense(n, self.dtype, self.param_dtype, name)
    norm = lambda x, name: layer_norm(cfg.layer_norm_eps, self.dtype, self.param_dtype, name)(x)

    x = norm(h, "layer_norm1")
    q, k, v = (linear(d, n)(x) for n in ("q_proj", "k_proj", "v_proj"))
    h = h + linear(d, "out_proj")(self_attention(q, k, v, cfg.num_heads))

    x = activation(cfg.hidden_act)(linear(cfg.intermediate_size, "fc1")(norm(h, "layer_norm2")))
    return h + linear(d, "fc2")(x)


class ClipVisionClassifier(nn.Module):
  """CLIP vision tower + linear classifier.

  Attributes:
    cfg: architecture.
    num_classes: classifier outputs.
    dropout_rate: dropout on the features before the classifier (train only).
    resize_input: resize images of another size to ``cfg.image_size``.
    dtype: compute dtype (float32 or bfloat16); softmax and head in float32.
    param_dtype: parameter dtype (float32 master weights).
  """

  cfg: ClipVisionConfig
  num_classes: int
  dropout_rate: float = 0.0
  resize_input: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    cfg, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.embeddings = ClipEmbeddings(cfg, **kw, name="embeddings")
    self.pre_layernorm = layer_norm(cfg.layer_norm_eps, self.dtype, self.param_dtype,
                                    "pre_layernorm")
    self.layers = [ClipLayer(cfg, **kw, name=f"layer_{i}") for i in range(cfg.num_layers)]
    # From the class token on, float32: a few [B, D] vectors, cheap and exact.
    self.post_layernorm = layer_norm(cfg.layer_norm_eps, jnp.float32, self.param_dtype,
                                     "post_layernorm")
    if cfg.projection_dim:
      self.visual_projection = dense(cfg.projection_dim, jnp.float32, self.param_dtype,
                                     "visual_projection", use_bias=False)
    self.head = ClassifierHead(self.num_classes, self.dropout_rate, self.param_dtype,
                               name="head")

  def encode(self, images: jax.Array) -> jax.Array:
    """HF ``last_hidden_state``: f32[B, 1 + N, D] of ``images: f32[B, H, W, C]``."""
    s = self.cfg.image_size
    if images.shape[1:3] != (s, s):
      if not self.resize_input:
        raise ValueError(f"images are {images.shape[1:3]}, the model expects {(s, s)}")
      images = jax.image.resize(images, (images.shape[0], s, s, images.shape[3]), "bilinear")
    h = self.pre_layernorm(self.embeddings(images.astype(self.dtype)))
    for layer in self.layers:
      h = layer(h)
    return h.astype(jnp.float32)

  def features(self, images: jax.Array) -> jax.Array:
    """f32[B, D] post-LN class token (or f32[B, P] after the projection)."""
    pooled = self.post_layernorm(self.encode(images)[:, 0])
    if self.cfg.projection_dim:
      pooled = self.visual_projection(pooled)
    return pooled

  def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
    """images: f32[B, H, W, C] -> logits f32[B, num_classes]."""
    return self.head(self.features(images), train)


def clip_groups(num_layers: int, projection: bool = False) -> LayerGroups:
  """Embeddings + pre-LN fixed, blocks candidates, post-LN/projection/head common."""
  common = ("post_layernorm",) + (("visual_projection",) if projection else ()) + ("head",)
  return LayerGroups(
      candidates=tuple((f"layer_{i}", (f"layer_{i}",)) for i in range(num_layers)),
      common=common,
      fixed=("embeddings", "pre_layernorm"))


def config_from_hf(hf: dict[str, Any], projection: bool) -> ClipVisionConfig:
  """Vision config from a CLIP (``vision_config``) or CLIP-vision config.json."""
  v = hf.get("vision_config", hf) or {}
  default = ClipVisionConfig()
  proj = hf.get("projection_dim", v.get("projection_dim", 512)) if projection else 0
  return ClipVisionConfig(
      image_size=v.get("image_size", default.image_size),
      patch_size=v.get("patch_size", default.patch_size),
      hidden_size=v.get("hidden_size", default.hidden_size),
      num_layers=v.get("num_hidden_layers", default.num_layers),
      num_heads=v.get("num_attention_heads", default.num_heads),
      intermediate_size=v.get("intermediate_size", default.intermediate_size),
      layer_norm_eps=v.get("layer_norm_eps", default.layer_norm_eps),
      hidden_act=v.get("hidden_act", default.hidden_act),
      num_channels=v.get("num_channels", default.num_channels),
      projection_dim=proj)


def load_vision(params: PyTree, directory, cfg: ClipVisionConfig) -> PyTree:
  """Overwrites the vision tower (and projection) of ``params`` from a HF dir.

  Only ``vision_model.*`` (or the unprefixed keys of a transformers-5
  ``CLIPVisionModel``) and ``visual_projection.weight`` are read; the text
  tower and ``logit_scale`` are ignored, the head is kept.
  """
  tensors = weights.read_tensors(directory)
  prefix = weights.find_prefix(tensors, "embeddings.patch_embedding.weight",
                               ("vision_model.", ""))
  claimed = ((prefix,) if prefix else
             ("embeddings.", "encoder.", "pre_layrnorm.", "post_layernorm."))
  return weights.load_params(
      params, tensors,
      weights.clip_vision_key_map(cfg.num_layers, bool(cfg.projection_dim), prefix),
      claimed=claimed, ignored=(prefix + "embeddings.position_ids",))


def build(model_cfg, num_classes: int) -> ModelSpec:
  """ModelSpec of a CLIP ViT classifier from ``config.model``.

  Fields (``model_cfg.get(field, default)``):
    name: registry name (default 'clip_vit').
    pretrained: '' = random init, or a directory with a HF CLIP checkpoint
      (config.json, model.safetensors / pytorch_model.bin); sizes then come
      from its (vision_)config.
    variant: size preset 'B/32' (default), 'B/16', 'L/14', 'T/4' (BENCH.md's tiny
      ViT), 'tiny' (tests).
    image_size, patch_size, hidden_size, num_layers, num_heads,
    intermediate_size, layer_norm_eps, hidden_act, num_channels: random-init
      overrides of the variant.
    use_projection: add ``visual_projection`` (default False); width
      ``projection_dim`` (default 512, or the checkpoint's).
    dtype: 'float32' | 'bfloat16' (params stay float32).
    dropout_rate: before the head (default 0.0).
    resize_input: resize other image sizes to image_size (default True).
    input_size: side of ``example_input`` (default image_size).

  Raises:
    DataMissingError: ``pretrained`` names something not on disk.
  """
  projection = bool(model_cfg.get("use_projection", False))
  pretrained = model_cfg.get("pretrained", "")
  directory = weights.resolve_pretrained(pretrained) if pretrained else None
  if directory is not None:
    cfg = config_from_hf(weights.read_config(directory), projection)
  else:
    variant = model_cfg.get("variant", "B/32")
    if variant not in VARIANTS:
      raise ValueError(f"unknown CLIP variant {variant!r}; known: {sorted(VARIANTS)}")
    base = VARIANTS[variant]
    fields = {f.name: model_cfg.get(f.name, getattr(base, f.name))
              for f in dataclasses.fields(ClipVisionConfig) if f.name != "projection_dim"}
    cfg = ClipVisionConfig(**fields, projection_dim=(
        int(model_cfg.get("projection_dim", 512)) if projection else 0))
  if cfg.image_size % cfg.patch_size:
    raise ValueError(f"image_size {cfg.image_size} is not a multiple of patch {cfg.patch_size}")
  dtype = compute_dtype(model_cfg.get("dtype", "float32"))

  module = ClipVisionClassifier(
      cfg=cfg, num_classes=num_classes, dropout_rate=float(model_cfg.get("dropout_rate", 0.0)),
      resize_input=bool(model_cfg.get("resize_input", True)), dtype=dtype,
      param_dtype=jnp.float32)
  side = int(model_cfg.get("input_size", cfg.image_size))
  example = np.zeros((2, side, side, cfg.num_channels), np.float32)

  load = None
  if directory is not None:
    load = pretrained_loader(lambda params: load_vision(params, directory, cfg))

  return ModelSpec(name=model_cfg.get("name", "clip_vit"), module=module,
                   groups=clip_groups(cfg.num_layers, bool(cfg.projection_dim)),
                   example_input=example, load_pretrained=load, lora_targets=LORA_TARGETS)
