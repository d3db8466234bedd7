"""Small models for fast simulations: an MLP, a CNN and a ViT.

Each is a Flax linen module whose top-level submodules are the layer groups:
``embed`` (fixed), ``block_0 .. block_{K-1}`` (candidates, input -> output)
and ``head`` (common). Compute runs in ``dtype`` (float32 or bfloat16) with
float32 parameters; logits are returned in float32.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from fedsel_jax.masks import LayerGroups
from fedsel_jax.models.spec import ModelSpec

Dtype = Any


def block_groups(num_blocks: int, fixed=("embed",), common=("head",)) -> LayerGroups:
  return LayerGroups(candidates=tuple((f"block_{k}", (f"block_{k}",)) for k in range(num_blocks)),
                     common=tuple(common), fixed=tuple(fixed))


class MLP(nn.Module):
  """Flatten -> Dense embed -> ``depth`` residual Dense blocks -> head."""

  num_classes: int
  width: int = 64
  depth: int = 4
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    del train
    x = x.reshape(x.shape[0], -1).astype(self.dtype)
    x = nn.Dense(self.width, dtype=self.dtype, name="embed")(x)
    for k in range(self.depth):
      x = x + nn.Dense(self.width, dtype=self.dtype, name=f"block_{k}")(nn.relu(x))
    return nn.Dense(self.num_classes, dtype=self.dtype, name="head")(nn.relu(x)).astype(jnp.float32)


class ConvBlock(nn.Module):
  features: int
  pool: bool
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(self.features, (3, 3), dtype=self.dtype, name="conv")(x)
    x = nn.GroupNorm(num_groups=min(8, self.features), dtype=self.dtype, name="norm")(x)
    x = nn.relu(x)
    return nn.max_pool(x, (2, 2), (2, 2)) if self.pool else x


class CNN(nn.Module):
  """Conv stem (fixed) -> ``len(features)`` conv stages (candidates) -> head."""

  num_classes: int
  features: tuple[int, ...] = (32, 32, 64, 64)
  stem: int = 16
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    del train
    x = x.astype(self.dtype)
    x = nn.relu(nn.Conv(self.stem, (3, 3), dtype=self.dtype, name="embed")(x))
    for k, f in enumerate(self.features):
      pool = k % 2 == 1 and x.shape[1] >= 2
      x = ConvBlock(f, pool=pool, dtype=self.dtype, name=f"block_{k}")(x)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x).astype(jnp.float32)


class ViTBlock(nn.Module):
  """Pre-LN transformer block."""

  num_heads: int
  mlp_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    y = nn.LayerNorm(dtype=self.dtype, name="ln1")(x)
    y = nn.MultiHeadDotProductAttention(num_heads=self.num_heads, dtype=self.dtype,
                                        name="attn")(y, y)
    x = x + y
    y = nn.LayerNorm(dtype=self.dtype, name="ln2")(x)
    y = nn.Dense(self.mlp_dim, dtype=self.dtype, name="mlp1")(y)
    y = nn.Dense(x.shape[-1], dtype=self.dtype, name="mlp2")(nn.gelu(y))
    return x + y


class ViTEmbed(nn.Module):
  patch: int
  width: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(self.width, (self.patch, self.patch), strides=(self.patch, self.patch),
                padding="VALID", dtype=self.dtype, name="patch")(x)
    b, h, w, c = x.shape
    x = x.reshape(b, h * w, c)
    cls = self.param("cls", nn.initializers.zeros, (1, 1, c))
    x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, c)).astype(x.dtype), x], axis=1)
    pos = self.param("pos", nn.initializers.normal(0.02), (1, h * w + 1, c))
    return x + pos.astype(x.dtype)


class ViT(nn.Module):
  """Patch embedding (fixed) -> ``depth`` blocks (candidates) -> LN + head (common)."""

  num_classes: int
  patch: int = 4
  width: int = 192
  depth: int = 6
  num_heads: int = 3
  mlp_dim: int = 768
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    del train
    x = ViTEmbed(self.patch, self.width, dtype=self.dtype, name="embed")(x.astype(self.dtype))
    for k in range(self.depth):
      x = ViTBlock(self.num_heads, self.mlp_dim, dtype=self.dtype, name=f"block_{k}")(x)
    x = nn.LayerNorm(dtype=self.dtype, name="norm")(x[:, 0])
    return nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x).astype(jnp.float32)


# Block kernels LoRA may adapt (fedsel_jax/models/lora.py). The MLP's block is
# one Dense (an MLP kernel, no attention); the CNN has no dense block kernel.
LORA_TARGETS = {
    "mlp": {"mlp": ("block_*",)},
    "cnn": {},
    "vit": {"attention": ("*/attn/query", "*/attn/key", "*/attn/value", "*/attn/out"),
            "mlp": ("*/mlp1", "*/mlp2")},
}


def build(model_cfg, num_classes: int, input_shape: tuple[int, ...]) -> ModelSpec:
  """Builds ``mlp``, ``cnn`` or ``vit`` from ``config.model``.

  Fields (defaults): ``width`` (64 mlp / 192 vit), ``depth`` (4 / 6),
  ``features`` ((32, 32, 64, 64) cnn), ``patch`` (4), ``num_heads`` (3),
  ``mlp_dim`` (4 * width), ``dtype`` ('float32' | 'bfloat16').
  """
  name = model_cfg.name
  dtype = jnp.dtype(model_cfg.get("dtype", "float32"))
  example = np.zeros((2,) + tuple(input_shape), np.float32)
  if name == "mlp":
    depth = model_cfg.get("depth", 4)
    module = MLP(num_classes, width=model_cfg.get("width", 64), depth=depth, dtype=dtype)
    groups = block_groups(depth)
  elif name == "cnn":
    features = tuple(model_cfg.get("features", (32, 32, 64, 64)))
    module = CNN(num_classes, features=features, dtype=dtype)
    groups = block_groups(len(features))
  elif name == "vit":
    width, depth = model_cfg.get("width", 192), model_cfg.get("depth", 6)
    module = ViT(num_classes, patch=model_cfg.get("patch", 4), width=width, depth=depth,
                 num_heads=model_cfg.get("num_heads", 3),
                 mlp_dim=model_cfg.get("mlp_dim", 4 * width), dtype=dtype)
    groups = block_groups(depth, common=("norm", "head"))
  else:
    raise ValueError(f"unknown small model {name!r}")
  return ModelSpec(name=name, module=module, groups=groups, example_input=example,
                   lora_targets=LORA_TARGETS[name])
