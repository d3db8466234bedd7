"""Diagnostics against closed forms: linear least-squares clients.

Client i holds (X_i, y_i) and f_i(theta) = (1/2n_i) ||X_i theta - y_i||^2, so
g_i = X_i^T (X_i theta - y_i) / n_i, and f = sum_i (n_i/n) f_i has the
Hessian X^T X / n (restricted to the trained coordinates): E1, E2, kappa_l^2,
||grad f||^2 and L are computed here in float64 NumPy from these formulas.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedsel_jax import diagnostics as diag
from fedsel_jax import federated
from fedsel_jax import masks as masks_lib

# group -> coordinates of theta (and columns of X); embed is fixed, head common.
SIZES = {"embed": 2, "block_0": 3, "block_1": 2, "block_2": 4, "head": 2}
K = 3
GROUPS = masks_lib.LayerGroups(candidates=tuple((f"block_{k}", (f"block_{k}",)) for k in range(K)),
                               common=("head",), fixed=("embed",))
D = sum(SIZES.values())
B = 3


def slices():
  out, start = {}, 0
  for name, size in SIZES.items():
    out[name] = slice(start, start + size)
    start += size
  return out


def init_params(seed=0):
  rng = np.random.default_rng(seed)
  return {name: {"w": jnp.asarray(rng.normal(size=size), jnp.float32)}
          for name, size in SIZES.items()}


def flat(params):
  return np.concatenate([np.asarray(params[n]["w"], np.float64) for n in SIZES])


def loss_fn(params, x, y, weights, key):
  del key
  pred = sum(x[:, slices()[n]] @ params[n]["w"] for n in SIZES)
  return 0.5 * jnp.sum(weights * (pred - y) ** 2) / jnp.maximum(jnp.sum(weights), 1e-9)


def clients(counts, n_max=None, seed=1):
  """Padded arrays of len(counts) clients with different optima (heterogeneous)."""
  rng = np.random.default_rng(seed)
  n_max = n_max or max(counts)
  scale = np.linspace(0.5, 2.5, D)                  # distinct curvatures: a spectral gap
  x = (rng.normal(size=(len(counts), n_max, D)) * scale).astype(np.float32)
  shift = rng.normal(size=(len(counts), 1)) * 2.0
  y = (x @ rng.normal(size=D) + shift + rng.normal(size=(len(counts), n_max))).astype(np.float32)
  counts = np.asarray(counts, np.int32)
  return dict(x=x, y=y, num_examples=counts, mask=np.arange(n_max)[None] < counts[:, None])


def closed_form(params, data, masks, ref, sampled):
  """float64 E1/E2/kappa per group (K candidates + common) and L."""
  theta, sl = flat(params), slices()
  n = data["num_examples"].astype(np.float64)
  g = np.stack([data["x"][i, :c].astype(np.float64).T
                @ (data["x"][i, :c].astype(np.float64) @ theta - data["y"][i, :c]) / c
                for i, c in enumerate(data["num_examples"])])
  g[:, sl["embed"]] = 0.
  w = n * ref
  gbar = w @ g / w.sum()
  groups = [f"block_{k}" for k in range(K)] + ["head"]
  sel = np.concatenate([masks, np.ones((len(n), 1), bool)], 1) * sampled[:, None]
  out = {key: np.zeros(K + 1) for key in ("e1", "e2", "kappa", "gsq", "p")}
  for l, name in enumerate(groups):
    s = sl[name]
    out["gsq"][l] = np.sum(gbar[s] ** 2)
    out["kappa"][l] = w @ np.sum((g[:, s] - gbar[s]) ** 2, axis=1) / w.sum()
    ws = n * sel[:, l]
    out["p"][l] = ws.sum() / w.sum()
    if ws.sum() == 0:
      out["e1"][l] = out["gsq"][l]
    else:
      out["e2"][l] = np.sum((ws @ g[:, s] / ws.sum() - gbar[s]) ** 2)
  trained = np.concatenate([np.arange(D)[sl[name]] for name in groups])
  xs = [data["x"][i, :c].astype(np.float64) for i, c in enumerate(data["num_examples"])]
  hess = sum(wi * xi.T @ xi / ci for wi, xi, ci in zip(w, xs, n)) / w.sum()
  out["L"] = np.max(np.abs(np.linalg.eigvalsh(hess[np.ix_(trained, trained)])))
  losses = [0.5 * np.mean((xi @ theta - data["y"][i, :len(xi)]) ** 2) for i, xi in enumerate(xs)]
  out["f"] = w @ np.asarray(losses) / w.sum()
  return out


def run_diagnose(params, data, masks, w_ref, w_sel, chunk=2, estimator="full", batches=1,
                 power_iters=0, grads=None):
  index = masks_lib.group_index(params, GROUPS)
  n_max = data["x"].shape[1]
  client_grads, diagnose = diag.make_diagnose_fn(loss_fn, index, K,
                                                 scan=federated.scan_client_chunks,
                                                 batch_size=B, n_max=n_max,
                                                 estimator=estimator, batches=batches,
                                                 power_iters=power_iters)
  keys = jax.random.split(jax.random.key(3), len(w_ref))
  if grads == "shared":
    grads = jax.jit(client_grads, static_argnums=3)(params, data, keys, chunk)
  fn = jax.jit(diagnose, static_argnums=6)
  return jax.device_get(fn(params, data, masks, w_ref, w_sel, keys, chunk, jax.random.key(4),
                           grads))


def check_terms(out, ref, rtol=1e-5):
  np.testing.assert_allclose(out["grad_sq_layers"], ref["gsq"], rtol=rtol)
  np.testing.assert_allclose(out["kappa_sq"], ref["kappa"], rtol=rtol)
  np.testing.assert_allclose(out["e1_layers"], ref["e1"], rtol=rtol)
  np.testing.assert_allclose(out["e2_layers"], ref["e2"], rtol=rtol, atol=1e-6 * ref["gsq"].sum())
  np.testing.assert_allclose(out["p_layers"], ref["p"], rtol=rtol)
  np.testing.assert_allclose(out["e1"], ref["e1"].sum(), rtol=rtol)
  np.testing.assert_allclose(out["e2"], ref["e2"].sum(), rtol=rtol, atol=1e-6 * ref["gsq"].sum())
  np.testing.assert_allclose(out["grad_sq"], ref["gsq"].sum(), rtol=rtol)
  np.testing.assert_allclose(out["grad_sq_cand"], ref["gsq"][:K].sum(), rtol=rtol)
  np.testing.assert_allclose(out["f_diag"], ref["f"], rtol=rtol)
  bound = np.where(ref["p"] > 0, (1 / np.maximum(ref["p"], 1e-30) - 1) * ref["kappa"], 0)
  np.testing.assert_allclose(out["e2_bound"], bound.sum(), rtol=rtol)
  assert np.all(out["e2_layers"] <= out["kappa_sq"] * np.maximum(
      1 / np.maximum(out["p_layers"], 1e-30) - 1, 0) * (1 + 1e-5) + 1e-9)


@pytest.mark.parametrize("shared", [False, True])
def test_sampled_clients_match_closed_form(shared):
  params = init_params()
  data = clients([7, 5, 9, 4, 6, 8])                        # sizes not multiples of B = 3
  masks = np.array([[1, 0, 0], [1, 1, 0], [0, 1, 0], [1, 0, 0], [0, 1, 0], [0, 0, 0]], bool)
  valid = np.array([1, 1, 1, 1, 1, 0], bool)               # the last slot is padding
  w = np.where(valid, data["num_examples"], 0).astype(np.float32)
  out = run_diagnose(params, data, masks, w, w, power_iters=200,
                     grads="shared" if shared else None)
  ref = closed_form(params, data, masks, valid.astype(float), valid.astype(float))
  assert ref["e1"][2] > 0 and ref["e2"][:2].min() > 0       # the test exercises both terms
  check_terms(out, ref)
  np.testing.assert_allclose(out["lipschitz"], ref["L"], rtol=1e-5)


def test_client_left_out_of_the_aggregate_leaves_the_aggregation_set_only():
  """A client whose update was non-finite (not aggregated) keeps its place in the
  reference set but not in S_l: the terms are the closed form's with it sampled
  but unselected."""
  params = init_params()
  data = clients([7, 5, 9, 4, 6, 8])
  masks = np.array([[1, 0, 0], [1, 1, 0], [0, 1, 0], [1, 0, 0], [0, 1, 0], [0, 0, 0]], bool)
  valid = np.array([1, 1, 1, 1, 1, 0], bool)
  aggregated = valid & (np.arange(6) != 1)                  # client 1's update was NaN
  w = np.where(valid, data["num_examples"], 0).astype(np.float32)
  rd = dict(data, client_ids=np.arange(6, dtype=np.int32), diagnose=np.bool_(True))
  index = masks_lib.group_index(params, GROUPS)
  _, diagnose = diag.make_diagnose_fn(loss_fn, index, K, scan=federated.scan_client_chunks,
                                      batch_size=B, n_max=data["x"].shape[1])
  out = jax.device_get(jax.jit(lambda r, a: diag.diagnose_round(
      diagnose, params, r, masks, w, jax.random.key(0), 2, population=False, aggregated=a))(
          rd, aggregated))
  check_terms(out, closed_form(params, data, masks, valid.astype(float),
                               aggregated.astype(float)))


def test_client_with_nonfinite_gradient_leaves_both_sets():
  """NaN data: that client's gradient at theta^t is NaN; the terms are those of the
  other clients (finite), not NaN."""
  params = init_params()
  data = clients([7, 5, 9, 4, 6, 8])
  masks = np.array([[1, 0, 0], [1, 1, 0], [0, 1, 0], [1, 0, 0], [0, 1, 0], [0, 0, 0]], bool)
  valid = np.array([1, 1, 1, 1, 1, 0], bool)
  bad = dict(data, x=data["x"].copy())
  bad["x"][2, 0, 0] = np.nan
  w = np.where(valid, data["num_examples"], 0).astype(np.float32)
  out = run_diagnose(params, bad, masks, w, w)
  keep = valid & (np.arange(6) != 2)
  check_terms(out, closed_form(params, data, masks, keep.astype(float), keep.astype(float)))


def test_population_mode_matches_closed_form():
  params = init_params(5)
  data = clients([7, 5, 9, 4, 6, 8, 3, 10], seed=2)
  sampled = np.array([0, 1, 1, 0, 1, 0, 0, 1], bool)
  masks = np.array([[0, 0, 0], [1, 0, 1], [1, 1, 0], [0, 0, 0], [0, 1, 0], [0, 0, 0],
                    [0, 0, 0], [1, 0, 0]], bool)
  n = data["num_examples"].astype(np.float32)
  out = run_diagnose(params, data, masks, n, n * sampled, chunk=4, power_iters=200)
  ref = closed_form(params, data, masks, np.ones(8), sampled.astype(float))
  check_terms(out, ref)
  assert ref["e2"][K] > 0          # the common layers carry the sampling error here
  np.testing.assert_allclose(out["lipschitz"], ref["L"], rtol=1e-5)


def test_e2_zero_when_all_select_the_same_layers():
  params = init_params()
  data = clients([7, 5, 9, 4])
  masks = np.array([[1, 0, 1]] * 4, bool)
  w = data["num_examples"].astype(np.float32)
  out = run_diagnose(params, data, masks, w, w)
  assert float(out["e2"]) <= 1e-12 * float(out["grad_sq"])
  assert float(out["e1"]) > 0 and np.all(out["e1_layers"][[0, 2, 3]] == 0)


def test_e1_zero_when_every_layer_is_covered():
  params = init_params()
  data = clients([7, 5, 9, 4])
  masks = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0]], bool)   # nobody has all
  w = data["num_examples"].astype(np.float32)
  out = run_diagnose(params, data, masks, w, w)
  assert float(out["e1"]) == 0 and float(out["e2"]) > 0


def test_weighted_estimator_is_the_full_data_gradient():
  params = init_params()
  data = clients([7], n_max=9)                              # 7 = 2 batches of 3 + 1
  index = masks_lib.group_index(params, GROUPS)
  one = {f: data[f][0] for f in ("x", "y", "num_examples")}
  ref = closed_form(params, data, np.zeros((1, K), bool), np.ones(1), np.ones(1))
  x, y = data["x"][0, :7].astype(np.float64), data["y"][0, :7]
  g_ref = x.T @ (x @ flat(params) - y) / 7
  g_ref[slices()["embed"]] = 0
  for estimator, batches in (("full", 1), ("sampled", 3), ("sampled", 10)):
    fn = diag.make_client_grad_fn(loss_fn, index, batch_size=B, n_max=9, estimator=estimator,
                                  batches=batches)
    loss, g = jax.jit(fn)(params, one, jax.random.key(7))
    np.testing.assert_allclose(flat(g), g_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(loss, ref["f"], rtol=1e-5)
  # The unweighted mean of batch means (the score pass's old estimator) is not it.
  means = [x[s].T @ (x[s] @ flat(params) - y[s]) / len(x[s]) for s in (slice(0, 3), slice(3, 6),
                                                                        slice(6, 7))]
  assert not np.allclose(np.mean(means, axis=0), g_ref, rtol=1e-3)


def test_sampled_rows_are_a_fresh_uniform_subset():
  n, n_max = 11, 14
  seen = np.zeros(n_max)
  draws = []
  for r in range(300):
    rows, w = diag.estimator_rows("sampled", jnp.int32(n), n_max, B, 2, jax.random.key(r))
    used = np.asarray(rows)[np.asarray(w) > 0]
    assert len(used) == 6 and len(set(used)) == 6 and used.max() < n   # distinct real rows
    seen[used] += 1
    draws.append(tuple(sorted(used)))
  # C(11, 6) = 462 subsets: 300 uniform draws give ~221 distinct ones on average.
  assert len(set(draws)) > 180
  assert seen[n:].sum() == 0
  expected = 300 * 6 / n                                                # every row equally likely
  assert np.all(np.abs(seen[:n] - expected) < 5 * np.sqrt(expected))


def test_power_iteration_on_a_matrix():
  rng = np.random.default_rng(0)
  q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
  a = q @ np.diag([-5., 3., 1., 0.5, 0.1, 0.]) @ q.T      # dominant eigenvalue negative
  lam = diag.power_iteration(lambda v: {"a": jnp.asarray(a, jnp.float32) @ v["a"]},
                             {"a": jnp.ones(6)}, 100)
  np.testing.assert_allclose(lam, 5.0, rtol=1e-5)


def test_bad_estimator_settings():
  with pytest.raises(ValueError, match="diagnostics.batches"):
    diag.num_diag_batches(10, 3, "sampled", 0)
  with pytest.raises(ValueError, match="diagnostics.estimator"):
    diag.num_diag_batches(10, 3, "bogus", 1)


def make_round(strategy, **kw):
  import optax
  params = init_params()
  index = masks_lib.group_index(params, GROUPS)
  settings = federated.RoundSettings(strategy=strategy, local_steps=2, batch_size=B,
                                     client_chunk=2, diag_power_iters=100, **kw)
  fn = federated.make_round_fn(loss_fn, index, K, optax.sgd(0.01), optax.sgd(1.0),
                               np.ones(K, np.float32), settings)
  return params, federated.init_server_state(params, optax.sgd(1.0), 8, K), jax.jit(fn)


def round_data(data, ids, budgets, population=None):
  rd = {f: data[f][ids] for f in data}
  rd.update(client_ids=np.asarray(ids, np.int32), valid=np.ones(len(ids), bool),
            budgets=np.full(len(ids), budgets, np.float32), lam=np.float32(0.1),
            reselect=np.bool_(True))
  if population is not None:
    rd["population"] = dict({f: population[f] for f in ("x", "y", "num_examples")},
                            client_ids=np.arange(len(population["num_examples"]), dtype=np.int32))
  return rd


@pytest.mark.parametrize("strategy,sel_batches", [("random", 1), ("proposed", 0)])
def test_logged_round_metrics_match_closed_form(strategy, sel_batches):
  """What round_fn logs (sample mode) against the closed form; with
  ``proposed`` and all-data scores the one shared pass also gives the scores."""
  params, state, fn = make_round(strategy, sel_batches=sel_batches)
  data = clients([7, 5, 9, 4, 6, 8, 3, 10], seed=3)
  ids = np.array([1, 2, 4, 7])
  new_state, m = fn(state, round_data(data, ids, 1.0), jax.random.key(0))
  sub = {f: data[f][ids] for f in data}
  ref = closed_form(params, sub, np.asarray(m["masks"]), np.ones(4), np.ones(4))
  check_terms(m, ref)
  np.testing.assert_allclose(m["lipschitz"], ref["L"], rtol=1e-5)
  step = flat(new_state.params) - flat(params)
  np.testing.assert_allclose(m["update_sq"], np.sum(step ** 2), rtol=1e-5)
  if strategy == "proposed":
    assert federated.RoundSettings(strategy, sel_batches=0).shares_score_pass
    theta, sl = flat(params), slices()
    for i, c in enumerate(sub["num_examples"]):
      x = sub["x"][i, :c].astype(np.float64)
      g = x.T @ (x @ theta - sub["y"][i, :c]) / c
      gn = [np.sum(g[sl[f"block_{l}"]] ** 2) for l in range(K)]
      np.testing.assert_allclose(m["scores"][i], gn, rtol=1e-5)


@pytest.mark.parametrize("strategy,score", [("proposed", "gradnorm"), ("snr", "snr")])
def test_score_estimator_reads_the_score_batches_without_changing_training(strategy, score):
  """estimator='score': E1/E2/kappa/f match the closed form on exactly the rows the
  score pass drew (scores.draw_score_batches with the score key), and the round's
  masks, scores and new model equal those of the same round with 'sampled'."""
  from fedsel_jax import scores as scores_lib
  data = clients([7, 5, 9, 4, 6, 8, 3, 10], seed=6)
  ids = np.array([1, 2, 4, 7])
  rd = round_data(data, ids, 1.0)
  got = {}
  for est in ("score", "sampled"):
    params, state, fn = make_round(strategy, score=score, sel_batches=2, diag_estimator=est,
                                   diag_batches=2)
    assert federated.RoundSettings(strategy, score=score, sel_batches=2,
                                   diag_estimator=est).shares_score_pass == (est == "score")
    got[est] = fn(state, rd, jax.random.key(7))
  (new_s, m), (new_o, m_o) = got["score"], got["sampled"]
  np.testing.assert_array_equal(m["masks"], m_o["masks"])
  np.testing.assert_array_equal(m["scores"], m_o["scores"])
  np.testing.assert_array_equal(flat(new_s.params), flat(new_o.params))
  assert not np.allclose(m["grad_sq"], m_o["grad_sq"])  # another draw: other estimates
  # The rows the score pass drew, as round_fn derives the score key.
  score_key = jax.random.split(jax.random.fold_in(jax.random.key(7), 0), 3)[2]
  sub = {f: data[f][ids] for f in data}
  xs, ys, counts = [], [], []
  for i, c in enumerate(ids):
    rows, w, _ = scores_lib.draw_score_batches(jnp.asarray(sub["mask"][i]),
                                               jax.random.fold_in(score_key, int(c)), 2, B)
    keep = np.asarray(rows).ravel()[np.asarray(w).ravel() > 0]
    xs.append(sub["x"][i, keep]), ys.append(sub["y"][i, keep]), counts.append(len(keep))
  n_max = max(counts)
  drawn = dict(x=np.stack([np.pad(x, ((0, n_max - len(x)), (0, 0))) for x in xs]),
               y=np.stack([np.pad(y, (0, n_max - len(y))) for y in ys]),
               num_examples=np.asarray(counts, np.int32))
  w = sub["num_examples"] / drawn["num_examples"]     # clients still weigh n_i
  ref = closed_form(params, drawn, np.asarray(m["masks"]), w, w)
  check_terms({k: v for k, v in m.items()}, ref)


def test_logged_population_metrics_match_closed_form():
  params, state, fn = make_round("random", diag_population=True)
  data = clients([7, 5, 9, 4, 6, 8, 3, 10], seed=4)
  ids = np.array([0, 3, 5, 6])
  _, m = fn(state, round_data(data, ids, 2.0, population=data), jax.random.key(1))
  masks = np.zeros((8, K), bool)
  masks[ids] = np.asarray(m["masks"])
  sampled = np.isin(np.arange(8), ids).astype(float)
  check_terms(m, closed_form(params, data, masks, np.ones(8), sampled))
  # The sample-mode terms ride along: the sampled clients as the reference set.
  ref = closed_form(params, data, masks, sampled, sampled)
  np.testing.assert_allclose(m["e1_sampled"], ref["e1"].sum(), rtol=1e-5)
  np.testing.assert_allclose(m["e2_sampled"], ref["e2"].sum(), rtol=1e-5,
                             atol=1e-6 * ref["gsq"].sum())
  np.testing.assert_allclose(m["e2_layers_sampled"], ref["e2"], rtol=1e-5,
                             atol=1e-6 * ref["gsq"].sum())
  np.testing.assert_allclose(m["grad_sq_sampled"], ref["gsq"].sum(), rtol=1e-5)
  # every sampled client trains the common layers
  assert m["e2_layers_sampled"][K] <= 1e-12 * ref["gsq"].sum()


def test_rounds_without_diagnostics_log_nan():
  _, state, fn = make_round("random")
  data = clients([7, 5, 9, 4], seed=3)
  rd = dict(round_data(data, np.arange(4), 1.0), diagnose=np.bool_(False))
  _, m = fn(state, rd, jax.random.key(0))
  assert np.isnan(m["e1"]) and np.isnan(m["lipschitz"]) and np.isfinite(m["update_sq"])
