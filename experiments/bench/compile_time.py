"""First-call (trace + compile) time of a config's round, by variant set and with
JAX's persistent compilation cache, in one process.

    python experiments/bench/compile_time.py --config configs/default.py \
        [--levels all,0:4:5:6] [--json PATH]

For the round without backprop cut and with each listed set of cut levels
(``all`` = 0..K), it times ``jit(round_fn).lower(...).compile()``: (1) with
no persistent cache, then, for the last set, (2) into an empty persistent
cache directory and (3) again from that cache after ``jax.clear_caches()``
(what a rerun of the same config pays).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time

from absl import app
from absl import flags
from ml_collections import config_flags
import jax

from fedsel_jax import bench
from fedsel_jax import client as client_lib
from fedsel_jax import federated
from fedsel_jax import train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.")
_LEVELS = flags.DEFINE_list("levels", ["all"], "Cut-level sets: 'all' or levels joined by ':'.")
_JSON = flags.DEFINE_string("json", "", "Also write the results here.")


def compile_seconds(setup, settings, rd, key) -> float:
  fn = jax.jit(federated.make_round_fn(
      client_lib.make_loss_fn(setup.spec.module.apply), setup.index, setup.k, setup.client_opt,
      setup.server_opt, setup.costs, settings), donate_argnums=0)
  t0 = time.perf_counter()
  fn.lower(setup.initial_state(), rd, key).compile()
  return time.perf_counter() - t0


def main(_):
  config = _CONFIG.value
  setup = train.Setup(config)
  rd = dict(setup.round_data(0), diagnose=False)
  key = jax.random.key(0)
  base = dataclasses.replace(setup.settings, backprop_cut=False, cut_levels=())
  out = dict(load=os.getloadavg(), rows=[])
  runs = [("no cut", base)]
  for spec in _LEVELS.value:
    levels = () if spec == "all" else tuple(int(c) for c in spec.split(":"))
    runs.append((f"cut levels {spec}", dataclasses.replace(base, backprop_cut=True,
                                                           cut_levels=levels)))
  for name, settings in runs:
    jax.clear_caches()
    out["rows"].append(dict(variant=name, compile_s=compile_seconds(setup, settings, rd, key)))
    print(out["rows"][-1], flush=True)
  cache = tempfile.mkdtemp(prefix="fedsel_jax_cache_")
  jax.config.update("jax_compilation_cache_dir", cache)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  # The cache is set up once per process, at the first compile (which ran
  # without it above): make JAX set it up again with the directory.
  from jax._src import compilation_cache
  compilation_cache.reset_cache()
  name, settings = runs[-1]
  for what in ("cold persistent cache", "warm persistent cache"):
    jax.clear_caches()
    out["rows"].append(dict(variant=f"{name}, {what}",
                            compile_s=compile_seconds(setup, settings, rd, key)))
    out["rows"][-1]["cache_entries"] = len(os.listdir(cache))
    print(out["rows"][-1], flush=True)
  out["load_after"] = os.getloadavg()
  print(f"load {out['load']} -> {out['load_after']}")
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(out, f, indent=2)


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(main)
