"""selection.cost='memory': the depth-aware memory cost model, measured, and runs under it."""

import csv

import jax
import numpy as np
import pytest

from fedsel_jax import client as client_lib
from fedsel_jax import costs as costs_lib
from fedsel_jax import masks as masks_lib
from fedsel_jax import memory_costs
from fedsel_jax import train
from fedsel_jax import validate
from tests.helpers import smoke_config


@pytest.fixture(scope="module")
def setup(data_dir):
  return train.Setup(smoke_config(data_dir, **{"selection.cost": "memory"}))


def test_weights_are_the_hand_count_and_backward_grows_with_depth(setup):
  """weight[l] = 4 n_l (2 + optimizer slots) bytes; backward[j] (activations kept
  for backprop down to block j) is 0 at K, positive below and non-increasing."""
  m = setup.memory
  k = setup.k
  sizes = masks_lib.group_sizes(setup.params, setup.index, k)
  np.testing.assert_array_equal(m.weight, 4.0 * sizes * (2 + 0))   # smoke: SGD, no slots
  # XLA reuses buffers, so neighbouring cuts may measure alike; the deepest keeps the most.
  assert m.backward[k] == 0 and m.backward[0] > 0
  assert np.all(np.diff(m.backward) <= 0)
  adam = memory_costs.memory_depth_costs(
      client_lib.make_loss_fn(setup.spec.module.apply), setup.params, setup.index, k,
      setup.clients.x[0, :4], setup.clients.y[0, :4], "adam")
  np.testing.assert_array_equal(adam.weight, 4.0 * sizes * (2 + 2))


def test_temp_bytes_fall_as_the_cut_rises(setup):
  """The measurement itself: backprop to a higher block keeps fewer activations."""
  loss_fn = client_lib.make_loss_fn(setup.spec.module.apply)
  x, y = setup.clients.x[0, :8], setup.clients.y[0, :8]
  temp = [memory_costs.gradient_temp_bytes(loss_fn, setup.params, setup.index, j, x, y)
          for j in (0, setup.k)]
  assert temp[0] > temp[1] > 0


def test_budget_units_are_the_cheapest_block(setup):
  costs, backward = setup.costs, setup.backward
  single = costs + backward[:-1]
  np.testing.assert_allclose(single.min(), 1.0, rtol=1e-6)
  # the lowest block costs most alone (backprop through every block above it)
  assert single[0] == single.max()


def test_run_spends_memory_budgets_and_logs_the_peak(data_dir, tmp_path, setup):
  config = smoke_config(data_dir, **{"selection.cost": "memory", "fl.num_rounds": 3,
                                     "selection.budget.kind": "fixed",
                                     "selection.budget.value": 2})
  train.train_and_evaluate(config, str(tmp_path / "run"), quiet=True)
  with np.load(tmp_path / "run" / "selection.npz") as f:
    masks = f["masks"]                                  # [rounds, M, K]
  m = setup.memory
  unit = m.scaled(m.cheapest_set)
  spent = np.asarray(costs_lib.depth_set_cost(masks, unit.weight, unit.backward))
  assert np.all(spent <= 2 + 1e-5) and np.all(masks.any(-1))
  with open(tmp_path / "run" / "metrics.csv") as f:
    rows = list(csv.DictReader(f))
  peak = [float(r["train_memory_mb"]) for r in rows]
  want = [(m.constant + np.max(np.asarray(costs_lib.depth_set_cost(mk, m.weight, m.backward))))
          / 2 ** 20 for mk in masks]
  np.testing.assert_allclose(peak, want, rtol=1e-6)


def test_memory_is_a_valid_cost_and_others_are_refused(data_dir):
  validate.validate_config(smoke_config(data_dir, **{"selection.cost": "memory"}))
  with pytest.raises(validate.ConfigError, match="selection.cost"):
    validate.validate_config(smoke_config(data_dir, **{"selection.cost": "bytes"}))


def test_unknown_optimizer_for_memory_is_refused(setup):
  with pytest.raises(ValueError, match="client_optim.name"):
    memory_costs.memory_depth_costs(client_lib.make_loss_fn(setup.spec.module.apply),
                                    setup.params, setup.index, setup.k,
                                    setup.clients.x[0, :2], setup.clients.y[0, :2], "lion")


def test_backend_reports_memory():
  """The measurement relies on XLA's memory analysis on this backend."""
  compiled = jax.jit(lambda a: (a * 2).sum()).lower(np.ones(4, np.float32)).compile()
  assert compiled.memory_analysis() is not None
