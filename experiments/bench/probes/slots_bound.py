"""What per-client trainable slots could save at most, on the flagship round.

Slots (issue #13's "one direction") would give each client of a chunk
optimizer state, gradients and updated copies of the chunk's union of
selected blocks only, instead of every block of the chunk's cut variant
(its lowest selected block up to the top). Their best case is a client
update compiled for exactly that union: ``client.make_client_update(
blocks=union)`` trains the union's blocks and the head, back-propagates
through the blocks between them for input gradients only, and holds no
state for the others. This probe times, chunk by chunk of a round on the
bench's masks, the update the round runs (the chunk's cut variant with the
kernel-gradient gates) against that ideal, alternately in one process, and
reports XLA's FLOPs and temp memory of each. Slots themselves would add a
gather of the slot parameters and a scatter of their deltas on top of the
ideal, so the ratio bounds what they can buy.

    PYTHONPATH=. python experiments/bench/probes/slots_bound.py \
        --config configs/default.py --config.fl.backprop_cut=True \
        --config.fl.client_chunk=2 --config.fl.grad_gates=True --masks random,config
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time

from absl import app
from absl import flags
from ml_collections import config_flags
import jax
import jax.numpy as jnp
import numpy as np

from fedsel_jax import bench
from fedsel_jax import client as client_lib
from fedsel_jax import federated
from fedsel_jax import train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.")
_MASKS = flags.DEFINE_list("masks", ["random", "config"], "Mask kinds (fedsel_jax.bench).")
_REPEATS = flags.DEFINE_integer("repeats", 7, "Alternated calls per chunk and side.")
_JSON = flags.DEFINE_string("json", "", "Also write the results here.")


def chunks_of(setup, rd: dict, masks: np.ndarray):
  """[(variant blocks, union blocks, chunk data, chunk masks)] as train_step groups them."""
  parts = federated.make_round_parts(client_lib.make_loss_fn(setup.spec.module.apply),
                                    setup.index, setup.k, setup.client_opt, setup.costs,
                                    setup.settings)
  valid = np.asarray(rd["valid"])
  weights = np.where(valid, rd["num_examples"], 0).astype(np.float32)
  order = np.asarray(federated.group_order(jnp.asarray(masks), jnp.asarray(valid)))
  chunk, table = parts.chunk_size(valid.shape[0]), parts.variant_table()
  out = []
  for start in range(0, valid.shape[0], chunk):
    sl = order[start:start + chunk]
    if not valid[sl].any():
      continue
    v = int(federated.pick_variant(table, jnp.asarray(masks[sl]), jnp.asarray(weights[sl])))
    union = tuple(int(b) for b in np.flatnonzero((masks[sl] & valid[sl, None]).any(0)))
    data = {f: jnp.asarray(np.asarray(rd[f])[sl]) for f in ("x", "y", "mask", "num_examples")}
    out.append((tuple(parts.variants[v]), union, data, jnp.asarray(masks[sl])))
  return out


def update_fn(setup, blocks, gate: bool):
  s = setup.settings
  return jax.jit(jax.vmap(client_lib.make_client_update(
      client_lib.make_loss_fn(setup.spec.module.apply), setup.client_opt, setup.index,
      local_steps=s.local_steps, batch_size=s.batch_size, blocks=blocks,
      dense_delta=False, gate=gate), in_axes=(None, 0, 0, 0)))


def compiled_stats(fn, args) -> dict:
  c = fn.lower(*args).compile()
  cost = c.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  mem = c.memory_analysis()
  return dict(gflops_per_step_loop=float(cost["flops"]) / 1e9,
              temp_mb=mem.temp_size_in_bytes / 2 ** 20 if mem is not None else None)


def probe_kind(setup, kind: str, rd: dict, key, repeats: int) -> dict:
  masks = bench.bench_masks(setup, kind, rd, key)
  rows, cache = [], {}
  for variant, union, data, mk in chunks_of(setup, rd, masks):
    keys = jax.random.split(key, mk.shape[0])
    sides = {}
    for name, blocks, gate in (("round", variant, True), ("ideal", union, False)):
      if (blocks, gate) not in cache:
        cache[blocks, gate] = update_fn(setup, blocks, gate)
      fn = cache[blocks, gate]
      args = (setup.params, data, mk, keys)
      stats = compiled_stats(fn, args)
      jax.block_until_ready(fn(*args))   # compile + warm
      sides[name] = dict(fn=fn, args=args, stats=stats, times=[])
    for _ in range(repeats):
      for side in sides.values():
        t0 = time.perf_counter()
        jax.block_until_ready(side["fn"](*side["args"]))
        side["times"].append(time.perf_counter() - t0)
    rows.append(dict(variant=list(variant), union=list(union),
                     **{f"{n}_s": statistics.median(s["times"]) for n, s in sides.items()},
                     **{f"{n}_{k}": v for n, s in sides.items() for k, v in s["stats"].items()}))
    print(f"  {kind}: variant {variant} union {union}: round {rows[-1]['round_s']:.3f} s, "
          f"ideal {rows[-1]['ideal_s']:.3f} s, temp {rows[-1]['round_temp_mb']:.0f} -> "
          f"{rows[-1]['ideal_temp_mb']:.0f} MB", flush=True)
  total = {n: sum(r[f"{n}_s"] for r in rows) for n in ("round", "ideal")}
  return dict(masks=kind, chunks=rows, round_s=total["round"], ideal_s=total["ideal"],
              ratio=total["round"] / total["ideal"])


def main(argv) -> None:
  del argv
  setup = train.Setup(_CONFIG.value)
  rd = setup.round_data(0)
  key = jax.random.key(_CONFIG.value.seed)
  report = dict(platform=platform.platform(), jax=jax.__version__, load=os.getloadavg(),
                date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                kinds=[probe_kind(setup, k, rd, key, _REPEATS.value) for k in _MASKS.value],
                load_after=os.getloadavg())
  for r in report["kinds"]:
    print(f"{r['masks']}: chunks' updates {r['round_s']:.3f} s as the round runs them, "
          f"{r['ideal_s']:.3f} s with state for the chunk's union only: "
          f"slots could save at most {100 * (1 - 1 / r['ratio']):.1f}%")
  print(f"load {report['load']} -> {report['load_after']}")
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(report, f, indent=1)


if __name__ == "__main__":
  app.run(main)
