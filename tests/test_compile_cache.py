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


# The command in a child process, counting JAX's persistent-cache hits.
CHILD = ("import sys\n"
         "from jax import monitoring\n"
         "hits = []\n"
         "monitoring.register_event_listener(lambda event, **kw: hits.append(event) "
         "if event == '/jax/compilation_cache/cache_hits' else None)\n"
         "from fedsel_jax import main\n"
         "code = main.main(sys.argv[1:])\n"
         "print('CACHE_HITS', len(hits))\n"
         "sys.exit(code)\n")


def _run(workdir, cache, data_dir, **env_vars):
  """(final.json, persistent-cache hits) of one smoke run with the cut."""
  env = dict(os.environ, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", PYTHONPATH=ROOT)
  for var in ("FEDSEL_JAX_COMPILATION_CACHE", "JAX_COMPILATION_CACHE_DIR"):
    env.pop(var, None)
  env.update(env_vars)
  out = subprocess.run(
      [sys.executable, "-c", CHILD, "--config",
       os.path.join(ROOT, "configs/digits.py:smoke"), "--workdir", str(workdir),
       f"--config.data.data_dir={data_dir}", "--config.fl.backprop_cut=True",
       f"--compilation_cache={cache}"], cwd=ROOT, env=env, capture_output=True, text=True,
      timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  hits = int(out.stdout.split("CACHE_HITS")[-1].split()[0])
  with open(os.path.join(workdir, "final.json")) as f:
    return json.load(f), hits


def test_a_rerun_of_the_same_config_compiles_nothing_new(data_dir, tmp_path):
  cache = tmp_path / "cache"
  first, first_hits = _run(tmp_path / "a", cache, data_dir)
  entries = set(os.listdir(cache))
  assert entries and first_hits == 0, "the first run wrote no compiled executables"
  second, second_hits = _run(tmp_path / "b", cache, data_dir)
  assert set(os.listdir(cache)) == entries    # nothing new to write
  rounds = [e for e in entries if e.startswith(("jit_round_fn", "jit_round_on_store"))]
  assert second_hits >= len(rounds) >= 1
  assert second["test_accuracy"] == first["test_accuracy"]
  assert second["test_loss"] == first["test_loss"]


def test_none_writes_no_cache(data_dir, tmp_path):
  home = tmp_path / "home"
  home.mkdir()
  _, hits = _run(tmp_path / "a", "none", data_dir, HOME=str(home),
                 JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax"))
  assert hits == 0 and not (home / ".cache" / "fedsel_jax").exists()
  assert not (tmp_path / "jax").exists() or not os.listdir(tmp_path / "jax")
