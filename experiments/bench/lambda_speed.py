"""Round speed against the consistency weight lambda: agreeing clients share chunks.

    python experiments/bench/lambda_speed.py --config configs/default.py \
        --config.fl.backprop_cut=True --config.fl.client_chunk=2 --config.fl.grad_gates=True \
        --lams 0,0.05,0.3,1 --repeats 3 --json experiments/bench/results/lambda_speed_flagship.json

One process, one compiled round: for each lambda, round 0's masks are what
the config's own selection (scores + P1 with that lambda; lambda is data)
picks for round 0's clients; the round on those masks (training,
aggregation, server step; as ``fedsel_jax.bench`` times it) is timed against
the authors' PyTorch pattern on the same masks (``torch_peer.py``, 2
threads), with XLA's executed FLOPs against the analytic need. Agreement is
reported as the number of distinct masks and the mean number of blocks in a
chunk's union (what a gated, cut chunk computes weight gradients for).
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app
from absl import flags
from ml_collections import config_flags
import jax
import jax.numpy as jnp
import numpy as np

from fedsel_jax import bench
from fedsel_jax import federated
from fedsel_jax import flops
from fedsel_jax import train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.")
_LAMS = flags.DEFINE_list("lams", ["0", "0.05", "0.3", "1"], "Lambdas.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed rounds per lambda.")
_THREADS = flags.DEFINE_integer("torch_threads", 2, "Threads of the torch peer.")
_JSON = flags.DEFINE_string("json", "", "Also write the results here.")


def chunk_unions(setup, rd: dict, masks: np.ndarray) -> float:
  """Mean blocks in the union of a chunk's masks, chunks as ``train_step`` groups them."""
  valid = np.asarray(rd["valid"])
  order = np.asarray(federated.group_order(jnp.asarray(masks), jnp.asarray(valid))) \
      if setup.settings.backprop_cut \
      else np.arange(len(valid))
  chunk = setup.settings.client_chunk or len(valid)
  m = masks[order]
  return float(np.mean([m[s:s + chunk].any(0).sum() for s in range(0, len(m), chunk)]))


def main(_):
  config = _CONFIG.value
  setup = train.Setup(config)
  peer = bench.load_peer(os.path.join(os.path.dirname(__file__), "torch_peer.py"))
  rd0 = setup.round_data(0)
  key = jax.random.key(config.seed)
  out = dict(command="python experiments/bench/lambda_speed.py " + " ".join(sys.argv[1:]),
             date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), cpus=os.cpu_count(),
             load=os.getloadavg(), settings=vars(setup.settings),
             torch=None if peer is None else peer.version(), rows=[])
  for lam in (float(x) for x in _LAMS.value):
    rd = dict(rd0, lam=np.float32(lam))
    masks = bench.bench_masks(setup, "config", rd, key)
    valid = np.asarray(rd["valid"])
    row = dict(lam=lam, distinct_masks=len({m.tobytes() for m in masks[valid]}),
               mean_blocks=float(masks[valid].sum(1).mean()),
               mean_chunk_union=chunk_unions(setup, rd, masks))
    row["round"], _ = bench.project_round(setup, rd, masks, key, _REPEATS.value)
    if peer is not None:
      row["torch"] = bench.timed(peer.make_round(setup, rd, masks, threads=_THREADS.value),
                                 max(1, _REPEATS.value - 1))
      row["speedup_over_torch"] = row["torch"]["median_s"] / row["round"]["median_s"]
    row["executed_flops"] = flops.executed_round_flops(flops.counting_parts(setup),
                                                       setup.params, rd, masks)
    row["needed_flops"] = flops.needed_round_flops(setup, rd, masks)
    out["rows"].append(row)
    print(f"lambda={lam}: {row['distinct_masks']} distinct masks, chunk union "
          f"{row['mean_chunk_union']:.2f} blocks, round {row['round']['median_s']:.3f} s"
          + (f", torch {row['torch']['median_s']:.3f} s ({row['speedup_over_torch']:.2f}x)"
             if peer is not None else "")
          + f", executed/needed {row['executed_flops'] / row['needed_flops']:.2f}x", flush=True)
  out["load_after"] = os.getloadavg()
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(out, f, indent=2, default=float)


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(main)
