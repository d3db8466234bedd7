"""Which groups are fixed and what a candidate is: config choices."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from fedsel_jax import client as client_lib
from fedsel_jax import federated
from fedsel_jax import masks as masks_lib
from fedsel_jax.models import build_model
from tests import test_core


def _model(name="mlp", **kw):
  cfg = ml_collections.ConfigDict(dict(name=name, depth=test_core.K, width=8, dtype="float32",
                                       pretrained="", embeddings="auto", sub_blocks=False))
  cfg.update(kw)
  shape = (6,) if name == "mlp" else (8, 8, 3)
  spec = build_model(cfg, num_classes=3, input_shape=shape)
  params = spec.module.init(jax.random.key(0), spec.example_input)["params"]
  return spec, params, masks_lib.group_index(params, spec.groups)


def test_embeddings_choice():
  _, _, index = _model()
  assert masks_lib.FIXED not in jax.tree_util.tree_leaves(index)  # from scratch: trained
  _, _, index = _model(embeddings="fixed")
  assert masks_lib.FIXED in jax.tree_util.tree_leaves(index)
  _, _, index = _model(pretrained="somewhere", embeddings="auto")
  assert masks_lib.FIXED in jax.tree_util.tree_leaves(index)
  with pytest.raises(ValueError, match="model.embeddings"):
    _model(embeddings="frozen")


def test_full_from_scratch_is_textbook_fedavg():
  """`full` = a plain loop: every client trains EVERY parameter with SGD on
  its minibatches, the server averages the models by example counts."""
  spec, params, index = _model()
  m, lr, steps, batch = 4, 0.1, 3, 4
  rd = test_core.round_data(test_core.random_clients(m, seed=2), np.arange(m),
                            budgets=[test_core.K] * m)
  key = jax.random.key(0)
  state = federated.init_server_state(params, optax.sgd(1.0), m, test_core.K)
  new, _ = jax.jit(test_core.make_round(spec, index, "full", diag=False))(state, rd, key)

  loss_fn = client_lib.make_loss_fn(spec.module.apply)
  grad = jax.jit(jax.grad(loss_fn))
  _, train_key, _ = jax.random.split(jax.random.fold_in(key, 0), 3)  # the round's keys
  models = []
  for i in range(m):
    batch_key, _ = jax.random.split(jax.random.fold_in(train_key, i))
    rows = client_lib.batch_positions(batch_key, jnp.asarray(rd["mask"][i]), steps, batch)
    local = params
    for s in range(steps):
      r = np.asarray(rows[s])
      g = grad(local, rd["x"][i][r], rd["y"][i][r], jnp.ones(batch), jax.random.key(0))
      local = jax.tree_util.tree_map(lambda p, gi: p - lr * gi, local, g)
    models.append(local)
  w = rd["num_examples"] / rd["num_examples"].sum()
  fedavg = jax.tree_util.tree_map(lambda *ps: sum(wi * p for wi, p in zip(w, ps)), *models)
  moved = 0
  for a, b, p in zip(jax.tree_util.tree_leaves(new.params), jax.tree_util.tree_leaves(fedavg),
                     jax.tree_util.tree_leaves(params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    moved += not np.allclose(a, p)
  assert moved == len(jax.tree_util.tree_leaves(params))  # embed included


def test_sub_block_candidates():
  spec, params, index = _model("vit", width=8, num_heads=2, mlp_dim=16, patch=4,
                               sub_blocks=True)
  names = spec.groups.names
  assert names[:4] == ("block_0.attn", "block_0.mlp", "block_1.attn", "block_1.mlp")
  assert len(names) == 2 * test_core.K
  sizes = masks_lib.group_sizes(params, index, len(names))
  assert np.all(sizes > 0)
  whole = _model("vit", width=8, num_heads=2, mlp_dim=16, patch=4)
  whole_sizes = masks_lib.group_sizes(whole[1], whole[2], test_core.K)
  np.testing.assert_array_equal(sizes.reshape(-1, 2).sum(1), whole_sizes)
  with pytest.raises(ValueError, match="model.sub_blocks"):
    _model("mlp", sub_blocks=True)
