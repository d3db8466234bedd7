"""The round of an earlier commit against today's, side by side in one process.

    python experiments/bench/before_after.py --config configs/default.py \
        --rev 0efdd41 [--masks config,top2] [--repeats 5] [--config.fl.backprop_cut=True]

The earlier ``client``, ``aggregate`` and ``federated`` modules are read with
``git show REV:...`` into a temporary package (their imports of each other
rewritten to it; everything else is today's), both rounds are built from the
same ``train.Setup`` (same clients, data, masks as data, no re-selection, no
diagnostics) and timed alternately: median seconds, the ratio, XLA's memory
analysis of each compiled round and the process's peak RSS during each.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags
from ml_collections import config_flags
import jax
import numpy as np

from fedsel_jax import bench
from fedsel_jax import client as client_lib
from fedsel_jax import round_programs
from fedsel_jax import timing
from fedsel_jax import train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.")
_REV = flags.DEFINE_string("rev", "HEAD~1", "The earlier commit.")
_MASKS = flags.DEFINE_list("masks", ["config", "top2"], "Mask kinds (fedsel_jax.bench).")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed rounds per side.")
_JSON = flags.DEFINE_string("json", "", "Also write the results here.")
MODULES = ("client", "aggregate", "federated")


def load_old(rev: str):
  """The ``federated`` module of ``rev`` (with its own client/aggregate)."""
  root = tempfile.mkdtemp(prefix="fedsel_old_")
  pkg = os.path.join(root, "fedsel_old")
  os.makedirs(pkg)
  open(os.path.join(pkg, "__init__.py"), "w").close()
  for name in MODULES:
    src = subprocess.run(["git", "show", f"{rev}:fedsel_jax/{name}.py"], check=True,
                         capture_output=True, text=True).stdout
    for other in MODULES:
      src = src.replace(f"from fedsel_jax import {other}", f"from fedsel_old import {other}")
    with open(os.path.join(pkg, f"{name}.py"), "w") as f:
      f.write(src)
  sys.path.insert(0, root)
  return importlib.import_module("fedsel_old.federated")


def side(setup, round_fn, rd, masks, key, repeats):
  make_state, rd = bench.given_masks_inputs(setup, rd, masks)
  dev_rd = jax.device_put(rd)
  t0 = time.perf_counter()
  compiled = round_fn.lower(make_state(), dev_rd, key).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  return dict(compiled=compiled, make_state=make_state, rd=dev_rd, compile_s=compile_s,
              xla_temp_mb=mem.temp_size_in_bytes / 2 ** 20, times=[], peak_rss_mb=0.)


def run_alternating(sides, key, repeats):
  for _ in range(repeats + 1):        # the first pass is a warm-up
    for s in sides.values():
      state = s["make_state"]()
      timing._clear_peak_rss()
      t0 = time.perf_counter()
      jax.block_until_ready(s["compiled"](state, s["rd"], key)[0].params)
      s["times"].append(time.perf_counter() - t0)
      s["peak_rss_mb"] = max(s["peak_rss_mb"], timing._peak_rss_mb())
  for s in sides.values():
    s["times"] = s["times"][1:]
    s["median_s"] = float(np.median(s["times"]))


def main(_):
  config = _CONFIG.value
  old = load_old(_REV.value)
  setup = train.Setup(config)
  loss_fn = client_lib.make_loss_fn(setup.spec.module.apply)
  # Today's round is built without diagnostics when they are their own
  # program (round_programs.py): build the old one the same way.
  today = round_programs.round_settings(setup.settings)
  old_round = jax.jit(old.make_round_fn(loss_fn, setup.index, setup.k, setup.client_opt,
                                        setup.server_opt, setup.costs,
                                        old.RoundSettings(**{
                                            f.name: getattr(today, f.name)
                                            for f in dataclasses.fields(old.RoundSettings)})),
                      donate_argnums=0)
  rd = setup.round_data(0)
  key = jax.random.key(config.seed)
  out = dict(rev=_REV.value, load=os.getloadavg(), settings=vars(setup.settings), rows=[])
  for kind in _MASKS.value:
    masks = bench.bench_masks(setup, kind, rd, key)
    sides = {"before": side(setup, old_round, rd, masks, key, _REPEATS.value),
             "after": side(setup, setup.round_fn, rd, masks, key, _REPEATS.value)}
    run_alternating(sides, key, _REPEATS.value)
    row = dict(masks=kind, ratio_before_over_after=sides["before"]["median_s"]
               / sides["after"]["median_s"])
    for name, s in sides.items():
      row[name] = {k: s[k] for k in ("median_s", "times", "compile_s", "xla_temp_mb",
                                     "peak_rss_mb")}
    out["rows"].append(row)
    print(f"masks={kind}: before {row['before']['median_s']:.3f} s "
          f"(compile {row['before']['compile_s']:.1f} s, XLA temp "
          f"{row['before']['xla_temp_mb']:.0f} MB, peak RSS {row['before']['peak_rss_mb']:.0f} MB)"
          f"  after {row['after']['median_s']:.3f} s (compile {row['after']['compile_s']:.1f} s, "
          f"XLA temp {row['after']['xla_temp_mb']:.0f} MB, peak RSS "
          f"{row['after']['peak_rss_mb']:.0f} MB)  before/after "
          f"{row['ratio_before_over_after']:.2f}x", flush=True)
  out["load_after"] = os.getloadavg()
  print(f"load {out['load']} -> {out['load_after']}")
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(out, f, indent=2, default=float)


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(main)
