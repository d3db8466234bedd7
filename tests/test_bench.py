"""The bench command's report on a seconds-long config."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_bench(tmp_path, masks, *overrides):
  """(stdout, the JSON report) of the bench on the smoke config, without torch."""
  out = tmp_path / "bench.json"
  proc = subprocess.run(
      [sys.executable, "-m", "fedsel_jax.bench", "--config", "configs/digits.py:smoke",
       "--masks", masks, "--repeats", "1", "--torch_peer", "", "--json", str(out), *overrides],
      cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu"),
      capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout, json.loads(out.read_text())


def test_bench_reports_every_mode_and_flop_count(tmp_path):
  stdout, report = run_bench(tmp_path, "top2,random", "--config.fl.backprop_cut=True")
  assert "samples/s" in stdout and "FLOPs executed" in stdout
  top2, rand = report["rows"]
  for row in (top2, rand):
    assert set(row["modes"]) == {"round", "loop"}
    assert row["modes"]["round"]["round_data"] == "device store"   # what a run reads (auto)
    assert row["modes"]["round"]["samples_per_s"] > 0 and row["needed_flops"] > 0
    # executed counts elementwise work (optimizer, norms) the analytic need leaves out
    assert 0.5 < row["executed_over_needed"] < 3.0
  # a peak: the best of the samples taken before and after the modes
  assert len(report["matmul_peak_samples"]) == 2 and min(report["matmul_peak_samples"]) > 0
  assert report["complete"] is True and report["matmul_peak_dtype"] == "float32"
  assert report["matmul_peak_flops"] == max(report["matmul_peak_samples"])
  # the top-2 consensus round needs and executes less than random 1-2-block masks reaching lower
  assert top2["executed_flops"] <= rand["executed_flops"] * 1.05 or \
      top2["needed_flops"] > rand["needed_flops"]


def test_a_killed_bench_keeps_the_modes_it_finished(tmp_path):
  """A time limit (SIGTERM) mid-run leaves the JSON of every mode done so far."""
  out = tmp_path / "bench.json"
  proc = subprocess.Popen(
      [sys.executable, "-m", "fedsel_jax.bench", "--config", "configs/digits.py:smoke",
       "--masks", "top2,random", "--repeats", "1", "--torch_peer", "", "--json", str(out)],
      cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu"),
      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
  try:
    for line in proc.stdout:
      if line.startswith("masks=top2:") and "round" in line:
        break
    proc.terminate()
    proc.wait(timeout=60)
  finally:
    proc.kill()
  report = json.loads(out.read_text())
  assert report["complete"] is False
  row = report["rows"][0]
  assert "round" in row["modes"] and row["modes"]["round"]["samples_per_s"] > 0
  assert row["needed_flops"] > 0 and row["mfu_needed"] > 0      # summarised as it stands
  assert report["matmul_peak_flops"] > 0
  # the README generator shows it as stopped, with what it has
  spec = importlib.util.spec_from_file_location(
      "make_readme", os.path.join(ROOT, "experiments/bench/make_readme.py"))
  make_readme = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(make_readme)
  text = "\n".join(make_readme.bench_table("killed.json", report))
  assert "Stopped before the end" in text and "| top2 (2.0 blocks) | round |" in text


def test_bench_times_host_round_data_when_the_run_would(tmp_path):
  _, report = run_bench(tmp_path, "top2", "--config.fl.device_data=off")
  assert report["rows"][0]["modes"]["round"]["round_data"] == "host"


def test_a_model_without_an_analytic_count_prints_no_nan():
  from fedsel_jax import bench
  row = dict(masks="random", mean_blocks=1.7, samples=800, modes={}, speedup_over_loop=1.0,
             executed_flops=3.8e10, needed_flops=float("nan"), executed_over_needed=float("nan"),
             mfu_needed=float("nan"), mfu_executed=0.26)
  text = bench.format_row(row)
  assert "nan" not in text and "no analytic count" in text and "26% executed" in text


def test_paired_ratio_alternates_round_and_peer(monkeypatch):
  """Each pair times one round call then one peer call, on the same clock."""
  from fedsel_jax import bench
  from fedsel_jax import timing
  clock, calls = [0.0], []

  class FakeTime:
    @staticmethod
    def perf_counter():
      return clock[0]

  def advance(name, dt):
    def fn():
      calls.append(name)
      clock[0] += dt
      return 0
    return fn

  monkeypatch.setattr(timing, "time", FakeTime)
  rounds = [advance("round", d) for d in (1.0, 2.0, 4.0)]
  peer = iter([3.0, 4.0, 4.0])
  res = bench.paired_ratio(rounds, lambda: advance("peer", next(peer))(), "torch_2")
  assert calls == ["round", "peer"] * 3
  assert res["ratios"] == [3.0, 2.0, 1.0] and res["median"] == 2.0
  assert (res["min"], res["max"], res["peer"]) == (1.0, 3.0, "torch_2")


def test_a_peer_missing_a_package_is_said_and_skipped(monkeypatch, capsys, tmp_path):
  """torch without transformers: one stderr line naming it, no peer, no traceback."""
  from fedsel_jax import bench
  peer_file = tmp_path / "peer.py"
  peer_file.write_text("raise AssertionError('the peer must not be imported')\n")
  real = bench.importlib.util.find_spec
  monkeypatch.setattr(bench.importlib.util, "find_spec",
                      lambda name: object() if name == "torch" else
                      (None if name == "transformers" else real(name)))
  assert bench.load_peer(str(peer_file)) is None
  err = capsys.readouterr().err
  assert "transformers" in err and "torch" not in err.split("needs")[1].split("(")[0]
  assert bench.load_peer(str(tmp_path / "absent.py")) is None
  assert "no torch peer" in capsys.readouterr().err
  monkeypatch.setattr(bench.importlib.util, "find_spec", lambda name: None)
  assert bench.load_peer(str(peer_file)) is None     # no torch: silently no peer
  assert capsys.readouterr().err == ""


@pytest.mark.parametrize("args,needle", [
    (["--masks", "bogus"], "--masks must be a comma list"),
    (["--config.foo=1"], "unknown config field"),
    (["--repeats", "0"], "--repeats must be an integer >= 1"),
    (["--json", "/proc/nope/x.json"], "--json '/proc/nope/x.json'"),
    (["--config.client_optim.lr=-1"], "client_optim.lr"),
    (["--config.selection.budget.value=9"], "selection.budget.value=9 exceeds"),
    (["--bogus"], "unknown flag --bogus"),
])
def test_bad_input_is_one_line_exit_2_before_any_timing(args, needle):
  proc = subprocess.run(
      [sys.executable, "-m", "fedsel_jax.bench", "--config", "configs/digits.py:smoke",
       "--torch_peer", "", *args], cwd=ROOT,
      env=dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu"),
      capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], proc.stderr
  assert not proc.stdout.strip()
