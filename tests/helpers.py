"""Shared test helpers (fixtures live in conftest.py)."""

from configs import digits as digits_config


def smoke_config(data_dir, **overrides):
  """``configs/digits.py:smoke`` on ``data_dir`` with dotted-field overrides."""
  c = digits_config.get_config("smoke")
  c.data.data_dir = data_dir
  for k, v in overrides.items():
    node = c
    *path, last = k.split(".")
    for p in path:
      node = node[p]
    node[last] = v
  return c
