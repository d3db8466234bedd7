"""The run's round and its separate diagnostics program against the fused round."""

import jax
import numpy as np
import pytest

from fedsel_jax import device_data
from fedsel_jax import round_programs
from fedsel_jax import train
from tests.helpers import smoke_config

# Not sharing the score pass: the diagnostics are their own program.
SEPARATE = {"diagnostics.estimator": "sampled", "diagnostics.batches": 2,
            "diagnostics.every": 2, "selection.sel_batches": 1}


def _fused_rounds(setup, rounds, key, store=None):
  body = setup.fused_round_body()
  if store is None:
    fn = jax.jit(body, donate_argnums=0)
    call = lambda s, t: fn(s, setup.round_data(t), key)  # noqa: E731
  else:
    fn = jax.jit(device_data.with_gather(body, setup.clients.mask.shape[1]), donate_argnums=0)
    call = lambda s, t: fn(s, setup.round_data(t, clients=False), store, key)  # noqa: E731
  state, out = setup.initial_state(), []
  for t in range(rounds):
    state, metrics = call(state, t)
    out.append(jax.device_get(metrics))
  return state, out


def _split_rounds(setup, rounds, key):
  state, out = setup.initial_state(), []
  for t in range(rounds):
    state, metrics, _ = setup.train_round(state, t, key)
    out.append(jax.device_get(metrics))
  return state, out


def _assert_same(fused, split):
  (s1, m1), (s2, m2) = fused, split
  for a, b in zip(jax.tree_util.tree_leaves(s1.params), jax.tree_util.tree_leaves(s2.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
  for t, (a, b) in enumerate(zip(m1, m2)):
    assert sorted(a) == sorted(b), t
    for name in a:
      np.testing.assert_allclose(np.asarray(a[name], np.float64), np.asarray(b[name], np.float64),
                                 rtol=1e-5, atol=1e-7, err_msg=f"round {t}: {name}")


@pytest.mark.parametrize("overrides", [
    {"fl.device_data": "off", "diagnostics.power_iters": 2},
    {"fl.device_data": "on", "fl.backprop_cut": True, "selection.strategy": "random"},
    {"fl.device_data": "off", "diagnostics.population": True, "fl.client_chunk": 1},
    {"fl.device_data": "off", "client_optim.lr": 1e30},   # no update aggregated
], ids=["host-hvp", "store-cut", "population", "diverging"])
def test_the_round_then_its_diagnostics_equal_the_fused_round(data_dir, overrides):
  """Two programs, same metrics (E1/E2 on diagnosed rounds, NaN on the
  others) and the same model as one program with the diagnostics inside."""
  setup = train.Setup(smoke_config(data_dir, **SEPARATE, **overrides))
  assert setup.diagnose_fn is not None and setup.settings.diagnostics
  key = jax.random.key(5)
  store = device_data.place(setup.clients) if setup.uses_store else None
  fused = _fused_rounds(setup, 3, key, store)
  split = _split_rounds(setup, 3, key)
  _assert_same(fused, split)
  e1 = [float(np.asarray(m["e1"])) for m in split[1]]
  assert np.isnan(e1[1])   # every = 2: round 1 not diagnosed
  if overrides.get("client_optim.lr", 0) < 1:
    assert np.isfinite(e1[0]) and np.isfinite(e1[2])
  else:
    assert all(m["round_skipped"] for m in split[1])
  # The round itself carries no diagnostics: they are the other program.
  rd = setup.round_data(0, clients=False) if store is not None else setup.round_data(0)
  fn = setup.device_round_fn if store is not None else setup.round_fn
  out = jax.eval_shape(fn, setup.initial_state(), rd, *([store] if store is not None else []),
                       key)[1]
  assert "e1" not in out and "e2_layers" not in out and "client_aggregated" in out


def test_rounds_not_diagnosed_never_compile_the_diagnostics_and_new_data_never_recompiles(
    data_dir):
  setup = train.Setup(smoke_config(data_dir, **SEPARATE, **{"fl.device_data": "off"}))
  key = jax.random.key(0)
  state = setup.initial_state()
  state, metrics, _ = setup.train_round(state, 1, key)      # round 1: not diagnosed
  assert setup.diagnose_fn._cache_size() == 0
  assert np.isnan(np.asarray(metrics["e1"])) and "e2_layers" in metrics
  for t in (2, 4, 5, 6):                                    # 2, 4 and 6 diagnosed
    state, metrics, _ = setup.train_round(state, t, key)
  assert setup.diagnose_fn._cache_size() == 1 and setup.round_fn._cache_size() == 1
  assert np.isfinite(np.asarray(metrics["e1"]))


def test_the_training_does_not_depend_on_the_diagnostics(data_dir):
  on = train.Setup(smoke_config(data_dir, **SEPARATE, **{"fl.device_data": "off"}))
  off = train.Setup(smoke_config(data_dir, **SEPARATE, **{"fl.device_data": "off",
                                                          "diagnostics.enabled": False}))
  key = jax.random.key(1)
  (s1, m1), (s2, m2) = _split_rounds(on, 3, key), _split_rounds(off, 3, key)
  for a, b in zip(jax.tree_util.tree_leaves(s1.params), jax.tree_util.tree_leaves(s2.params)):
    assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
  assert all(np.array_equal(a["masks"], b["masks"]) for a, b in zip(m1, m2))
  assert "e1" in m1[0] and "e1" not in m2[0]


@pytest.mark.parametrize("overrides", [
    {},                                               # full estimator, all-data scores
    {"diagnostics.estimator": "score", "selection.sel_batches": 1},
])
def test_diagnostics_that_share_the_score_pass_stay_in_the_round(data_dir, overrides):
  setup = train.Setup(smoke_config(data_dir, **overrides))
  assert setup.settings.shares_score_pass and not round_programs.separate(setup.settings)
  assert setup.diagnose_fn is None
  _, metrics, _ = setup.train_round(setup.initial_state(), 0, jax.random.key(0))
  assert np.isfinite(np.asarray(metrics["e1"]))


def test_auto_chunk_sizes_the_larger_of_the_two_programs(data_dir):
  setup = train.Setup(smoke_config(data_dir, **SEPARATE, **{"fl.client_chunk": 2}))
  state, rd, key = setup.initial_state(), setup.round_data(0), jax.random.key(0)
  from fedsel_jax import auto_chunk
  alone = auto_chunk.compiled_mb(setup.round_fn.lower(state, rd, key).compile())
  both = round_programs.compiled_mb(setup.round_fn, setup.diagnose_fn, state, rd, key)
  params_mb = sum(x.nbytes for x in jax.tree_util.tree_leaves(state.params)) / 2**20
  assert both >= alone + params_mb
  assert round_programs.compiled_mb(setup.round_fn, None, state, rd, key) == alone


def test_check_only_traces_the_diagnostics_program(data_dir, monkeypatch):
  from fedsel_jax import diagnostics
  from fedsel_jax import main as main_lib

  def broken(*args, **kwargs):
    raise RuntimeError("the diagnostics were traced")

  monkeypatch.setattr(diagnostics, "diagnose_round", broken)
  for device_data_mode in ("off", "on"):
    config = smoke_config(data_dir, **SEPARATE, **{"fl.device_data": device_data_mode})
    with pytest.raises(RuntimeError, match="diagnostics were traced"):
      main_lib.check_only(config)
  main_lib.check_only(smoke_config(data_dir, **SEPARATE, **{"diagnostics.enabled": False}))
