"""Config files and ``--config.FIELD=VALUE`` overrides, parsed without tracebacks.

``load_config('configs/NAME.py[:ARG]')`` runs the file's ``get_config(ARG)``;
``apply_overrides(config, ['selection.lam=0.1', ...])`` sets fields the way
``ml_collections.config_flags`` does, but every mistake (an unknown field, a
value of the wrong type, a file that does not exist) is a
:class:`~fedsel_jax.errors.ConfigError` whose message names the field, the
value and what is allowed. The training command and the sweep command share
this module.

Values are read as the type of the field they replace: ``int`` fields take
integers, ``float`` fields any number (``1e-3``, ``inf``), ``bool`` fields
``true/false/1/0``, ``str`` fields the text as given, tuple fields a Python
literal (``"('head','top')"``) or a comma-separated list.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import os
import sys
from typing import Any, Iterable

import ml_collections

from fedsel_jax.errors import ConfigError

_BOOLS = {"true": True, "false": False, "1": True, "0": False}
# Fields that take an integer or one of these string forms (validate.py checks the form).
_INT_OR_TEXT = {"fl.client_chunk": "auto"}


def load_config(spec: str) -> ml_collections.ConfigDict:
  """The ConfigDict of ``path[:arg]`` (``get_config(arg)`` of the file at path)."""
  path, sep, arg = spec.partition(":")
  if not path.endswith(".py"):
    raise ConfigError(f"--config must be a configs/NAME.py[:ARG] file, got {spec!r}")
  if not os.path.isfile(path):
    raise ConfigError(f"--config file {path!r} does not exist "
                      f"(relative paths start at {os.getcwd()})")
  module_spec = importlib.util.spec_from_file_location("fedsel_config", path)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except Exception as e:  # a broken config file is the user's to fix: name it
    raise ConfigError(f"--config file {path!r} failed to load: {type(e).__name__}: {e}") from e
  if not hasattr(module, "get_config"):
    raise ConfigError(f"--config file {path!r} has no get_config(arg) function")
  try:
    config = module.get_config(arg) if sep else module.get_config()
  except ValueError as e:
    raise ConfigError(f"--config argument {arg!r} of {path}: {e}") from e
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f"--config file {path!r}: get_config must return a ConfigDict")
  return config


def field_names(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  """Every leaf field of ``config`` as a dotted name, in declaration order."""
  names = []
  for key, value in config.items():
    name = f"{prefix}{key}"
    if isinstance(value, ml_collections.ConfigDict):
      names.extend(field_names(value, name + "."))
    else:
      names.append(name)
  return names


def _unknown(field: str, config: ml_collections.ConfigDict) -> ConfigError:
  close = difflib.get_close_matches(field, field_names(config), n=1, cutoff=0.6)
  hint = f"; did you mean {close[0]!r}?" if close else ""
  return ConfigError(f"unknown config field {field!r}{hint}")


def get_field(config: ml_collections.ConfigDict, field: str) -> Any:
  """The value of dotted ``field``; ConfigError naming it if it does not exist."""
  node = config
  for part in field.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      raise _unknown(field, config)
    node = node[part]
  return node


def parse_value(field: str, text: str, current: Any) -> Any:
  """``text`` read as the type of ``current`` (the field's value now)."""
  def wrong(kind: str) -> ConfigError:
    return ConfigError(f"--config.{field}={text} is not {kind} (the field is "
                       f"{type(current).__name__}, e.g. {current!r})")

  if isinstance(current, ml_collections.ConfigDict):
    names = sorted(current.keys()) or ["FIELD"]
    raise ConfigError(f"--config.{field}={text}: {field} is a group of fields, not a value; "
                      f"set one of them, e.g. --config.{field}.{names[0]}=... (fields: "
                      f"{', '.join(names)})")
  prefix = _INT_OR_TEXT.get(field)
  if prefix and text.strip().startswith(prefix):
    return text.strip()
  if prefix and isinstance(current, str):
    current = 0
  if isinstance(current, bool):
    if text.strip().lower() not in _BOOLS:
      raise wrong("true or false")
    return _BOOLS[text.strip().lower()]
  if isinstance(current, int):
    try:
      return int(text)
    except ValueError:
      raise wrong("an integer" + (f" or {prefix!r}" if prefix else "")) from None
  if isinstance(current, float):
    try:
      return float(text)
    except ValueError:
      raise wrong("a number") from None
  if isinstance(current, str):
    return text
  if isinstance(current, (tuple, list)):
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = tuple(v.strip() for v in text.split(",") if v.strip())
    if isinstance(value, (str, int, float)):
      value = (value,)
    if not isinstance(value, (tuple, list)):
      raise wrong("a tuple")
    return tuple(value)
  if current is None:
    try:
      return ast.literal_eval(text)
    except (ValueError, SyntaxError):
      return text
  raise wrong(type(current).__name__)


def set_field(config: ml_collections.ConfigDict, field: str, value: Any) -> None:
  """Sets dotted ``field`` (which must exist) to ``value`` (already typed)."""
  get_field(config, field)   # raises for unknown fields
  *parents, last = field.split(".")
  node = config
  for part in parents:
    node = node[part]
  with node.unlocked():
    if field in _INT_OR_TEXT and type(node[last]) is not type(value):
      del node[last]   # ConfigDict keeps a field's type: int <-> text needs a fresh field
    try:
      node[last] = value
    except TypeError as e:
      raise ConfigError(f"config field {field} cannot take {value!r}: {e}") from None


def apply_overrides(config: ml_collections.ConfigDict, overrides: Iterable[str]) -> None:
  """Applies ``FIELD=VALUE`` strings in order (``FIELD`` dotted, no prefix)."""
  for item in overrides:
    field, sep, text = item.partition("=")
    if not sep or not field:
      raise ConfigError(f"--config.{item}: expected --config.FIELD=VALUE")
    set_field(config, field, parse_value(field, text, get_field(config, field)))


def parse_command(argv: list[str], flags: dict[str, bool], usage: str,
                  required: Iterable[str] = ("config",)) -> tuple[dict[str, Any], list[str]]:
  """:func:`split_argv` for a command: ``--help`` prints ``usage`` and exits 0,
  and each flag in ``required`` must be given (ConfigError naming it)."""
  values, overrides = split_argv(argv, flags)
  if values.get("help"):
    print(usage)
    sys.exit(0)
  for name in required:
    if not values.get(name):
      raise ConfigError(f"--{name} is required; {usage}")
  return values, overrides


def split_argv(argv: list[str], flags: dict[str, bool]) -> tuple[dict[str, Any], list[str]]:
  """Splits ``argv`` into named flags and ``--config.FIELD=VALUE`` overrides.

  Args:
    argv: the arguments without the program name.
    flags: flag name -> whether it takes a value (``False``: a switch).
      ``--name=value`` and ``--name value`` both work; a flag given twice
      keeps its last value, except those listed in ``flags`` as taking a
      value whose name ends in ``[]``, which collect every occurrence.

  Returns:
    (flag values, overrides) with overrides as ``FIELD=VALUE`` strings.
  """
  values: dict[str, Any] = {name.rstrip("[]"): [] for name in flags if name.endswith("[]")}
  overrides: list[str] = []
  takes = {name.rstrip("[]"): v for name, v in flags.items()}
  args = list(argv)
  while args:
    arg = args.pop(0)
    if not arg.startswith("--"):
      raise ConfigError(f"unexpected argument {arg!r}: arguments are --flag=value")
    name, sep, value = arg[2:].partition("=")
    if name.startswith("config."):
      if not sep:
        if not args:
          raise ConfigError(f"{arg} needs a value: {arg}=VALUE")
        value = args.pop(0)
      overrides.append(f"{name[len('config.'):]}={value}")
      continue
    if name not in takes:
      close = difflib.get_close_matches(name, list(takes), n=1)
      hint = f"; did you mean --{close[0]}?" if close else ""
      raise ConfigError(f"unknown flag --{name}{hint} (flags: "
                        f"{', '.join('--' + n for n in takes)}, --config.FIELD=VALUE)")
    if not takes[name]:
      if sep:
        if value.lower() not in _BOOLS:
          raise ConfigError(f"--{name} is a switch; got --{name}={value}")
        values[name] = _BOOLS[value.lower()]
      else:
        values[name] = True
      continue
    if not sep:
      if not args or args[0].startswith("--"):
        raise ConfigError(f"--{name} needs a value")
      value = args.pop(0)
    if isinstance(values.get(name), list):
      values[name].append(value)
    else:
      values[name] = value
  return values, overrides
