"""Shared transformer pieces (fedsel_jax/models/transformer.py) against naive NumPy."""

import jax.numpy as jnp
import numpy as np
import pytest

from fedsel_jax.models import transformer


def naive_attention(q, k, v, heads, keep):
  b, t, d = q.shape
  hd = d // heads
  out = np.zeros((b, t, d))
  for i in range(b):
    for h in range(heads):
      sl = slice(h * hd, (h + 1) * hd)
      logits = q[i, :, sl] @ k[i, :, sl].T / np.sqrt(hd)
      logits = np.where(keep[i][None, :], logits, -np.inf)
      p = np.exp(logits - logits.max(-1, keepdims=True))
      p /= p.sum(-1, keepdims=True)
      out[i, :, sl] = p @ v[i, :, sl]
  return out


def test_self_attention_matches_naive_with_padding():
  rng = np.random.default_rng(0)
  q, k, v = (rng.normal(size=(2, 5, 12)).astype(np.float32) for _ in range(3))
  keep = np.array([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], bool)
  got = transformer.self_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), 3,
                                   keep=jnp.asarray(keep))
  np.testing.assert_allclose(got, naive_attention(q, k, v, 3, keep), rtol=1e-5, atol=1e-6)
  full = transformer.self_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), 3)
  np.testing.assert_allclose(full, naive_attention(q, k, v, 3, np.ones_like(keep)),
                             rtol=1e-5, atol=1e-6)


def test_activations_and_dtypes():
  x = jnp.linspace(-3, 3, 7)
  np.testing.assert_allclose(transformer.activation("quick_gelu")(x),
                             x * (1 / (1 + np.exp(-1.702 * np.asarray(x)))), rtol=1e-6)
  np.testing.assert_array_equal(transformer.activation("relu")(x), np.maximum(x, 0))
  with pytest.raises(ValueError, match="quick_gelu"):
    transformer.activation("swish")
  assert transformer.compute_dtype("bfloat16") == jnp.bfloat16
  with pytest.raises(ValueError, match="model.dtype"):
    transformer.compute_dtype("float16")


def test_pretrained_loader_accepts_both_forms():
  load = transformer.pretrained_loader(lambda p: {**p, "x": 1})
  assert load({"a": 0}) == {"a": 0, "x": 1}
  assert load({"params": {"a": 0}}) == {"params": {"a": 0, "x": 1}}
