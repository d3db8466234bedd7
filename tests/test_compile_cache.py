"""The commands' persistent compilation cache: where it goes, and that a rerun uses it."""

import json
import os
import subprocess
import sys

from fedsel_jax import compile_cache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_flag_wins_then_jax_then_ours_then_the_default(monkeypatch, tmp_path):
  for var in ("JAX_COMPILATION_CACHE_DIR", compile_cache.ENV):
    monkeypatch.delenv(var, raising=False)
  assert compile_cache.resolve(None) == os.path.expanduser(compile_cache.DEFAULT)
  monkeypatch.setenv(compile_cache.ENV, "none")
  assert compile_cache.resolve(None) is None
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax"))
  assert compile_cache.resolve(None) == str(tmp_path / "jax")
  assert compile_cache.resolve(str(tmp_path / "flag")) == str(tmp_path / "flag")
  assert compile_cache.resolve("none") is None and compile_cache.resolve("OFF") is None


def _run(workdir, cache, data_dir, **env_vars):
  env = dict(os.environ, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", PYTHONPATH=ROOT,
             **env_vars)
  for var in ("FEDSEL_JAX_COMPILATION_CACHE", "JAX_COMPILATION_CACHE_DIR"):
    env.pop(var, None)
  out = subprocess.run(
      [sys.executable, "-m", "fedsel_jax.main", "--config",
       os.path.join(ROOT, "configs/digits.py:smoke"), "--workdir", str(workdir),
       f"--config.data.data_dir={data_dir}", "--config.fl.backprop_cut=True",
       f"--compilation_cache={cache}"], cwd=ROOT, env=env, capture_output=True, text=True,
      timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  with open(os.path.join(workdir, "final.json")) as f:
    return json.load(f)


def test_a_rerun_of_the_same_config_compiles_nothing_new(data_dir, tmp_path):
  cache = tmp_path / "cache"
  first = _run(tmp_path / "a", cache, data_dir)
  entries = set(os.listdir(cache))
  assert entries, "the first run wrote no compiled executables"
  second = _run(tmp_path / "b", cache, data_dir)
  assert set(os.listdir(cache)) == entries    # every compile of the rerun was a cache hit
  assert second["test_accuracy"] == first["test_accuracy"]
  assert second["test_loss"] == first["test_loss"]


def test_none_writes_no_cache(data_dir, tmp_path):
  home = tmp_path / "home"
  home.mkdir()
  _run(tmp_path / "a", "none", data_dir, HOME=str(home))
  assert not (home / ".cache" / "fedsel_jax").exists()
