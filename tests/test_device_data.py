"""Client data on the device once (device_data.py) against the host gathers."""

import os

import jax
import numpy as np
import pytest

from fedsel_jax import data as data_lib
from fedsel_jax import device_data
from fedsel_jax import train
from tests.helpers import smoke_config
from tests.test_train import final_leaves


def ragged_clients(seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(200, 3, 2)).astype(np.float32)
  y = rng.integers(0, 5, 200)
  sizes = [1, 7, 30, 2, 13, 47]
  cuts = np.cumsum(sizes)[:-1]
  parts = np.split(rng.permutation(sum(sizes)), cuts)
  return data_lib.pad_clients(x, y, [np.sort(p) for p in parts])


def test_the_in_graph_gather_equals_the_host_take_for_ragged_clients_and_padding_slots():
  clients = ragged_clients()
  n, n_max = clients.num_clients, clients.mask.shape[1]
  store = device_data.place(clients)
  slots = np.array([5, 0, 3, n, n, 1], np.int32)          # two padding slots (id N)
  got = jax.jit(device_data.gather, static_argnums=2)(store, slots, n_max)
  want = clients.take(np.minimum(slots, n - 1))
  for f in device_data.FIELDS:
    assert np.asarray(got[f]).dtype == want[f].dtype, f
    assert np.asarray(got[f]).tobytes() == want[f].tobytes(), f


def test_the_store_holds_each_real_row_once():
  clients = ragged_clients()
  store = device_data.flat_store(clients)
  assert len(store["y"]) == int(clients.num_examples.sum()) == 100
  report = device_data.padding_report(clients, clients_per_round=3, slots=4)
  assert report["store_rows"] == report["real_rows"] == 100
  assert report["rectangle_rows"] == 6 * 47
  assert report["round_rows_over_real"] == pytest.approx(4 * 47 / (3 * 100 / 6))


def test_auto_keeps_large_stores_on_the_host_and_sharded_runs_never_use_it():
  clients = ragged_clients()
  assert device_data.wanted("auto", clients, 1e-6, False)[0] is False
  assert "fl.device_data_max_mb" in device_data.wanted("auto", clients, 1e-6, False)[1]
  assert device_data.wanted("on", clients, 1e-6, False) == (True, "")
  assert device_data.wanted("auto", clients, 100.0, False) == (True, "")
  assert device_data.wanted("off", clients, 100.0, False) == (False, "")
  assert device_data.wanted("on", clients, 100.0, True)[0] is False


def _final(config, workdir):
  setup = train.Setup(config)
  final = train.train_and_evaluate(config, workdir, setup=setup, quiet=True)
  with open(os.path.join(workdir, "metrics.csv")) as f:
    return setup, final, f.read()


def test_a_run_on_the_device_store_equals_the_host_run_bit_for_bit(data_dir, tmp_path):
  on, off = (smoke_config(data_dir, **{"fl.device_data": mode, "fl.client_chunk": 3})
             for mode in ("on", "off"))
  setup_on, final_on, csv_on = _final(on, str(tmp_path / "on"))
  setup_off, final_off, csv_off = _final(off, str(tmp_path / "off"))
  assert setup_on.store is not None and setup_off.store is None
  assert len(set(np.asarray(setup_on.clients.num_examples))) > 1      # ragged clients
  assert setup_on.round_data(0)["client_ids"].shape[0] % 3 == 0
  assert "x" not in setup_on.round_data(0, clients=False)             # only ids cross
  header = csv_on.splitlines()[0].split(",")
  keep = [i for i, h in enumerate(header) if h != "seconds"]
  rows = lambda text: [[r.split(",")[i] for i in keep] for r in text.splitlines()]  # noqa: E731
  assert rows(csv_on) == rows(csv_off)
  assert final_on["test_accuracy"] == final_off["test_accuracy"]
  assert final_on["test_loss"] == final_off["test_loss"]
  assert final_on["client_data"]["on_device"] and not final_off["client_data"]["on_device"]
  assert final_on["client_data"]["store_rows"] == float(setup_on.clients.num_examples.sum())
  for a, b in zip(final_leaves(str(tmp_path / "on"), setup_on),
                  final_leaves(str(tmp_path / "off"), setup_off)):
    assert np.asarray(a).tobytes() == np.asarray(b).tobytes()


def _store_round(setup, per_chunk):
  body = setup.fused_round_body()
  return jax.jit(device_data.with_gather(body, setup.clients.mask.shape[1], per_chunk=per_chunk))


@pytest.mark.parametrize("overrides", [
    {"fl.backprop_cut": True, "selection.strategy": "random", "diagnostics.power_iters": 2},
    {"diagnostics.estimator": "score", "selection.sel_batches": 1, "fl.client_chunk": 1},
], ids=["cut-random-hvp", "score-estimator-chunk1"])
def test_gathering_chunk_by_chunk_equals_gathering_the_whole_round_first(data_dir, overrides):
  setup = train.Setup(smoke_config(data_dir, **{"fl.device_data": "on", **overrides}))
  store = device_data.place(setup.clients)
  key = jax.random.key(3)
  outs = []
  for per_chunk in (True, False):
    state = setup.initial_state()
    fn = _store_round(setup, per_chunk)
    for t in range(2):
      state, metrics = fn(state, setup.round_data(t, clients=False), store, key)
    outs.append((jax.tree_util.tree_leaves(state.params), metrics))
  (p1, m1), (p2, m2) = outs
  assert len(set(np.asarray(setup.clients.num_examples))) > 1
  for a, b in zip(p1, p2):
    assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
  assert sorted(m1) == sorted(m2)
  for name in m1:
    np.testing.assert_array_equal(np.asarray(m1[name]), np.asarray(m2[name]), err_msg=name)
  assert np.isfinite(np.asarray(m1["e1"])).all() and np.isfinite(np.asarray(m1["e2"])).all()


def test_a_round_on_the_store_holds_one_chunk_of_padded_rows_not_the_whole_round(data_dir):
  # 8 clients in chunks of 1: the whole-round gather materialises 8 x n_max
  # rows of 64 floats, the chunked one a single client's.
  setup = train.Setup(smoke_config(data_dir, **{
      "fl.device_data": "on", "fl.client_chunk": 1, "fl.clients_per_round": 8,
      "diagnostics.enabled": False}))
  store = device_data.place(setup.clients)
  rd, key = setup.round_data(0, clients=False), jax.random.key(0)
  n_max = setup.clients.mask.shape[1]
  row_bytes = int(np.prod(setup.clients.x.shape[2:])) * setup.clients.x.dtype.itemsize
  temp = {}
  for per_chunk in (True, False):
    compiled = _store_round(setup, per_chunk).lower(setup.initial_state(), rd, store,
                                                    key).compile()
    temp[per_chunk] = compiled.memory_analysis().temp_size_in_bytes
  round_rows = 8 * n_max * row_bytes
  assert temp[False] - temp[True] > 0.75 * round_rows, (temp, round_rows)
