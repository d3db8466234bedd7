"""Local-only baseline and per-client held-out splits (fedsel_jax/local_only.py)."""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest

from fedsel_jax import client as client_lib
from fedsel_jax import local_only
from fedsel_jax import train
from tests.helpers import smoke_config


def test_split_parts_is_disjoint_seeded_and_keeps_a_training_row():
  parts = [np.arange(10), np.arange(10, 13), np.array([13]), np.arange(14, 34)]
  train_p, held = local_only.split_parts(parts, 0.2, seed=0)
  assert [len(h) for h in held] == [2, 1, 0, 4]
  for p, t, h in zip(parts, train_p, held):
    assert not set(t) & set(h) and sorted(set(t) | set(h)) == sorted(p) and len(t) >= 1
  again = local_only.split_parts(parts, 0.2, seed=0)
  assert all(np.array_equal(a, b) for a, b in zip(held, again[1]))


@pytest.fixture(scope="module")
def setup(data_dir):
  return train.Setup(smoke_config(data_dir, **{
      "fl.local_only": True, "selection.strategy": "top", "fl.num_rounds": 2,
      "data.client_holdout": 0.25}))


def test_local_clients_never_see_each_other(setup):
  ids = np.array([0, 1, 2, 3])
  params, _ = local_only.train_clients(setup, ids)
  c = setup.clients
  x = c.x.copy()
  x[2] = np.random.default_rng(0).normal(size=x[2].shape).astype(x.dtype)  # client 2 only
  perturbed = dataclasses.replace(c, x=x, y=np.roll(c.y, 1, axis=1))
  perturbed = dataclasses.replace(perturbed, y=np.where(np.arange(len(c.y))[:, None] == 2,
                                                        perturbed.y, c.y))
  other, _ = local_only.train_clients(setup, ids, clients=perturbed)
  for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(other)):
    a, b = np.asarray(a), np.asarray(b)
    for i in (0, 1, 3):
      assert a[i].tobytes() == b[i].tobytes()
  moved = [not np.array_equal(np.asarray(a)[2], np.asarray(b)[2]) for a, b in
           zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(other))]
  assert any(moved)


def test_local_rounds_equal_repeated_client_updates(setup):
  """Naive reference: client_update applied round after round to one client's model."""
  c = setup.config
  update = jax.jit(client_lib.make_client_update(
      client_lib.make_loss_fn(setup.spec.module.apply), setup.client_opt, setup.index,
      local_steps=c.fl.local_steps, batch_size=c.fl.batch_size))
  i = 3
  mask = local_only.local_masks(setup, np.array([i]))[0]
  data = {k: v[0] for k, v in setup.clients.take(np.array([i])).items()}
  params = setup.params
  for t in range(c.fl.num_rounds):
    train_key = jax.random.split(jax.random.fold_in(jax.random.key(c.seed), t), 3)[1]
    res = update(params, data, mask, jax.random.fold_in(train_key, i))
    params = jax.tree_util.tree_map(lambda p, d: p + d, params, res.delta)
  fast, _ = local_only.train_clients(setup, np.array([1, i]))
  for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(fast)):
    np.testing.assert_allclose(np.asarray(b)[1], a, rtol=1e-5, atol=1e-6)
  assert mask.sum() == min(c.selection.budget.value, setup.k)


def test_local_and_federated_runs_report_the_same_splits(setup, data_dir, tmp_path):
  final = train.train_and_evaluate(setup.config, str(tmp_path / "local"), setup=setup,
                                   quiet=True)
  assert final["strategy"] == "local_top"
  spread = final["client_holdout_accuracy"]
  assert 0 <= spread["min"] <= spread["mean"] <= spread["max"] <= 1
  with open(tmp_path / "local" / "clients.csv") as f:
    assert len(f.readlines()) == setup.clients.num_clients + 1
  fed_cfg = smoke_config(data_dir, **{"selection.strategy": "top", "fl.num_rounds": 2,
                                      "data.client_holdout": 0.25})
  fed = train.train_and_evaluate(fed_cfg, str(tmp_path / "fed"), quiet=True)
  assert "client_holdout_accuracy" in fed
  with open(tmp_path / "fed" / "final.json") as f:
    assert json.load(f)["client_holdout_accuracy"] == fed["client_holdout_accuracy"]
  # Held-out rows are not in the training rectangles.
  h = setup.holdout
  assert h.num_examples.sum() > 0
  assert (setup.clients.num_examples + h.num_examples).sum() == sum(
      len(p) for p in train.data_lib.partition(
          setup.dataset, "dirichlet", setup.config.data.num_clients, setup.config.seed,
          alpha=setup.config.data.alpha, min_size=setup.config.data.min_client_size))


def test_local_only_needs_a_server_free_strategy(data_dir):
  with pytest.raises(train.ConfigError, match="fl.local_only"):
    train.validate_config(smoke_config(data_dir, **{"fl.local_only": True,
                                                    "selection.strategy": "proposed"}))
  with pytest.raises(train.ConfigError, match="data.client_holdout"):
    train.validate_config(smoke_config(data_dir, **{"data.client_holdout": 1.0}))


def test_one_command_gives_federated_local_and_probe_rows(data_dir, tmp_path):
  from fedsel_jax import main
  config = smoke_config(data_dir, **{"selection.strategy": "top", "fl.num_rounds": 1,
                                     "data.client_holdout": 0.25})
  config.compare_strategies = ("head", "local:top", "probe")
  results = main.run(config, str(tmp_path))
  assert [r["strategy"] for r in results] == ["top", "head", "local_top", "probe"]
  for r in results:
    assert 0 <= r["test_accuracy"] <= 1
    assert 0 <= r["client_holdout_accuracy"]["mean"] <= 1
  assert os.path.exists(tmp_path / "compare" / "local_top" / "clients.csv")
  # Strict JSON: what was not computed is null, not a bare NaN.
  for sub, field in (("local_top", "test_loss"), ("probe", "median_seconds_per_round")):
    with open(tmp_path / "compare" / sub / "final.json") as f:
      final = json.loads(f.read(), parse_constant=lambda c: pytest.fail(f"{sub}: bare {c}"))
    assert final[field] is None
  assert results[-1]["num_train"] == int(train.Setup(config).clients.num_examples.sum())


def test_probe_features_are_the_head_input(setup):
  from fedsel_jax import probe
  fn = probe.make_features_fn(setup.spec.module.apply)
  x = setup.test_x[:5]
  feats = np.asarray(fn(setup.params, x))
  head = setup.params["head"]
  logits = setup.spec.module.apply({"params": setup.params}, x)
  np.testing.assert_allclose(feats @ np.asarray(head["kernel"]) + np.asarray(head["bias"]),
                             logits, rtol=1e-5, atol=1e-5)
