"""CLIP vision tower: parity with PyTorch transformers, groups, dtypes, loading.

Parity runs against committed fixtures (tiny random CLIP checkpoints and
torch outputs from tests/fixtures/make_parity_fixtures.py) and, when torch +
transformers import, live against a freshly drawn CLIPVisionModel.
"""

import json
import pathlib
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import safetensors.numpy

from fedsel_jax import masks
from fedsel_jax.datasets.base import DataMissingError
from fedsel_jax.models import clip

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
ATOL = 1e-4


def make_spec(num_classes=5, **fields):
  return clip.build(ml_collections.ConfigDict(fields), num_classes)


def param_shapes(spec):
  return jax.eval_shape(spec.module.init, jax.random.key(0), spec.example_input)["params"]


def pretrained_params(spec):
  rng = np.random.default_rng(0)  # head random, everything else overwritten
  draw = lambda s: jnp.asarray(0.1 * rng.standard_normal(s.shape), s.dtype)
  return spec.load_pretrained(jax.tree.map(draw, param_shapes(spec)))


def run_all(spec, params, images):
  """(last_hidden, features, logits) from one compiled function."""

  @jax.jit
  def run(p, x):
    call = lambda method: spec.module.apply({"params": p}, x, method=method)
    return call("encode"), call("features"), call("__call__")

  return [np.asarray(y) for y in run(params, images)]


@pytest.mark.parametrize("name,projection", [("tiny_clip_vision", False), ("tiny_clip", True)])
def test_matches_torch_fixture(name, projection):
  spec = make_spec(pretrained=str(FIXTURES / name), use_projection=projection)
  fix = np.load(FIXTURES / name / "parity.npz")
  params = pretrained_params(spec)
  hidden, feats, logits = run_all(spec, params, fix["images"])
  np.testing.assert_allclose(hidden, fix["last_hidden"], rtol=0, atol=ATOL)
  np.testing.assert_allclose(feats, fix["image_embeds" if projection else "pooled"],
                             rtol=0, atol=ATOL)
  head = params["head"]["classifier"]
  np.testing.assert_allclose(logits, feats @ head["kernel"] + head["bias"], atol=1e-5)
  assert ("visual_projection" in params) == projection


def test_live_torch_parity(tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(0)
  cfg = transformers.CLIPVisionConfig(image_size=24, patch_size=6, hidden_size=24,
                                      intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=3)
  ref = transformers.CLIPVisionModel(cfg).eval()
  with torch.no_grad():
    for p in ref.parameters():
      p.add_(0.05 * torch.randn(p.shape))
  ref.save_pretrained(tmp_path)
  images = np.random.default_rng(1).normal(size=(3, 24, 24, 3)).astype(np.float32)
  with torch.no_grad():
    out = ref(pixel_values=torch.from_numpy(images).permute(0, 3, 1, 2))
  spec = make_spec(pretrained=str(tmp_path))
  hidden, feats, _ = run_all(spec, pretrained_params(spec), images)
  np.testing.assert_allclose(hidden, out.last_hidden_state.numpy(), rtol=0, atol=ATOL)
  np.testing.assert_allclose(feats, out.pooler_output.numpy(), rtol=0, atol=ATOL)


def test_bfloat16_runs_with_float32_params():
  spec = make_spec(variant="tiny", dtype="bfloat16", num_layers=1)
  ref = make_spec(variant="tiny", dtype="float32", num_layers=1)
  assert {x.dtype for x in jax.tree.leaves(param_shapes(spec))} == {jnp.dtype(jnp.float32)}
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: jnp.asarray(0.1 * rng.standard_normal(s.shape), s.dtype),
                        param_shapes(spec))
  images = rng.normal(size=(2, 32, 32, 3)).astype(np.float32)
  run = jax.jit(lambda p, x: [s.module.apply({"params": p}, x) for s in (spec, ref)])
  logits, ref_logits = run(params, images)
  assert logits.dtype == jnp.float32 and logits.shape == (2, 5)
  assert np.isfinite(np.asarray(logits)).all()
  np.testing.assert_allclose(logits, ref_logits, atol=0.05)


def test_other_image_sizes_are_resized():
  spec = make_spec(variant="tiny", num_layers=1, input_size=16)
  assert spec.example_input.shape == (2, 16, 16, 3)
  params = pretrained_params(make_spec(pretrained=str(FIXTURES / "tiny_clip_vision")))
  params = {k: v for k, v in params.items() if k != "layer_1"}  # same tower, one block
  small = np.random.default_rng(0).normal(size=(2, 16, 16, 3)).astype(np.float32)
  big = np.asarray(jax.image.resize(small, (2, 32, 32, 3), "bilinear"))
  run = jax.jit(lambda p, a, b: [spec.module.apply({"params": p}, x) for x in (a, b)])
  from_small, from_big = run(params, small, big)
  np.testing.assert_allclose(from_small, from_big, atol=1e-5)
  strict = make_spec(variant="tiny", num_layers=1, resize_input=False)
  with pytest.raises(ValueError, match="expects"):
    strict.module.apply({"params": params}, small)


@pytest.mark.parametrize("projection", [False, True])
def test_vit_b32_groups_cover_every_parameter_once(projection):
  spec = make_spec(use_projection=projection)  # default = ViT-B/32, shapes only
  shapes = param_shapes(spec)
  index = masks.group_index(shapes, spec.groups)  # raises on a gap or overlap
  assert len(jax.tree.leaves(index)) == len(jax.tree.leaves(shapes))
  counts = {name: n for _, name, n in masks.describe(shapes, spec.groups)}
  assert spec.groups.names == tuple(f"layer_{i}" for i in range(12))
  assert all(counts[f"layer_{i}"] == 7_087_872 for i in range(12))
  # HF CLIPVisionModel(WithProjection)() parameter counts, ViT-B/32.
  tower = sum(x.size for k, v in shapes.items() if k != "head" for x in jax.tree.leaves(v))
  assert tower == (87_849_216 if projection else 87_456_000)
  assert shapes["head"]["classifier"]["kernel"].shape == ((512 if projection else 768), 5)


def write_checkpoint(directory, tensors):
  directory.mkdir()
  (directory / "config.json").write_text(
      (FIXTURES / "tiny_clip" / "config.json").read_text())
  safetensors.numpy.save_file(tensors, str(directory / "model.safetensors"))
  return str(directory)


def test_strict_loading_names_the_key(tmp_path):
  tensors = safetensors.numpy.load_file(str(FIXTURES / "tiny_clip" / "model.safetensors"))
  spec = make_spec(pretrained=str(FIXTURES / "tiny_clip"), use_projection=True)
  shapes = param_shapes(spec)
  load = lambda t, name: clip.load_vision(  # pylint: disable=g-long-lambda
      shapes, write_checkpoint(tmp_path / name, t), spec.module.cfg)

  gone = "vision_model.post_layernorm.weight"
  with pytest.raises(KeyError, match=gone.replace(".", r"\.")):
    load({k: v for k, v in tensors.items() if k != gone}, "missing")
  gone = "visual_projection.weight"
  with pytest.raises(KeyError, match=gone.replace(".", r"\.")):
    load({k: v for k, v in tensors.items() if k != gone}, "no_projection")
  extra = "vision_model.encoder.layers.2.mlp.fc1.bias"
  with pytest.raises(KeyError, match=extra.replace(".", r"\.")):
    load({**tensors, extra: np.zeros(64, np.float32)}, "unexpected")
  bad = "vision_model.embeddings.patch_embedding.weight"
  with pytest.raises(ValueError, match=bad.replace(".", r"\.")):
    load({**tensors, bad: np.zeros((32, 3, 4, 4), np.float32)}, "shape")


def test_missing_pretrained_is_data_missing_error_fast(tmp_path):
  start = time.perf_counter()
  with pytest.raises(DataMissingError, match="clip-vit-base-patch32"):
    make_spec(pretrained=str(tmp_path / "clip-vit-base-patch32"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(DataMissingError, match="config.json"):
    make_spec(pretrained=str(tmp_path / "empty"))
  (tmp_path / "empty" / "config.json").write_text(json.dumps({"model_type": "clip"}))
  with pytest.raises(DataMissingError, match="model.safetensors"):
    make_spec(pretrained=str(tmp_path / "empty"))
  assert time.perf_counter() - start < 1.0
