"""Command line: ``python -m fedsel_jax.main --config configs/NAME.py[:ARG] --workdir DIR``.

Any config field can be overridden: ``--config.selection.lam=0.1``. Rerunning
the same command on an existing DIR resumes from its newest intact
checkpoint; another config on the same DIR is refused (``--restart`` moves the
old run aside and starts over). ``--check_only`` validates everything (config,
data, model, one traced round) and exits without training. Compiled rounds go
to JAX's persistent cache (``--compilation_cache=DIR``, default
``~/.cache/fedsel_jax/xla``, ``none`` turns it off; ``compile_cache.py``), so a
rerun or resume of the same config skips the compile.

What a user gets (never a traceback):

* bad input, missing data, a workdir in use or holding another run: one
  ``error: ...`` line, exit code 2, before any compute;
* ``fl.max_bad_rounds`` rounds in a row without a finite update: one
  ``error: training diverged ...`` line, exit code 3, the checkpoints intact
  (a loss that blows up but stays finite: one ``warning:`` line, no stop);
* SIGINT / SIGTERM: ``interrupted at round r; rerun the same command to
  resume``, exit code 130 / 143;
* an I/O failure (disk full, permission): one ``error:`` line naming the
  path, exit code 2, earlier checkpoints intact;
* anything else is a bug: one ``error: internal error ...`` line naming the
  file that holds the traceback, exit code 1.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import traceback

USAGE = ("usage: python -m fedsel_jax.main --config configs/NAME.py[:ARG] --workdir DIR "
         "[--restart] [--check_only] [--compilation_cache DIR|none] [--jax_distributed "
         "[--coordinator_address HOST:PORT --num_processes P --process_id I]] "
         "[--config.FIELD=VALUE ...]")
FLAGS = {"config": True, "workdir": True, "restart": False, "check_only": False, "help": False,
         "jax_distributed": False, "coordinator_address": True, "num_processes": True,
         "process_id": True, "compilation_cache": True}
DISTRIBUTED = ("coordinator_address", "num_processes", "process_id")


def run(config, workdir: str, restart: bool = False, quiet: bool = False) -> list[dict]:
  """Runs the configured strategy and each of ``config.compare_strategies``.

  Every run's config is validated, its set-up built (the data- and
  model-dependent checks: budgets against the model's layers, the
  partition, ...) and then every workdir claimed (locked and checked against
  its fingerprint) before the first one computes, so a config that fails a
  check writes nothing and ``--restart`` moves nothing aside.
  """
  from fedsel_jax import datasets
  from fedsel_jax import multihost
  from fedsel_jax import plotting
  from fedsel_jax import train

  from fedsel_jax import probe

  quiet = quiet or not multihost.is_primary()
  entries = table_entries(config)
  configs = strategy_configs(config)
  for c in configs:
    datasets.check_available(c.data)
  subs = [workdir if i == 0 else os.path.join(workdir, "compare", e.replace(":", "_"))
          for i, e in enumerate(entries)]
  # The first run's set-up is kept; the others are built for their checks and
  # dropped (rebuilt in turn), so one set-up at a time holds memory.
  setups = [make_setup(configs[0])] + [None] * (len(configs) - 1)
  for c in configs[1:]:
    make_setup(c)
  locks = []
  try:
    for c, sub in zip(configs, subs):
      locks.append(train.claim_workdir(c, sub, restart=restart and not locks, quiet=quiet))
    results = []
    for i, (e, c, sub, lock) in enumerate(zip(entries, configs, subs, locks)):
      if not quiet:
        print(f"== {e}: {sub}", flush=True)
      setup, setups[i] = setups[i] or make_setup(c), None   # freed after its run
      if e == "probe":
        final = probe.train_and_evaluate(setup, sub, quiet=quiet)
      else:
        final = train.train_and_evaluate(c, sub, setup=setup, quiet=quiet, lock=lock)
      results.append(dict(final, workdir=sub))
  finally:
    for lock in locks:
      lock.release()
  if multihost.is_primary():   # the other processes of a multi-process run write nothing
    if not quiet:
      print(plotting.results_table(results), flush=True)
    plotting.write_plots([workdir], workdir)   # finds the compare runs under workdir
  return results


def table_entries(config) -> list[str]:
  """The main strategy, then each compare_strategies entry not equal to it."""
  return [config.selection.strategy] + [
      s for s in config.compare_strategies if s != config.selection.strategy]


def strategy_configs(config) -> list:
  """The validated config of the main run and of each compared strategy."""
  from fedsel_jax import train
  configs = []
  for entry in table_entries(config):
    c = config.copy_and_resolve_references()
    with c.unlocked():
      _set_entry(c, entry)
    train.validate_config(c)
    configs.append(c)
  return configs


def _set_entry(c, entry: str) -> None:
  """One table row's config: a strategy, 'local:<strategy>' (the local-only
  baseline) or 'probe' (fedsel_jax/probe.py, on the main run's model and
  data). A row that uses no adapters (a strategy other than 'lora' without
  model.lora.within_selection) runs the plain model: the LoRA settings of a
  'lora' run do not leak into it."""
  if entry.startswith("local:"):
    c.fl.local_only, c.selection.strategy = True, entry[len("local:"):]
  elif entry != "probe":
    c.selection.strategy = entry
  if c.selection.strategy != "lora" and not c.model.lora.within_selection:
    c.model.lora.rank = 0


def make_setup(config):
  """``train.Setup`` with its data- and model-dependent checks as ConfigError."""
  from fedsel_jax import errors
  from fedsel_jax import train
  try:
    return train.Setup(config)
  except errors.UserError:
    raise
  except ValueError as e:   # partition, budgets, costs: checked before any round
    raise errors.ConfigError(str(e)) from e


def check_only(config) -> None:
  """Validates every run and traces one round of each (no compile, no training)."""
  import jax
  for c in strategy_configs(config):
    setup = make_setup(c)
    key = jax.random.key(c.seed)
    from fedsel_jax import round_programs
    if setup.uses_store:   # the programs training runs: the in-graph gather from the store
      from fedsel_jax import device_data
      round_programs.trace(setup.device_round_fn, setup.device_diagnose_fn, setup.initial_state(),
                           setup.round_data(0, clients=False), key,
                           (device_data.flat_store(setup.clients),))
    else:   # and the diagnostics' own program, where there is one
      round_programs.trace(setup.round_fn, setup.diagnose_fn, setup.initial_state(),
                           setup.round_data(0), key)
  print("ok: the config is valid and a round traces", flush=True)


def parse(argv: list[str]):
  """(config, workdir, restart, check_only) from the arguments, or ConfigError."""
  from fedsel_jax import cli
  from fedsel_jax import errors
  from fedsel_jax import validate
  values, overrides = cli.parse_command(argv, FLAGS, USAGE)
  if values.get("workdir") is None and not values.get("check_only"):
    raise errors.ConfigError(f"--workdir is required; {USAGE}")
  config = cli.load_config(values["config"])
  cli.apply_overrides(config, overrides)
  validate.validate_config(config)
  distributed = _distributed_args(values, config)
  from fedsel_jax import compile_cache
  compile_cache.enable(values.get("compilation_cache"))
  return config, values.get("workdir"), bool(values.get("restart")), bool(
      values.get("check_only")), distributed


def _distributed_args(values: dict, config) -> dict | None:
  """``jax.distributed.initialize`` arguments of ``--jax_distributed``, or None."""
  from fedsel_jax import errors
  given = [f for f in DISTRIBUTED if values.get(f) is not None]
  if not values.get("jax_distributed"):
    if given:
      raise errors.ConfigError(f"--{given[0]} needs --jax_distributed")
    return None
  if not config.fl.get("shard_clients", False):
    raise errors.ConfigError("--jax_distributed needs --config.fl.shard_clients=True (the client "
                             "axis is what the processes share)")
  args = {"coordinator_address": values.get("coordinator_address")}
  for f in ("num_processes", "process_id"):
    v = values.get(f)
    if v is not None:
      try:
        args[f] = int(v)
      except ValueError:
        raise errors.ConfigError(f"--{f} must be an integer, got {v!r}") from None
  if "num_processes" in args and args["num_processes"] < 1:
    raise errors.ConfigError(f"--num_processes must be >= 1, got {args['num_processes']}")
  if "process_id" in args and not 0 <= args["process_id"] < args.get("num_processes", 2**31):
    raise errors.ConfigError(f"--process_id must be in [0, --num_processes), got "
                             f"{args['process_id']}")
  return args


def _crash_log(workdir: str | None) -> str:
  text = traceback.format_exc()
  for folder in (workdir, tempfile.gettempdir()):
    if not folder:
      continue
    path = os.path.join(folder, f"crash-{time.strftime('%Y%m%d-%H%M%S')}.log")
    try:
      os.makedirs(folder, exist_ok=True)
      with open(path, "w") as f:
        f.write(text)
      return path
    except OSError:
      continue
  return "(no writable folder for it)"


def main(argv: list[str] | None = None) -> int:
  """The command; returns the exit code (see the module docstring)."""
  argv = sys.argv[1:] if argv is None else argv
  from fedsel_jax import errors
  from fedsel_jax import signals
  workdir = None
  try:
    with signals.handle_signals():
      _quiet_libraries()
      config, workdir, restart, only_check, distributed = parse(argv)
      if distributed is not None:
        from fedsel_jax import multihost
        multihost.initialize(**distributed)
      if only_check:
        check_only(config)
      else:
        run(config, workdir, restart=restart)
    return 0
  except errors.UserError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    return e.exit_code
  except errors.Interrupted as e:
    where = f"at round {e.round_idx}" if e.round_idx is not None else "before the first round"
    print(f"interrupted {where}; rerun the same command to resume", file=sys.stderr, flush=True)
    return e.exit_code
  except OSError as e:
    path = e.filename or workdir or "?"
    print(f"error: cannot read or write {path}: {e.strerror or e}", file=sys.stderr, flush=True)
    return 2
  except Exception as e:   # a bug: one line, the traceback in a file
    log = _crash_log(workdir)
    print(f"error: internal error {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
          f" (a bug; traceback in {log})", file=sys.stderr, flush=True)
    return 1


def _quiet_libraries() -> None:
  from absl import logging
  logging.set_verbosity(logging.WARNING)   # keep library INFO chatter off the console
  try:
    import tensorflow_datasets as tfds
  except ImportError:     # runs on synthetic data need no TFDS (an accelerator image)
    return
  tfds.disable_progress_bar()


if __name__ == "__main__":
  sys.exit(main())
