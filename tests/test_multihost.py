"""--jax_distributed: two processes on localhost CPU give the metrics of one process."""

import csv
import math
import os
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SKIP = {"seconds"}   # wall time


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices: int) -> dict:
  return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
              XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


def _args(data_dir, workdir, rounds):
  return [sys.executable, "-m", "fedsel_jax.main", "--config", "configs/digits.py:smoke",
          "--workdir", str(workdir), f"--config.data.data_dir={data_dir}",
          "--config.fl.shard_clients=True", "--config.fl.client_chunk=4",
          f"--config.fl.num_rounds={rounds}"]


def _run_pair(data_dir, workdir, rounds):
  """The two-process run (2 CPU devices each: one mesh of 4) and the
  one-process run of the same config on 4 devices, side by side."""
  port = _free_port()
  procs = [subprocess.Popen(
      _args(data_dir, workdir / "two", rounds) + [
          "--jax_distributed", f"--coordinator_address=127.0.0.1:{port}",
          "--num_processes=2", f"--process_id={i}"],
      cwd=ROOT, env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(2)]
  one = subprocess.run(_args(data_dir, workdir / "one", rounds), cwd=ROOT, env=_env(4),
                       capture_output=True, text=True, timeout=600)
  outs = [p.communicate(timeout=600)[0] for p in procs]
  assert one.returncode == 0, one.stderr[-2000:]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-2000:]
  return outs


def _rows(path):
  with open(path) as f:
    return list(csv.DictReader(f))


def _assert_same_metrics(a, b):
  ra, rb = _rows(a), _rows(b)
  assert len(ra) == len(rb) > 0
  for x, y in zip(ra, rb):
    assert x.keys() == y.keys()
    for k in x:
      if k in SKIP or x[k] == y[k]:
        continue
      u, v = float(x[k]), float(y[k])
      assert (math.isnan(u) and math.isnan(v)) or u == pytest.approx(v, rel=1e-5, abs=1e-7), (
          k, x["round"], u, v)


def test_two_processes_equal_one_and_resume_alike(data_dir, tmp_path):
  outs = _run_pair(data_dir, tmp_path, rounds=3)
  _assert_same_metrics(tmp_path / "one" / "metrics.csv", tmp_path / "two" / "metrics.csv")
  primary, other = outs
  assert "round 3/3" in primary
  assert "round" not in other and "error" not in other     # only process 0 prints
  two = sorted(os.listdir(tmp_path / "two"))
  assert [n for n in two if n.startswith("events.")].__len__() == 1   # one writer
  assert {"final.json", "metrics.csv", "selection.npz", "checkpoints"} <= set(two)
  # Resume both with one more round: the primary restores and broadcasts.
  outs = _run_pair(data_dir, tmp_path, rounds=4)
  assert "resuming" in outs[0] and "round 4/4" in outs[0]
  _assert_same_metrics(tmp_path / "one" / "metrics.csv", tmp_path / "two" / "metrics.csv")
  assert len(_rows(tmp_path / "two" / "metrics.csv")) == 4


@pytest.mark.parametrize("flags, needle", [
    (["--process_id=1"], "--process_id needs --jax_distributed"),
    (["--jax_distributed"], "needs --config.fl.shard_clients=True"),
    (["--jax_distributed", "--config.fl.shard_clients=True", "--num_processes=two"],
     "--num_processes must be an integer"),
    (["--jax_distributed", "--config.fl.shard_clients=True", "--num_processes=2",
      "--process_id=2"], "--process_id must be in [0, --num_processes)"),
])
def test_bad_distributed_flags_are_one_error_line(tmp_path, flags, needle):
  proc = subprocess.run(
      [sys.executable, "-m", "fedsel_jax.main", "--config", "configs/digits.py:smoke",
       "--workdir", str(tmp_path / "w"), *flags], cwd=ROOT, env=_env(1),
      capture_output=True, text=True, timeout=300)
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert proc.returncode == 2 and len(lines) == 1, proc.stderr
  assert lines[0].startswith("error: ") and needle in lines[0]
  assert not (tmp_path / "w").exists()
