"""Depth-aware budgets: the cost model by hand, and P1 with it (in-graph vs
MILP vs brute force)."""

import itertools

import jax.numpy as jnp
import numpy as np
import pytest

from fedsel_jax import costs as costs_lib
from fedsel_jax import exact
from fedsel_jax import selection as sel

# A 3-block model: forward FLOPs per example of the blocks, head and fixed stem.
BLOCKS, HEAD, FIXED = [10.0, 20.0, 30.0], 5.0, 7.0
# Hand count (forward + activation grads down to the lowest block + weight
# grads of the selected blocks and the head), SPEC.md "Cost model":
HAND = {
    (): 7 + 60 + 5 + 0 + 5,                  # forward, head weight grads
    (2,): 7 + 60 + 5 + (30 + 5) + (30 + 5),
    (1,): 7 + 60 + 5 + (20 + 30 + 5) + (20 + 5),
    (0,): 7 + 60 + 5 + (10 + 20 + 30 + 5) + (10 + 5),
    (0, 2): 7 + 60 + 5 + (10 + 20 + 30 + 5) + (10 + 30 + 5),
    (1, 2): 7 + 60 + 5 + (20 + 30 + 5) + (20 + 30 + 5),
    (0, 1): 7 + 60 + 5 + (10 + 20 + 30 + 5) + (10 + 20 + 5),
    (0, 1, 2): 7 + 3 * (60 + 5),
}


def test_depth_costs_match_a_hand_count():
  model = costs_lib.depth_costs_from_flops(BLOCKS, HEAD, FIXED)
  sets = list(HAND)
  masks = np.zeros((len(sets), 3), bool)
  for r, s in enumerate(sets):
    masks[r, list(s)] = True
  got = model.constant + np.asarray(costs_lib.depth_set_cost(masks, model.weight,
                                                             model.backward))
  np.testing.assert_allclose(got, [HAND[s] for s in sets])
  np.testing.assert_allclose(got, costs_lib.training_flops_per_sample(
      BLOCKS, HEAD, masks, fixed_forward_flops=FIXED))
  np.testing.assert_allclose(exact.set_costs_np(masks, model.weight, model.backward)
                             + model.constant, got)
  # Not additive: {0} costs more than {2} although block 0 is the smallest.
  assert HAND[(0,)] > HAND[(2,)] and BLOCKS[0] < BLOCKS[2]
  assert model.cheapest_set == pytest.approx(HAND[(2,)] - HAND[()])


def _depth_instance(seed, m, k, lam):
  rng = np.random.default_rng(seed)
  model = costs_lib.depth_costs_from_flops(rng.uniform(0.5, 2.0, k), rng.uniform(0.1, 0.5))
  model = model.scaled(model.cheapest_set)  # the cheapest set costs 1
  scores = np.asarray(sel.normalize_scores(rng.gamma(0.5, size=(m, k)).astype(np.float32)))
  budgets = rng.uniform(1.0, 4.0, m).astype(np.float32)
  return scores, model, budgets, lam


def _feasible(masks, model, budgets):
  cost = exact.set_costs_np(masks, model.weight, model.backward)
  return np.all(cost <= budgets * (1 + 1e-5) + 1e-6)


@pytest.mark.parametrize("lam_sign", [1.0, -1.0])
def test_depth_aware_p1_in_graph_vs_milp_vs_brute(lam_sign):
  """Feasible always, optimal on >= 95 %, within 2 % on all; MILP = brute."""
  rng = np.random.default_rng(0)
  n, optimal = 30, 0
  for seed in range(n):
    m, k = int(rng.integers(2, 6)), int(rng.integers(2, 5))
    lam = lam_sign * float(rng.choice([0.01, 0.05, 0.2]))
    scores, model, budgets, _ = _depth_instance(seed, m, k, lam)
    _, best = sel.solve_p1_brute(scores, model.weight, budgets, lam, backward=model.backward)
    milp, info = sel.solve_p1_exact(scores, model.weight, budgets, lam,
                                    backward=model.backward)
    assert info["status"] == "optimal" and _feasible(milp, model, budgets)
    assert info["objective"] == pytest.approx(best, abs=1e-6)
    got = np.asarray(sel.solve_p1(scores, model.weight.astype(np.float32), budgets, lam,
                                  backward=model.backward.astype(np.float32)))
    assert _feasible(got, model, budgets)
    value = exact.p1_objective_np(got, scores, lam)
    scale = max(abs(best), 1e-3)
    assert value >= best - 0.02 * scale - 1e-6, (seed, value, best)
    optimal += value >= best - 1e-5 * (1 + abs(best))
  assert optimal >= 0.95 * n, optimal


def test_depth_best_response_enumerates_the_lowest_block():
  """One client: the in-graph best response is the brute-force optimum."""
  from fedsel_jax import solver  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(1)
  for seed in range(20):
    k = int(rng.integers(2, 6))
    scores, model, budgets, _ = _depth_instance(seed, 1, k, 0.0)
    values = scores[0] - (rng.random(k) < 0.3) * 0.5  # some negative gains
    prob = solver.make_problem(scores, model.weight, budgets, 0.0, backward=model.backward)
    got = np.asarray(prob.respond(jnp.asarray(values, jnp.float32), jnp.asarray(budgets)))[0]
    best = max((np.array(s) for s in itertools.product([False, True], repeat=k)
                if exact.set_costs_np(np.array(s), model.weight, model.backward) <= budgets[0]),
               key=lambda s: (values * s).sum())
    assert _feasible(got[None], model, budgets)
    assert (values * got).sum() == pytest.approx((values * best).sum(), abs=1e-6)


@pytest.mark.parametrize("strategy", ["top", "bottom", "both", "random", "gradnorm",
                                      "proposed"])
def test_every_budgeted_strategy_respects_depth_aware_budgets(strategy):
  import jax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from fedsel_jax import client as client_lib  # pylint: disable=g-import-not-at-top
  from fedsel_jax import federated  # pylint: disable=g-import-not-at-top
  from tests import test_core
  spec, params, index = test_core.tiny_model()
  k, m = test_core.K, 5
  model = costs_lib.depth_costs_from_flops([4.0, 3.0, 2.0, 1.0], 0.5)
  model = model.scaled(model.cheapest_set)
  budgets = np.array([1.0, 2.0, 3.5, 6.0, 12.0], np.float32)
  settings = federated.RoundSettings(strategy=strategy, local_steps=1, batch_size=4,
                                     diagnostics=False, sel_batches=1)
  fn = jax.jit(federated.make_round_fn(
      client_lib.make_loss_fn(spec.module.apply), index, k, optax.sgd(0.1), optax.sgd(1.0),
      model.weight.astype(np.float32), settings, backward=model.backward.astype(np.float32)))
  rd = test_core.round_data(test_core.random_clients(m, seed=3), np.arange(m),
                            budgets=budgets, lam=0.05)
  state = federated.init_server_state(params, optax.sgd(1.0), m, k)
  _, metrics = fn(state, rd, jax.random.key(0))
  masks = np.asarray(metrics["masks"])
  assert np.all(np.asarray(sel.is_feasible(masks, model.weight, budgets,
                                           backward=model.backward)))
  assert masks[-1].any()  # the largest budget trains something
  # Alone, blocks 0..3 cost 5.8, 3.8, 2.2, 1 (units of the top block alone):
  # budget 1 affords only the top block, whatever the strategy prefers.
  np.testing.assert_array_equal(masks[0], [False, False, False, True])
  if strategy == "bottom":
    assert masks[3, 0] and not masks[2, 0]


@pytest.mark.parametrize("move", ["handover_step", "swap_step"])
def test_spreading_moves_respect_depth_aware_budgets(move):
  """From feasible random masks (lam < 0), a handover or swap never breaks a
  depth-aware budget or lowers the objective, and some do move."""
  import jax
  import jax.numpy as jnp
  from fedsel_jax import solver
  step = jax.jit(getattr(solver, move))
  rng, moved = np.random.default_rng(11), 0
  for seed in range(20):
    m, k = int(rng.integers(2, 7)), int(rng.integers(2, 6))
    scores, model, budgets, lam = _depth_instance(seed, m, k, -0.3)
    prob = solver.make_problem(scores, model.weight.astype(np.float32), budgets,
                               np.float32(lam), backward=model.backward.astype(np.float32))
    masks = np.zeros((3, m, k), bool)
    for p, i in itertools.product(range(3), range(m)):
      for l in rng.permutation(k):   # add layers while the set stays affordable
        trial = masks[p, i].copy()
        trial[l] = rng.random() < 0.6
        if _feasible(trial[None], model, budgets[i:i + 1]):
          masks[p, i] = trial
    new, _, changed = step(prob, jnp.asarray(masks), solver.counts_of(jnp.asarray(masks)))
    new = np.asarray(new)
    assert all(_feasible(new[p], model, budgets) for p in range(3))
    before = [exact.p1_objective_np(x, scores, lam) for x in masks]
    after = [exact.p1_objective_np(x, scores, lam) for x in new]
    assert np.all(np.asarray(after) >= np.asarray(before) - 1e-6)
    moved += bool(changed)
  assert moved > 0
