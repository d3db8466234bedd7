"""What a sweep is: axes (``--sweep FIELD=V1,V2``), members and run groups.

Pure host-side logic, no JAX: parsing and checking the command line, the
cartesian product of the axes, each member's config and directory name, and
which members compile to the same program (a *run group*, trained as one
vmapped program by ``fedsel_jax.vmap_runs``).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from typing import Any

import ml_collections

# Fields that only change traced values or host-side round data, never the
# program: members that differ in these alone share one vmapped program.
# (Learning rates are traced by building the optimizers inside the trace;
# seeds, alpha and budgets change partitions and round data, whose example
# axis is padded to the group's largest client.)
RUN_AXIS_FIELDS = (
    "seed", "selection.lam", "client_optim.lr", "server_optim.lr", "data.alpha",
    "selection.budget.kind", "selection.budget.value", "selection.budget.low",
    "selection.budget.high", "selection.budget.mean", "selection.budget.std",
)


class SweepError(ValueError):
  """A --sweep / --baseline argument names an unknown field or a bad value."""


@dataclasses.dataclass(frozen=True)
class Axis:
  field: str
  values: tuple


@dataclasses.dataclass
class Member:
  """One run of the sweep: its field values, config and directory name."""

  values: dict[str, Any]
  config: ml_collections.ConfigDict
  name: str


def lookup(config: ml_collections.ConfigDict, field: str):
  """The value of a dotted ``field``; SweepError if the config has no such field."""
  node = config
  for part in field.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      raise SweepError(f"--sweep: unknown config field {field!r}")
    node = node[part]
  return node


def coerce(field: str, current, text: str):
  """``text`` as a value of the type of the field's default ``current``."""
  if isinstance(current, ml_collections.ConfigDict):
    raise SweepError(f"--sweep: {field!r} is a group of fields, not a field")
  if isinstance(current, bool):
    low = text.lower()
    if low not in ("true", "false", "1", "0"):
      raise SweepError(f"--sweep: {field} must be a bool (true/false), got {text!r}")
    return low in ("true", "1")
  if isinstance(current, int):
    try:
      return int(text)
    except ValueError:
      raise SweepError(f"--sweep: {field} must be an int, got {text!r}") from None
  if isinstance(current, float):
    try:
      value = float(text)
    except ValueError:
      raise SweepError(f"--sweep: {field} must be a float, got {text!r}") from None
    if not math.isfinite(value):
      raise SweepError(f"--sweep: {field} must be a finite float, got {text!r}")
    return value
  if isinstance(current, str):
    return text
  raise SweepError(f"--sweep: {field} holds a {type(current).__name__}; only int, float, "
                   "bool and str fields can be swept")


def parse_axis(spec: str, config: ml_collections.ConfigDict) -> Axis:
  """``'selection.lam=0,0.1'`` -> Axis('selection.lam', (0.0, 0.1))."""
  field, sep, raw = spec.partition("=")
  field = field.strip()
  if not sep or not field:
    raise SweepError(f"--sweep {spec!r} must look like FIELD=V1,V2,...")
  current = lookup(config, field)
  items = [v.strip() for v in raw.split(",")] if raw.strip() else []
  if not items or any(v == "" for v in items):
    raise SweepError(f"--sweep: {field} has an empty list of values ({spec!r})")
  values = tuple(coerce(field, current, v) for v in items)
  if len(set(values)) != len(values):
    raise SweepError(f"--sweep: {field} lists a value twice ({spec!r})")
  return Axis(field, values)


def parse_axes(specs: list[str], config: ml_collections.ConfigDict) -> list[Axis]:
  if not specs:
    raise SweepError("--sweep: give at least one FIELD=V1,V2,... (e.g. seed=0,1,2)")
  axes = [parse_axis(s, config) for s in specs]
  fields = [a.field for a in axes]
  for f in fields:
    if fields.count(f) > 1:
      raise SweepError(f"--sweep: {f} is swept twice")
  return axes


def parse_baseline(spec: str | None, axes: list[Axis],
                   config: ml_collections.ConfigDict) -> tuple[str, Any] | None:
  """``'selection.strategy=top'`` -> (field, value); the field must be swept."""
  if not spec:
    return None
  field, sep, raw = spec.partition("=")
  field = field.strip()
  axis = next((a for a in axes if a.field == field), None)
  if not sep or axis is None or field == "seed":
    raise SweepError(f"--baseline {spec!r} must be FIELD=VALUE with FIELD one of the swept "
                     f"fields other than seed {[a.field for a in axes if a.field != 'seed']}")
  value = coerce(field, lookup(config, field), raw.strip())
  if value not in axis.values:
    raise SweepError(f"--baseline: {field}={raw.strip()} is not among the swept values "
                     f"{list(axis.values)}")
  return field, value


def format_value(value) -> str:
  return repr(value) if isinstance(value, float) else str(value)


def member_name(values: dict[str, Any]) -> str:
  """The member's directory: ``field=value,field=value`` in --sweep order."""
  return ",".join(f"{f}={format_value(v)}" for f, v in values.items())


def set_field(config: ml_collections.ConfigDict, field: str, value) -> None:
  *path, last = field.split(".")
  node = config
  for part in path:
    node = node[part]
  node[last] = value


def make_members(config: ml_collections.ConfigDict, axes: list[Axis]) -> list[Member]:
  """The cartesian product of the axes, first axis slowest."""
  members = []
  for combo in itertools.product(*(a.values for a in axes)):
    values = dict(zip((a.field for a in axes), combo))
    c = config.copy_and_resolve_references()
    for f, v in values.items():
      try:
        set_field(c, f, v)
      except TypeError as e:
        raise SweepError(f"--sweep: {f}={format_value(v)}: {e}") from None
    members.append(Member(values, c, member_name(values)))
  return members


def _static_key(config: ml_collections.ConfigDict) -> str:
  """The config without its run-axis fields: equal keys = one program."""
  d = config.to_dict()
  for f in RUN_AXIS_FIELDS:
    *path, last = f.split(".")
    node = d
    for part in path:
      node = node[part]
    node.pop(last, None)
  return json.dumps(d, sort_keys=True, default=str)


def vmappable(config: ml_collections.ConfigDict) -> bool:
  """Whether a member may join a vmapped group (sharded or MILP-checked runs may not)."""
  return not (config.fl.get("shard_clients", False)
              or config.selection.get("check_exact", False))


def run_groups(members: list[Member], vmap: bool = True) -> list[list[Member]]:
  """Members in groups that compile to the same program, in sweep order."""
  if not vmap:
    return [[m] for m in members]
  groups: dict[str, list[Member]] = {}
  for i, m in enumerate(members):
    key = _static_key(m.config) if vmappable(m.config) else f"single-{i}"
    groups.setdefault(key, []).append(m)
  return list(groups.values())
