"""Experiment configs (ml_collections), one module per experiment.

``load_config('configs/NAME.py[:ARG]')`` loads one outside the CLI, the way
``--config`` of ``fedsel_jax.main`` does (scripts under experiments/ use it).
"""


def load_config(spec: str):
  """The ConfigDict of ``path[:arg]``: ``get_config(arg)`` of the file at path.

  Raises ``fedsel_jax.errors.ConfigError`` (a ValueError) naming the file or
  argument that does not work.
  """
  from fedsel_jax import cli
  return cli.load_config(spec)
