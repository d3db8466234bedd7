"""XLA memory of one round by where its client rows come from, as clients grow.

    python experiments/bench/round_memory.py --config configs/digits.py \
        --clients 30,100,300 [--set FIELD=VALUE ...] [--repeats 3] [--json PATH]

For each clients-per-round value M (the federation has ``max(M, its own
num_clients)`` clients) it compiles the same round three ways and reports
XLA's memory analysis (argument and temporary bytes) and the median time of
``--repeats`` rounds after a first call:

* ``host``: the round on host round data (``Setup.round_fn``): the
  ``[Mp, n_max]`` padded arrays are arguments, copied every round;
* ``store, whole round``: the device store, every slot's rows gathered in-graph
  before the round (``device_data.with_gather(per_chunk=False)``: the layout
  before chunk-by-chunk gathers);
* ``store, per chunk``: the device store, each chunk's rows gathered when the
  chunk scan reaches it (what runs use: ``Setup.device_round_fn``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import jax  # noqa: E402

from fedsel_jax import cli, device_data, train  # noqa: E402


def _time(fn, state_fn, args, repeats):
  state = fn(state_fn(), *args)[0]
  jax.block_until_ready(state.params)
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    state = fn(state, *args)[0]
    jax.block_until_ready(state.params)
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def measure(config, repeats: int) -> dict:
  setup = train.Setup(config)
  n_max = setup.clients.mask.shape[1]
  store = device_data.place(setup.clients)
  key = jax.random.key(0)
  host_rd, ids_rd = setup.round_data(0), setup.round_data(0, clients=False)
  body = setup._bodies(setup.settings, None)[0]   # the run's round
  ways = {
      "host": (setup.round_fn, (host_rd, key)),
      "store, whole round": (jax.jit(device_data.with_gather(body, n_max, per_chunk=False),
                                     donate_argnums=0), (ids_rd, store, key)),
      "store, per chunk": (setup.device_round_fn, (ids_rd, store, key)),
  }
  out = dict(clients_per_round=config.fl.clients_per_round, chunk=setup.chunk, n_max=n_max,
             mean_rows=float(setup.clients.num_examples.mean()),
             store_mb=device_data.store_mb(setup.clients), ways={})
  for name, (fn, args) in ways.items():
    mem = fn.lower(setup.initial_state(), *args).compile().memory_analysis()
    out["ways"][name] = dict(args_mb=mem.argument_size_in_bytes / 2 ** 20,
                             temp_mb=mem.temp_size_in_bytes / 2 ** 20,
                             round_s=_time(fn, setup.initial_state, args, repeats))
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", required=True)
  parser.add_argument("--clients", default="30,100,300")
  parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--json", default="")
  args = parser.parse_args()
  report = dict(command="python experiments/bench/round_memory.py " + " ".join(sys.argv[1:]),
                device=jax.devices()[0].device_kind, cpus=os.cpu_count(),
                load=os.getloadavg(), date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                rows=[])
  for m in (int(v) for v in args.clients.split(",")):
    config = cli.load_config(args.config)
    cli.apply_overrides(config, args.set)
    config.fl.clients_per_round = m
    config.data.num_clients = max(m, config.data.num_clients)
    config.fl.device_data = "on"
    row = measure(config, args.repeats)
    report["rows"].append(row)
    print(f"M={m} chunk {row['chunk']} n_max {row['n_max']} (mean {row['mean_rows']:.1f} rows), "
          f"store {row['store_mb']:.1f} MB")
    for name, w in row["ways"].items():
      print(f"  {name:<20} args {w['args_mb']:8.2f} MB  temp {w['temp_mb']:8.2f} MB  "
            f"round {w['round_s'] * 1e3:8.1f} ms")
  report["load_after"] = os.getloadavg()
  if args.json:
    with open(args.json, "w") as f:
      json.dump(report, f, indent=1)


if __name__ == "__main__":
  main()
