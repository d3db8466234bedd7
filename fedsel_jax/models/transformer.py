"""Pieces the BERT-family and CLIP encoders share.

Both towers are Hugging Face ports whose parity tests (tests/test_bert.py,
tests/test_clip.py) pin numerics to PyTorch, so everything here reproduces
PyTorch's arithmetic: LayerNorm with the two-pass variance, N(0, 0.02) Dense
kernels (kernel = HF ``weight.T``), softmax in float32.

* :func:`activation`: ``hidden_act`` names of both families;
* :func:`layer_norm`, :func:`dense`: the Flax layers with HF's conventions;
* :func:`self_attention`: scaled dot-product attention over already projected
  queries, keys and values (the projections stay Dense submodules of each
  block, so their parameter paths, which the checkpoint key maps and the
  LoRA targets name, do not change);
* :class:`ClassifierHead`: dropout + Dense(num_classes) in float32;
* :func:`compute_dtype`: the ``model.dtype`` check;
* :func:`pretrained_loader`: the ``params -> params`` closure a ModelSpec
  carries, tolerant of the full ``{'params': ...}`` variables dict.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any

DTYPES = ("float32", "bfloat16")

_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: nn.gelu(x, approximate=False),           # exact (erf), BERT
    "gelu_new": lambda x: nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),      # OpenAI CLIP
    "relu": nn.relu,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
  """The elementwise function of a HF ``hidden_act`` name.

  Raises:
    ValueError: an unknown name (listing the known ones).
  """
  if name not in _ACTIVATIONS:
    raise ValueError(f"unsupported hidden_act {name!r}; known: {sorted(_ACTIVATIONS)}")
  return _ACTIVATIONS[name]


def compute_dtype(name: str) -> jnp.dtype:
  """``model.dtype`` -> jnp dtype; parameters stay float32 whatever it is.

  Raises:
    ValueError: ``name`` is not 'float32' or 'bfloat16'.
  """
  if name not in DTYPES:
    raise ValueError(f"model.dtype must be 'float32' or 'bfloat16', got {name!r}")
  return jnp.dtype(name)


def layer_norm(eps: float, dtype, param_dtype, name: str) -> nn.LayerNorm:
  """LayerNorm with PyTorch's two-pass variance (the fast form loses digits)."""
  return nn.LayerNorm(eps, use_fast_variance=False, dtype=dtype, param_dtype=param_dtype,
                      name=name)


def dense(features: int, dtype, param_dtype, name: str, use_bias: bool = True) -> nn.Dense:
  """Dense with BERT/CLIP's N(0, 0.02) kernel init; kernel = HF weight.T."""
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                  kernel_init=nn.initializers.normal(0.02), name=name)


def self_attention(q: jax.Array, k: jax.Array, v: jax.Array, num_heads: int,
                   keep: jax.Array | None = None,
                   dropout: Callable[[jax.Array], jax.Array] | None = None) -> jax.Array:
  """Multi-head scaled dot-product attention of projected q, k, v.

  Logits and softmax run in float32; the probabilities are cast back to the
  compute dtype of ``v`` before the weighted sum (as PyTorch does in bf16).

  Args:
    q, k, v: dtype[B, T, D] projected queries, keys, values (D = heads * d).
    num_heads: number of heads (divides D).
    keep: optional bool[B, T], False on padded keys (they get probability 0).
    dropout: optional function applied to the probabilities (BERT).

  Returns:
    dtype[B, T, D] context vectors, heads concatenated as HF does.
  """
  b, t, d = q.shape
  split = lambda x: x.reshape(b, t, num_heads, d // num_heads)
  logits = jnp.einsum("bqhd,bkhd->bhqk", split(q), split(k)).astype(jnp.float32)
  logits = logits / np.sqrt(d // num_heads).astype(np.float32)
  if keep is not None:
    logits = jnp.where(keep[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  if dropout is not None:
    probs = dropout(probs)
  return jnp.einsum("bhqk,bkhd->bqhd", probs, split(v)).reshape(b, t, d)


class ClassifierHead(nn.Module):
  """Dropout + Dense(num_classes), computed in float32."""

  num_classes: int
  dropout_rate: float = 0.0
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features: jax.Array, train: bool) -> jax.Array:
    """features: [B, D] -> f32[B, num_classes]."""
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(features.astype(jnp.float32))
    return dense(self.num_classes, jnp.float32, self.param_dtype, "classifier")(x)


def pretrained_loader(load_params: Callable[[PyTree], PyTree]) -> Callable[[PyTree], PyTree]:
  """Wraps ``load_params(params) -> params`` to also accept ``{'params': params}``."""

  def load(params: PyTree) -> PyTree:
    if set(params) == {"params"}:  # tolerate the full variables dict
      return {"params": load_params(params["params"])}
    return load_params(params)

  return load
