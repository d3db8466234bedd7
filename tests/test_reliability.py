"""Runs that never lie: faults a long unattended run meets, and what the user gets.

Non-finite clients, divergence, workdir fingerprints and locks, damaged
checkpoints, SIGKILL / SIGINT / SIGTERM, and a property test over generated
config overrides (every run starts or ends with one ``error:`` line).
"""

import csv
import glob
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from fedsel_jax import aggregate
from fedsel_jax import checkpoints
from fedsel_jax import errors
from fedsel_jax import main as main_lib
from fedsel_jax import masks as masks_lib
from fedsel_jax import train
from fedsel_jax import workdir as workdir_lib
from fedsel_jax.evaluate import make_eval_fn
from tests.helpers import smoke_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli_args(data_dir, workdir, *extra):
  return ["-m", "fedsel_jax.main", "--config", "configs/digits.py:smoke", "--workdir",
          str(workdir), f"--config.data.data_dir={data_dir}", *extra]


def run_cli(*args, timeout=240):
  return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=timeout)


def error_lines(stderr):
  return [l for l in stderr.splitlines() if l.startswith("error:")]


def rows_without_seconds(workdir):
  with open(os.path.join(workdir, "metrics.csv")) as f:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(f)]


def latest_state(workdir, setup):
  ckpts = checkpoints.RunCheckpoints(workdir, keep=2)
  abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, setup.initial_state())
  got = ckpts.restore_latest(abstract)
  ckpts.close()
  return got


def same_leaves(a, b):
  la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  return len(la) == len(lb) and all(
      np.asarray(x).tobytes() == np.asarray(y).tobytes() for x, y in zip(la, lb))


# ---------------------------------------------------------------- non-finite clients


def test_drop_nonfinite_equals_aggregating_the_finite_clients_only():
  rng = np.random.default_rng(0)
  params = {"block_0": {"w": np.zeros((3, 2), np.float32)}, "head": {"w": np.zeros(2, np.float32)}}
  groups = masks_lib.LayerGroups(candidates=(("block_0", ("block_0",)),), common=("head",))
  index = masks_lib.group_index(params, groups)
  deltas = jax.tree_util.tree_map(lambda p: rng.normal(size=(4,) + p.shape).astype(np.float32),
                                  params)
  deltas["block_0"]["w"][1, 0, 0] = np.nan
  losses = np.array([1., 2., 3., np.inf], np.float32)   # client 3: non-finite loss
  masks = np.array([[True], [True], [False], [True]])
  weights = np.array([5., 7., 9., 11.], np.float32)
  ok = aggregate.finite_clients(deltas, losses)
  np.testing.assert_array_equal(ok, [True, False, True, False])
  got, coverage = aggregate.aggregate_masked(*aggregate.drop_nonfinite(deltas, masks, weights, ok),
                                             index)
  keep = np.array([0, 2])
  want, want_cov = aggregate.aggregate_masked(
      jax.tree_util.tree_map(lambda d: d[keep], deltas), masks[keep], weights[keep], index)
  for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-6)
  np.testing.assert_array_equal(coverage, want_cov)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(got))


def test_keep_if_finite_rejects_any_non_finite_leaf():
  old = {"a": jnp.ones(3), "b": jnp.zeros(2)}
  bad = {"a": jnp.array([1., jnp.inf, 1.]), "b": jnp.ones(2)}
  tree, applied = aggregate.keep_if_finite(bad, old, jnp.array(True))
  assert not bool(applied) and same_leaves(tree, old)
  good = {"a": jnp.full(3, 2.), "b": jnp.ones(2)}
  tree, applied = aggregate.keep_if_finite(good, old, jnp.array(True))
  assert bool(applied) and same_leaves(tree, good)
  tree, applied = aggregate.keep_if_finite(good, old, jnp.array(False))
  assert not bool(applied) and same_leaves(tree, old)


def test_nan_client_is_left_out_and_the_run_continues(data_dir, tmp_path):
  config = smoke_config(data_dir, **{"fl.num_rounds": 4, "selection.strategy": "full"})
  setup = train.Setup(config)
  x = setup.clients.x.copy()
  x[0] = np.nan                # every row of client 0
  object.__setattr__(setup.clients, "x", x)
  final = train.train_and_evaluate(config, str(tmp_path), setup=setup, quiet=True)
  with open(tmp_path / "metrics.csv") as f:
    rows = list(csv.DictReader(f))
  sampled = [0 in train.data_lib.sample_clients(config.seed, t, 8, 4) for t in range(4)]
  assert any(sampled)
  assert [int(r["clients_nonfinite"]) for r in rows] == [int(s) for s in sampled]
  assert all(r["round_skipped"] == "0" for r in rows)
  assert np.isfinite(final["test_loss"])
  _, state, _, _ = latest_state(str(tmp_path), setup)
  assert all(np.isfinite(np.asarray(l)).all() for l in jax.tree_util.tree_leaves(state.params))


def test_all_nan_run_stops_with_the_last_finite_checkpoint_intact(data_dir, tmp_path):
  config = smoke_config(data_dir, **{"fl.num_rounds": 2})
  setup = train.Setup(config)
  train.train_and_evaluate(config, str(tmp_path), setup=setup, quiet=True)
  step, good, _, _ = latest_state(str(tmp_path), setup)
  assert step == 2
  longer = smoke_config(data_dir, **{"fl.num_rounds": 12})
  broken = train.Setup(longer)
  object.__setattr__(broken.clients, "x", np.full_like(broken.clients.x, np.nan))
  broken.nonfinite_rows = 99
  with pytest.raises(errors.DivergedError, match=r"rounds 2-4 changed nothing.*NaN or inf"):
    train.train_and_evaluate(longer, str(tmp_path), setup=broken, quiet=True)
  step, state, _, _ = latest_state(str(tmp_path), setup)   # keep=2 did not push it out
  assert step == 2 and same_leaves(state, good)


def test_diverging_learning_rate_exits_3_with_one_line(data_dir, tmp_path):
  proc = run_cli(*cli_args(data_dir, tmp_path, "--config.client_optim.lr=1e6",
                           "--config.fl.num_rounds=8"))
  assert proc.returncode == 3, proc.stderr
  lines = error_lines(proc.stderr)
  assert len(lines) == 1 and "training diverged" in lines[0] and "client_optim.lr" in lines[0]
  assert "Traceback" not in proc.stderr
  with open(tmp_path / "metrics.csv") as f:
    assert any(r["clients_nonfinite"] != "0" for r in csv.DictReader(f))


# ---------------------------------------------------------------- workdir rules


def test_changed_config_is_refused_and_restart_moves_the_run_aside(data_dir, tmp_path):
  wd = tmp_path / "run"
  config = smoke_config(data_dir, **{"fl.num_rounds": 2})
  train.train_and_evaluate(config, str(wd), quiet=True)
  before = {n: (wd / n).read_bytes() for n in ("config.json", "metrics.csv", "fingerprint.json")}
  proc = run_cli(*cli_args(data_dir, wd, "--config.fl.num_rounds=2", "--config.selection.lam=0.3",
                           "--config.data.alpha=0.7"))
  assert proc.returncode == 2, proc.stderr
  lines = error_lines(proc.stderr)
  assert len(lines) == 1 and "holds another run" in lines[0]
  assert "selection.lam: 0.05 -> 0.3" in lines[0] and "data.alpha: 0.5 -> 0.7" in lines[0]
  assert {n: (wd / n).read_bytes() for n in before} == before   # nothing written
  # Fewer rounds than done: refused too (final.json would lie).
  with pytest.raises(errors.ConfigError, match="below the 2 rounds already done"):
    train.claim_workdir(smoke_config(data_dir, **{"fl.num_rounds": 1}), str(wd))
  # More rounds, another eval frequency: a resume.
  train.claim_workdir(smoke_config(data_dir, **{"fl.num_rounds": 5, "eval_every": 2}),
                      str(wd)).release()
  other = smoke_config(data_dir, **{"fl.num_rounds": 2, "selection.lam": 0.3})
  final = train.train_and_evaluate(other, str(wd), restart=True, quiet=True)
  assert final["rounds"] == 2
  (old,) = glob.glob(str(wd) + ".old-*")
  assert json.load(open(os.path.join(old, "config.json")))["selection"]["lam"] == 0.05
  assert open(os.path.join(old, "metrics.csv"), "rb").read() == before["metrics.csv"]
  stored = json.load(open(wd / "fingerprint.json"))["fields"]
  assert stored["selection.lam"] == 0.3


def test_second_concurrent_run_is_refused(data_dir, tmp_path):
  wd = tmp_path / "run"
  first = subprocess.Popen([sys.executable, *cli_args(data_dir, wd, "--config.fl.num_rounds=100000",
                                                      "--config.checkpoint_every=1000")],
                           cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.time() + 120
    while not (wd / "metrics.csv").exists() and not (wd / "fingerprint.json").exists():
      assert time.time() < deadline and first.poll() is None, first.stderr.read()
      time.sleep(0.2)
    proc = run_cli(*cli_args(data_dir, wd, "--config.fl.num_rounds=100000",
                             "--config.checkpoint_every=1000"))
    assert proc.returncode == 2
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and f"in use by process {first.pid}" in lines[0], proc.stderr
  finally:
    first.kill()
    first.wait()
  # The killed run's lock is stale: the next claim takes it over.
  config = smoke_config(data_dir, **{"fl.num_rounds": 100000, "checkpoint_every": 1000})
  lock = train.claim_workdir(config, str(wd))
  assert json.load(open(wd / workdir_lib.LOCK))["pid"] == os.getpid()
  lock.release()
  assert not (wd / workdir_lib.LOCK).exists()


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path, capsys):
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  with open(tmp_path / workdir_lib.LOCK, "w") as f:
    json.dump({"pid": dead.pid, "host": os.uname().nodename, "start": "1"}, f)
  with workdir_lib.Lock(str(tmp_path)):
    pass
  assert f"stale lock of process {dead.pid}" in capsys.readouterr().err


# ---------------------------------------------------------------- damaged checkpoints


def _files(step_dir, item):
  return sorted((p for p in glob.glob(os.path.join(step_dir, item, "**", "*"), recursive=True)
                 if os.path.isfile(p)), key=os.path.getsize)


def _data_files(step_dir, item):
  """The array data files of an orbax item (ocdbt ``d/`` folders), largest first."""
  files = [p for p in _files(step_dir, item) if os.sep + "d" + os.sep in p]
  return files[::-1] or _files(step_dir, item)[::-1]


def _damage(kind, step_dir):
  if kind == "truncate_state":
    for path in _data_files(step_dir, "state"):
      with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
  elif kind == "flip_state":
    for path in _data_files(step_dir, "state"):
      data = bytearray(open(path, "rb").read())
      for i in range(len(data) // 3, len(data), max(1, len(data) // 7)):
        data[i] ^= 0xFF
      open(path, "wb").write(bytes(data))
  elif kind == "delete_state":
    shutil.rmtree(os.path.join(step_dir, "state"))
  elif kind == "flip_meta":
    path = os.path.join(step_dir, "meta", "metadata")
    text = open(path).read().replace('"round": 3', '"round": 7')
    open(path, "w").write(text)
  elif kind == "delete_history":
    for p in _files(step_dir, "history"):
      os.remove(p)


@pytest.fixture(scope="module")
def three_rounds(data_dir, tmp_path_factory):
  """A finished 3-round run (checkpoints 2 and 3) and the 4-round reference."""
  base = tmp_path_factory.mktemp("ckpt")
  setup = train.Setup(smoke_config(data_dir, **{"fl.num_rounds": 4}))
  train.train_and_evaluate(smoke_config(data_dir, **{"fl.num_rounds": 4}), str(base / "ref"),
                           setup=setup, quiet=True)
  train.train_and_evaluate(smoke_config(data_dir, **{"fl.num_rounds": 3}), str(base / "three"),
                           setup=setup, quiet=True)
  return base, setup


@pytest.mark.parametrize("kind", ["truncate_state", "flip_state", "delete_state", "flip_meta",
                                  "delete_history"])
def test_damaged_latest_checkpoint_falls_back_to_the_previous(three_rounds, data_dir, tmp_path,
                                                              kind, capsys):
  base, setup = three_rounds
  wd = tmp_path / "run"
  shutil.copytree(base / "three", wd)
  _damage(kind, str(wd / "checkpoints" / "3"))
  os.remove(wd / "metrics.csv")          # rebuilt from the checkpoint
  config = smoke_config(data_dir, **{"fl.num_rounds": 4})
  train.train_and_evaluate(config, str(wd), setup=setup, quiet=True)
  err = capsys.readouterr().err
  assert "checkpoint of round 3" in err and "damaged" in err
  assert os.path.isdir(wd / "checkpoints.damaged")
  assert same_leaves(latest_state(str(wd), setup)[1], latest_state(str(base / "ref"), setup)[1])
  assert rows_without_seconds(str(wd)) == rows_without_seconds(str(base / "ref"))


def test_no_intact_checkpoint_stops_with_one_clear_error(three_rounds, data_dir, tmp_path):
  base, setup = three_rounds
  wd = tmp_path / "run"
  shutil.copytree(base / "three", wd)
  for step in ("2", "3"):
    _damage("truncate_state", str(wd / "checkpoints" / step))
  with pytest.raises(errors.WorkdirError, match="no intact checkpoint"):
    train.train_and_evaluate(smoke_config(data_dir, **{"fl.num_rounds": 4}), str(wd),
                             setup=setup, quiet=True)
  assert sorted(os.listdir(wd / "checkpoints")) == ["2", "3"]   # nothing deleted


# ---------------------------------------------------------------- kills and signals


def test_sigkill_at_random_points_resumes_to_the_uninterrupted_run(data_dir, tmp_path):
  rounds = 12
  extra = (f"--config.fl.num_rounds={rounds}", "--config.checkpoint_every=1")
  straight = tmp_path / "straight"
  assert run_cli(*cli_args(data_dir, straight, *extra)).returncode == 0
  killed = tmp_path / "killed"
  rng = random.Random(0)
  for target in (1, 4, 8):   # kill just after the k-th checkpoint appears (often mid-write)
    proc = subprocess.Popen([sys.executable, *cli_args(data_dir, killed, *extra)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while workdir_lib.rounds_done(str(killed)) < target and proc.poll() is None:
      assert time.time() < deadline
      time.sleep(0.005)
    time.sleep(rng.uniform(0, 0.03))
    proc.kill()
    proc.wait()
  proc = run_cli(*cli_args(data_dir, killed, *extra))
  assert proc.returncode == 0, proc.stderr
  assert rows_without_seconds(str(killed)) == rows_without_seconds(str(straight))
  a, b = (np.load(os.path.join(str(d), "selection.npz")) for d in (straight, killed))
  assert all(np.array_equal(a[k], b[k]) for k in a.files)
  setup = train.Setup(smoke_config(data_dir, **{"fl.num_rounds": rounds}))
  assert same_leaves(latest_state(str(killed), setup)[1], latest_state(str(straight), setup)[1])


@pytest.mark.parametrize("signum,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_gives_one_line_and_a_resumable_workdir(data_dir, tmp_path, signum, code):
  wd = tmp_path / "run"
  proc = subprocess.Popen([sys.executable, *cli_args(data_dir, wd, "--config.fl.num_rounds=100000",
                                                      "--config.checkpoint_every=1")],
                          cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 180
  while workdir_lib.rounds_done(str(wd)) < 2:
    assert time.time() < deadline and proc.poll() is None
    time.sleep(0.01)
  proc.send_signal(signum)
  _, err = proc.communicate(timeout=60)
  assert proc.returncode == code, err
  lines = [l for l in err.splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith("interrupted at round ") and \
      lines[0].endswith("; rerun the same command to resume"), err
  done = workdir_lib.rounds_done(str(wd))
  setup = train.Setup(smoke_config(data_dir, **{"fl.num_rounds": done + 2}))
  assert latest_state(str(wd), setup)[0] == done          # the newest checkpoint is intact
  train.train_and_evaluate(smoke_config(data_dir, **{"fl.num_rounds": done + 2}), str(wd),
                           setup=setup, quiet=True)
  with open(wd / "metrics.csv") as f:
    assert [int(r["round"]) for r in csv.DictReader(f)] == list(range(done + 2))


# ---------------------------------------------------------------- evaluation


@pytest.mark.parametrize("n,batch", [(1, 200), (2, 200), (3, 2), (7, 3), (200, 200), (201, 200)])
def test_evaluate_counts_every_example_once_for_any_size(n, batch):
  rng = np.random.default_rng(n)
  w = rng.normal(size=(5, 3)).astype(np.float32)
  apply_fn = lambda v, x, train: x @ v["params"]["w"]
  x = rng.normal(size=(n, 5)).astype(np.float32)
  y = rng.integers(0, 3, n).astype(np.int32)
  got = make_eval_fn(apply_fn, batch)({"w": w}, x, y)
  logits = x @ w
  logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
  np.testing.assert_allclose(got["loss"], -logp[np.arange(n), y].mean(), rtol=1e-5)
  assert got["accuracy"] == pytest.approx(np.mean(logits.argmax(1) == y))


# ---------------------------------------------------------------- property test of the CLI

import hypothesis  # noqa: E402  (declared in the test extra of pyproject.toml)
from hypothesis import strategies as st  # noqa: E402

_INTS = st.integers(-2, 40).map(str)
_FLOATS = st.sampled_from(["0", "-1", "1e-3", "0.1", "1e6", "nan", "inf", "-inf", "2.5", "abc"])
_VALUES = {
    "eval_every": _INTS, "checkpoint_every": _INTS, "diagnostics.every": _INTS,
    "eval_batch_size": _INTS, "checkpoint_keep": _INTS, "seed": _INTS,
    "selection.solver_starts": _INTS, "selection.sel_batches": _INTS, "selection.sel_gap": _INTS,
    "model.width": _INTS, "model.depth": st.integers(-1, 6).map(str),
    "data.num_clients": _INTS, "data.max_test": _INTS, "data.max_examples": _INTS,
    "data.min_client_size": _INTS, "fl.clients_per_round": _INTS, "fl.client_chunk": _INTS,
    "fl.local_steps": st.integers(-1, 4).map(str), "fl.batch_size": _INTS,
    "fl.num_rounds": st.integers(-1, 3).map(str), "fl.max_bad_rounds": _INTS,
    "selection.budget.value": _FLOATS, "selection.lam": _FLOATS, "data.alpha": _FLOATS,
    "client_optim.lr": _FLOATS, "server_optim.lr": _FLOATS, "client_optim.momentum": _FLOATS,
    "selection.budget.kind": st.sampled_from(["fixed", "uniform", "truncnorm", "gauss"]),
    "selection.strategy": st.sampled_from(["full", "head", "top", "random", "proposed", "snr",
                                           "rgn_p1", "bogus"]),
    "selection.cost": st.sampled_from(["unit", "params", "flops", "time"]),
    "model.name": st.sampled_from(["mlp", "cnn", "vit", "minilm", "clip_vit", "resnet"]),
    "data.partition": st.sampled_from(["iid", "dirichlet", "natural", "shards"]),
    "model.dtype": st.sampled_from(["float32", "bfloat16", "float16"]),
    "fl.backprop_cut": st.sampled_from(["true", "false", "maybe"]),
    "fl.grad_gates": st.sampled_from(["true", "false", "maybe"]),
    "compare_strategies": st.sampled_from(["('head',)", "head,top", "('nope',)", "()"]),
    "fl.num_roundz": _INTS, "selection.lamda": _FLOATS,
}


@hypothesis.settings(max_examples=60, deadline=None, derandomize=True,
                     suppress_health_check=list(hypothesis.HealthCheck))
@hypothesis.given(config=st.sampled_from(["configs/digits.py:smoke", "configs/digits.py:smoke",
                                          "configs/digits.py:smoke", "configs/default.py:smoke",
                                          "configs/cifar10_clip.py:smoke",
                                          "configs/xglue_xlmr.py:smoke"]),
                  overrides=st.lists(st.sampled_from(sorted(_VALUES)).flatmap(
                      lambda f: _VALUES[f].map(lambda v: f"--config.{f}={v}")), max_size=4))
def test_every_generated_run_starts_or_ends_with_one_error_line(config, overrides, capsys,
                                                               data_dir, tmp_path_factory):
  if not config.startswith("configs/digits"):   # no data there: fails fast, after validation
    data_dir = str(tmp_path_factory.getbasetemp() / "hyp_tfds_missing")
  argv = ["--config", os.path.join(ROOT, config), "--check_only",
          f"--config.data.data_dir={data_dir}", *overrides]
  code = main_lib.main(argv)
  out, err = capsys.readouterr()
  assert "Traceback" not in err and "Traceback" not in out
  if code == 0:
    assert "ok: the config is valid" in out
  else:
    assert code == 2, (argv, err)
    assert len(error_lines(err)) == 1, (argv, err)


def test_disk_full_during_a_checkpoint_is_one_line_and_keeps_the_earlier_ones(
    data_dir, tmp_path, monkeypatch, capsys):
  saved = checkpoints.RunCheckpoints.save

  def save(self, step, *args, **kwargs):
    if step == 2:
      raise OSError(28, "No space left on device", os.path.join(self.dir, "2"))
    return saved(self, step, *args, **kwargs)

  monkeypatch.setattr(checkpoints.RunCheckpoints, "save", save)
  wd = tmp_path / "run"
  code = main_lib.main(["--config", os.path.join(ROOT, "configs/digits.py:smoke"), "--workdir",
                        str(wd), f"--config.data.data_dir={data_dir}"])
  err = capsys.readouterr().err
  assert code == 2 and "Traceback" not in err
  (line,) = error_lines(err)
  assert "No space left on device" in line and str(wd / "checkpoints" / "2") in line
  assert workdir_lib.rounds_done(str(wd)) == 1 and not (wd / workdir_lib.LOCK).exists()


@pytest.mark.parametrize("workdir,needle", [("", "--workdir must be a folder path"),
                                            ("FILE", "exists and is not a folder")])
def test_bad_workdir_is_one_line(data_dir, tmp_path, capsys, workdir, needle):
  if workdir == "FILE":
    workdir = str(tmp_path / "a_file")
    open(workdir, "w").close()
  code = main_lib.main(["--config", os.path.join(ROOT, "configs/digits.py:smoke"), "--workdir",
                        workdir, f"--config.data.data_dir={data_dir}"])
  (line,) = error_lines(capsys.readouterr().err)
  assert code == 2 and needle in line


def test_restart_with_a_config_failing_a_setup_check_moves_nothing(data_dir, tmp_path):
  """--restart moves the old run aside only once the new config passed every
  check, including those that need the data or the model."""
  wd = tmp_path / "run"
  train.train_and_evaluate(smoke_config(data_dir, **{"fl.num_rounds": 1}), str(wd), quiet=True)
  before = sorted(os.listdir(wd))
  final = (wd / "final.json").read_bytes()
  proc = run_cli(*cli_args(data_dir, wd, "--config.fl.num_rounds=1", "--restart",
                           "--config.selection.budget.value=10"))
  assert proc.returncode == 2, proc.stderr
  assert len(error_lines(proc.stderr)) == 1 and "selection.budget.value=10" in proc.stderr
  assert sorted(os.listdir(wd)) == before and not glob.glob(str(wd) + ".old-*")
  # Rerunning the finished run keeps its final.json byte for byte.
  proc = run_cli(*cli_args(data_dir, wd, "--config.fl.num_rounds=1"))
  assert proc.returncode == 0, proc.stderr
  assert (wd / "final.json").read_bytes() == final
  # A final.json of fewer rounds (a run extended, killed before writing its
  # new one) is not kept: the rerun writes this run's.
  stale = json.loads(final)
  stale["rounds"] = 0
  (wd / "final.json").write_text(json.dumps(stale))
  proc = run_cli(*cli_args(data_dir, wd, "--config.fl.num_rounds=1"))
  assert proc.returncode == 0, proc.stderr
  assert json.loads((wd / "final.json").read_text())["rounds"] == 1


def test_a_finite_loss_blowup_is_warned_once(data_dir, tmp_path):
  """Adam at lr 1e4: the loss explodes but stays finite, so no round is
  skipped; the run says it is likely diverging (once) and still finishes."""
  proc = run_cli(*cli_args(data_dir, tmp_path, "--config.client_optim.name=adam",
                           "--config.client_optim.lr=1e4", "--config.fl.num_rounds=6"))
  assert proc.returncode == 0, proc.stderr
  warnings = [l for l in proc.stderr.splitlines() if "likely diverging" in l]
  assert len(warnings) == 1 and "client_optim.lr=10000" in warnings[0], proc.stderr
  proc = run_cli(*cli_args(data_dir, tmp_path / "calm", "--config.fl.num_rounds=6"))
  assert proc.returncode == 0 and "likely diverging" not in proc.stderr, proc.stderr
