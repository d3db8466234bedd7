"""End to end: the smoke configs, kill-and-resume, and the CLI's error lines."""

import csv
import os
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import digits as digits_config
from fedsel_jax import train
from tests.helpers import smoke_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_smoke_run_writes_metrics_and_resumes_bit_for_bit(data_dir, tmp_path):
  config = smoke_config(data_dir)
  setup = train.Setup(config)
  straight = str(tmp_path / "straight")
  final = train.train_and_evaluate(config, straight, setup=setup, quiet=True)
  assert 0 <= final["test_accuracy"] <= 1
  with open(os.path.join(straight, "metrics.csv")) as f:
    rows = list(csv.DictReader(f))
  assert [int(r["round"]) for r in rows] == list(range(config.fl.num_rounds))
  for key in ("train_loss", "test_accuracy", "seconds", "penalty", "e1", "e2", "S_block_0"):
    assert key in rows[0]
  assert os.path.exists(os.path.join(straight, "config.json"))

  # Kill after round 2 (a run configured for 2 rounds), then resume to 3.
  resumed = str(tmp_path / "resumed")
  short = smoke_config(data_dir, **{"fl.num_rounds": 2})
  train.train_and_evaluate(short, resumed, setup=setup, quiet=True)
  train.train_and_evaluate(config, resumed, setup=setup, quiet=True)
  for x, y in zip(final_leaves(straight, setup), final_leaves(resumed, setup)):
    assert np.asarray(x).tobytes() == np.asarray(y).tobytes()
  with open(os.path.join(resumed, "metrics.csv")) as f:
    assert [int(r["round"]) for r in csv.DictReader(f)] == [0, 1, 2]


def final_leaves(workdir, setup):
  """The leaves of the newest checkpoint's state."""
  from fedsel_jax import checkpoints
  ckpts = checkpoints.RunCheckpoints(workdir, keep=2)
  abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, setup.initial_state())
  step, state, _, _ = ckpts.restore_latest(abstract)
  ckpts.close()
  return jax.tree_util.tree_leaves(state)


@pytest.mark.parametrize("strategy", ["full", "proposed", "snr_p1"])
def test_every_strategy_runs(data_dir, tmp_path, strategy):
  config = smoke_config(data_dir, **{"selection.strategy": strategy, "fl.num_rounds": 1,
                                     "selection.sel_batches": 2})
  if strategy == "proposed":
    config.selection.check_exact = True
  final = train.train_and_evaluate(config, str(tmp_path), quiet=True)
  assert np.isfinite(final["test_loss"])
  if strategy == "proposed":   # the in-graph solver against the exact MILP, logged per round
    with open(os.path.join(str(tmp_path), "metrics.csv")) as f:
      row = next(csv.DictReader(f))
    assert float(row["solver_gap"]) >= -1e-5
    assert float(row["objective"]) <= float(row["exact_objective"]) + 1e-5


def run_cli(*args, timeout=60):
  t0 = time.time()
  proc = subprocess.run([sys.executable, "-m", "fedsel_jax.main", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout)
  return proc, time.time() - t0


@pytest.mark.parametrize("override,needle", [
    ("--config.selection.strategy=best", "selection.strategy must be one of"),
    ("--config.model.name=resnet", "model.name must be one of"),
    ("--config.data.name=imagenet", "data.name must be one of"),
    ("--config.selection.budget.value=9", "selection.budget.value=9 exceeds the 3"),
    ("--config.fl.clients_per_round=20", "fl.clients_per_round=20 exceeds"),
    ("--config.data.alpha=0", "data.alpha must be > 0"),
    ("--config.selection.lam=inf", "selection.lam must be a finite number"),
    ("--config.model.name=vit", "model.width=16 must be a multiple of model.num_heads=3"),
    ("--config.selection.lam=1e308", "selection.lam must be <= 1000000.0"),
    ("--config.model.pretrained=/nonexistent", "model.name='mlp' loads no pretrained weights"),
    ("--config.selection=3", "selection is a group of fields, not a value"),
    ("--config.selection.budget.kind=uniform --config.selection.budget.high=10",
     "selection.budget.high=10 exceeds the 3"),
])
def test_cli_bad_input_is_one_line_exit_2(data_dir, tmp_path, override, needle):
  workdir = tmp_path / "run"
  proc, seconds = run_cli("--config", "configs/digits.py:smoke", "--workdir", str(workdir),
                          f"--config.data.data_dir={data_dir}", *override.split())
  assert proc.returncode == 2, proc.stderr
  lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], proc.stderr
  assert "Traceback" not in proc.stderr and not proc.stdout.strip(), proc.stdout
  assert not workdir.exists()   # checks that need the data or the model too: nothing written


def test_cli_missing_dataset_fails_fast(tmp_path):
  proc, seconds = run_cli("--config", "configs/digits.py:smoke", "--workdir", str(tmp_path),
                          "--config.data.name=cifar10", f"--config.data.data_dir={tmp_path}")
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr.startswith("error: ") and "cifar10" in proc.stderr
  assert seconds < 30   # interpreter + imports; the check itself takes well under a second


@pytest.mark.parametrize("name", ["default", "digits", "cifar10_clip", "domainnet_clip",
                                  "xglue_xlmr", "bench_vit"])
def test_every_config_is_valid(name):
  import importlib
  config = importlib.import_module(f"configs.{name}").get_config()
  train.validate_config(config)
  assert config.fl.clients_per_round <= (config.data.num_clients or 10**9)


def test_load_config_reads_file_and_arg():
  import configs
  from configs import default as default_config
  folder = os.path.dirname(os.path.abspath(configs.__file__))
  smoke = configs.load_config(os.path.join(folder, "default.py") + ":smoke")
  assert smoke.to_dict() == default_config.get_config("smoke").to_dict()
  digits = configs.load_config(os.path.join(folder, "digits.py"))
  assert digits.to_dict() == digits_config.get_config().to_dict()
  with pytest.raises(ValueError, match="smoke"):
    configs.load_config(os.path.join(folder, "default.py") + ":bogus")
