"""Client-update variants that compute only what the masks need, against naive references."""

import itertools

import jax
import ml_collections
import numpy as np
import optax
import pytest

from fedsel_jax import client as client_lib
from fedsel_jax import federated
from fedsel_jax import flops
from fedsel_jax import masks as masks_lib
from fedsel_jax.models import build_model
from tests.test_core import K, make_round, naive_round, random_clients, round_data, tiny_model


def given_masks_round(spec, index, params, rd, masks, chunk, cut, client_opt=None, **kw):
  """Runs a round that trains exactly ``masks`` (kept masks, no re-selection)."""
  n = 100
  ids = rd["client_ids"]
  real = ids < n
  state = federated.init_server_state(params, optax.sgd(1.0), n, K)
  state = state.replace(client_masks=state.client_masks.at[ids[real]].set(masks[real]),
                        seen=state.seen.at[ids[real]].set(True))
  fn = jax.jit(make_round(spec, index, "random", chunk, cut, diag=False,
                          client_opt=client_opt, **kw))
  return fn(state, dict(rd, reselect=np.bool_(False)), jax.random.key(3))


def random_masks(m, seed, consensus=False):
  rng = np.random.default_rng(seed)
  if consensus:
    return np.tile(np.arange(K) >= K - 1 - seed % 2, (m, 1))
  masks = rng.random((m, K)) < 0.4
  masks[rng.random(m) < 0.2] = False          # some clients train only the head
  return masks


@pytest.mark.parametrize("seed,chunk,consensus", [(0, 2, False), (1, 3, False), (2, 1, False),
                                                  (3, 4, False), (0, 2, True), (1, 4, True)])
def test_grouped_variant_round_equals_naive_loop(seed, chunk, consensus):
  spec, params, index = tiny_model()
  m = 9 if chunk == 3 else 8                    # uneven clients, 2 padding slots
  rd = round_data(random_clients(m, seed=seed), np.arange(m) * 7, budgets=[K] * m)
  rd["valid"][-2:] = False
  rd["client_ids"][-2:] = 100
  masks = random_masks(m, seed, consensus) & rd["valid"][:, None]
  new, metrics = given_masks_round(spec, index, params, rd, masks, chunk, cut=True)
  np.testing.assert_array_equal(np.asarray(metrics["masks"]), masks)
  want = naive_round(spec, index, params, rd, masks, jax.random.key(3))
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                         new.params, want)
  # the same round without variants: identical up to float reassociation
  plain, _ = given_masks_round(spec, index, params, rd, masks, chunk, cut=False)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                         new.params, plain.params)


def test_fewer_cut_levels_equal_naive_loop():
  spec, params, index = tiny_model()
  m = 8
  rd = round_data(random_clients(m, seed=4), np.arange(m), budgets=[K] * m)
  rd["valid"][-1] = False
  rd["client_ids"][-1] = 100
  masks = random_masks(m, 4) & rd["valid"][:, None]
  fn = make_round(spec, index, "random", 2, True, diag=False, cut_levels=(K - 1, K))
  n = 100
  ids = rd["client_ids"]
  real = ids < n
  state = federated.init_server_state(params, optax.sgd(1.0), n, K)
  state = state.replace(client_masks=state.client_masks.at[ids[real]].set(masks[real]),
                        seen=state.seen.at[ids[real]].set(True))
  new, _ = jax.jit(fn)(state, dict(rd, reselect=np.bool_(False)), jax.random.key(3))
  want = naive_round(spec, index, params, rd, masks, jax.random.key(3))
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                         new.params, want)
  with pytest.raises(ValueError, match="fl.cut_levels"):
    make_round(spec, index, "random", 2, True, cut_levels=(K + 1,))


def test_pick_variant_is_the_cheapest_cover():
  table = np.array([[c <= l for l in range(K)] for c in range(K + 1)])
  cost = federated.variant_cost(table)
  rng = np.random.default_rng(0)
  for _ in range(20):
    masks = rng.random((3, K)) < 0.3
    weights = rng.integers(0, 2, 3).astype(np.float32)
    union = (masks & (weights > 0)[:, None]).any(0)
    covering = [v for v in range(len(table)) if not (union & ~table[v]).any()]
    want = min(covering, key=lambda v: cost[v])
    assert int(federated.pick_variant(table, masks, weights)) == want


def test_group_order_puts_equal_masks_together_and_padding_last():
  rng = np.random.default_rng(1)
  masks = rng.random((12, K)) < 0.5
  masks[[2, 7, 9]] = masks[4]
  valid = np.ones(12, bool)
  valid[[0, 5]] = False
  order = np.asarray(federated.group_order(masks, valid))
  assert sorted(order) == list(range(12))
  assert set(order[-2:]) == {0, 5}
  lowest = np.asarray(client_lib.lowest_selected(masks))[order[:-2]]
  assert np.all(np.diff(lowest) >= 0)
  pos = [list(order).index(i) for i in (2, 4, 7, 9)]
  assert max(pos) - min(pos) == 3


def test_new_masks_never_recompile_with_variants():
  spec, params, index = tiny_model()
  traces = []
  inner = make_round(spec, index, "random", chunk=2, cut=True)

  def counted(state, rd, key):
    traces.append(1)
    return inner(state, rd, key)

  fn = jax.jit(counted, donate_argnums=0)
  state = federated.init_server_state(params, optax.sgd(1.0), 20, K)
  for t in range(3):
    rd = round_data(random_clients(4, seed=t), np.arange(4) + t, budgets=[1 + t % 3] * 4)
    state, _ = fn(state, rd, jax.random.key(t))
  assert len(traces) == 1


def test_update_has_no_state_or_delta_outside_its_variant():
  spec, params, index = tiny_model()
  data = {k: v[0] for k, v in random_clients(1).items()}
  loss_fn = client_lib.make_loss_fn(spec.module.apply)
  mask = np.array([False, False, True, False])
  dense = client_lib.make_client_update(loss_fn, optax.adam(0.01), index, local_steps=2,
                                        batch_size=4)(params, data, mask, jax.random.key(0))
  sparse = client_lib.make_client_update(loss_fn, optax.adam(0.01), index, local_steps=2,
                                         batch_size=4, blocks=(2,), dense_delta=False)
  res = sparse(params, data, mask, jax.random.key(0))
  kinds = jax.tree_util.tree_leaves(index)
  got = jax.tree_util.tree_leaves(res.delta, is_leaf=lambda x: x is None)
  assert [g is None for g in got] == [k not in (2, masks_lib.COMMON) for k in kinds]
  for k, g, d in zip(kinds, got, jax.tree_util.tree_leaves(dense.delta)):
    if g is not None:
      np.testing.assert_allclose(g, d, rtol=1e-6, atol=1e-7)
  # no optimizer state for the leaves outside the variant: the jaxpr carries
  # Adam moments only for the trained leaves
  jaxpr = jax.make_jaxpr(sparse)(params, data, mask, jax.random.key(0))
  fixed = sum(int(np.prod(p.shape)) for p, k in zip(jax.tree_util.tree_leaves(params), kinds)
              if k not in (2, masks_lib.COMMON))
  scan = [e for e in jaxpr.eqns if e.primitive.name == "scan"][-1]
  carried = sum(int(np.prod(v.aval.shape)) for v in scan.outvars if hasattr(v.aval, "shape"))
  trained = sum(int(np.prod(p.shape)) for p, k in zip(jax.tree_util.tree_leaves(params), kinds)
                if k in (2, masks_lib.COMMON))
  assert fixed > 0 and carried <= 3 * trained + 64, (carried, trained, fixed)


def test_consensus_top_block_round_costs_well_below_full_model_round():
  cfg = ml_collections.ConfigDict(dict(name="mlp", depth=K, width=64, dtype="float32"))
  spec = build_model(cfg, num_classes=3, input_shape=(6,))
  params = spec.module.init(jax.random.key(0), spec.example_input)["params"]
  index = masks_lib.group_index(params, spec.groups)
  settings = federated.RoundSettings(strategy="random", local_steps=3, batch_size=4,
                                     client_chunk=2, backprop_cut=True, diagnostics=False,
                                     unroll=True)
  parts = federated.make_round_parts(client_lib.make_loss_fn(spec.module.apply), index, K,
                                     optax.adam(0.01), np.ones(K, np.float32), settings)
  m = 4
  rd = dict(random_clients(m, seed=0), valid=np.ones(m, bool))
  top = np.tile(np.arange(K) == K - 1, (m, 1))
  full = np.ones((m, K), bool)
  cost_top = flops.executed_round_flops(parts, params, rd, top)
  cost_full = flops.executed_round_flops(parts, params, rd, full)
  assert cost_top < 0.6 * cost_full, (cost_top, cost_full)
  # the analytic need orders the same way and the top-block round executes close to it
  need_top = flops.needed_round_flops_from(params, index, K, 1, 4, 3, top)
  need_full = flops.needed_round_flops_from(params, index, K, 1, 4, 3, full)
  assert need_top < 0.6 * need_full
