"""Round time against clients per round, at a fixed chunk (does a round scale linearly?).

    python experiments/bench/scaling.py --clients 500,2000,5000,20000 --chunk 500 \
        --repeats 3 --json experiments/bench/results/scaling_digits_mlp.json

The digits config's model and round settings (MLP width 128, depth 4; 5 local
Adam steps of 16; proposed selection with its score pass and the P1 solver
every round) on a synthetic federation of M clients per round with digits'
shapes (8 x 8 x 1 images, 10 classes, 8-32 rows per client, n_max 32), all in one
process. Diagnostics are off (E1/E2 over 20,000 clients is its own pass,
not the round's). Per M: compile seconds, the median of ``--repeats`` timed
rounds after the first, seconds per client, XLA's temp memory (which stays
fixed if the chunks stream), and the ratio of seconds per client to the
smallest M's.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

from absl import app
from absl import flags
import jax
import numpy as np

from fedsel_jax import client as client_lib
from fedsel_jax import federated
from fedsel_jax import train
from fedsel_jax.cli import load_config

_CLIENTS = flags.DEFINE_list("clients", ["500", "2000", "5000", "20000"], "Clients per round.")
_CHUNK = flags.DEFINE_integer("chunk", 500, "fl.client_chunk.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed rounds per M after the first call.")
_JSON = flags.DEFINE_string("json", "", "Also write the results here.")
N_MAX, CLASSES = 32, 10


def synthetic_round(m: int, k: int, seed: int = 0) -> dict:
  """Round data for M clients with 8-32 rows each (real rows first), budget 2 blocks."""
  rng = np.random.default_rng(seed)
  counts = rng.integers(8, N_MAX + 1, m).astype(np.int32)
  return dict(x=rng.normal(size=(m, N_MAX, 8, 8, 1)).astype(np.float32),
              y=rng.integers(0, CLASSES, (m, N_MAX)).astype(np.int32),
              mask=np.arange(N_MAX)[None] < counts[:, None], num_examples=counts,
              client_ids=np.arange(m, dtype=np.int32), valid=np.ones(m, bool),
              budgets=np.full(m, 2.0, np.float32), lam=np.float32(0.05),
              reselect=np.bool_(True), diagnose=np.bool_(False))


def one_size(setup, m: int, chunk: int, repeats: int) -> dict:
  settings = dataclasses.replace(setup.settings, client_chunk=chunk, diagnostics=False)
  round_fn = jax.jit(federated.make_round_fn(
      client_lib.make_loss_fn(setup.spec.module.apply), setup.index, setup.k, setup.client_opt,
      setup.server_opt, setup.costs, settings, backward=setup.backward))
  state = federated.init_server_state(setup.params, setup.server_opt, m, setup.k)
  rd = jax.device_put(synthetic_round(m, setup.k))
  key = jax.random.key(0)
  t0 = time.perf_counter()
  compiled = round_fn.lower(state, rd, key).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  times = []
  for _ in range(repeats + 1):
    t0 = time.perf_counter()
    state, metrics = compiled(state, rd, key)
    jax.block_until_ready(state.params)
    times.append(time.perf_counter() - t0)
  median = float(np.median(times[1:]))
  return dict(clients=m, chunk=chunk, compile_s=compile_s, first_s=times[0], times=times[1:],
              median_s=median, s_per_client=median / m,
              xla_temp_mb=mem.temp_size_in_bytes / 2 ** 20,
              xla_args_mb=mem.argument_size_in_bytes / 2 ** 20,
              masks_per_client=float(np.asarray(metrics["masks"]).sum(1).mean()))


def main(_):
  config = load_config("configs/digits.py")
  setup = train.Setup(config)
  out = dict(command="python experiments/bench/scaling.py " + " ".join(sys.argv[1:]),
             date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), cpus=os.cpu_count(),
             device=jax.devices()[0].device_kind, load=os.getloadavg(),
             settings=dict(vars(setup.settings), client_chunk=_CHUNK.value, diagnostics=False),
             rows=[])
  for m in (int(c) for c in _CLIENTS.value):
    row = one_size(setup, m, _CHUNK.value, _REPEATS.value)
    row["per_client_over_smallest"] = row["s_per_client"] / (
        out["rows"][0]["s_per_client"] if out["rows"] else row["s_per_client"])
    out["rows"].append(row)
    print(f"M={m}: {row['median_s']:.2f} s/round ({1e3 * row['s_per_client']:.3f} ms/client, "
          f"{row['per_client_over_smallest']:.2f}x the smallest M's), compile "
          f"{row['compile_s']:.1f} s, XLA temp {row['xla_temp_mb']:.1f} MB", flush=True)
  out["load_after"] = os.getloadavg()
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(out, f, indent=2, default=float)


if __name__ == "__main__":
  app.run(main)
