"""Command line: a sweep over any config fields, in one process.

    python -m fedsel_jax.sweep --config configs/digits.py --workdir runs/lam \
        --sweep selection.lam=0,0.01,0.1 --sweep seed=0,1,2 \
        [--sweep selection.strategy=proposed,top] [--config.FIELD=VALUE ...] \
        [--baseline selection.strategy=top] [--run_chunk 16] [--sequential]

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

from fedsel_jax import sweep_spec

HYPER_FIELDS = ("selection.lam", "client_optim.lr", "server_optim.lr")
USAGE = ("usage: python -m fedsel_jax.sweep --config configs/NAME.py[:ARG] --workdir DIR "
         "--sweep FIELD=V1,V2,... [--sweep ...] [--baseline FIELD=VALUE] [--run_chunk N] "
         "[--sequential] [--compilation_cache DIR|none] [--config.FIELD=VALUE ...]")
FLAGS = {"config": True, "workdir": True, "sweep[]": True, "baseline": True, "run_chunk": True,
         "sequential": False, "help": False, "compilation_cache": True}


def _is_done(member: sweep_spec.Member, workdir: str) -> bool:
  """A finished member: this run's fingerprint (another run's raises) and final.json
  (or diverged.json: it stopped on fl.max_bad_rounds)."""
  from fedsel_jax import workdir as workdir_lib
  if os.path.exists(os.path.join(workdir, "diverged.json")):
    # Deterministic: rerunning a diverged member diverges again.
    return workdir_lib.check_fingerprint(workdir, member.config)
  if not os.path.exists(os.path.join(workdir, "final.json")):
    return False
  if not workdir_lib.check_fingerprint(workdir, member.config):
    return False
  with open(os.path.join(workdir, "final.json")) as f:
    return json.load(f).get("rounds") == member.config.fl.num_rounds \
        and workdir_lib.rounds_done(workdir) == member.config.fl.num_rounds


def prepare(config, specs: list[str], baseline: str | None):
  """Axes, members and baseline, every member's config validated (no compute)."""
  from fedsel_jax import errors
  from fedsel_jax import validate
  axes = sweep_spec.parse_axes(specs, config)
  base = sweep_spec.parse_baseline(baseline, axes, config)
  members = sweep_spec.make_members(config, axes)
  for m in members:
    try:
      validate.validate_config(m.config)
    except errors.ConfigError as e:
      raise errors.ConfigError(f"{e} (member {m.name})") from e
  return axes, members, base


def _chunks(items: list, size: int) -> list[list]:
  """``items`` in near-equal chunks of at most ``size`` (0 = one chunk): few shapes."""
  parts = 1 if size <= 0 else -(-len(items) // size)
  bounds = np.linspace(0, len(items), parts + 1).round().astype(int)
  return [items[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


_DATASETS: dict[str, object] = {}   # data config (JSON) -> loaded dataset, reused by members


def _setup(member):
  from fedsel_jax import datasets
  from fedsel_jax import errors
  from fedsel_jax import train
  key = member.config.data.to_json_best_effort(sort_keys=True)
  try:   # everything Setup checks (partition, budgets, costs) comes before compute
    if key not in _DATASETS:
      datasets.check_available(member.config.data)
      _DATASETS[key] = datasets.load_dataset(member.config.data)
    return train.Setup(member.config, dataset=_DATASETS[key])
  except errors.UserError:
    raise
  except ValueError as e:
    raise errors.ConfigError(f"{e} (member {member.name})") from e


def run_group(group: list[sweep_spec.Member], workdir: str, run_chunk: int,
              done: set[str]) -> None:
  """Trains a group's unfinished members: vmapped if more than one, else alone."""
  from fedsel_jax import errors
  from fedsel_jax import run_record
  from fedsel_jax import train
  from fedsel_jax import vmap_runs
  todo = [m for m in group if m.name not in done]
  if not todo:
    return
  if len(todo) == 1:
    m = todo[0]
    print(f"== {m.name}", flush=True)
    wd = os.path.join(workdir, m.name)
    try:
      train.train_and_evaluate(m.config, wd, setup=_setup(m))
    except errors.DivergedError as e:   # one member's divergence does not stop the sweep
      run_record.record_diverged(wd, e)
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
  # A member directory holding another run is refused here, before any compute,
  # and so is a member failing a data- or model-dependent check: nothing written.
  done = {m.name for m in members if _is_done(m, os.path.join(workdir, m.name))}
  for m in members:   # built for their checks and dropped: a group holds only its own
    if m.name not in done:
      _setup(m)
  print(f"{len(members)} members in {len(groups)} program(s) -> {workdir}", flush=True)
  os.makedirs(workdir, exist_ok=True)
  t0 = time.perf_counter()
  for group in groups:
    run_group(group, workdir, run_chunk, done)
  print(f"trained in {time.perf_counter() - t0:.1f} s", flush=True)
  rows = stats.write_summary(workdir, axes, members, base)
  print(stats.markdown_summary(rows, axes, base), flush=True)
  plotting.write_sweep_plots(workdir)
  return members


def parse(argv: list[str]):
  """(config, workdir, sweep specs, baseline, run_chunk, vmap) or ConfigError."""
  from fedsel_jax import cli
  from fedsel_jax import errors
  values, overrides = cli.parse_command(argv, FLAGS, USAGE, required=("config", "workdir"))
  config = cli.load_config(values["config"])
  cli.apply_overrides(config, overrides)
  try:
    run_chunk = int(values.get("run_chunk", 16))
  except ValueError:
    raise errors.ConfigError(f"--run_chunk must be an integer, got "
                             f"{values['run_chunk']!r}") from None
  from fedsel_jax import compile_cache
  compile_cache.enable(values.get("compilation_cache"))
  return (config, values["workdir"], values["sweep"], values.get("baseline"), run_chunk,
          not values.get("sequential", False))


def main(argv: list[str] | None = None) -> int:
  """The command; returns the exit code (bad input: one ``error:`` line, 2)."""
  from fedsel_jax import errors
  from fedsel_jax import main as main_lib
  from fedsel_jax import signals
  argv = sys.argv[1:] if argv is None else argv
  try:
    with signals.handle_signals():
      main_lib._quiet_libraries()
      run(*parse(argv))
    return 0
  except errors.UserError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    return e.exit_code
  except errors.Interrupted as e:
    print("interrupted; rerun the same command to resume", file=sys.stderr, flush=True)
    return e.exit_code


if __name__ == "__main__":
  sys.exit(main())
