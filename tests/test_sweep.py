"""The sweep command: members equal single CLI runs, resume after a kill, bad input."""

import csv
import glob
import json
import os
import struct
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import digits as digits_config
from fedsel_jax import plot as plot_cli
from fedsel_jax import stats
from fedsel_jax import sweep_spec
from fedsel_jax import train
from fedsel_jax import vmap_runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWEEP = ["--sweep", "selection.lam=0,0.1", "--sweep", "seed=0,1"]
COMPARED = ("train_loss", "test_loss", "test_accuracy", "penalty", "disagreement", "objective",
            "e1", "e2", "e2_bound", "grad_sq", "train_flops", "score_flops", "bytes_up",
            "bytes_down")


def cli(module, *args, env=None, timeout=600):
  return subprocess.run([sys.executable, "-m", f"fedsel_jax.{module}", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout,
                        env=dict(os.environ, **(env or {})))


def smoke_args(data_dir, workdir):
  # Every round diagnosed, so E1/E2 are compared in all 3 rounds.
  return ["--config", "configs/digits.py:smoke", "--workdir", str(workdir),
          f"--config.data.data_dir={data_dir}", "--config.diagnostics.every=1"]


def read_csv(path):
  with open(path) as f:
    return list(csv.DictReader(f))


def assert_same_metrics(a_dir, b_dir, rtol=1e-5, atol=1e-6):
  a, b = read_csv(os.path.join(a_dir, "metrics.csv")), read_csv(os.path.join(b_dir, "metrics.csv"))
  assert [r["round"] for r in a] == [r["round"] for r in b] == ["0", "1", "2"]
  for ra, rb in zip(a, b):
    for k in list(COMPARED) + [k for k in ra if k.startswith("S_")]:
      assert (ra[k] == "") == (rb[k] == ""), (k, ra[k], rb[k])
      if ra[k] != "":
        np.testing.assert_allclose(float(ra[k]), float(rb[k]), rtol=rtol, atol=atol, err_msg=k)
  with np.load(os.path.join(a_dir, "selection.npz")) as fa, \
       np.load(os.path.join(b_dir, "selection.npz")) as fb:
    np.testing.assert_array_equal(fa["masks"], fb["masks"])
    np.testing.assert_allclose(fa["scores"], fb["scores"], rtol=rtol, atol=atol)


@pytest.fixture(scope="module")
def swept(data_dir, tmp_path_factory):
  """An uninterrupted 2 lambdas x 2 seeds sweep (one vmapped program)."""
  workdir = tmp_path_factory.mktemp("sweep") / "s"
  proc = cli("sweep", *smoke_args(data_dir, workdir), *SWEEP)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "4 runs vmapped" in proc.stdout
  return str(workdir)


@pytest.mark.parametrize("member,overrides", [
    ("selection.lam=0.1,seed=0", ["--config.selection.lam=0.1"]),      # a lambda member
    ("selection.lam=0.0,seed=1", ["--config.seed=1", "--config.selection.lam=0"]),  # a seed member
])
def test_sweep_member_equals_a_separate_cli_run(data_dir, swept, tmp_path, member, overrides):
  proc = cli("main", *smoke_args(data_dir, tmp_path), *overrides)
  assert proc.returncode == 0, proc.stderr[-3000:]
  run_dir = os.path.join(swept, member)
  assert_same_metrics(run_dir, str(tmp_path))
  for name in ("config.json", "final.json", "selection.npz", "checkpoints"):
    assert os.path.exists(os.path.join(run_dir, name)), name
  with open(os.path.join(run_dir, "config.json")) as f, \
       open(os.path.join(tmp_path, "config.json")) as g:
    assert json.load(f) == json.load(g)


def test_killed_sweep_resumes_to_the_same_results(data_dir, swept, tmp_path):
  args = smoke_args(data_dir, tmp_path / "s") + SWEEP
  # 4 runs save after every round: the 6th save is inside round 2.
  proc = cli("sweep", *args, env={vmap_runs.KILL_ENV: "6"})
  assert proc.returncode == -9, proc.stderr[-3000:]
  assert not glob.glob(str(tmp_path / "s" / "*" / "final.json"))
  proc = cli("sweep", *args)
  assert proc.returncode == 0, proc.stderr[-3000:]
  # Runs 0-1 saved round 2 before the kill, runs 2-3 only round 1: two groups resume.
  assert "resuming 2 runs from round 1" in proc.stdout
  assert "resuming 2 runs from round 2" in proc.stdout
  for member in json.load(open(os.path.join(swept, "sweep.json")))["members"]:
    assert_same_metrics(os.path.join(swept, member["name"]),
                        str(tmp_path / "s" / member["name"]), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("sweep,needle", [
    ("selection.lamda=0,1", "unknown config field 'selection.lamda'"),
    ("fl.num_rounds=2,2.5", "fl.num_rounds must be an int, got '2.5'"),
    ("selection.lam=", "selection.lam has an empty list"),
    # A member failing a check that needs the model (3 candidate layers): before any training.
    ("selection.budget.value=1,10", "selection.budget.value=10 exceeds"),
])
def test_bad_sweep_input_is_one_line_exit_2(data_dir, tmp_path, sweep, needle):
  workdir = tmp_path / "sweep"
  proc = cli("sweep", *smoke_args(data_dir, workdir), "--sweep", sweep, timeout=120)
  assert proc.returncode == 2, proc.stderr
  lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], proc.stderr
  assert not proc.stdout.strip() and not workdir.exists(), proc.stdout


def test_axes_members_and_groups():
  c = digits_config.get_config("smoke")
  axes = sweep_spec.parse_axes(["selection.lam=0,0.5", "seed=1,2",
                                "selection.strategy=top,proposed"], c)
  assert axes[0].values == (0.0, 0.5) and axes[1].values == (1, 2)
  members = sweep_spec.make_members(c, axes)
  assert len(members) == 8
  assert members[0].name == "selection.lam=0.0,seed=1,selection.strategy=top"
  assert members[-1].config.selection.lam == 0.5 and members[-1].config.seed == 2
  groups = sweep_spec.run_groups(members)
  assert sorted(len(g) for g in groups) == [4, 4]    # one program per strategy
  assert all(len({m.config.selection.strategy for m in g}) == 1 for g in groups)
  assert len(sweep_spec.run_groups(members, vmap=False)) == 8
  assert sweep_spec.parse_baseline("selection.strategy=top", axes, c) == \
      ("selection.strategy", "top")
  for bad in ["selection.strategy=best", "seed=1", "fl.local_steps=2"]:
    with pytest.raises(sweep_spec.SweepError):
      sweep_spec.parse_baseline(bad, axes, c)
  for bad in ["seed", "seed=1,1", "fl.unroll=maybe", "model.features=1,2", "fl=1"]:
    with pytest.raises(sweep_spec.SweepError):
      sweep_spec.parse_axes([bad], c)


def test_padding_the_example_axis_changes_no_result(data_dir):
  """The claim the vmapped seeds rest on: a round is invariant to example padding."""
  c = digits_config.get_config("smoke")
  c.data.data_dir = data_dir
  c.selection.strategy = "snr_p1"
  c.selection.sel_batches = 0
  setup = train.Setup(c)
  rd = setup.round_data(0)
  key = jax.random.key(0)
  # The fused round (diagnostics inside), what a vmapped sweep member runs.
  fused = jax.jit(setup.fused_round_body())
  _, plain = fused(setup.initial_state(), rd, key)
  _, padded = fused(setup.initial_state(), vmap_runs.pad_examples(rd, rd["mask"].shape[1] + 37),
                    key)
  assert "e1" in plain
  for k in plain:
    np.testing.assert_allclose(np.asarray(plain[k]), np.asarray(padded[k]), rtol=1e-6,
                               atol=1e-9, err_msg=k)


def test_summary_statistics_and_paired_differences():
  x = [0.9, 0.92, 0.95]
  m, s, h = stats.mean_std_ci(x)
  assert m == pytest.approx(np.mean(x)) and s == pytest.approx(np.std(x, ddof=1))
  assert h == pytest.approx(4.302652729749462 * s / np.sqrt(3))   # t(0.975, 2)
  assert np.isnan(stats.mean_std_ci([0.5])[1])
  rows = [dict(seed=i, **{"selection.strategy": st, "test_accuracy": a})
          for st, accs in (("top", [0.5, 0.6, 0.7]), ("proposed", [0.6, 0.6, 0.9]))
          for i, a in enumerate(accs)]
  [(combo, diffs)] = stats.paired_differences(rows, ["selection.strategy"],
                                              ("selection.strategy", "top"))
  assert combo == ("proposed",)
  np.testing.assert_allclose(diffs, [0.1, 0.0, 0.2], atol=1e-12)


def test_summary_and_figures_regenerate_from_files(swept, tmp_path):
  rows = read_csv(os.path.join(swept, "summary.csv"))
  assert len(rows) == 4
  for r in rows:
    with open(os.path.join(swept, r["member"], "final.json")) as f:
      assert float(r["test_accuracy"]) == json.load(f)["test_accuracy"]
  md = open(os.path.join(swept, "summary.md")).read()
  assert "| 0.0 | 2 |" in md and "95% CI" in md
  paths = plot_cli.main([swept, "--out", str(tmp_path)])
  assert sorted(os.path.basename(p) for p in paths) == [
      "accuracy.png", "errors.png", "lambda.png", "loss.png", "selection.png"]
  assert all(os.path.getsize(p) > 10_000 for p in paths)
  # A single run overlaid on the sweep: every figure, the lambda one from the sweep's runs.
  both = plot_cli.main([swept, os.path.join(swept, rows[0]["member"]), "--out",
                        str(tmp_path / "both")])
  assert sorted(os.path.basename(p) for p in both) == sorted(os.path.basename(p) for p in paths)


def _events(path):
  """Scalar (tag, step, value) of a TensorBoard event file (TFRecord framing)."""
  from tensorboardX.proto import event_pb2
  out = []
  with open(path, "rb") as f:
    while header := f.read(12):
      (length,) = struct.unpack("<Q", header[:8])
      event = event_pb2.Event.FromString(f.read(length))
      f.read(4)
      out += [(v.tag, event.step, v.simple_value) for v in event.summary.value]
  return out


def test_writer_mirrors_the_csv_in_tensorboard(swept):
  run_dir = os.path.join(swept, "selection.lam=0.1,seed=1")
  [path] = glob.glob(os.path.join(run_dir, "events.out.tfevents.*"))
  events = {(tag, step): v for tag, step, v in _events(path)}
  for row in read_csv(os.path.join(run_dir, "metrics.csv")):
    assert events[("train_loss", int(row["round"]))] == pytest.approx(float(row["train_loss"]))
  assert ("test_accuracy", 2) in events


def test_shared_round_data_equals_stacked_round_data(data_dir):
  """Runs that differ in lambda only: data without a run axis == data stacked R times."""
  import jax.numpy as jnp
  setups = []
  for lam in (0.0, 0.3):
    c = digits_config.get_config("smoke")
    c.data.data_dir = data_dir
    c.selection.lam = lam
    setups.append(train.Setup(c))
  n_max = setups[0].clients.mask.shape[1]
  keys = jax.vmap(jax.random.key)(jnp.zeros(2, jnp.int32))
  lrs = jnp.asarray([[0.1, 1.0]] * 2, jnp.float32)
  out = []
  for shared in (True, False):
    states = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *[s.initial_state() for s in setups])
    rd = vmap_runs.stack_round_data([s.round_data(0) for s in setups], shared, n_max)
    out.append(vmap_runs.make_runs_fn(setups[0], shared)(states, rd, lrs, keys)[1])
  for k in out[0]:
    np.testing.assert_allclose(np.asarray(out[0][k]), np.asarray(out[1][k]), rtol=1e-6,
                               atol=1e-9, err_msg=k)


@pytest.mark.parametrize("cost", ["flops", "memory"])
def test_vmapped_round_equals_the_single_round_with_depth_aware_costs(data_dir, cost):
  """A sweep member's round selects with the same depth-aware budgets
  (``setup.backward``) as the single run's round: same masks, same metrics."""
  import jax.numpy as jnp
  from tests.helpers import smoke_config
  # frozen embeddings: with the smoke MLP's trained ones FLOPs costs are additive
  c = smoke_config(data_dir, **{"selection.cost": cost, "selection.strategy": "proposed",
                                "model.embeddings": "fixed"})
  setup = train.Setup(c)
  assert setup.backward is not None
  rd = setup.round_data(0)
  key = jax.random.key(c.seed)
  _, single = setup.round_fn(setup.initial_state(), rd, key)
  states = jax.tree_util.tree_map(lambda a: a[None], setup.initial_state())
  stacked = vmap_runs.stack_round_data([rd], False, setup.clients.mask.shape[1])
  lrs = jnp.asarray([[c.client_optim.lr, c.server_optim.lr]], jnp.float32)
  _, vmapped = vmap_runs.make_runs_fn(setup, False)(states, stacked, lrs,
                                                   jax.vmap(jax.random.key)(jnp.asarray([c.seed])))
  np.testing.assert_array_equal(np.asarray(vmapped["masks"])[0], np.asarray(single["masks"]))
  for k in ("train_loss", "penalty", "disagreement"):
    np.testing.assert_allclose(np.asarray(vmapped[k])[0], np.asarray(single[k]), rtol=1e-5,
                               err_msg=k)


def test_a_diverging_member_stops_alone_and_is_reported(data_dir, tmp_path):
  """A vmapped member whose every update is non-finite stops after
  fl.max_bad_rounds rounds (diverged.json, no final.json, no checkpoint after
  the streak began); the other member finishes and matches a separate run."""
  workdir = tmp_path / "s"
  args = smoke_args(data_dir, workdir) + ["--config.fl.num_rounds=5", "--config.fl.max_bad_rounds=2",
                                          "--sweep", "client_optim.lr=0.1,1e30"]
  proc = cli("sweep", *args)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "2 runs vmapped" in proc.stdout
  bad, good = workdir / "client_optim.lr=1e+30", workdir / "client_optim.lr=0.1"
  errs = [l for l in proc.stdout.splitlines() if l.startswith("error: training diverged")]
  assert len(errs) == 1, proc.stdout
  assert json.loads((bad / "diverged.json").read_text())["diverged"] in errs[0]
  assert not (bad / "final.json").exists() and (good / "final.json").exists()
  rows = read_csv(bad / "metrics.csv")
  assert len(rows) == 2 and all(r["round_skipped"] == "1" for r in rows)
  assert not glob.glob(str(bad / "checkpoints" / "*" / "*"))   # the streak began in round 0
  summary = read_csv(workdir / "summary.csv")
  by = {r["member"]: r for r in summary}
  assert by[bad.name]["diverged"] and by[bad.name]["test_accuracy"] == ""
  assert by[good.name]["diverged"] == "" and float(by[good.name]["test_accuracy"]) > 0
  assert "(1 diverged)" in (workdir / "summary.md").read_text()
  # Rerunning the finished sweep trains nothing and keeps the verdict.
  again = cli("sweep", *args)
  assert again.returncode == 0 and "runs vmapped" not in again.stdout, again.stdout


def test_round_flags_stay_conditionals_across_seeds(data_dir):
  """Members with different seeds (stacked round data): 'diagnose' and 'reselect'
  carry no run axis, so the diagnostics pass stays a lax.cond under vmap (a
  batched predicate turns it into a select that runs it every round)."""
  import jax.numpy as jnp
  setups = []
  for seed in (0, 1):
    c = digits_config.get_config("smoke")
    c.data.data_dir = data_dir
    c.seed = seed
    c.diagnostics.every = 2
    setups.append(train.Setup(c))
  n_max = max(s.clients.mask.shape[1] for s in setups)
  rd = vmap_runs.stack_round_data([s.round_data(0) for s in setups], False, n_max)
  assert np.ndim(rd["diagnose"]) == 0 and np.ndim(rd["reselect"]) == 0
  assert np.ndim(rd["budgets"]) == 2                      # per-run data keeps its axis
  states = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *[s.initial_state() for s in setups])
  keys = jax.vmap(jax.random.key)(jnp.arange(2))
  lrs = jnp.asarray([[0.1, 1.0]] * 2, jnp.float32)
  text = str(jax.make_jaxpr(vmap_runs.make_runs_fn(setups[0], False))(states, rd, lrs, keys))
  assert "cond[" in text
  with pytest.raises(ValueError, match="diagnose"):
    vmap_runs.stack_round_data([setups[0].round_data(0), setups[1].round_data(1)], False, n_max)
