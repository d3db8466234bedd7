"""Cost accounting: a round's FLOPs and bytes by hand, and in a run's logs."""

import csv
import json
import os

import numpy as np
import pytest

from fedsel_jax import accounting
from fedsel_jax import costs as costs_lib
from fedsel_jax import train
from tests.helpers import smoke_config

# 3 blocks: forward FLOPs per example 10, 20, 30; head 5; stem 7.
RUN = accounting.RunCosts(fixed_flops=7.0, block_flops=np.array([10.0, 20.0, 30.0]),
                         common_flops=5.0, fixed_params=100, block_params=np.array([1, 2, 3]),
                         common_params=10, train_examples=8, score_rows=6)


def test_round_costs_by_hand():
  masks = np.array([[False, False, True], [True, False, False], [True, True, True],
                    [True, True, True]])
  valid = np.array([True, True, True, False])      # the last is padding
  scored = np.array([True, False, True, True])
  num_examples = np.array([4, 9, 20, 20])
  got = accounting.round_costs(RUN, masks, valid, scored, num_examples)
  # Per example: forward 72 + activation grads down to the lowest block + weight grads.
  per_client = [72 + (30 + 5) + (30 + 5), 72 + (60 + 5) + (10 + 5), 7 + 3 * 65]
  assert got["train_flops"] == pytest.approx(8 * sum(per_client))
  # Score pass: forward + full backward (202 FLOPs) over min(n, 6) examples.
  assert got["score_flops"] == pytest.approx((4 + 6) * 202)
  # Up: deltas of selected + common layers (float32) and 3 scores per scoring client.
  assert got["bytes_up"] == pytest.approx(4 * ((3 + 10) + (1 + 10) + (6 + 10)) + 2 * 3 * 4)
  assert got["bytes_down"] == pytest.approx(3 * 4 * (100 + 10 + 6))


def test_run_logs_costs_per_round_and_totals(data_dir, tmp_path):  # pylint: disable=redefined-outer-name
  # frozen embeddings keep the FLOPs budgets depth-aware (trained ones make them additive)
  config = smoke_config(data_dir, **{"selection.strategy": "proposed",
                                     "selection.cost": "flops", "fl.num_rounds": 2,
                                     "model.embeddings": "fixed"})
  final = train.train_and_evaluate(config, str(tmp_path), quiet=True)
  with open(os.path.join(str(tmp_path), "metrics.csv")) as f:
    rows = list(csv.DictReader(f))
  with open(os.path.join(str(tmp_path), "final.json")) as f:
    assert json.load(f) == final
  for column in accounting.COST_COLUMNS:
    values = [float(r[column]) for r in rows]
    assert all(v > 0 for v in values), column
    assert final[f"total_{column}"] == pytest.approx(sum(values))
  # Round 0 selects, so every sampled client scored; bytes down = M x model.
  assert float(rows[0]["score_flops"]) > 0
  setup = train.Setup(config)
  run = setup.run_costs
  model = run.fixed_params + run.common_params + run.block_params.sum()
  assert float(rows[0]["bytes_down"]) == pytest.approx(
      4 * model * config.fl.clients_per_round)
  # Depth-aware budgets: the cheapest single block costs 1 budget unit.
  assert setup.backward is not None
  assert np.min(setup.costs + setup.backward[:-1]) == pytest.approx(1.0)
  # The digits MLP trained from scratch trains its embedding below the blocks:
  # every backward pass reaches it, so FLOPs costs are additive, in units of
  # the cheapest block's weight gradients, and the logged training FLOPs are
  # the full backward's plus the selected blocks' weight gradients.
  config.model.embeddings = "auto"
  setup = train.Setup(config)
  assert setup.backward is None and setup.run_costs.base_flops > 0
  np.testing.assert_allclose(setup.costs, setup.flops.blocks / setup.flops.blocks.min(),
                             rtol=1e-6)


def test_a_budget_of_one_cheapest_set_is_affordable_despite_float32_rounding():
  """Depth-aware costs are in units of the cheapest one-block set; its float32
  cost may round above 1, and a budget of exactly 1 must still afford it."""
  for k in (3, 12, 24, 48):
    costs, backward = costs_lib.budget_costs("flops", np.ones(k), (0.0, np.ones(k), 0.1))
    costs_lib.check_budgets(np.ones(5, np.float32), costs, backward)
  with pytest.raises(ValueError, match="selection.budget"):
    costs_lib.check_budgets(np.full(5, 0.99, np.float32), costs, backward)
