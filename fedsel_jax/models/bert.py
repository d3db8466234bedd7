"""BERT-family text encoders (BERT, MiniLM, RoBERTa, XLM-R) with a linear head.

Post-LN transformer blocks as in Hugging Face ``BertModel`` / ``RobertaModel``;
the pooler is dropped and a Dense classifier reads a mean-pooled (MiniLM's
sentence-transformers pooling) or first-token representation.

Parameter tree (without the outer ``'params'`` key), which fixes the groups::

  embeddings/   word, position, token-type embeddings + LayerNorm   (fixed)
  layer_0 ... layer_{L-1}/   one transformer block each       (candidates)
  head/classifier/           Dense(num_classes)                    (common)

Padding: the attention mask is ``ids != pad_token_id`` (0 for BERT/MiniLM, 1
for RoBERTa/XLM-R); data for a RoBERTa-style model must be padded with 1.
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

_ROBERTA_TYPES = ("roberta", "xlm-roberta", "camembert")

# Block kernels LoRA may adapt (fedsel_jax/models/lora.py).
LORA_TARGETS = {"attention": ("*/query", "*/key", "*/value", "*/attention_output"),
                "mlp": ("*/intermediate", "*/output")}


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """Architecture of a BERT-family encoder (Hugging Face field meanings).

  Attributes:
    position_style: ``'absolute'`` (BERT: positions 0..T-1) or ``'roberta'``
      (positions ``pad_token_id + 1 + cumsum`` over non-pad tokens, pad
      tokens at ``pad_token_id``).
  """

  vocab_size: int = 30522
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  intermediate_size: int = 3072
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  pad_token_id: int = 0
  hidden_act: str = "gelu"
  position_style: str = "absolute"

  @property
  def max_len(self) -> int:
    """Longest sequence the position table allows."""
    if self.position_style == "roberta":
      return self.max_position_embeddings - self.pad_token_id - 1
    return self.max_position_embeddings


# Defaults per registry name (HF base sizes); size fields of the config override.
PRESETS: dict[str, BertConfig] = {
    "minilm": BertConfig(hidden_size=384, num_layers=6, num_heads=12,
                         intermediate_size=1536),
    "bert": BertConfig(),
    "roberta": BertConfig(vocab_size=50265, max_position_embeddings=514,
                          type_vocab_size=1, layer_norm_eps=1e-5, pad_token_id=1,
                          position_style="roberta"),
    "xlmr": BertConfig(vocab_size=250002, max_position_embeddings=514,
                       type_vocab_size=1, layer_norm_eps=1e-5, pad_token_id=1,
                       position_style="roberta"),
}


def position_ids(ids: jax.Array, cfg: BertConfig) -> jax.Array:
  """int32[B, T] position ids of token ids ``ids: int32[B, T]``."""
  if cfg.position_style == "roberta":
    keep = (ids != cfg.pad_token_id).astype(jnp.int32)
    return jnp.cumsum(keep, axis=1) * keep + cfg.pad_token_id
  if cfg.position_style == "absolute":
    return jnp.broadcast_to(jnp.arange(ids.shape[1], dtype=jnp.int32), ids.shape)
  raise ValueError(f"unknown position_style {cfg.position_style!r}")


class BertEmbeddings(nn.Module):
  """Word + position + token-type (always type 0) embeddings, then LayerNorm."""

  cfg: BertConfig
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, ids: jax.Array, train: bool) -> jax.Array:
    """ids: int32[B, T] -> dtype[B, T, H]."""
    cfg = self.cfg
    h = self._embed(cfg.vocab_size, "word_embeddings")(ids)
    h += self._embed(cfg.max_position_embeddings, "position_embeddings")(position_ids(ids, cfg))
    h += self._embed(cfg.type_vocab_size, "token_type_embeddings")(jnp.zeros_like(ids))
    h = layer_norm(cfg.layer_norm_eps, self.dtype, self.param_dtype, "LayerNorm")(h)
    return nn.Dropout(self.dropout_rate, deterministic=not train)(h)

  def _embed(self, num: int, name: str) -> nn.Embed:
    return nn.Embed(num, self.cfg.hidden_size, embedding_init=nn.initializers.normal(0.02),
                    dtype=self.dtype, param_dtype=self.param_dtype, name=name)


class BertLayer(nn.Module):
  """One post-LN block: self-attention + residual + LN, FFN + residual + LN."""

  cfg: BertConfig
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h: jax.Array, keep: jax.Array, train: bool) -> jax.Array:
    """Applies the block.

    Args:
      h: dtype[B, T, H] hidden states.
      keep: bool[B, T] True on real (non-pad) tokens; pad keys are masked.
      train: enables dropout (``'dropout'`` rng).

    Returns:
      dtype[B, T, H].
    """
    cfg = self.cfg
    d = h.shape[-1]
    linear = lambda n, name: dense(n, self.dtype, self.param_dtype, name)
    drop = lambda x: nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    norm = lambda x, name: layer_norm(cfg.layer_norm_eps, self.dtype, self.param_dtype, name)(x)

    q, k, v = (linear(d, n)(h) for n in ("query", "key", "value"))
    ctx = self_attention(q, k, v, cfg.num_heads, keep=keep, dropout=drop)
    h = norm(h + drop(linear(d, "attention_output")(ctx)), "attention_norm")

    ffn = activation(cfg.hidden_act)(linear(cfg.intermediate_size, "intermediate")(h))
    return norm(h + drop(linear(d, "output")(ffn)), "output_norm")


class BertClassifier(nn.Module):
  """BERT-family encoder + pooling + linear classifier.

  Attributes:
    cfg: architecture.
    num_classes: classifier outputs.
    pooling: ``'mean'`` (masked mean over real tokens) or ``'cls'`` (first token).
    dropout_rate: dropout on embeddings, attention probabilities, block
      outputs and the pooled features, active only when ``train=True``.
    dtype: compute dtype (float32 or bfloat16); softmax, pooling and the head
      run in float32.
    param_dtype: parameter dtype (float32 master weights).
  """

  cfg: BertConfig
  num_classes: int
  pooling: str = "mean"
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    kw = dict(cfg=self.cfg, dropout_rate=self.dropout_rate, dtype=self.dtype,
              param_dtype=self.param_dtype)
    self.embeddings = BertEmbeddings(**kw, name="embeddings")
    self.layers = [BertLayer(**kw, name=f"layer_{i}") for i in range(self.cfg.num_layers)]
    self.head = ClassifierHead(self.num_classes, self.dropout_rate, self.param_dtype,
                               name="head")

  def encode(self, ids: jax.Array, train: bool = False) -> jax.Array:
    """Last encoder layer's hidden states (HF ``last_hidden_state``).

    Args:
      ids: int32[B, T] token ids, ``pad_token_id`` = padding.
      train: enables dropout.

    Returns:
      f32[B, T, H].
    """
    keep = ids != self.cfg.pad_token_id
    h = self.embeddings(ids, train)
    for layer in self.layers:
      h = layer(h, keep, train)
    return h.astype(jnp.float32)

  def features(self, ids: jax.Array, train: bool = False) -> jax.Array:
    """Pooled sentence features f32[B, H] of ``ids: int32[B, T]``."""
    h = self.encode(ids, train)
    if self.pooling == "cls":
      return h[:, 0]
    if self.pooling == "mean":
      keep = (ids != self.cfg.pad_token_id).astype(jnp.float32)[..., None]
      return jnp.sum(h * keep, axis=1) / jnp.maximum(jnp.sum(keep, axis=1), 1e-9)
    raise ValueError(f"unknown pooling {self.pooling!r}; use 'mean' or 'cls'")

  def __call__(self, ids: jax.Array, train: bool = False) -> jax.Array:
    """ids: int32[B, T] -> logits f32[B, num_classes]."""
    return self.head(self.features(ids, train), train)


def bert_groups(num_layers: int) -> LayerGroups:
  """Embeddings fixed, each block a candidate (input -> output), head common."""
  return LayerGroups(
      candidates=tuple((f"layer_{i}", (f"layer_{i}",)) for i in range(num_layers)),
      common=("head",),
      fixed=("embeddings",))


def config_from_hf(hf: dict[str, Any]) -> BertConfig:
  """BertConfig from a Hugging Face ``config.json`` dict (HF defaults for gaps)."""
  model_type = hf.get("model_type", "bert")
  if hf.get("position_embedding_type", "absolute") != "absolute":
    raise NotImplementedError(
        f"position_embedding_type {hf['position_embedding_type']!r} is not supported")
  roberta = model_type in _ROBERTA_TYPES
  return BertConfig(
      vocab_size=hf.get("vocab_size", 30522),
      hidden_size=hf.get("hidden_size", 768),
      num_layers=hf.get("num_hidden_layers", 12),
      num_heads=hf.get("num_attention_heads", 12),
      intermediate_size=hf.get("intermediate_size", 3072),
      max_position_embeddings=hf.get("max_position_embeddings", 512),
      type_vocab_size=hf.get("type_vocab_size", 2),
      layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
      pad_token_id=hf.get("pad_token_id", 1 if roberta else 0),
      hidden_act=hf.get("hidden_act", "gelu"),
      position_style="roberta" if roberta else "absolute")


def load_encoder(params: PyTree, directory, num_layers: int) -> PyTree:
  """Overwrites embeddings and blocks of ``params`` from a HF checkpoint dir.

  Accepts base-model keys (``embeddings.*``) and task-model keys
  (``bert.embeddings.*``, ``roberta.embeddings.*``); pooler and task heads in
  the checkpoint are ignored, the Flax head is kept.
  """
  tensors = weights.read_tensors(directory)
  prefix = weights.find_prefix(tensors, "embeddings.word_embeddings.weight",
                               ("", "bert.", "roberta.", "model."))
  return weights.load_params(
      params, tensors, weights.bert_key_map(num_layers, prefix),
      claimed=(prefix + "embeddings.", prefix + "encoder."),
      ignored=(prefix + "embeddings.position_ids", prefix + "embeddings.token_type_ids"))


def build(model_cfg, num_classes: int) -> ModelSpec:
  """ModelSpec of a BERT-family classifier from ``config.model``.

  Fields (``model_cfg.get(field, default)``):
    name: 'minilm' | 'bert' | 'roberta' | 'xlmr' (selects size defaults).
    pretrained: '' = random init, 'minilm' = packaged all-MiniLM-L6-v2, or a
      directory with config.json + model.safetensors / pytorch_model.bin
      (then sizes come from its config.json). Default 'minilm' for name
      'minilm', '' otherwise.
    dtype: 'float32' | 'bfloat16' compute dtype (params stay float32).
    max_len: sequence length of ``example_input`` (default 128).
    pooling: 'mean' | 'cls' (default 'mean').
    dropout_rate: default 0.0.
    vocab_size, hidden_size, num_layers, num_heads, intermediate_size,
    max_position_embeddings, type_vocab_size, layer_norm_eps, pad_token_id,
    hidden_act: random-init sizes (defaults: the name's preset).

  Raises:
    DataMissingError: ``pretrained`` names something not on disk.
  """
  name = model_cfg.get("name", "minilm")
  if name not in PRESETS:
    raise ValueError(f"unknown BERT-family model {name!r}; known: {sorted(PRESETS)}")
  pretrained = model_cfg.get("pretrained", "minilm" if name == "minilm" else "")
  directory = weights.resolve_pretrained(pretrained) if pretrained else None
  if directory is not None:
    cfg = config_from_hf(weights.read_config(directory))
  else:
    fields = {f.name: model_cfg.get(f.name, getattr(PRESETS[name], f.name))
              for f in dataclasses.fields(BertConfig)}
    cfg = BertConfig(**fields)
  max_len = int(model_cfg.get("max_len", 128))
  if max_len > cfg.max_len:
    raise ValueError(f"max_len {max_len} exceeds the {cfg.max_len} positions of the model")

  module = BertClassifier(
      cfg=cfg, num_classes=num_classes, pooling=model_cfg.get("pooling", "mean"),
      dropout_rate=float(model_cfg.get("dropout_rate", 0.0)),
      dtype=compute_dtype(model_cfg.get("dtype", "float32")), param_dtype=jnp.float32)

  # Two rows of non-pad tokens, the second half-padded, within any vocabulary.
  example = np.arange(2 * max_len, dtype=np.int32).reshape(2, max_len)
  example = example % (cfg.vocab_size - cfg.pad_token_id - 1) + cfg.pad_token_id + 1
  example[1, max(1, max_len // 2):] = cfg.pad_token_id

  load = None
  if directory is not None:
    load = pretrained_loader(lambda params: load_encoder(params, directory, cfg.num_layers))

  return ModelSpec(name=name, module=module, groups=bert_groups(cfg.num_layers),
                   example_input=example, load_pretrained=load, lora_targets=LORA_TARGETS)
