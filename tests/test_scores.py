"""Scores: streamed moments vs a float64 reference, fresh uniform score batches."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedsel_jax import masks as masks_lib
from fedsel_jax import scores as scores_lib

# A linear "model" whose per-example gradient is the example itself:
# loss = weighted mean_j theta . x_j, so d loss / d theta = weighted mean x_j.
SIZES = {"embed": 3, "block_0": 4, "block_1": 5, "block_2": 3, "head": 2}
GROUPS = masks_lib.LayerGroups(
    candidates=tuple((f"block_{k}", (f"block_{k}",)) for k in range(3)),
    common=("head",), fixed=("embed",))
K = 3


def _params():
  return {name: jnp.zeros((size,), jnp.float32) for name, size in SIZES.items()}


def _split(x):
  """x f32[..., D] -> {group: x[..., cols]} in SIZES order."""
  out, start = {}, 0
  for name, size in SIZES.items():
    out[name] = x[..., start:start + size]
    start += size
  return out


def _loss(params, x, y, w, key):
  del y, key
  theta = jnp.concatenate([params[n] for n in SIZES])
  return jnp.sum(w * (x @ theta)) / jnp.maximum(jnp.sum(w), 1e-9)


def _client(seed, n_max=50, n_real=45):
  """Ordinary, near-constant (std/mean 2e-2) and very constant (1e-3) columns."""
  rng = np.random.default_rng(seed)
  cols = []
  for name, size in SIZES.items():
    noise = rng.standard_normal((n_max, size))
    if name == "block_1":
      cols.append(1.0 + 0.02 * noise)
    elif name == "block_2":
      cols.append(10.0 + 0.01 * noise)
    else:
      cols.append(noise)
  x = np.concatenate(cols, 1).astype(np.float32)
  mask = np.zeros(n_max, bool)
  mask[rng.choice(n_max, n_real, replace=False)] = True
  return dict(x=x, y=np.zeros(n_max, np.int32), mask=mask)


def _reference(data, rows, weights, variance):
  """float64 two-pass moments of the very rows the stats function drew."""
  x = np.asarray(data["x"], np.float64)
  rows, weights = np.asarray(rows), np.asarray(weights, np.float64)
  n_b = weights.sum(1)
  used = n_b > 0
  batch_means = np.stack([(weights[b][:, None] * x[rows[b]]).sum(0) / n_b[b]
                          for b in np.flatnonzero(used)])
  if variance == "example":
    flat_w = weights[used].ravel()
    g = x[rows[used].ravel()]
    mean = (flat_w[:, None] * g).sum(0) / flat_w.sum()
    var = (flat_w[:, None] * (g - mean) ** 2).sum(0) / flat_w.sum()
  else:
    bw = n_b[used]
    mean = (bw[:, None] * batch_means).sum(0) / bw.sum()
    var = (bw[:, None] * (batch_means - mean) ** 2).sum(0) / bw.sum()
  return mean, var, batch_means, n_b[used]


def _stats(data, key, batch_size, sel_batches, variance):
  index = masks_lib.group_index(_params(), GROUPS)
  nb = scores_lib.num_score_batches(data["mask"].shape[0], batch_size, sel_batches)
  fn = jax.jit(scores_lib.make_grad_stats_fn(_loss, index, K, batch_size=batch_size,
                                             num_batches=nb, variance=variance))
  rows, weights, _ = scores_lib.draw_score_batches(jnp.asarray(data["mask"]), key, nb,
                                                    batch_size)
  return fn(_params(), data, key), rows, weights, index


@pytest.mark.parametrize("variance", ["batch", "example"])
@pytest.mark.parametrize("sel_batches", [0, 3])
def test_moments_match_float64_reference(variance, sel_batches):
  data = _client(0)
  key = jax.random.key(7)
  stats, rows, weights, index = _stats(data, key, 8, sel_batches, variance)
  mean, var, batch_means, n_b = _reference(data, rows, weights, variance)
  assert len(n_b) >= 3  # several batches, one of them short when sel_batches = 0
  got_mean = np.concatenate([np.asarray(stats["mean_grad"][n]) for n in SIZES if n != "embed"])
  got_var = np.concatenate([np.asarray(stats["var"][n]) for n in SIZES if n != "embed"])
  cand = slice(SIZES["embed"], None)
  np.testing.assert_allclose(got_mean, mean[cand], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got_var, var[cand], rtol=2e-3, atol=1e-9)
  assert np.all(np.asarray(stats["mean_grad"]["embed"]) == 0)  # fixed: not differentiated
  assert float(stats["num_examples"]) == n_b.sum()
  # Scores against the same formula in float64.
  snr64 = mean ** 2 / (var + mean ** 2 / scores_lib.SNR_MAX)
  per_group = [snr64[SIZES["embed"] + sum(list(SIZES.values())[1:1 + k]):][:SIZES[f"block_{k}"]]
               for k in range(K)]
  kind = "snr" if variance == "batch" else "snr_example"
  got = scores_lib.scores_from_stats(kind, stats, _params(), index, K)
  np.testing.assert_allclose(got, [g.mean() for g in per_group], rtol=2e-3)
  # gradnorm_batch: example-weighted mean of per-batch squared norms.
  cols = np.cumsum([0] + list(SIZES.values()))
  want_sq = [(n_b * (batch_means[:, cols[k + 1]:cols[k + 2]] ** 2).sum(1)).sum() / n_b.sum()
             for k in range(K)]
  np.testing.assert_allclose(stats["batch_sq"], want_sq, rtol=1e-5)


def test_naive_second_moment_would_fail_here():
  """The old E[g^2] - E[g]^2 in float32 is far off on the near-constant groups,
  so the test above does check the stable update."""
  data = _client(0)
  x = jnp.asarray(data["x"][data["mask"]])
  naive = jnp.mean(x * x, 0) - jnp.mean(x, 0) ** 2
  x64 = np.asarray(data["x"][data["mask"]], np.float64)
  exact = x64.var(0)
  cols = slice(SIZES["embed"] + SIZES["block_0"] + SIZES["block_1"], -SIZES["head"])
  assert np.max(np.abs(np.asarray(naive)[cols] / exact[cols] - 1)) > 0.05


def test_single_batch_snr_is_the_documented_cap():
  data = _client(1)
  stats, _, _, index = _stats(data, jax.random.key(0), 8, 1, "batch")
  assert float(stats["num_batches"]) == 1
  snr = scores_lib.scores_from_stats("snr", stats, _params(), index, K)
  np.testing.assert_allclose(snr, scores_lib.SNR_MAX, rtol=1e-6)
  assert float(scores_lib.snr_per_parameter(jnp.float32(0), jnp.float32(0))) == 0.0


def test_score_batches_fresh_each_round_and_uniform():
  """Every real example is drawn equally often; padding never; rounds differ."""
  n_max, n_real, batch_size, nb = 40, 29, 4, 2
  rng = np.random.default_rng(3)
  mask = np.zeros(n_max, bool)
  mask[rng.choice(n_max, n_real, replace=False)] = True
  base = jax.random.key(11)
  client = 5
  num_rounds = 3000

  def one_round(t):
    key = jax.random.fold_in(jax.random.fold_in(base, t), client)
    rows, weights, _ = scores_lib.draw_score_batches(jnp.asarray(mask), key, nb, batch_size)
    return rows, weights

  rows, weights = jax.jit(jax.vmap(one_round))(jnp.arange(num_rounds))
  rows, weights = np.asarray(rows).reshape(num_rounds, -1), np.asarray(weights)
  weights = weights.reshape(num_rounds, -1)
  assert np.all(weights == 1)  # 8 draws from 29 real examples: always real
  assert np.all(mask[rows])
  assert all(len(set(r)) == len(r) for r in rows[:50])  # no example twice in a round
  assert np.mean([set(rows[t]) != set(rows[t + 1]) for t in range(100)]) > 0.95
  counts = np.bincount(rows.ravel(), minlength=n_max)[mask]
  expected = num_rounds * nb * batch_size / n_real
  chi2 = np.sum((counts - expected) ** 2 / expected)
  # df = 28: P(chi2 > 60) < 1e-3 for a uniform draw.
  assert chi2 < 60, (chi2, counts)


def test_all_data_when_sel_batches_is_zero():
  mask = np.array([True] * 10 + [False] * 3 + [True] * 4)
  nb = scores_lib.num_score_batches(len(mask), 4, 0)
  rows, weights, _ = scores_lib.draw_score_batches(jnp.asarray(mask), jax.random.key(0),
                                                   nb, 4)
  rows, weights = np.asarray(rows).ravel(), np.asarray(weights).ravel()
  assert sorted(rows[weights > 0]) == list(np.flatnonzero(mask))
  # Full batches first, then one short, then none.
  assert np.asarray(weights).reshape(nb, 4).sum(1).tolist() == [4, 4, 4, 2, 0]


@pytest.mark.parametrize("score", ["snr", "snr_example"])
def test_round_scores_change_with_the_round(score):
  """Inside the round the score batches come from (seed, round, client):
  the same state at another round number gives other scores."""
  import optax  # pylint: disable=g-import-not-at-top
  from fedsel_jax import federated  # pylint: disable=g-import-not-at-top
  from tests import test_core
  spec, params, index = test_core.tiny_model()
  m = 3
  rd = test_core.round_data(test_core.random_clients(m, n_max=12, seed=2), np.arange(m),
                            budgets=np.ones(m, np.float32))
  fn = jax.jit(test_core.make_round(spec, index, "snr", diag=False, sel_batches=2,
                                    score=score))
  state = federated.init_server_state(params, optax.sgd(1.0), m, test_core.K)
  _, first = fn(state, rd, jax.random.key(0))
  _, again = fn(state, rd, jax.random.key(0))
  _, later = fn(state.replace(round=jnp.int32(1)), rd, jax.random.key(0))
  assert np.all(np.isfinite(first["scores"]))
  np.testing.assert_array_equal(first["scores"], again["scores"])
  assert not np.allclose(first["scores"], later["scores"])
