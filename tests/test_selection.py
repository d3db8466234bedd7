"""Tests of fedsel_jax.selection and fedsel_jax.solver: P1 solvers, baselines,
budgets, cost model."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedsel_jax import exact
from fedsel_jax import selection as sel
from fedsel_jax import solver

PAD = 6  # small instances are padded to PAD x PAD for one vmapped solve
PAD_COST = 1e9  # a padding layer never fits a budget


def random_instance(rng, max_clients=PAD, max_layers=PAD):
  """Mixed small P1 instance: unit / integer / float costs, budgets 1..K."""
  m = int(rng.integers(1, max_clients + 1))
  k = int(rng.integers(1, max_layers + 1))
  scores = rng.gamma(0.5, size=(m, k)) + 1e-9
  scores = (scores / scores.sum(1, keepdims=True)).astype(np.float32)  # rows sum to 1
  kind = rng.integers(3)
  if kind == 0:
    costs = np.ones(k, np.float32)
  elif kind == 1:
    costs = rng.integers(1, 4, k).astype(np.float32)
  else:
    costs = rng.uniform(0.3, 2.5, k).astype(np.float32)
  budgets = rng.integers(1, k + 1, m).astype(np.float32)
  lam = 0.0 if rng.random() < 0.1 else float(rng.uniform(0.0, 2.0))
  return scores, costs, budgets, lam


def pad_batch(instances):
  """Stacks instances into PAD x PAD arrays with client_valid."""
  n = len(instances)
  scores = np.zeros((n, PAD, PAD), np.float32)
  costs = np.full((n, PAD), PAD_COST, np.float32)
  budgets = np.zeros((n, PAD), np.float32)
  lams = np.zeros((n,), np.float32)
  valid = np.zeros((n, PAD), bool)
  for r, (s, c, b, lam) in enumerate(instances):
    m, k = s.shape
    scores[r, :m, :k], costs[r, :k], budgets[r, :m] = s, c, b
    lams[r], valid[r, :m] = lam, True
  return scores, costs, budgets, lams, valid


TRACES = []  # one entry per trace of solve_one


@jax.jit
def solve_one(scores, costs, budgets, lam, valid):
  TRACES.append(scores.shape)
  return sel.solve_p1(scores, costs, budgets, lam, client_valid=valid)


solve_batch = jax.jit(jax.vmap(solve_one))


def solve_padded(scores, costs, budgets, lam):
  """solve_p1 on one instance padded to PAD x PAD (one compilation for all)."""
  m, k = np.shape(scores)
  batch = pad_batch([(np.asarray(scores), np.asarray(costs), np.asarray(budgets), lam)])
  return np.asarray(solve_one(*[x[0] for x in batch]))[:m, :k]


def upper_bound(scores, costs, budgets):
  """sum_i of client i's best score sum within budget (P1 at lam = 0)."""
  total = 0.0
  for s, b in zip(scores, budgets):
    subsets = exact._feasible_subsets(np.asarray(costs, np.float64), float(b))
    total += float(np.max(subsets @ np.asarray(s, np.float64)))
  return total


@pytest.fixture(scope="module")
def small_instances():
  rng = np.random.default_rng(1234)
  instances = [random_instance(rng) for _ in range(500)]
  brute = [sel.solve_p1_brute(*x) for x in instances]
  out = np.asarray(solve_batch(*pad_batch(instances)))
  return instances, brute, out


# ---------------------------------------------------------------------------
# Exact solvers.


def test_brute_matches_naive_enumeration():
  rng = np.random.default_rng(0)
  for _ in range(20):
    s, c, b, lam = random_instance(rng, max_clients=3, max_layers=3)
    best = -np.inf
    per_client = [exact._feasible_subsets(c.astype(np.float64), bi) for bi in b]
    for combo in itertools.product(*per_client):
      best = max(best, sel.p1_objective_np(np.array(combo), s, lam))
    masks, value = sel.solve_p1_brute(s, c, b, lam)
    assert value == pytest.approx(best, abs=1e-9)
    assert sel.p1_objective_np(masks, s, lam) == pytest.approx(value, abs=1e-9)
    assert np.all(masks.astype(float) @ c <= b + 1e-6)


def test_exact_milp_matches_brute(small_instances):
  instances, brute, _ = small_instances
  for x, (_, value) in zip(instances, brute):
    masks, info = sel.solve_p1_exact(*x)
    assert info["status"] == "optimal", info
    assert info["objective"] == pytest.approx(value, abs=1e-6)
    assert info["bound"] >= value - 1e-6
    assert np.all(masks.astype(float) @ x[1] <= x[2] + 1e-6)


def test_penalty_is_pairwise_disagreement():
  rng = np.random.default_rng(1)
  masks = rng.random((7, 5)) < 0.5
  pairs = sum(np.sum(masks[i] != masks[j]) for i in range(7) for j in range(i))
  assert float(sel.p1_penalty(masks, 0.5)) == pytest.approx(0.5 * pairs)
  scores = rng.random((7, 5)).astype(np.float32)
  assert float(sel.p1_objective(masks, scores, 0.5)) == pytest.approx(
      sel.p1_objective_np(masks, scores, 0.5), rel=1e-6)


# ---------------------------------------------------------------------------
# The in-graph solver against the exact optimum.


def test_solve_p1_near_optimal_on_small_instances(small_instances):
  """Issue 3's acceptance: always feasible, optimal on >= 95% of the
  instances and within 2% of the optimum on all of them, the gap measured
  relative to the optimum itself, (opt - obj) / opt. The optimum is >= 0
  (the empty mask scores 0); where it is 0 the solver must score 0 too."""
  instances, brute, out = small_instances
  batch = pad_batch(instances)
  assert np.all(np.asarray(jax.vmap(sel.is_feasible)(out, *batch[1:3], batch[4])))
  optimal, rel_gaps = 0, []
  for (s, c, b, lam), (_, opt), masks in zip(instances, brute, out):
    m, k = s.shape
    assert not masks[m:].any() and not masks[:, k:].any()  # padding stays off
    masks = masks[:m, :k]
    assert np.all(masks.astype(np.float64) @ c <= b * (1 + 1e-6))
    value = sel.p1_objective_np(masks, s, lam)
    assert value <= opt + 1e-6
    optimal += (opt - value) <= 1e-6 * max(1.0, abs(opt))
    if opt > 1e-6:
      rel_gaps.append((opt - value) / opt)
    else:
      assert value >= -1e-6, (s, c, b, lam)
  assert optimal >= 0.95 * len(instances)
  assert max(rel_gaps) <= 0.02


# (seed, index) of instances of the quality study (random_instance, the
# index-th draw of default_rng(seed); experiments/selection) where the solver
# without insert kicks stopped 1-46% below the optimum: the cohort agreed on
# a layer that no client could leave alone without losing.
WRONG_CONSENSUS = [(5, 488), (11, 303), (1, 334), (5, 132), (20, 498), (30, 371),
                   (29, 328)]


@pytest.mark.parametrize("seed,index", WRONG_CONSENSUS)
def test_solve_p1_leaves_a_wrong_consensus(seed, index):
  rng = np.random.default_rng(seed)
  for _ in range(index + 1):
    scores, costs, budgets, lam = random_instance(rng)
  _, opt = sel.solve_p1_brute(scores, costs, budgets, lam)
  masks = solve_padded(scores, costs, budgets, lam)
  assert sel.p1_objective_np(masks, scores, lam) == pytest.approx(opt, abs=1e-6)


def test_padding_clients_change_nothing():
  """Invalid clients (NaN scores, zero budgets) neither select nor count."""
  rng = np.random.default_rng(2)
  real, fake = np.array([0, 2, 3]), np.array([1, 4, 5])
  for costs in (np.ones(PAD, np.float32), rng.uniform(0.3, 2.5, PAD).astype(np.float32)):
    for lam in (0.0, 0.2, 1.0):
      scores = np.asarray(sel.normalize_scores(rng.gamma(0.5, size=(3, PAD))))
      budgets = rng.integers(1, PAD + 1, 3).astype(np.float32)
      packed = solve_padded(scores, costs, budgets, lam)  # padding after them
      mixed_scores = np.full((PAD, PAD), np.nan, np.float32)
      mixed_scores[real] = scores
      mixed_budgets = np.full(PAD, 100.0, np.float32)
      mixed_budgets[real] = budgets
      mixed = np.asarray(solve_one(mixed_scores, costs, mixed_budgets,
                                   np.float32(lam), np.isin(np.arange(PAD), real)))
      np.testing.assert_array_equal(mixed[real], packed)
      assert not mixed[fake].any()


def test_lam_zero_is_per_client_top_b():
  rng = np.random.default_rng(3)
  m, k = PAD, PAD
  costs = np.ones(k, np.float32)
  for _ in range(5):
    scores = np.asarray(sel.normalize_scores(rng.random((m, k))))
    budgets = rng.integers(1, k + 1, m).astype(np.float32)
    masks = solve_padded(scores, costs, budgets, 0.0)
    expected = np.zeros((m, k), bool)
    for i in range(m):
      expected[i, np.argsort(-scores[i])[:int(budgets[i])]] = True
    np.testing.assert_array_equal(masks, expected)
    np.testing.assert_array_equal(
        np.asarray(sel.select_topk_scores(scores, costs, budgets)), expected)


def test_lam_zero_unequal_costs_is_knapsack_optimum():
  rng = np.random.default_rng(4)
  for _ in range(10):
    s, _, b, _ = random_instance(rng)
    c = rng.uniform(0.3, 2.5, s.shape[1]).astype(np.float32)
    masks = solve_padded(s, c, b, 0.0)
    assert sel.p1_objective_np(masks, s, 0.0) == pytest.approx(
        upper_bound(s, c, b), abs=1e-6)


def test_huge_lam_gives_consensus():
  rng = np.random.default_rng(5)
  for _ in range(5):
    scores = np.asarray(sel.normalize_scores(rng.random((PAD, PAD))))
    budgets = np.full((PAD,), 2.0, np.float32)
    valid = np.arange(PAD) < 4
    masks = np.asarray(solve_one(scores, np.ones(PAD, np.float32), budgets,
                                 np.float32(1e4), valid))
    assert (masks[:4] == masks[0]).all() and masks[0].sum() == 2
    assert not masks[4:].any()


def test_vmapped_solver_matches_single_calls(small_instances):
  instances, _, out = small_instances
  batch = pad_batch(instances[:12])
  for r in range(12):
    np.testing.assert_array_equal(out[r], np.asarray(solve_one(*[x[r] for x in batch])))


def test_changing_lam_scores_and_budgets_does_not_retrace():
  rng = np.random.default_rng(7)
  solve_padded(rng.random((PAD, PAD)), np.ones(PAD), np.full(PAD, 2.0), 0.1)
  before = len(TRACES)
  for lam in (0.0, 0.3, 2.0):
    solve_padded(rng.random((PAD, PAD)), rng.uniform(0.5, 2, PAD),
                 rng.integers(1, 4, PAD), lam)
  assert len(TRACES) == before


# ---------------------------------------------------------------------------
# Scores with NaN / inf.


def test_normalize_scores_handles_nonfinite():
  raw = np.array([[1.0, np.nan, 3.0, -1.0],
                  [np.nan, np.nan, np.inf, np.nan],
                  [0.0, 0.0, 0.0, 0.0],
                  [2.0, 2.0, 0.0, 4.0]], np.float32)
  out = np.asarray(sel.normalize_scores(raw))
  assert np.all(np.isfinite(out)) and np.allclose(out.sum(1), 1.0)
  np.testing.assert_allclose(out[0], [0.25, 0.0, 0.75, 0.0])
  np.testing.assert_allclose(out[1], 0.25)  # nothing finite left: uniform
  np.testing.assert_allclose(out[2], 0.25)
  np.testing.assert_allclose(out[3], [0.25, 0.25, 0.0, 0.5])
  np.testing.assert_array_equal(np.asarray(sel.count_nonfinite(raw)), [1, 4, 0, 0])


def test_solver_treats_nonfinite_scores_as_zero():
  rng = np.random.default_rng(8)
  scores = rng.random((PAD, PAD)).astype(np.float32)
  scores[1, 2], scores[4, 0], scores[3, 3] = np.nan, np.inf, -np.inf
  zeroed = np.where(np.isfinite(scores), scores, 0.0)
  budgets = rng.integers(1, 5, PAD).astype(np.float32)
  for lam in (0.0, 0.05):
    masks = solve_padded(scores, np.ones(PAD), budgets, lam)
    np.testing.assert_array_equal(masks, solve_padded(zeroed, np.ones(PAD), budgets, lam))
    assert np.isfinite(float(sel.p1_objective(masks, scores, lam)))
    assert np.all(masks.sum(1) <= budgets)


# ---------------------------------------------------------------------------
# Baselines.


def random_costs_budgets(rng, m=PAD, k=PAD):
  costs = rng.uniform(0.3, 2.5, k).astype(np.float32)
  budgets = rng.uniform(0.2, 6.0, m).astype(np.float32)
  return costs, budgets


def test_baselines_feasible_with_unequal_costs():
  rng = np.random.default_rng(9)
  costs, budgets = random_costs_budgets(rng)
  scores = rng.random((PAD, PAD)).astype(np.float32)
  valid = np.arange(PAD) < 4
  for masks in (sel.select_top(costs, budgets, client_valid=valid),
                sel.select_bottom(costs, budgets, client_valid=valid),
                sel.select_both(costs, budgets, client_valid=valid),
                sel.select_random(costs, budgets, jax.random.key(0), client_valid=valid),
                sel.select_topk_scores(scores, costs, budgets, client_valid=valid),
                solve_one(scores, costs, budgets, np.float32(0.3), valid)):
    assert np.all(np.asarray(sel.is_feasible(masks, costs, budgets, valid)))
    assert not np.asarray(masks)[4:].any()


def test_ordered_baselines_skip_misfits_and_fill():
  """Walking its order, a baseline never leaves a layer out that still fits."""
  rng = np.random.default_rng(10)
  costs, budgets = random_costs_budgets(rng)
  for fn, order in ((sel.select_top, np.arange(PAD)[::-1]),
                    (sel.select_bottom, np.arange(PAD)),
                    (sel.select_both, sel.both_ends_order(PAD))):
    masks = np.asarray(fn(costs, budgets))
    for i in range(PAD):
      used = 0.0
      for layer in order:
        fits = used + costs[layer] <= budgets[i]
        assert masks[i, layer] == fits, (fn.__name__, i, layer)
        used += costs[layer] if fits else 0.0


def test_top_bottom_both_unit_costs():
  k = 7
  budgets = np.arange(0, 9, dtype=np.float32)
  costs = np.ones(k, np.float32)
  top = np.asarray(sel.select_top(costs, budgets))
  bottom = np.asarray(sel.select_bottom(costs, budgets))
  both = np.asarray(sel.select_both(costs, budgets))
  full = np.asarray(sel.select_full(costs, budgets))
  assert full.all()
  for i, b in enumerate(budgets.astype(int)):
    n = min(b, k)
    np.testing.assert_array_equal(np.flatnonzero(top[i]), np.arange(k - n, k))
    np.testing.assert_array_equal(np.flatnonzero(bottom[i]), np.arange(n))
    expected = set(range(k - (n + 1) // 2, k)) | set(range(n // 2))
    assert set(np.flatnonzero(both[i])) == expected and both[i].sum() == n


def test_both_ends_order_alternates_without_duplicates():
  for k in range(1, 10):
    order = sel.both_ends_order(k)
    assert sorted(order.tolist()) == list(range(k))
    assert order[0] == k - 1
    if k > 1:
      assert order[1] == 0
    top, bottom = order[0::2], order[1::2]
    assert np.all(np.diff(top) == -1) and np.all(np.diff(bottom) == 1)


def test_random_baseline():
  ids = np.arange(30)
  select = jax.jit(lambda c, b, key, ids: sel.select_random(c, b, key, client_ids=ids))
  costs = np.ones(12, np.float32)
  budgets = np.full((30,), 3.0, np.float32)
  a = np.asarray(select(costs, budgets, jax.random.key(0), ids))
  b = np.asarray(select(costs, budgets, jax.random.key(0), ids))
  c = np.asarray(select(costs, budgets, jax.random.key(1), ids))
  np.testing.assert_array_equal(a, b)
  assert (a != c).any()
  assert np.all(a.sum(1) == 3)
  assert len({tuple(row) for row in a}) > 1
  # A client's mask depends on its id, not on who else is sampled.
  shuffled = np.asarray(select(costs, budgets, jax.random.key(0), ids[::-1]))
  np.testing.assert_array_equal(shuffled, a[::-1])


def test_baselines_jit_and_vmap():
  costs = jnp.ones(5)
  budgets = jnp.array([[1.0, 2.0], [3.0, 4.0]])
  top = jax.jit(jax.vmap(sel.select_top, in_axes=(None, 0)))(costs, budgets)
  assert top.shape == (2, 2, 5)
  np.testing.assert_array_equal(np.asarray(top).sum(-1), [[1, 2], [3, 4]])
  keys = jax.random.split(jax.random.key(0), 2)
  rand = jax.jit(jax.vmap(sel.select_random, in_axes=(None, 0, 0)))(costs, budgets, keys)
  np.testing.assert_array_equal(np.asarray(rand).sum(-1), [[1, 2], [3, 4]])


# ---------------------------------------------------------------------------
# Budgets, costs, validation.


def test_budget_draws_reproducible_and_in_range():
  for kind, kw in (("uniform", dict(low=1, high=4)),
                   ("truncnorm", dict(low=1, high=4, mean=2.0, std=1.0))):
    a = sel.draw_budgets(kind, 500, 3, **kw)
    np.testing.assert_array_equal(a, sel.draw_budgets(kind, 500, 3, **kw))
    assert (a != sel.draw_budgets(kind, 500, 4, **kw)).any()
    assert a.dtype == np.float32 and a.shape == (500,)
    assert a.min() >= 1 and a.max() <= 4 and np.all(a == np.round(a))
    assert set(np.unique(a)) == {1.0, 2.0, 3.0, 4.0}
  np.testing.assert_array_equal(sel.draw_budgets("fixed", 3, 0, value=2.5), [2.5] * 3)


def test_truncnorm_budgets_follow_the_distribution():
  from scipy import stats
  draws = sel.draw_budgets("truncnorm", 20000, 0, low=1, high=5, mean=2.0, std=1.0)
  dist = stats.truncnorm(-1.0, 3.0, loc=2.0, scale=1.0)
  for v in range(1, 6):  # P(round(x) == v), x truncated normal on [1, 5]
    p = dist.cdf(min(v + 0.5, 5)) - dist.cdf(max(v - 0.5, 1))
    assert np.mean(draws == v) == pytest.approx(p, abs=0.015)


@pytest.mark.parametrize("kind,kw,field", [
    ("gauss", {}, "selection.budget.kind"),
    ("fixed", {"value": 0}, "selection.budget.value"),
    ("uniform", {"low": 0, "high": 3}, "selection.budget.low"),
    ("uniform", {"low": 1.5, "high": 3}, "selection.budget.low"),
    ("uniform", {"low": 3, "high": 2}, "selection.budget.high"),
    ("truncnorm", {"low": 1, "high": 3, "mean": 2}, "selection.budget.std"),
    ("truncnorm", {"low": 1, "high": 3, "std": 1}, "selection.budget.mean"),
])
def test_budget_errors_name_the_field(kind, kw, field):
  with pytest.raises(ValueError, match=field.replace(".", r"\.")):
    sel.draw_budgets(kind, 10, 0, **kw)


def test_layer_costs():
  np.testing.assert_array_equal(sel.layer_costs("unit", param_counts=[5, 7]), [1, 1])
  np.testing.assert_allclose(sel.layer_costs("params", param_counts=[10, 30]), [0.5, 1.5])
  np.testing.assert_allclose(sel.layer_costs("flops", flops=[2.0, 2.0, 8.0]),
                             [0.5, 0.5, 2.0])
  with pytest.raises(ValueError, match=r"selection\.cost"):
    sel.layer_costs("bytes", param_counts=[1])
  with pytest.raises(ValueError, match=r"selection\.cost"):
    sel.layer_costs("flops", param_counts=[1])
  with pytest.raises(ValueError, match=r"selection\.cost"):
    sel.layer_costs("params", param_counts=[3, 0])


@pytest.mark.parametrize("lam", [float("nan"), float("inf"), -float("inf"), "x", None])
def test_check_lam_rejects(lam):
  with pytest.raises(ValueError, match=r"selection\.lam must be a finite number"):
    sel.check_lam(lam)


def test_check_lam_and_budgets_accept_valid():
  assert sel.check_lam(0) == 0.0 and sel.check_lam(1.5) == 1.5
  assert sel.check_lam(-0.1) == -0.1   # lam < 0 rewards disagreement
  sel.check_budgets([1.0, 2.0], [1.0, 1.0])
  with pytest.raises(ValueError, match=r"selection\.budget"):
    sel.check_budgets([1.0, 0.5], [0.7, 1.3])


# ---------------------------------------------------------------------------
# Cost model.


def test_training_flops():
  f = np.array([1.0, 2.0, 3.0, 4.0], np.float32)
  head, fixed = 0.5, 0.25
  masks = np.array([[1, 1, 1, 1], [0, 0, 0, 0], [0, 1, 0, 1], [0, 0, 0, 1]], bool)
  out = np.asarray(sel.training_flops_per_sample(f, head, masks,
                                                 fixed_forward_flops=fixed))
  forward = fixed + f.sum() + head
  np.testing.assert_allclose(out[0], fixed + 3 * (f.sum() + head))
  np.testing.assert_allclose(out[1], forward + head)
  # lowest selected block 1: activation grads of blocks 1..3 and the head,
  # weight grads of blocks 1, 3 and the head.
  np.testing.assert_allclose(out[2], forward + (9 + head) + (6 + head))
  np.testing.assert_allclose(out[3], forward + (4 + head) + (4 + head))


def test_communication_bytes():
  counts = np.array([100, 200, 300])
  masks = np.array([[1, 0, 1], [0, 0, 0]], bool)
  down, up = sel.communication_bytes(counts, masks, common_params=10,
                                     fixed_params=50, bytes_per_param=2)
  np.testing.assert_allclose(np.asarray(down), [2 * 660] * 2)
  np.testing.assert_allclose(np.asarray(up), [2 * 410 + 12, 2 * 10 + 12])
  _, up = sel.communication_bytes(counts, masks, common_params=10, fixed_params=50,
                                  sends_scores=False)
  np.testing.assert_allclose(np.asarray(up), [4 * 410, 4 * 10])


def test_every_strategy_has_one_selection_mode():
  from fedsel_jax import federated
  modes = {s: federated.selection_mode(s) for s in federated.STRATEGIES}
  assert {s for s, m in modes.items() if m == "server"} == {"proposed", "rgn_p1", "snr_p1"}
  assert {s for s, m in modes.items() if m == "client"} == {"gradnorm", "rgn", "snr"}
  assert set(modes.values()) == {"server", "client", "fixed"}
