"""The engine against naive references: masks, client update, aggregation, rounds."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from fedsel_jax import aggregate
from fedsel_jax import client as client_lib
from fedsel_jax import data as data_lib
from fedsel_jax import federated
from fedsel_jax import masks as masks_lib
from fedsel_jax.models import build_model

K = 4


def tiny_model(name="mlp", **kw):
  cfg = ml_collections.ConfigDict(dict(name=name, depth=K, width=8, dtype="float32", **kw))
  spec = build_model(cfg, num_classes=3, input_shape=(6,))
  params = spec.module.init(jax.random.key(0), spec.example_input)["params"]
  return spec, params, masks_lib.group_index(params, spec.groups)


def random_clients(m, n_max=12, seed=0):
  rng = np.random.default_rng(seed)
  counts = rng.integers(2, n_max + 1, m).astype(np.int32)
  mask = np.arange(n_max)[None] < counts[:, None]
  x = rng.normal(size=(m, n_max, 6)).astype(np.float32)
  y = rng.integers(0, 3, (m, n_max)).astype(np.int32)
  return dict(x=x, y=y, mask=mask, num_examples=counts)


def round_data(data, ids, budgets, lam=0.0, valid=None, reselect=True):
  m = len(ids)
  return dict(data, client_ids=np.asarray(ids, np.int32),
              valid=np.ones(m, bool) if valid is None else valid,
              budgets=np.asarray(budgets, np.float32), lam=np.float32(lam),
              reselect=np.bool_(reselect))


# ---------------------------------------------------------------- masks

def test_every_parameter_in_exactly_one_group():
  spec, params, index = tiny_model()
  kinds = jax.tree_util.tree_leaves(index)
  assert set(kinds) == {masks_lib.FIXED, masks_lib.COMMON, *range(K)}
  bad = masks_lib.LayerGroups(candidates=spec.groups.candidates, common=("head",))
  with pytest.raises(ValueError, match="embed"):
    masks_lib.group_index(params, bad)     # embed is in no group
  dup = masks_lib.LayerGroups(candidates=spec.groups.candidates, common=("head", "block_0"),
                              fixed=("embed",))
  with pytest.raises(ValueError, match="several"):
    masks_lib.group_index(params, dup)


def test_prefix_matches_whole_components():
  params = {"block_1": {"w": jnp.ones(2)}, "block_10": {"w": jnp.ones(2)}}
  groups = masks_lib.LayerGroups(candidates=(("a", ("block_1",)), ("b", ("block_10",))))
  assert jax.tree_util.tree_leaves(masks_lib.group_index(params, groups)) == [0, 1]


def test_mask_tree_roundtrip():
  _, _, index = tiny_model()
  for bits in ([True, False, True, False], [False] * K, [True] * K):
    tree = masks_lib.mask_tree(np.array(bits), index)
    np.testing.assert_array_equal(masks_lib.tree_to_mask(tree, index, K), bits)


# ---------------------------------------------------------------- client

@pytest.mark.parametrize("opt", [optax.sgd(0.1, momentum=0.9),
                                 optax.adamw(0.01, weight_decay=0.1),
                                 optax.chain(optax.add_decayed_weights(0.5), optax.sgd(0.1))])
def test_frozen_layers_bit_identical(opt):
  spec, params, index = tiny_model()
  data = {k: v[0] for k, v in random_clients(1).items()}
  update = jax.jit(client_lib.make_client_update(
      client_lib.make_loss_fn(spec.module.apply), opt, index, local_steps=3, batch_size=4))
  mask = np.array([False, True, False, True])
  res = update(params, data, mask, jax.random.key(1))
  trained = masks_lib.mask_tree(mask, index)
  for t, d in zip(jax.tree_util.tree_leaves(trained), jax.tree_util.tree_leaves(res.delta)):
    if bool(t):
      assert np.any(np.asarray(d) != 0)
    else:
      assert np.all(np.asarray(d) == 0)
  # bit-identical: the new params equal the old ones bitwise on frozen leaves
  new = jax.tree_util.tree_map(jnp.add, params, res.delta)
  for t, p, q in zip(jax.tree_util.tree_leaves(trained), jax.tree_util.tree_leaves(params),
                     jax.tree_util.tree_leaves(new)):
    if not bool(t):
      assert np.asarray(p).tobytes() == np.asarray(q).tobytes()


def test_batches_read_only_real_rows():
  mask = np.array([True] * 5 + [False] * 7)
  rows = client_lib.batch_positions(jax.random.key(0), mask, 4, 3)
  assert np.asarray(rows).max() < 5
  # the first local epoch visits every real example once
  np.testing.assert_array_equal(np.sort(np.asarray(rows).ravel()[:5]), np.arange(5))


def test_backprop_cut_gives_same_update():
  spec, params, index = tiny_model()
  data = {k: v[0] for k, v in random_clients(1).items()}
  loss_fn = client_lib.make_loss_fn(spec.module.apply)
  mask = np.array([False, False, True, True])
  a = client_lib.make_client_update(loss_fn, optax.sgd(0.1), index, local_steps=2,
                                    batch_size=4, cut=0)(params, data, mask, jax.random.key(3))
  b = client_lib.make_client_update(loss_fn, optax.sgd(0.1), index, local_steps=2,
                                    batch_size=4, cut=2)(params, data, mask, jax.random.key(3))
  jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7),
                         a.delta, b.delta)


# ---------------------------------------------------------------- aggregation

def numpy_aggregate(deltas, masks, weights, index):
  """Reference: a loop over layers and clients."""
  out = []
  for kind, d in zip(jax.tree_util.tree_leaves(index), jax.tree_util.tree_leaves(deltas)):
    d = np.asarray(d, np.float64)
    if kind == masks_lib.FIXED:
      users = np.zeros(len(weights), bool)
    elif kind == masks_lib.COMMON:
      users = weights > 0
    else:
      users = masks[:, kind] & (weights > 0)
    if not users.any():
      out.append(np.zeros(d.shape[1:]))
      continue
    w = weights[users] / weights[users].sum()
    out.append(np.tensordot(w, d[users], axes=1))
  return out


def test_aggregate_matches_numpy():
  _, params, index = tiny_model()
  rng = np.random.default_rng(0)
  m = 7
  masks = rng.random((m, K)) < 0.4
  masks[:, 2] = False                           # a layer nobody trained
  weights = rng.integers(1, 20, m).astype(np.float32)
  weights[-1] = 0                               # a padding client
  deltas = jax.tree_util.tree_map(
      lambda p: rng.normal(size=(m,) + p.shape).astype(np.float32), params)
  mean, coverage = aggregate.aggregate_masked(deltas, jnp.asarray(masks), jnp.asarray(weights),
                                              index)
  for got, want in zip(jax.tree_util.tree_leaves(mean), numpy_aggregate(deltas, masks, weights,
                                                                        index)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(coverage, (masks & (weights > 0)[:, None]).sum(0))


def test_all_false_mask_leaves_server_unchanged():
  _, params, index = tiny_model()
  m = 3
  deltas = jax.tree_util.tree_map(lambda p: jnp.ones((m,) + p.shape), params)
  mean, _ = aggregate.aggregate_masked(deltas, jnp.zeros((m, K), bool), jnp.zeros(m), index)
  agg = aggregate.accumulate(aggregate.init_aggregation(params, K), deltas,
                             jnp.zeros((m, K), bool), jnp.zeros(m), index)
  _, covered = aggregate.finalize(agg, index)
  new, _ = aggregate.server_step(params, optax.sgd(1.0).init(params), mean, covered,
                                 optax.sgd(1.0))
  for p, q in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(new)):
    assert np.asarray(p).tobytes() == np.asarray(q).tobytes()


# ---------------------------------------------------------------- rounds

def make_round(spec, index, strategy, chunk=0, cut=False, diag=True, server_opt=None,
               client_opt=None, **kw):
  settings = federated.RoundSettings(strategy=strategy, local_steps=3, batch_size=4,
                                     client_chunk=chunk, backprop_cut=cut, diagnostics=diag,
                                     **kw)
  return federated.make_round_fn(client_lib.make_loss_fn(spec.module.apply), index, K,
                                 client_opt or optax.sgd(0.1), server_opt or optax.sgd(1.0),
                                 np.ones(K, np.float32), settings)


def naive_round(spec, index, params, rd, masks, key, round_idx=0):
  """A Python loop over client_update and a NumPy per-layer aggregation."""
  update = jax.jit(client_lib.make_client_update(client_lib.make_loss_fn(spec.module.apply),
                                                 optax.sgd(0.1), index, local_steps=3,
                                                 batch_size=4))
  _, train_key, _ = jax.random.split(jax.random.fold_in(key, round_idx), 3)
  deltas = []
  for i, cid in enumerate(rd["client_ids"]):
    d = {f: rd[f][i] for f in ("x", "y", "mask", "num_examples")}
    deltas.append(update(params, d, masks[i], jax.random.fold_in(train_key, cid)).delta)
  stacked = jax.tree_util.tree_map(lambda *a: np.stack(a), *deltas)
  w = np.where(rd["valid"], rd["num_examples"], 0).astype(np.float64)
  mean = numpy_aggregate(stacked, masks, w, index)
  leaves, treedef = jax.tree_util.tree_flatten(params)
  return jax.tree_util.tree_unflatten(treedef, [np.asarray(p) + m for p, m in zip(leaves, mean)])


@pytest.mark.parametrize("chunk,cut", [(0, False), (2, False), (3, True)])
def test_vectorised_round_equals_naive_loop(chunk, cut):
  spec, params, index = tiny_model()
  m = 6
  rd = round_data(random_clients(m, seed=1), np.arange(m) * 3, budgets=[1, 2, 3, 2, 1, 4])
  rd["valid"][-1] = False                          # a padding slot
  rd["client_ids"][-1] = 100
  key = jax.random.key(5)
  state = federated.init_server_state(params, optax.sgd(1.0), 100, K)
  new, metrics = jax.jit(make_round(spec, index, "random", chunk, cut))(state, rd, key)
  masks = np.asarray(metrics["masks"])
  assert not masks[-1].any() and masks[:-1].any()
  want = naive_round(spec, index, params, rd, masks, key)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                         new.params, want)


def test_full_mask_is_fedavg():
  spec, params, index = tiny_model()
  m = 4
  rd = round_data(random_clients(m, seed=2), np.arange(m), budgets=[K] * m)
  key = jax.random.key(0)
  state = federated.init_server_state(params, optax.sgd(1.0), m, K)
  new, metrics = jax.jit(make_round(spec, index, "full"))(state, rd, key)
  assert np.asarray(metrics["masks"]).all()
  # FedAvg: every non-fixed leaf is the example-weighted mean of the clients' models
  update = jax.jit(client_lib.make_client_update(client_lib.make_loss_fn(spec.module.apply),
                                                 optax.sgd(0.1), index, local_steps=3,
                                                 batch_size=4))
  _, train_key, _ = jax.random.split(jax.random.fold_in(key, 0), 3)
  models, w = [], rd["num_examples"] / rd["num_examples"].sum()
  for i in range(m):
    d = {f: rd[f][i] for f in ("x", "y", "mask", "num_examples")}
    res = update(params, d, np.ones(K, bool), jax.random.fold_in(train_key, i))
    models.append(jax.tree_util.tree_map(jnp.add, params, res.delta))
  fedavg = jax.tree_util.tree_map(lambda *ps: sum(wi * p for wi, p in zip(w, ps)), *models)
  for kind, a, b, p in zip(jax.tree_util.tree_leaves(index), jax.tree_util.tree_leaves(new.params),
                           jax.tree_util.tree_leaves(fedavg), jax.tree_util.tree_leaves(params)):
    np.testing.assert_allclose(a, p if kind == masks_lib.FIXED else b, rtol=1e-5, atol=1e-6)


def test_head_strategy_changes_only_common_layers():
  spec, params, index = tiny_model()
  m = 3
  rd = round_data(random_clients(m), np.arange(m), budgets=[2] * m)
  state = federated.init_server_state(params, optax.sgd(1.0), m, K)
  new, metrics = jax.jit(make_round(spec, index, "head"))(state, rd, jax.random.key(0))
  assert not np.asarray(metrics["masks"]).any()
  for kind, a, b in zip(jax.tree_util.tree_leaves(index), jax.tree_util.tree_leaves(params),
                        jax.tree_util.tree_leaves(new.params)):
    same = np.asarray(a).tobytes() == np.asarray(b).tobytes()
    assert same == (kind != masks_lib.COMMON)


def test_new_masks_do_not_retrace():
  spec, params, index = tiny_model()
  traces = []
  inner = make_round(spec, index, "random", chunk=2)

  def counted(state, rd, key):
    traces.append(1)
    return inner(state, rd, key)

  fn = jax.jit(counted, donate_argnums=0)
  state = federated.init_server_state(params, optax.sgd(1.0), 20, K)
  for t in range(3):
    rd = round_data(random_clients(4, seed=t), np.arange(4) + t, budgets=[1 + t % 3] * 4,
                    lam=0.1 * t, reselect=t % 2 == 0)
    state, _ = fn(state, rd, jax.random.key(t))
  assert len(traces) == 1


def test_sel_gap_keeps_masks_between_selections():
  spec, params, index = tiny_model()
  fn = jax.jit(make_round(spec, index, "random"))
  state = federated.init_server_state(params, optax.sgd(1.0), 10, K)
  rd = round_data(random_clients(3), [1, 4, 7], budgets=[2] * 3)
  state, m0 = fn(state, rd, jax.random.key(0))
  rd2 = round_data(random_clients(3, seed=3), [1, 4, 8], budgets=[2] * 3, reselect=False)
  state, m1 = fn(state, rd2, jax.random.key(0))
  np.testing.assert_array_equal(m1["masks"][:2], m0["masks"][:2])  # kept
  assert m1["masks"][2].sum() == 2                                  # unseen client: fresh
  np.testing.assert_array_equal(state.client_masks[8], m1["masks"][2])


def test_error_terms_respect_their_bound():
  spec, params, index = tiny_model()
  m = 6
  rd = round_data(random_clients(m, seed=4), np.arange(m), budgets=[1] * m)
  state = federated.init_server_state(params, optax.sgd(1.0), m, K)
  _, metrics = jax.jit(make_round(spec, index, "random", chunk=3))(state, rd, jax.random.key(2))
  e2_layers, bound = np.asarray(metrics["e2_layers"]), np.asarray(metrics["kappa_sq"])
  cov = np.asarray(metrics["coverage"])
  assert float(metrics["grad_sq"]) > 0
  # E1 is the gradient mass of exactly the layers nobody selected
  # (per-group arrays have K + 1 entries: the common layers last, always covered)
  np.testing.assert_allclose(metrics["e1"],
                             np.asarray(metrics["grad_sq_layers"])[:K][cov == 0].sum(), rtol=1e-5)
  assert float(metrics["e2"]) <= float(metrics["e2_bound"]) * (1 + 1e-4) + 1e-12
  assert np.all(e2_layers[:K][cov == 0] == 0) and bound.shape == (K + 1,)


def test_full_selection_has_no_selection_error():
  spec, params, index = tiny_model()
  m = 4
  rd = round_data(random_clients(m, seed=5), np.arange(m), budgets=[K] * m)
  state = federated.init_server_state(params, optax.sgd(1.0), m, K)
  _, metrics = jax.jit(make_round(spec, index, "full"))(state, rd, jax.random.key(0))
  assert float(metrics["e1"]) == 0
  assert float(metrics["e2"]) <= 1e-6 * float(metrics["grad_sq"])


# ---------------------------------------------------------------- data

def test_dirichlet_partition_deterministic_and_complete():
  labels = np.random.default_rng(0).integers(0, 10, 2000)
  a = data_lib.partition_dirichlet(labels, 25, 0.5, seed=3, min_size=10)
  b = data_lib.partition_dirichlet(labels, 25, 0.5, seed=3, min_size=10)
  c = data_lib.partition_dirichlet(labels, 25, 0.5, seed=4, min_size=10)
  assert all(np.array_equal(x, y) for x, y in zip(a, b))
  assert not all(np.array_equal(x, y) for x, y in zip(a, c))
  allidx = np.concatenate(a)
  np.testing.assert_array_equal(np.sort(allidx), np.arange(2000))  # each example exactly once
  assert min(len(p) for p in a) >= 10
  # label skew: clients' label histograms differ far more than under IID
  hist = np.stack([np.bincount(labels[p], minlength=10) / len(p) for p in a])
  iid = np.stack([np.bincount(labels[p], minlength=10) / len(p)
                  for p in data_lib.partition_iid(2000, 25, 0)])
  assert hist.std(0).mean() > 3 * iid.std(0).mean()


def test_partition_errors_name_the_field():
  with pytest.raises(ValueError, match="data.alpha"):
    data_lib.partition_dirichlet(np.zeros(100, int), 5, 0.0, 0)
  with pytest.raises(ValueError, match="fl.clients_per_round"):
    data_lib.sample_clients(0, 0, 5, 6)


def test_natural_partition_and_padding():
  groups = np.array([0] * 10 + [1] * 3 + [2] * 7)
  parts = data_lib.partition_natural(groups, 0, 0)
  assert [len(p) for p in parts] == [10, 3, 7]
  parts6 = data_lib.partition_natural(groups, 6, 0)
  assert len(parts6) == 6 and np.array_equal(np.sort(np.concatenate(parts6)), np.arange(20))
  x = np.arange(20, dtype=np.float32)[:, None]
  ca = data_lib.pad_clients(x, np.zeros(20, int), parts)
  assert ca.x.shape == (3, 10, 1) and list(ca.num_examples) == [10, 3, 7]
  np.testing.assert_array_equal(ca.x[1, :3, 0], [10, 11, 12])
  assert ca.mask[1].sum() == 3


def test_client_sampling_is_a_function_of_seed_and_round():
  a = data_lib.sample_clients(0, 5, 100, 10)
  assert np.array_equal(a, data_lib.sample_clients(0, 5, 100, 10))
  assert not np.array_equal(a, data_lib.sample_clients(0, 6, 100, 10))
  assert len(set(a)) == 10


@pytest.mark.parametrize("strategy", sorted(federated.STRATEGIES))
def test_every_strategy_respects_budgets(strategy):
  spec, params, index = tiny_model()
  m = 5
  budgets = np.array([1, 2, 3, 2, 1], np.float32)
  rd = round_data(random_clients(m, seed=6), np.arange(m), budgets=budgets, lam=0.5)
  state = federated.init_server_state(params, optax.sgd(1.0), m, K)
  fn = jax.jit(make_round(spec, index, strategy, diag=False, sel_batches=2))
  new, metrics = fn(state, rd, jax.random.key(0))
  masks = np.asarray(metrics["masks"])
  if strategy in ("full", "lora"):   # lora: every (adapter) group, budgets ignored
    assert masks.all()
  elif strategy == "head":
    assert not masks.any()
  elif federated.STRATEGIES[strategy][1]:
    assert np.all(masks.sum(1) <= budgets)    # P1 may leave budget unused when lam > 0
  else:
    np.testing.assert_array_equal(masks.sum(1), budgets)   # unit costs: budgets filled exactly
  assert np.isfinite(float(metrics["train_loss"]))
  for leaf in jax.tree_util.tree_leaves(new.params):
    assert np.all(np.isfinite(leaf))
