"""Command line: ``python -m fedsel_jax.main --config configs/NAME.py[:ARG] --workdir DIR``.

Any config field can be overridden: ``--config.selection.lam=0.1``. Rerunning
the same command on an existing DIR resumes from its last checkpoint. Bad
input (an unknown name, an impossible budget, missing data) ends with one
``error: ...`` line and exit code 2 before any compute.
"""

from __future__ import annotations

import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/NAME.py[:ARG]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where metrics, plots and checkpoints go.")


def run(config, workdir: str) -> list[dict]:
  """Runs the configured strategy and each of ``config.compare_strategies``."""
  from fedsel_jax import plotting
  from fedsel_jax import train

  strategies = [config.selection.strategy] + [
      s for s in config.compare_strategies if s != config.selection.strategy]
  configs = []
  for s in strategies:   # validate every run before the first one computes
    c = config.copy_and_resolve_references()
    c.unlock()
    c.selection.strategy = s
    train.validate_config(c)
    configs.append(c)
  results = []
  for i, c in enumerate(configs):
    sub = workdir if i == 0 else os.path.join(workdir, "compare", c.selection.strategy)
    print(f"== {c.selection.strategy}: {sub}", flush=True)
    try:   # everything Setup checks (partition, budgets, costs) comes before compute
      setup = train.Setup(c)
    except ValueError as e:
      raise train.ConfigError(str(e)) from e
    results.append(dict(train.train_and_evaluate(c, sub, setup=setup), workdir=sub))
  print(plotting.results_table(results), flush=True)
  plotting.write_plots([workdir], workdir)   # finds the compare runs under workdir
  return results


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)   # keep library INFO chatter off the console
  import tensorflow_datasets as tfds
  tfds.disable_progress_bar()
  if _CONFIG.value is None or _WORKDIR.value is None:
    print("error: --config and --workdir are required, e.g. "
          "--config configs/default.py --workdir runs/default", file=sys.stderr)
    sys.exit(2)
  from fedsel_jax import train
  from fedsel_jax.datasets.base import DataMissingError
  try:
    run(_CONFIG.value, _WORKDIR.value)
  except (train.ConfigError, DataMissingError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
