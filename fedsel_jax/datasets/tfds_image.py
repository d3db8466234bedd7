"""CIFAR-10, MNIST and DomainNet from TFDS data prepared beforehand (read without TF).

These need the network once: prepare them on a machine with network and
TensorFlow, in the array_record format that ``tfds.data_source`` reads:

    python -c "import tensorflow_datasets as tfds; \
      tfds.builder('cifar10', data_dir='D', file_format='array_record').download_and_prepare()"

then copy ``D/cifar10`` into this machine's ``data.data_dir``. Data already
prepared as tfrecord converts with
``tfds convert_format --dataset_dir=D/cifar10 --out_file_format=array_record``.
Nothing here downloads: an unprepared dataset raises DataMissingError at once
(``tfds.load`` would retry the network for minutes first).

Memory: ``Dataset`` holds float32 images, so images stay at their native size
by default (CIFAR-10 32x32x3 float32 is 0.7 GB for train + test; at 224x224 it
would be 36 GB). Models that need another input size (CLIP ViT-B/32: 224)
should resize on the device (``jax.image.resize``, per batch); per-channel
normalisation commutes with bilinear resizing, so normalising here is
equivalent. ``image_size`` > 0 resizes at load time instead (shorter side to
``image_size`` with bicubic filtering, then a centre crop, as CLIP's
preprocessing does). DomainNet images vary in size, so it needs
``image_size`` (default 64).

Decoded (and resized) uint8 images are cached in ``{data_dir}/fedsel_cache/``
(first DomainNet load scans every record of the six domains: minutes).

DomainNet: TFDS configs ``domainnet/{real,painting,clipart,quickdraw,infograph,
sketch}`` (345 classes; train/test per domain). Only the classes of
``data.classes`` are kept, relabelled 0..C-1 in that order; the default is the
10-class subset used by FedBN (Li et al., ICLR 2021) and later federated
DomainNet studies: bird, feather, headphones, ice_cream, teapot, tiger, whale,
windmill, wine_glass, zebra. ``train_groups`` = index of the domain in
``data.domains``; the test split concatenates the domains' test splits.

Config fields (``data_cfg``), with defaults:
  data_dir: TFDS data directory ($TFDS_DATA_DIR or ~/tensorflow_datasets).
  image_size: 0 = native (CIFAR-10, MNIST); DomainNet: 64.
  normalize: 'unit' (alias '[0,1]'): x / 255; 'clip': CLIP's mean/std per channel.
  rgb: False; True repeats MNIST's gray channel to 3 channels.
  cache: True.
  domains (DomainNet): all six, in the order above.
  classes (DomainNet): DOMAINNET_CLASSES.
"""

from __future__ import annotations

import hashlib
import io
import os

import numpy as np
import tensorflow_datasets as tfds

from fedsel_jax.datasets import common
from fedsel_jax.datasets.base import DataMissingError, Dataset

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DOMAINS = ("real", "painting", "clipart", "quickdraw", "infograph", "sketch")
DOMAINNET_CLASSES = ("bird", "feather", "headphones", "ice_cream", "teapot", "tiger", "whale",
                     "windmill", "wine_glass", "zebra")
DOMAINNET_IMAGE_SIZE = 64
DOMAINNET_TFDS_NAME = "domainnet"  # Tests point this at a stand-in builder.
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")
_READ_CHUNK = 512


def prepare_command(name: str, data_dir: str) -> str:
  return (f"python -c \"import tensorflow_datasets as tfds; tfds.builder('{name}', "
          f"data_dir='{data_dir}', file_format='array_record').download_and_prepare()\"")


def _require_prepared(builder, name: str, data_dir: str) -> None:
  """Raises DataMissingError (within milliseconds) unless ``builder`` can be read here."""
  if not common.builder_is_prepared(builder):
    raise DataMissingError(
        f"TFDS dataset '{name}' is not prepared in {data_dir} (looked for {builder.data_dir}). "
        "This machine has no network: on one that has (with tensorflow, tensorflow-datasets "
        f"and array_record installed) run\n  {prepare_command(name, data_dir)}\n"
        f"and copy {os.path.join(data_dir, name.split('/')[0])} here, or set data.data_dir.")
  file_format = builder.info.file_format
  if file_format is not None and file_format != tfds.core.FileFormat.ARRAY_RECORD:
    raise DataMissingError(
        f"TFDS dataset '{name}' in {builder.data_dir} is stored as {file_format.value}; reading "
        "without TensorFlow needs array_record. Convert it (where TensorFlow is installed) with "
        f"`tfds convert_format --dataset_dir={os.path.join(data_dir, name.split('/')[0])} "
        "--out_file_format=array_record`, or prepare it again as above.")


def _builder(name: str, data_dir: str):
  """The TFDS builder for ``name`` in ``data_dir``; checked to be prepared."""
  builder = tfds.builder(name, data_dir=data_dir)
  _require_prepared(builder, name, data_dir)
  return builder


def to_size(image: np.ndarray | bytes, size: int, channels: int) -> np.ndarray:
  """One image as uint8 ``[S, S, channels]``: resize the shorter side to S, centre-crop.

  Args:
    image: uint8 ``[H, W, C]`` or encoded bytes (JPEG/PNG).
    size: S; 0 keeps the native size (arrays only).
    channels: 1 or 3.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top

  if isinstance(image, np.ndarray) and (size == 0 or image.shape[:2] == (size, size)):
    return image
  if isinstance(image, np.ndarray):
    pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
  else:
    pil = Image.open(io.BytesIO(image))
    pil.draft("RGB" if channels == 3 else "L", (size, size))  # Fast JPEG downscaling.
  pil = pil.convert("RGB" if channels == 3 else "L")
  width, height = pil.size
  scale = size / min(width, height)
  new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
  pil = pil.resize((new_w, new_h), Image.BICUBIC)
  left, top = (new_w - size) // 2, (new_h - size) // 2
  pil = pil.crop((left, top, left + size, top + size))
  return np.asarray(pil, np.uint8).reshape(size, size, channels)


def normalize(images: np.ndarray, how: str) -> np.ndarray:
  """uint8 ``[N, H, W, C]`` -> float32 ``[N, H, W, C]``, 'unit' ([0, 1]) or 'clip'."""
  x = images.astype(np.float32) / 255.0
  if how in ("unit", "[0,1]"):
    return x
  if how == "clip":
    mean, std = np.asarray(CLIP_MEAN, np.float32), np.asarray(CLIP_STD, np.float32)
    if x.shape[-1] == 1:  # Gray images: the mean of the channel statistics.
      mean, std = mean.mean(keepdims=True), std.mean(keepdims=True)
    return (x - mean) / std
  raise ValueError(f"data.normalize must be 'unit', '[0,1]' or 'clip', got {how!r}")


def _cached(data_cfg, key: str, compute):
  """compute() -> dict of arrays, cached as an .npz under ``key`` when data.cache is on."""
  cache_dir = common.cache_dir(data_cfg)
  if cache_dir is None:
    return compute()
  path = os.path.join(cache_dir, f"{key}.npz")
  if os.path.isfile(path):
    with np.load(path) as cached:
      return dict(cached)
  arrays = compute()
  common.save_npz_atomic(path, **arrays)
  return arrays


def _read_images(builder, split: str, size: int, channels: int) -> dict[str, np.ndarray]:
  """A whole split of a fixed-shape image dataset: images uint8 [N, S, S, C], labels [N]."""
  records = common.read_split(builder, split)
  return {"images": np.stack([to_size(r["image"], size, channels) for r in records]),
          "labels": np.asarray([r["label"] for r in records], np.int32)}


def _load_fixed_shape(data_cfg, name: str, channels: int) -> Dataset:
  data_dir = common.data_dir(data_cfg)
  builder = _builder(name, data_dir)
  size = int(data_cfg.get("image_size", 0))
  out_channels = 3 if data_cfg.get("rgb", False) else channels
  arrays = {}
  for split in ("train", "test"):
    key = f"{name}_{builder.version}_{split}_{size}_{channels}"
    raw = _cached(data_cfg, key, lambda split=split: _read_images(builder, split, size, channels))
    images = raw["images"]
    if out_channels != channels:
      images = np.repeat(images, out_channels, axis=-1)
    arrays[f"{split}_x"] = normalize(images, data_cfg.get("normalize", "unit"))
    arrays[f"{split}_y"] = raw["labels"].astype(np.int32)
  names = builder.info.features["label"].names
  return Dataset(name=name, num_classes=len(names), class_names=tuple(names), **arrays)


def load_cifar10(data_cfg) -> Dataset:
  """CIFAR-10: x float32 ``[N, 32, 32, 3]`` (or ``image_size``), 10 classes."""
  return _load_fixed_shape(data_cfg, "cifar10", channels=3)


def load_mnist(data_cfg) -> Dataset:
  """MNIST: x float32 ``[N, 28, 28, 1]`` (3 channels if ``rgb``), 10 classes."""
  return _load_fixed_shape(data_cfg, "mnist", channels=1)


def check_cifar10(data_cfg) -> None:
  _builder("cifar10", common.data_dir(data_cfg))


def check_mnist(data_cfg) -> None:
  _builder("mnist", common.data_dir(data_cfg))


def _domainnet_settings(data_cfg) -> tuple[tuple[str, ...], tuple[str, ...], int]:
  domains = tuple(data_cfg.get("domains", DOMAINS))
  classes = tuple(data_cfg.get("classes", DOMAINNET_CLASSES))
  unknown = [d for d in domains if d not in DOMAINS]
  if unknown:
    raise ValueError(f"data.domains: unknown {unknown}; choose from {DOMAINS}")
  size = int(data_cfg.get("image_size", DOMAINNET_IMAGE_SIZE)) or DOMAINNET_IMAGE_SIZE
  return domains, classes, size


def _domainnet_builders(data_cfg, domains: tuple[str, ...]) -> list:
  """Builders of the domains; one DataMissingError listing every domain not prepared."""
  data_dir = common.data_dir(data_cfg)
  builders, missing = [], []
  for domain in domains:
    builder = tfds.builder(f"{DOMAINNET_TFDS_NAME}/{domain}", data_dir=data_dir)
    if not common.builder_is_prepared(builder):
      missing.append(domain)
    builders.append(builder)
  if missing:
    raise DataMissingError(
        f"DomainNet domains {missing} are not prepared in {data_dir} (looked for "
        f"{os.path.join(data_dir, DOMAINNET_TFDS_NAME)}/<domain>/). This machine has no network: "
        "on one that has (with tensorflow, tensorflow-datasets and array_record installed) run\n"
        "  python -c \"import tensorflow_datasets as tfds; [tfds.builder(f'domainnet/{d}', "
        f"data_dir='{data_dir}', file_format='array_record').download_and_prepare() "
        f"for d in {tuple(missing)!r}]\"\n"
        f"and copy {os.path.join(data_dir, 'domainnet')} here, or set data.data_dir.")
  for domain, builder in zip(domains, builders):
    _require_prepared(builder, f"{DOMAINNET_TFDS_NAME}/{domain}", data_dir)
  return builders


def check_domainnet(data_cfg) -> None:
  domains, _, _ = _domainnet_settings(data_cfg)
  _domainnet_builders(data_cfg, domains)


def _read_domainnet(builder, split: str, class_ids: np.ndarray, size: int):
  """Images of the selected classes: scans the split without decoding other images."""
  source = builder.as_data_source(split=split, decoders={"image": tfds.decode.SkipDecoding()})
  images, labels = [], []
  for start in range(0, len(source), _READ_CHUNK):
    keys = list(range(start, min(start + _READ_CHUNK, len(source))))
    for record in source.__getitems__(keys):
      hit = np.flatnonzero(class_ids == int(record["label"]))
      if hit.size:
        images.append(to_size(record["image"], size, 3))
        labels.append(int(hit[0]))
  return {"images": np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8),
          "labels": np.asarray(labels, np.int32)}


def load_domainnet(data_cfg) -> Dataset:
  """DomainNet, selected classes and domains.

  Returns:
    Dataset with x float32 ``[N, S, S, 3]``, y int32 ``[N]`` in [0, len(classes)),
    train_groups int32 ``[N]`` = domain index, group_names = the domains.
  """
  domains, classes, size = _domainnet_settings(data_cfg)
  builders = _domainnet_builders(data_cfg, domains)
  all_names = builders[0].info.features["label"].names
  unknown = [c for c in classes if c not in all_names]
  if unknown:
    raise ValueError(f"data.classes: not DomainNet classes: {unknown}")
  class_ids = np.asarray([all_names.index(c) for c in classes])
  classes_key = hashlib.sha256(",".join(classes).encode()).hexdigest()[:10]

  parts = {"train": [], "test": []}
  groups = []
  for group, (domain, builder) in enumerate(zip(domains, builders)):
    for split in ("train", "test"):
      key = f"domainnet_{domain}_{builder.version}_{split}_{size}_{classes_key}"
      raw = _cached(data_cfg, key,
                    lambda b=builder, s=split: _read_domainnet(b, s, class_ids, size))
      parts[split].append(raw)
      if split == "train":
        groups.append(np.full(len(raw["labels"]), group, np.int32))
  how = data_cfg.get("normalize", "unit")
  arrays = {}
  for split, split_parts in parts.items():
    arrays[f"{split}_x"] = normalize(np.concatenate([p["images"] for p in split_parts]), how)
    arrays[f"{split}_y"] = np.concatenate([p["labels"] for p in split_parts]).astype(np.int32)
  return Dataset(name="domainnet", num_classes=len(classes), class_names=classes,
                 train_groups=np.concatenate(groups), group_names=domains, **arrays)
