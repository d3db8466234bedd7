"""Diagnostics end to end: metrics.csv bound columns, diagnostics.npz, resume, bad input."""

import csv
import math
import os

import numpy as np
import pytest

from fedsel_jax import bound
from fedsel_jax import train
from tests.helpers import smoke_config
from tests.test_train import run_cli


def read(workdir):
  with open(os.path.join(workdir, "metrics.csv")) as f:
    rows = list(csv.DictReader(f))
  with np.load(os.path.join(workdir, "diagnostics.npz")) as f:
    return rows, {k: f[k] for k in f.files}


def test_population_run_logs_the_bound_and_resumes_exactly(data_dir, tmp_path):
  over = {"diagnostics.population": True, "diagnostics.power_iters": 3,
          "diagnostics.every": 2, "fl.num_rounds": 3}
  config = smoke_config(data_dir, **over)
  setup = train.Setup(config)
  straight, resumed = str(tmp_path / "a"), str(tmp_path / "b")
  train.train_and_evaluate(config, straight, setup=setup, quiet=True)
  train.train_and_evaluate(smoke_config(data_dir, **dict(over, **{"fl.num_rounds": 2})),
                           resumed, setup=setup, quiet=True)
  train.train_and_evaluate(config, resumed, setup=setup, quiet=True)
  rows, layers = read(straight)
  rows_b, layers_b = read(resumed)
  assert list(layers["round"]) == [0, 2]                     # every diagnosed round, once
  k1 = setup.k + 1
  for key in bound.LAYER_KEYS + ("e2_layers_sampled",):
    assert layers[key].shape == (2, k1)
    np.testing.assert_array_equal(layers[key], layers_b[key])
  assert list(layers["names"][-1:]) == ["common"] and np.all(layers["lipschitz"] > 0)
  for r, rb in zip(rows, rows_b):
    for col in bound.BOUND_COLUMNS + ("e1", "e2", "grad_sq", "update_sq", "e2_sampled"):
      assert r[col] == rb[col], col
  # Per round: the row's totals are the per-layer file's sums; the running average
  # and the right-hand side are there from round 0 on.
  for i, t in enumerate(layers["round"]):
    np.testing.assert_allclose(float(rows[t]["e1"]), layers["e1_layers"][i].sum(), rtol=1e-5)
    np.testing.assert_allclose(float(rows[t]["grad_sq"]), layers["grad_sq_layers"][i].sum(),
                               rtol=1e-5)
  assert rows[1]["e1"] == "" and rows[1]["update_sq"] != ""  # round 1 not diagnosed
  assert all(float(r["bound_rhs"]) > 0 and float(r["grad_sq_avg"]) > 0 for r in rows)
  assert float(rows[0]["grad_sq_cand"]) < float(rows[0]["grad_sq"])   # the head counts too


def test_bound_columns_by_hand():
  rows = [dict(round=0, grad_sq=4.0, e1=1.0, e2=0.5, f_diag=2.0, lipschitz=3.0, update_sq=0.1),
          dict(round=1, grad_sq="", e1="", e2="", f_diag="", lipschitz="", update_sq=0.2),
          dict(round=2, grad_sq=2.0, e1=0.0, e2=0.25, f_diag=1.5, lipschitz=5.0, update_sq=0.3)]
  cols = bound.bound_columns(rows, eta=0.5)
  last = cols[-1]
  assert last["grad_sq_avg"] == 3.0 and last["bound_err"] == 0.875
  assert last["f_star"] == 1.5 and last["L_max"] == 5.0
  assert math.isclose(last["bound_opt"], 2 * 0.5 / (0.5 * 3))
  assert math.isclose(last["bound_eta"], 5.0 * 0.6 / (0.5 * 3))
  assert math.isclose(last["bound_rhs"], last["bound_opt"] + 0.875 + last["bound_eta"])
  assert math.isclose(last["bound_rhs_fstar0"], 2 * 2.0 / 1.5 + 0.875 + last["bound_eta"])
  assert cols[0]["bound_opt"] == 0.0 and math.isclose(cols[0]["bound_eta"], 3.0 * 0.1 / 0.5)


@pytest.mark.parametrize("override,needle", [
    ("--config.diagnostics.batches=0", "diagnostics.batches must be >= 1"),
    ("--config.diagnostics.estimator=half", "diagnostics.estimator must be one of"),
    ("--config.diagnostics.every=0", "diagnostics.every must be >= 1"),
    ("--config.diagnostics.population_max_mb=0.001",
     "diagnostics.population must be False for this federation"),
])
def test_cli_bad_diagnostics_is_one_line_exit_2(data_dir, tmp_path, override, needle):
  proc, _ = run_cli("--config", "configs/digits.py:smoke", "--workdir", str(tmp_path),
                    f"--config.data.data_dir={data_dir}", "--config.diagnostics.population=True",
                    override)
  assert proc.returncode == 2, proc.stderr
  lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], proc.stderr
  assert not os.path.exists(os.path.join(str(tmp_path), "metrics.csv"))
