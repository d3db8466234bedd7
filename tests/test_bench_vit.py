"""The GPU rows' workload (configs/bench_vit.py) on the CPU: the synthetic
image source, the ViT's needed FLOPs against XLA's count of the ideal
gradient and against BENCH.md's figure, the torch peer's CLIP tower against
the JAX one, and experiments/bench/gpu_rows.sh end to end at smoke size."""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from fedsel_jax import datasets
from fedsel_jax import errors
from fedsel_jax import flops
from fedsel_jax import masks as masks_lib
from fedsel_jax import validate
from fedsel_jax.cli import apply_overrides, load_config
from fedsel_jax.datasets import synthetic
from fedsel_jax.models import build_model
from tests.helpers import xla_grad_flops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _data_cfg(**fields):
  return ml_collections.ConfigDict(dict(name="synthetic", synthetic=fields))


def test_synthetic_images_are_a_fixed_learnable_dataset():
  cfg = _data_cfg(size=8, channels=3, classes=4, train=400, test=40)
  ds = datasets.load_dataset(cfg)
  again = datasets.load_dataset(cfg)
  np.testing.assert_array_equal(ds.train_x, again.train_x)     # a fixed dataset
  assert ds.train_x.shape == (400, 8, 8, 3) and ds.train_x.dtype == np.float32
  assert ds.test_x.shape == (40, 8, 8, 3) and ds.num_classes == 4
  assert set(np.unique(ds.train_y)) == {0, 1, 2, 3} and ds.train_y.dtype == np.int32
  assert ds.train_x.std() > 0.5 and np.all(ds.train_x.reshape(400, -1).std(1) > 0)
  # learnable: the nearest class mean of the training set labels test images well
  means = np.stack([ds.train_x[ds.train_y == c].mean(0) for c in range(4)])
  dist = ((ds.test_x[:, None] - means[None]) ** 2).sum((2, 3, 4))
  assert (dist.argmin(1) == ds.test_y).mean() > 0.9
  # the test set does not depend on the training set's size
  more = datasets.load_dataset(_data_cfg(size=8, channels=3, classes=4, train=500, test=40))
  np.testing.assert_array_equal(more.test_x, ds.test_x)
  # the defaults fill in missing fields
  assert synthetic.fields(ml_collections.ConfigDict(dict(name="synthetic")))["size"] == 32


@pytest.mark.parametrize("override,needle", [
    ("data.synthetic.size=0", "data.synthetic.size"),
    ("data.synthetic.classes=1", "data.synthetic.classes"),
    ("data.synthetic.train=-5", "data.synthetic.train"),
])
def test_bad_synthetic_fields_are_config_errors(override, needle):
  config = load_config("configs/bench_vit.py:smoke")
  apply_overrides(config, [override])
  with pytest.raises(errors.ConfigError, match=needle):
    validate.validate_config(config)


def test_bench_vit_configs_build_and_name_their_rows():
  sizes = {}
  for arg in ("b32", "tiny", "tiny2000", "smoke"):
    c = load_config(f"configs/bench_vit.py:{arg}")
    validate.validate_config(c)
    sizes[arg] = (c.model.variant, c.fl.clients_per_round, c.fl.local_steps, c.fl.batch_size)
  assert sizes["b32"] == ("B/32", 20, 5, 64)        # BENCH.md's ViT-B/32 row
  assert sizes["tiny"] == ("T/4", 200, 10, 32)      # its tiny ViT row
  assert sizes["tiny2000"][:2] == ("T/4", 2000)
  with pytest.raises(ValueError, match="bench_vit.py takes"):
    load_config("configs/bench_vit.py:huge")


def _clip(**over):
  fields = dict(name="clip_vit", variant="tiny", pretrained="", embeddings="fixed",
                dtype="float32", image_size=32, patch_size=8, hidden_size=64, num_layers=3,
                num_heads=4, intermediate_size=256)
  fields.update(over)
  spec = build_model(ml_collections.ConfigDict(fields), num_classes=10, input_shape=(32, 32, 3))
  params = spec.module.init(jax.random.key(0), spec.example_input)["params"]
  return spec, params, masks_lib.group_index(params, spec.groups)


def test_vit_needed_flops_match_xla_count_of_the_ideal_gradient():
  spec, params, index = _clip()
  tokens, batch, k = spec.module.cfg.num_patches + 1, 4, 3
  for sel in [(), (2,), (1,), (0,), (0, 2), (0, 1, 2)]:
    mask = np.isin(np.arange(k), sel)
    need = flops.needed_step_flops(params, index, k, tokens, batch, mask, spec.groups.base)
    x = np.random.default_rng(0).normal(size=(batch, 32, 32, 3)).astype(np.float32)
    xla = xla_grad_flops(spec, params, index, mask, x, num_classes=10)
    # XLA also counts norms, softmax, activations and bias gradients
    assert need <= xla <= 1.1 * need, (sel, need, xla)


def test_vit_b32_full_backprop_is_benchs_26_4_gflop_per_sample():
  spec = build_model(ml_collections.ConfigDict(dict(
      name="clip_vit", variant="B/32", pretrained="", embeddings="fixed", dtype="float32")),
      num_classes=10, input_shape=(224, 224, 3))
  shapes = jax.eval_shape(lambda: spec.module.init(jax.random.key(0), spec.example_input))
  params = shapes["params"]
  n = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params))
  assert 87.4e6 < n < 87.9e6                         # BENCH.md: 87.5M parameters
  index = masks_lib.group_index(params, spec.groups)
  need = lambda sel: flops.needed_step_flops(params, index, 12, 50, 1, np.isin(np.arange(12), sel))
  forward = need(())             # the forward pass (+ the head's weight gradient, 15 kFLOP)
  assert abs(3 * forward / 26.4e9 - 1) < 0.01, forward    # BENCH.md: 3 x forward, everything
  # what a full mask needs: all of that but the backward of the fixed patch embedding
  # (49 patches x 3072 x 768, twice) and the input gradient of block 0's q, k, v
  skipped = 2 * 2 * 49 * 3072 * 768 + 3 * 2 * 50 * 768 * 768
  np.testing.assert_allclose(need(range(12)), 3 * forward - skipped, rtol=1e-3)


def test_exported_tensors_load_back_to_the_same_params():
  """weights.export_tensors (the torch peer's weights) inverts weights.load_params."""
  from fedsel_jax import weights
  spec, params, _ = _clip()
  key_map = weights.clip_vision_key_map(spec.module.cfg.num_layers, False, "")
  tensors = weights.export_tensors(params, key_map)
  assert tensors["embeddings.patch_embedding.weight"].shape == (64, 3, 8, 8)   # OIHW
  zeros = jax.tree_util.tree_map(np.zeros_like, params)
  back = weights.load_params(zeros, tensors, key_map)
  for path, _ in key_map.items():
    node_a, node_b = params, back
    for part in path.split("/"):
      node_a, node_b = node_a[part], node_b[part]
    np.testing.assert_array_equal(np.asarray(node_b), np.asarray(node_a))


@pytest.mark.skipif(importlib.util.find_spec("torch") is None
                    or importlib.util.find_spec("transformers") is None,
                    reason="the torch peer needs torch and transformers")
@pytest.mark.parametrize("image_size", [32, 64])   # 64: the peer resizes as the JAX model
def test_torch_peer_builds_the_same_clip_classifier(image_size):
  import torch
  from fedsel_jax import main as main_lib
  config = load_config("configs/bench_vit.py:smoke")
  config.model.image_size = image_size
  setup = main_lib.make_setup(config)
  spec = importlib.util.spec_from_file_location(
      "peer", os.path.join(ROOT, "experiments/bench/torch_peer.py"))
  peer = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(peer)
  model, prefix, common, _, nchw = peer.model_and_prefixes(setup)
  x = np.asarray(setup.round_data(0)["x"][0][:4])
  want = np.asarray(setup.spec.module.apply({"params": setup.params}, x))
  with torch.no_grad():
    got = model(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()).numpy()
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  names = [n for n, _ in model.named_parameters()]
  assert nchw and any(n.startswith(prefix(1)) for n in names)
  # the common layers the JAX groups train: post-LN and head
  trained_common = {n.split(".")[-2] for n in names if any(n.startswith(c) for c in common)}
  assert trained_common == {"post_layernorm", "head"}


def test_gpu_rows_script_runs_a_row_at_smoke_size(tmp_path):
  proc = subprocess.run(
      ["bash", os.path.join(ROOT, "experiments/bench/gpu_rows.sh"), "tiny2000"],
      env=dict(os.environ, OUT=str(tmp_path), GPU_ROWS_SMOKE="1", PYTHON=sys.executable,
               PYTHONPATH=ROOT, JAX_PLATFORMS="cpu"),
      capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
  report = json.loads((tmp_path / "tiny2000.json").read_text())
  assert report["rows"][0]["modes"]["round"]["samples_per_s"] > 0
  assert np.isfinite(report["rows"][0]["needed_flops"])       # the ViT has an analytic count
  assert (tmp_path / "device.txt").exists() and "== tiny2000: exit 0" in proc.stdout
  bad = subprocess.run(["bash", os.path.join(ROOT, "experiments/bench/gpu_rows.sh"), "huge"],
                       env=dict(os.environ, OUT=str(tmp_path)), capture_output=True, text=True)
  assert bad.returncode == 2 and "unknown row 'huge'" in bad.stderr


def test_gpu_rows_arguments_pass_the_bench_checks():
  """The real rows' arguments (not run here: they need a GPU) parse and validate."""
  from fedsel_jax import bench
  proc = subprocess.run(["bash", os.path.join(ROOT, "experiments/bench/gpu_rows.sh")],
                        env=dict(os.environ, GPU_ROWS_PRINT="1"), capture_output=True,
                        text=True, check=True)
  rows = dict(line.split(" ", 1) for line in proc.stdout.strip().splitlines())
  assert set(rows) == {"tiny", "b32", "tiny2000"}
  for name, args in rows.items():
    parsed = bench.parse(args.split())
    assert parsed["masks"] == ["top2"] and parsed["repeats"] >= 3
    assert parsed["loop"] == (name != "tiny2000")
