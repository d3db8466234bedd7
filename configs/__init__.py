"""Experiment configs (ml_collections), one module per experiment.

``load_config('configs/NAME.py[:ARG]')`` loads one outside the CLI, the way
``--config`` of ``fedsel_jax.main`` does (scripts under experiments/ use it).
"""

import importlib.util


def load_config(spec: str):
  """The ConfigDict of ``path[:arg]``: ``get_config(arg)`` of the file at path."""
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("fedsel_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()
