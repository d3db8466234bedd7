"""fl.client_chunk='auto': the largest divisor chunk whose compiled round fits the budget."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from fedsel_jax import auto_chunk
from fedsel_jax import cli
from fedsel_jax import train
from fedsel_jax import validate
from fedsel_jax.errors import ConfigError
from tests.helpers import smoke_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def chunk_config(data_dir, value):
  c = smoke_config(data_dir)
  cli.set_field(c, "fl.client_chunk", value)
  return c


def test_choice_equals_the_naive_scan():
  """Against a check of every candidate, on random memory curves (not monotone)."""
  rng = np.random.default_rng(0)
  for _ in range(300):
    m = int(rng.integers(1, 200))
    cands = auto_chunk.divisors(m)
    curve = dict(zip(cands, rng.uniform(0, 10, len(cands))))
    limit = float(rng.uniform(0, 11))
    best, measured = auto_chunk.choose(cands, curve.__getitem__, limit)
    fits = [c for c in cands if curve[c] <= limit]
    assert best == (max(fits) if fits else None)
    assert set(measured) == {c for c in cands if best is None or c >= best}
    assert all(measured[c] == curve[c] for c in measured)


def test_divisors_and_device_multiples():
  assert auto_chunk.divisors(12) == [1, 2, 3, 4, 6, 12]
  assert auto_chunk.divisors(12, multiple_of=4) == [4, 12]
  assert auto_chunk.divisors(10, multiple_of=4) == []


@pytest.mark.parametrize("value", [0, 5, "auto", "auto:0.25", "auto:1", "auto:512MB",
                                   "auto:0.5MB"])
def test_accepted_forms(value):
  auto_chunk.check("fl.client_chunk", value)


@pytest.mark.parametrize("value", [-1, True, 2.0, "auto:0", "auto:1.5", "auto:0MB", "auto:",
                                   "autox", "auto:-1", "half"])
def test_refused_forms_name_the_field(value):
  with pytest.raises(ConfigError, match="fl.client_chunk"):
    auto_chunk.check("fl.client_chunk", value)


def test_cli_override_turns_an_int_field_into_auto_and_back():
  c = smoke_config("/nonexistent")
  cli.apply_overrides(c, ["fl.client_chunk=auto:64MB"])
  assert c.fl.client_chunk == "auto:64MB"
  validate.validate_config(c)
  cli.apply_overrides(c, ["fl.client_chunk=4"])
  assert c.fl.client_chunk == 4
  with pytest.raises(ConfigError, match="fl.client_chunk.*integer or 'auto'"):
    cli.apply_overrides(c, ["fl.client_chunk=half"])


def test_bad_auto_form_is_one_error_line_before_compute(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "fedsel_jax.main", "--config", "configs/digits.py:smoke",
       "--workdir", str(tmp_path / "w"), "--config.fl.client_chunk=auto:2"],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: ") and "fl.client_chunk" in lines[0]
  assert not (tmp_path / "w" / "metrics.csv").exists()


def test_auto_picks_the_largest_fitting_chunk_and_trains_like_it(data_dir):
  """Against the naive reference (compile the round at every divisor chunk
  and keep the largest that fits): for budgets at each measured need, auto
  picks the same chunk; its round is bit-identical to that chunk set by hand;
  a budget below every chunk's need is one clear error."""
  wide = {"diagnostics.enabled": False}   # a shorter compile; the choice is the same code
  key = jax.random.key(0)
  curve = {}
  for c in (1, 2, 4):
    s = train.Setup(smoke_config(data_dir, **wide, **{"fl.client_chunk": c}))
    lowered = s.round_fn.lower(s.initial_state(), s.round_data(0), key)
    curve[c] = auto_chunk.compiled_mb(lowered.compile())
  chosen = {}
  for need in sorted(set(curve.values())):
    limit = f"{need + 1e-4:.6f}"
    c = chunk_config(data_dir, f"auto:{limit}MB")
    c.diagnostics.enabled = False
    setup = train.Setup(c)
    expected = max(d for d in curve if curve[d] <= float(limit))
    assert setup.chunk == setup.settings.client_chunk == expected, (limit, curve)
    chosen[expected] = setup
  small = min(chosen)   # not always 1: memory is not monotone in the chunk (auto_chunk.choose)
  by_hand = train.Setup(smoke_config(data_dir, **wide, **{"fl.client_chunk": small}))
  outs = [s.round_fn(s.initial_state(), s.round_data(0), key) for s in (chosen[small], by_hand)]
  for a, b in zip(jax.tree_util.tree_leaves(outs[0]), jax.tree_util.tree_leaves(outs[1])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  c = chunk_config(data_dir, f"auto:{min(curve.values()) * 0.5:.6f}MB")
  c.diagnostics.enabled = False
  with pytest.raises(ConfigError, match="even a chunk of 1 client"):
    train.Setup(c)
