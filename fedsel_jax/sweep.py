"""Command line: a sweep over any config fields, in one process.

    python -m fedsel_jax.sweep --config configs/digits.py --workdir runs/lam \
        --sweep selection.lam=0,0.01,0.1 --sweep seed=0,1,2 \
        [--sweep selection.strategy=proposed,top] [--config.FIELD=VALUE ...] \
        [--baseline selection.strategy=top] [--run_chunk 16] [--novmap]

runs the cartesian product of the ``--sweep`` values. Members that differ
only in run-axis fields (``sweep_spec.RUN_AXIS_FIELDS``: seed, lambda,
learning rates, alpha, budgets) train together as one vmapped program
(``vmap_runs``), ``--run_chunk`` runs at a time; the other members run one
after another through ``train.train_and_evaluate``. Every member writes what
a single run writes under ``DIR/<field=value,...>/``; rerunning the command
resumes every member from its last checkpoint. At the end it writes
``DIR/summary.csv`` and ``DIR/summary.md`` (``fedsel_jax.stats``) and the
figures (``fedsel_jax.plotting``). Bad input ends with one ``error: ...``
line and exit code 2 before any compute.
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from fedsel_jax import sweep_spec

HYPER_FIELDS = ("selection.lam", "client_optim.lr", "server_optim.lr")

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/NAME.py[:ARG]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "The sweep's directory (one subdirectory per "
                               "member).")
_SWEEP = flags.DEFINE_multi_string("sweep", [], "FIELD=V1,V2,... (repeat for more axes).")
_BASELINE = flags.DEFINE_string("baseline", None, "FIELD=VALUE: paired differences against "
                                "these members in summary.md.")
_RUN_CHUNK = flags.DEFINE_integer("run_chunk", 16, "Runs vmapped together at most (memory); "
                                  "0 = a whole group.")
_VMAP = flags.DEFINE_bool("vmap", True, "Vmap members that share a program (--novmap: one "
                          "after another, e.g. to compare).")


def _is_done(member: sweep_spec.Member, workdir: str) -> bool:
  """A member whose final.json exists and whose config.json is this config."""
  try:
    with open(os.path.join(workdir, "config.json")) as f:
      same = json.loads(f.read()) == json.loads(member.config.to_json_best_effort())
    with open(os.path.join(workdir, "final.json")) as f:
      return same and json.load(f)["rounds"] == member.config.fl.num_rounds
  except (OSError, ValueError, KeyError):
    return False


def prepare(config, specs: list[str], baseline: str | None):
  """Axes, members and baseline, every member's config validated (no compute)."""
  from fedsel_jax import train
  axes = sweep_spec.parse_axes(specs, config)
  base = sweep_spec.parse_baseline(baseline, axes, config)
  members = sweep_spec.make_members(config, axes)
  for m in members:
    try:
      train.validate_config(m.config)
    except train.ConfigError as e:
      raise train.ConfigError(f"{e} (member {m.name})") from e
  return axes, members, base


def _chunks(items: list, size: int) -> list[list]:
  """``items`` in near-equal chunks of at most ``size`` (0 = one chunk): few shapes."""
  parts = 1 if size <= 0 else -(-len(items) // size)
  bounds = np.linspace(0, len(items), parts + 1).round().astype(int)
  return [items[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


_DATASETS: dict[str, object] = {}   # data config (JSON) -> loaded dataset, reused by members


def _setup(member):
  from fedsel_jax import datasets
  from fedsel_jax import train
  key = member.config.data.to_json_best_effort(sort_keys=True)
  try:   # everything Setup checks (partition, budgets, costs) comes before compute
    if key not in _DATASETS:
      datasets.check_available(member.config.data)
      _DATASETS[key] = datasets.load_dataset(member.config.data)
    return train.Setup(member.config, dataset=_DATASETS[key])
  except ValueError as e:
    raise train.ConfigError(f"{e} (member {member.name})") from e


def run_group(group: list[sweep_spec.Member], workdir: str, run_chunk: int) -> None:
  """Trains a group's unfinished members: vmapped if more than one, else alone."""
  from fedsel_jax import train
  from fedsel_jax import vmap_runs
  todo = [m for m in group if not _is_done(m, os.path.join(workdir, m.name))]
  if not todo:
    return
  if len(group) == 1:
    m = todo[0]
    print(f"== {m.name}", flush=True)
    train.train_and_evaluate(m.config, os.path.join(workdir, m.name), setup=_setup(m))
    return
  setups = [_setup(m) for m in todo]
  # One shape for the whole group: pad every run's example axis to the largest.
  n_max = max(s.clients.mask.shape[1] for s in setups)
  # Runs that differ in lambda or learning rates alone see the same round data.
  shared = all(len({m.values[f] for m in group}) == 1 for f in group[0].values
               if f not in HYPER_FIELDS)
  runs_fn = vmap_runs.make_runs_fn(setups[0], shared_data=shared)
  for part in _chunks(list(zip(todo, setups)), run_chunk):
    print(f"== {len(part)} runs vmapped: {', '.join(m.name for m, _ in part)}", flush=True)
    vmap_runs.run_chunk([s for _, s in part], [os.path.join(workdir, m.name) for m, _ in part],
                        runs_fn, shared, n_max)


def run(config, workdir: str, specs: list[str], baseline: str | None = None,
        run_chunk: int = 16, vmap: bool = True) -> list[sweep_spec.Member]:
  """Runs (or resumes) every member, then writes the summary and the figures."""
  from fedsel_jax import plotting
  from fedsel_jax import stats
  axes, members, base = prepare(config, specs, baseline)
  groups = sweep_spec.run_groups(members, vmap=vmap)
  print(f"{len(members)} members in {len(groups)} program(s) -> {workdir}", flush=True)
  os.makedirs(workdir, exist_ok=True)
  t0 = time.perf_counter()
  for group in groups:
    run_group(group, workdir, run_chunk)
  print(f"trained in {time.perf_counter() - t0:.1f} s", flush=True)
  rows = stats.write_summary(workdir, axes, members, base)
  print(stats.markdown_summary(rows, axes, base), flush=True)
  plotting.write_sweep_plots(workdir)
  return members


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  import tensorflow_datasets as tfds
  tfds.disable_progress_bar()
  if _CONFIG.value is None or _WORKDIR.value is None:
    print("error: --config and --workdir are required, e.g. --config configs/digits.py "
          "--workdir runs/sweep --sweep seed=0,1,2", file=sys.stderr)
    sys.exit(2)
  from fedsel_jax import train
  from fedsel_jax.datasets.base import DataMissingError
  try:
    run(_CONFIG.value, _WORKDIR.value, _SWEEP.value, _BASELINE.value, _RUN_CHUNK.value,
        _VMAP.value)
  except (sweep_spec.SweepError, train.ConfigError, DataMissingError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
