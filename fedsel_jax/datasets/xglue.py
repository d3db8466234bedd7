"""XGLUE news classification (NC): 5 languages, 10 categories, language = client group.

XGLUE is not in TFDS and needs the network; place the files of the official
release (https://github.com/microsoft/XGLUE, ``xglue_full_dataset.tar.gz``)
under ``{data_dir}/xglue_nc/`` (or ``data.xglue_dir``), keeping the release's
layout; either of

    {xglue_dir}/NC/xglue.nc.{lang}.dev
    {xglue_dir}/xglue_full_dataset/NC/xglue.nc.{lang}.dev

for lang in en, de, es, fr, ru. Each line is ``news title<TAB>news body<TAB>category``
with category one of ``CATEGORIES``. The release has a training file only for
English (``xglue.nc.en.train``, for zero-shot transfer) and withholds test
labels, so, as in federated multilingual studies (e.g. Weller et al., 2022),
each language's labelled dev file (10,000 news) is the data: a hash of
(language, line number) sends 20% of it to test, the rest to train. With
``include_en_train`` the English training file joins the English train part.

Tokens: the (title, body) pair is encoded as one sequence pair by a
``tokenizers`` tokenizer.json, truncated/padded to ``max_len``. The paper uses
XLM-RoBERTa: put its tokenizer.json at ``{xglue_dir}/tokenizer.json`` (the
default; e.g. ``huggingface-cli download FacebookAI/xlm-roberta-base
tokenizer.json --local-dir {xglue_dir}``) or set ``data.tokenizer`` to its
path; XLM-R pads with id 1 (``Dataset.pad_id``).

Config fields (``data_cfg``), with defaults:
  data_dir: $TFDS_DATA_DIR or ~/tensorflow_datasets.
  xglue_dir: '{data_dir}/xglue_nc'.
  languages: ('en', 'de', 'es', 'fr', 'ru').
  tokenizer: '{xglue_dir}/tokenizer.json'; or 'minilm', or a path.
  max_len: 128.
  include_en_train: False.
  cache: True (tokens cached in {data_dir}/fedsel_cache/).
"""

from __future__ import annotations

import os

import numpy as np

from fedsel_jax.datasets import common
from fedsel_jax.datasets.base import DataMissingError, Dataset

LANGUAGES = ("en", "de", "es", "fr", "ru")
CATEGORIES = ("autos", "entertainment", "finance", "foodanddrink", "health", "lifestyle",
              "news", "sports", "travel", "video")
TEST_FRACTION = 0.2
_LAYOUTS = ("NC", os.path.join("xglue_full_dataset", "NC"))


def xglue_dir(data_cfg) -> str:
  default = os.path.join(common.data_dir(data_cfg), "xglue_nc")
  return os.path.abspath(os.path.expanduser(str(data_cfg.get("xglue_dir", None) or default)))


def _nc_dir(root: str) -> str | None:
  for layout in _LAYOUTS:
    if os.path.isdir(os.path.join(root, layout)):
      return os.path.join(root, layout)
  return None


def _files(data_cfg) -> dict[str, str]:
  """Paths of the labelled files, by language; raises DataMissingError naming what is missing."""
  root = xglue_dir(data_cfg)
  languages = tuple(data_cfg.get("languages", LANGUAGES))
  unknown = [lang for lang in languages if lang not in LANGUAGES]
  if unknown:
    raise ValueError(f"data.languages: XGLUE-NC has no {unknown}; choose from {LANGUAGES}")
  nc_dir = _nc_dir(root) or os.path.join(root, "NC")
  files = {lang: os.path.join(nc_dir, f"xglue.nc.{lang}.dev") for lang in languages}
  if data_cfg.get("include_en_train", False) and "en" in languages:
    files["en_train"] = os.path.join(nc_dir, "xglue.nc.en.train")
  missing = [path for path in files.values() if not os.path.isfile(path)]
  if missing:
    raise DataMissingError(
        "XGLUE-NC files missing:\n  " + "\n  ".join(missing) + "\nDownload "
        "https://xglue.blob.core.windows.net/xglue/xglue_full_dataset.tar.gz on a machine with "
        f"network and extract its NC/ folder to {os.path.join(root, 'NC')} (or set "
        "data.xglue_dir).")
  return files


def _tokenizer(data_cfg) -> str:
  name = data_cfg.get("tokenizer", None) or os.path.join(xglue_dir(data_cfg), "tokenizer.json")
  try:
    return common.tokenizer_path(name)
  except DataMissingError as e:
    raise DataMissingError(
        f"{e}. XGLUE needs a tokenizer.json: XLM-R's (huggingface-cli download "
        f"FacebookAI/xlm-roberta-base tokenizer.json --local-dir {xglue_dir(data_cfg)}), "
        "or data.tokenizer='minilm' (English vocabulary only)") from None


def check_available(data_cfg) -> None:
  """Fast existence checks: the data files and the tokenizer file."""
  _files(data_cfg)
  _tokenizer(data_cfg)


def read_nc_file(path: str) -> list[tuple[str, str, int]]:
  """(title, body, category index) of each line of an XGLUE-NC file.

  Raises:
    ValueError: a line without 3 tab-separated fields or with an unknown category.
  """
  rows = []
  with open(path, encoding="utf-8") as f:
    for line_no, line in enumerate(f, 1):
      line = line.rstrip("\r\n")
      if not line.strip():
        continue
      fields = line.split("\t")
      category = fields[-1].strip()
      if len(fields) < 3 or category not in CATEGORIES:
        raise ValueError(f"{path}:{line_no}: expected 'title<TAB>body<TAB>category' with a "
                         f"category in {CATEGORIES}, got {line[:120]!r}")
      rows.append((fields[0].strip(), "\t".join(fields[1:-1]).strip(),
                   CATEGORIES.index(category)))
  return rows


def load(data_cfg) -> Dataset:
  """Reads and tokenises XGLUE-NC.

  Returns:
    Dataset: x int32 ``[N, max_len]`` token ids (padding ``pad_id``), y int32
    ``[N]`` category, train_groups int32 ``[N]`` = language index into group_names.
  """
  files = _files(data_cfg)
  tokenizer_file = _tokenizer(data_cfg)
  max_len = int(data_cfg.get("max_len", 128))
  languages = tuple(data_cfg.get("languages", LANGUAGES))

  split_rows = {"train": [], "test": []}
  groups = []
  for group, lang in enumerate(languages):
    for line_no, row in enumerate(read_nc_file(files[lang])):
      test = common.stable_fraction(f"xglue_nc/{lang}/{line_no}") < TEST_FRACTION
      split_rows["test" if test else "train"].append(row)
      if not test:
        groups.append(group)
    if lang == "en" and "en_train" in files:
      rows = read_nc_file(files["en_train"])
      split_rows["train"] += rows
      groups += [group] * len(rows)

  arrays = {}
  pad_id = 0
  for split, rows in split_rows.items():
    ids, pad_id = common.tokenize([(title, body) for title, body, _ in rows], tokenizer_file,
                                  max_len, cache_dir=common.cache_dir(data_cfg))
    arrays[f"{split}_x"] = ids
    arrays[f"{split}_y"] = np.asarray([label for _, _, label in rows], np.int32)
  return Dataset(name="xglue", num_classes=len(CATEGORIES), class_names=CATEGORIES,
                 train_groups=np.asarray(groups, np.int32), group_names=languages,
                 pad_id=pad_id, **arrays)
