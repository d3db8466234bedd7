"""scikit-learn digits (1,797 images of 8x8, 10 classes) as a real TFDS builder.

The data ships inside the scikit-learn wheel, so the builder prepares offline
and without TensorFlow (array_record files) into ``data_cfg.data_dir`` on first
use; later loads read it back with ``builder.as_data_source``.

Split: an example goes to test when a hash of its index falls in the lowest
20% (``common.stable_fraction``): fixed, independent of seeds and of library
versions; 360 test / 1,437 train.

Config fields (``data_cfg``):
  data_dir: TFDS data directory (default $TFDS_DATA_DIR or ~/tensorflow_datasets).
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

from fedsel_jax.datasets import common
from fedsel_jax.datasets.base import Dataset

TEST_FRACTION = 0.2
NUM_CLASSES = 10
# Pixel values of load_digits() are counts in 0..16.
MAX_PIXEL = 16.0


def is_test_index(index: int) -> bool:
  """Fixed split rule: True for the ~20% of indices whose hash falls lowest."""
  return common.stable_fraction(f"digits/{index}") < TEST_FRACTION


class SklearnDigits(tfds.core.GeneratorBasedBuilder):
  """TFDS builder for ``sklearn.datasets.load_digits``."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Hashed 80/20 split of the 1,797 images."}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="Optical recognition of handwritten digits (UCI), 8x8, values 0..16.",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
            "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
            "index": np.int64,
        }),
        supervised_keys=("image", "label"),
        homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download: the data is in the scikit-learn wheel.
    return {"train": self._generate_examples(test=False),
            "test": self._generate_examples(test=True)}

  def _generate_examples(self, test: bool):
    from sklearn import datasets as sk_datasets  # pylint: disable=g-import-not-at-top

    digits = sk_datasets.load_digits()
    for index, (image, label) in enumerate(zip(digits.images, digits.target)):
      if is_test_index(index) == test:
        yield index, {"image": image.astype(np.uint8)[..., None], "label": int(label),
                      "index": index}


def builder(data_cfg) -> SklearnDigits:
  return SklearnDigits(data_dir=common.data_dir(data_cfg), file_format="array_record")


def check_available(data_cfg) -> None:
  """Always available: scikit-learn carries the data."""
  del data_cfg


def load(data_cfg) -> Dataset:
  """Prepares (first call only) and loads the digits.

  Returns:
    Dataset with x float32 ``[N, 8, 8, 1]`` in [0, 1], y int32 ``[N]``, 10 classes.
  """
  digits_builder = builder(data_cfg)
  if not common.builder_is_prepared(digits_builder):
    digits_builder.download_and_prepare()
  arrays = {}
  for split in ("train", "test"):
    records = sorted(common.read_split(digits_builder, split), key=lambda r: int(r["index"]))
    arrays[f"{split}_x"] = np.stack([r["image"] for r in records]).astype(np.float32) / MAX_PIXEL
    arrays[f"{split}_y"] = np.asarray([r["label"] for r in records], np.int32)
  return Dataset(name="digits", num_classes=NUM_CLASSES,
                 class_names=tuple(str(c) for c in range(NUM_CLASSES)), **arrays)
