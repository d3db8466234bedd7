"""LoRA adapters (fedsel_jax/models/lora.py): exactness, merging, masking, bad input."""

import io
import contextlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import optax
import pytest

from configs import default as default_config
from fedsel_jax import client as client_lib
from fedsel_jax import masks as masks_lib
from fedsel_jax import train
from fedsel_jax.models import __main__ as models_cli
from fedsel_jax.models import build_model
from fedsel_jax.models import lora
from tests.helpers import smoke_config

TINY_BERT = dict(name="bert", pretrained="", vocab_size=50, hidden_size=16, num_layers=2,
                 num_heads=2, intermediate_size=24, max_position_embeddings=16, max_len=8)
FAMILIES = {
    "bert": (TINY_BERT, ()),
    "clip_vit": (dict(name="clip_vit", variant="tiny"), ()),
    "vit": (dict(name="vit", width=16, depth=2, num_heads=2, mlp_dim=32, patch=4), (8, 8, 3)),
    "mlp": (dict(name="mlp", width=8, depth=3), (6,)),
}


def lora_cfg(rank=4, targets="attention+mlp", alpha=8.0):
  return dict(rank=rank, alpha=alpha, targets=targets, within_selection=True)


def build(family, rank=4, targets="attention+mlp", **extra):
  fields, shape = FAMILIES[family]
  base = build_model(ml_collections.ConfigDict(dict(fields, **extra)), 3, shape)
  spec = build_model(ml_collections.ConfigDict(
      dict(fields, lora=lora_cfg(rank, targets), **extra)), 3, shape)
  return base, spec


def inputs(spec, seed=1):
  x = spec.example_input
  if x.dtype.kind == "f":
    return np.random.default_rng(seed).normal(size=x.shape).astype(np.float32)
  return x


def randomize_b(params, seed=0):
  rng = np.random.default_rng(seed)

  def draw(path, v):
    if masks_lib.path_str(path).endswith("/b"):
      return jnp.asarray(0.3 * rng.standard_normal(v.shape), v.dtype)
    return v

  return jax.tree_util.tree_map_with_path(draw, params)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_zero_b_is_the_base_model_and_merge_equals_adapter_forward(family):
  base, spec = build(family)
  params = spec.module.init(jax.random.key(0), spec.example_input)["params"]
  base_params, adapters = lora.split_params(params)
  x = inputs(spec)

  def run(p):
    return (base.module.apply({"params": lora.split_params(p)[0]}, x),
            spec.module.apply({"params": p}, x), spec.apply_for_eval({"params": p}, x))

  # b = 0: the adapter term is exactly zero and W + 0 = W, so op by op
  # (eager; under jit XLA may fuse the bias add differently, ~1 ulp) the
  # outputs are bit-identical to the base model's.
  plain, adapted, merged = run(params)
  np.testing.assert_array_equal(adapted, plain)
  np.testing.assert_array_equal(merged, plain)
  run = jax.jit(run)
  plain_jit, adapted_jit, _ = run(params)
  np.testing.assert_allclose(adapted_jit, plain_jit, rtol=1e-5, atol=1e-6)
  b_leaves = [v for p, v in zip(masks_lib.leaf_paths(adapters),
                                jax.tree_util.tree_leaves(adapters)) if p.endswith("/b")]
  assert b_leaves and not any(np.any(np.asarray(b)) for b in b_leaves)
  # Random b: the adapters change the output, and merging agrees with them.
  params_b = randomize_b(params)
  plain_b, adapted_b, merged_b = run(params_b)
  np.testing.assert_array_equal(plain_b, plain_jit)
  assert not np.allclose(adapted_b, plain, atol=1e-4)
  np.testing.assert_allclose(merged_b, adapted_b, rtol=1e-5, atol=1e-6)
  assert set(jax.tree_util.tree_leaves(jax.tree_util.tree_map(jnp.shape, base_params))) \
      == set(jax.tree_util.tree_leaves(jax.tree_util.tree_map(
          jnp.shape, base.module.init(jax.random.key(0), base.example_input)["params"])))


def test_merge_is_w_plus_scaled_ab():
  _, spec = build("mlp", rank=2)
  params = randomize_b(spec.module.init(jax.random.key(0), spec.example_input)["params"])
  merged = lora.merge_params(params, spec.module.targets, spec.module.settings.scale)
  ab = params["lora"]["block_1"]
  np.testing.assert_allclose(merged["block_1"]["kernel"], params["block_1"]["kernel"]
                             + 8.0 / 2 * np.asarray(ab["a"]) @ np.asarray(ab["b"]), rtol=1e-6)
  assert "lora" not in merged
  np.testing.assert_array_equal(merged["head"]["kernel"], params["head"]["kernel"])


def test_groups_freeze_blocks_and_keep_the_head_common():
  _, spec = build("bert", targets="attention")
  shapes = jax.eval_shape(spec.module.init, jax.random.key(0), spec.example_input)["params"]
  index = masks_lib.group_index(shapes, spec.groups)   # every leaf exactly once
  assert spec.groups.names == ("layer_0_lora", "layer_1_lora")
  sizes = masks_lib.group_sizes(shapes, index, 2)
  assert list(sizes) == [4 * 4 * (16 + 16)] * 2   # q, k, v, output: r (in + out) each
  for path, k in zip(masks_lib.leaf_paths(shapes), jax.tree_util.tree_leaves(index)):
    if path.startswith("lora/"):
      assert k >= 0
    elif path.startswith("head/"):
      assert k == masks_lib.COMMON
    else:
      assert k == masks_lib.FIXED, path


def train_once(spec, params, mask, steps=3):
  index = masks_lib.group_index(params, spec.groups)
  update = jax.jit(client_lib.make_client_update(
      client_lib.make_loss_fn(spec.module.apply), optax.adam(1e-2), index, local_steps=steps,
      batch_size=2))
  rng = np.random.default_rng(0)
  x = np.concatenate([inputs(spec, 2), inputs(spec, 3)])
  data = dict(x=x, y=rng.integers(0, 3, len(x)).astype(np.int32),
              mask=np.ones(len(x), bool), num_examples=np.int32(len(x)))
  res = update(params, data, jnp.asarray(mask), jax.random.key(3))
  return index, jax.tree_util.tree_map(lambda p, d: p + d, params, res.delta), res


@pytest.mark.parametrize("family", ["bert", "mlp"])
def test_only_adapters_and_head_change_with_a_frozen_base(family):
  _, spec = build(family)
  params = spec.module.init(jax.random.key(0), spec.example_input)["params"]
  k = spec.groups.num_candidates
  index, new, res = train_once(spec, params, np.ones(k, bool))
  for path, g, old, upd in zip(masks_lib.leaf_paths(params), jax.tree_util.tree_leaves(index),
                               jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(new)):
    if g == masks_lib.FIXED:
      assert np.asarray(old).tobytes() == np.asarray(upd).tobytes(), path
    elif path.endswith("/b") or path.startswith("head/"):
      assert not np.array_equal(old, upd), path   # b starts at 0, gets a gradient
  assert np.isfinite(float(res.loss))


def test_within_selection_masks_adapters_like_blocks():
  _, spec = build("mlp")
  params = spec.module.init(jax.random.key(0), spec.example_input)["params"]
  mask = np.array([True, False, True])
  index, new, res = train_once(spec, params, mask)
  for path, g, old, upd, d in zip(
      masks_lib.leaf_paths(params), jax.tree_util.tree_leaves(index),
      jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(new),
      jax.tree_util.tree_leaves(res.delta)):
    frozen = g == masks_lib.FIXED or (g >= 0 and not mask[g])
    if frozen:   # unselected adapters and every base weight: bit-identical, delta exactly 0
      assert np.asarray(old).tobytes() == np.asarray(upd).tobytes(), path
      assert not np.any(np.asarray(d)), path
    elif path.endswith("/b"):
      assert np.any(np.asarray(d)), path
  # The same mask as a block mask of the base model's groups would select the same blocks.
  trained = masks_lib.tree_to_mask(masks_lib.mask_tree(jnp.asarray(mask), index), index, 3)
  np.testing.assert_array_equal(trained, mask)


@pytest.mark.parametrize("lora_fields,strategy,needle", [
    (dict(rank=0), "lora", "model.lora.rank must be >= 1"),
    (dict(rank=-2), "full", "model.lora.rank must be an integer >= 1"),
    (dict(rank=4), "full", "needs selection.strategy='lora'"),
    (dict(rank=4, targets="mlp"), "lora", "model.lora.targets must be one of"),
    (dict(rank=4, alpha=0.0), "lora", "model.lora.alpha must be"),
    (dict(rank=0, within_selection=True), "proposed", "within_selection"),
])
def test_config_errors(lora_fields, strategy, needle):
  c = default_config.get_config()
  c.selection.strategy = strategy
  for key, value in lora_fields.items():
    c.model.lora[key] = value
  with pytest.raises(train.ConfigError, match=needle):
    train.validate_config(c)


def test_rank_wider_than_a_layer_and_models_without_blocks_are_refused():
  with pytest.raises(ValueError, match="model.lora.rank must be <= 8"):
    build("mlp", rank=9)
  with pytest.raises(ValueError, match="no blocks"):
    build_model(ml_collections.ConfigDict(dict(name="cnn", features=(4, 4),
                                               lora=lora_cfg())), 3, (8, 8, 1))
  with pytest.raises(ValueError, match="no blocks"):   # the MLP has no attention
    build("mlp", targets="attention")


def test_list_shows_adapter_groups():
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    code = models_cli.main(["--list", "mlp", "--config.model.lora.rank=2",
                            "--lora-targets", "attention+mlp"])
  assert code == 0
  text = out.getvalue()
  assert "block_0_lora" in text and "block_3_lora" in text
  # Default MLP: width 64, depth 4; rank 2 adapters: 2 * (64 + 64) per block.
  assert "256" in text.split("block_0_lora")[1].splitlines()[0]


# ---------------------------------------------------------------- end to end

from tests.test_train import run_cli  # noqa: E402


@pytest.mark.parametrize("strategy,within", [("lora", False), ("proposed", True)])
def test_lora_runs_end_to_end_and_checkpoints_adapters(data_dir, tmp_path, strategy, within):
  config = smoke_config(data_dir, **{
      "selection.strategy": strategy, "fl.num_rounds": 2, "model.lora.rank": 2,
      "model.lora.targets": "attention+mlp", "model.lora.within_selection": within})
  setup = train.Setup(config)
  assert setup.spec.groups.names == ("block_0_lora", "block_1_lora", "block_2_lora")
  final = train.train_and_evaluate(config, str(tmp_path), setup=setup, quiet=True)
  assert np.isfinite(final["test_loss"])
  from fedsel_jax import checkpoints
  ckpts = checkpoints.RunCheckpoints(str(tmp_path), keep=2)
  abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, setup.initial_state())
  _, state, _, _ = ckpts.restore_latest(abstract)
  ckpts.close()
  start = setup.params
  # The checkpoint holds the adapters; base weights never moved; eval = merged weights.
  assert np.any(np.asarray(state.params["lora"]["block_0"]["b"]))
  np.testing.assert_array_equal(state.params["block_1"]["kernel"], start["block_1"]["kernel"])
  ev = setup.evaluate(state.params, setup.test_x, setup.test_y)
  assert ev["accuracy"] == final["test_accuracy"]
  masks = np.load(tmp_path / "selection.npz")["masks"]
  if strategy == "lora":
    assert masks.all()
  else:
    assert masks.sum(axis=-1).max() <= config.selection.budget.value


@pytest.mark.parametrize("override,needle", [
    ("--config.model.lora.rank=17", "model.lora.rank must be <= 16"),
    ("--config.model.lora.rank=0", "model.lora.rank must be >= 1"),
])
def test_cli_bad_lora_is_one_line_exit_2(data_dir, tmp_path, override, needle):
  proc, _ = run_cli("--config", "configs/digits.py:smoke", "--workdir", str(tmp_path),
                    f"--config.data.data_dir={data_dir}", "--config.selection.strategy=lora",
                    "--config.model.lora.targets=attention+mlp", override)
  assert proc.returncode == 2, proc.stderr
  lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], proc.stderr
  assert not (tmp_path / "metrics.csv").exists()


def test_lora_round_with_backprop_cut_equals_the_uncut_round():
  from fedsel_jax import federated
  from tests.test_core import random_clients, round_data
  fields = dict(name="mlp", width=8, depth=4, lora=lora_cfg(rank=2))
  spec = build_model(ml_collections.ConfigDict(fields), 3, (6,))
  params = spec.module.init(jax.random.key(0), spec.example_input)["params"]
  params = randomize_b(params)   # b != 0: gradients reach a as well
  index = masks_lib.group_index(params, spec.groups)
  rd = round_data(random_clients(4), [0, 1, 2, 3], [2, 1, 2, 1])

  def run(cut):
    settings = federated.RoundSettings(strategy="top", local_steps=2, batch_size=4,
                                       backprop_cut=cut, diagnostics=False)
    fn = jax.jit(federated.make_round_fn(client_lib.make_loss_fn(spec.module.apply), index,
                                         4, optax.sgd(0.1), optax.sgd(1.0),
                                         np.ones(4, np.float32), settings))
    state = federated.init_server_state(params, optax.sgd(1.0), 4, 4)
    return fn(state, rd, jax.random.key(1))[0].params

  cut, uncut = run(True), run(False)
  for a, b, p in zip(jax.tree_util.tree_leaves(cut), jax.tree_util.tree_leaves(uncut),
                     jax.tree_util.tree_leaves(params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # Only the top adapters (budget 1-2 of 4) and the head moved; blocks 0-1 did not.
  np.testing.assert_array_equal(cut["lora"]["block_0"]["b"], params["lora"]["block_0"]["b"])
  assert not np.array_equal(cut["lora"]["block_3"]["b"], params["lora"]["block_3"]["b"])
  np.testing.assert_array_equal(cut["block_3"]["kernel"], params["block_3"]["kernel"])


def test_compare_rows_of_a_lora_run_use_the_plain_model():
  from fedsel_jax import main
  c = default_config.get_config()
  c.selection.strategy, c.model.lora.rank = "lora", 4
  c.compare_strategies = ("head", "local:top", "probe")
  rows = main.strategy_configs(c)   # validates every row
  assert [r.model.lora.rank for r in rows] == [4, 0, 0, 4]   # probe: the main run's model
  assert rows[2].fl.local_only and rows[2].selection.strategy == "top"


def test_pretrained_loading_keeps_the_adapters():
  import pathlib
  fixture = str(pathlib.Path(__file__).parent / "fixtures" / "tiny_roberta")
  fields = dict(name="roberta", pretrained=fixture, max_len=12)
  base = build_model(ml_collections.ConfigDict(fields), 3, ())
  spec = build_model(ml_collections.ConfigDict(dict(fields, lora=lora_cfg(rank=2))), 3, ())
  params = randomize_b(spec.module.init(jax.random.key(0), spec.example_input)["params"])
  loaded = spec.load_pretrained(params)
  want = base.load_pretrained(lora.split_params(params)[0])
  for a, b in zip(jax.tree_util.tree_leaves(lora.split_params(loaded)[0]),
                  jax.tree_util.tree_leaves(want)):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree_util.tree_leaves(loaded["lora"]),
                  jax.tree_util.tree_leaves(params["lora"])):
    np.testing.assert_array_equal(a, b)
  assert set(spec.load_pretrained({"params": params})) == {"params"}
