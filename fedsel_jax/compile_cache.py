"""JAX's persistent compilation cache for the commands (reruns start warm).

A round with ``fl.backprop_cut`` compiles one client-update variant per cut
level, which makes its first call several times slower than the round
without the cut (``experiments/bench/README.md``). The commands
(``fedsel_jax.main``, ``fedsel_jax.sweep``) therefore turn on JAX's own
persistent cache: a rerun, a resume, or another member of a sweep with the
same shapes loads the compiled executables from disk instead of compiling
them again. Results do not depend on it (a cached executable is the same
program), so it is a flag of the command, not a config field, and it is not
part of a run's fingerprint.

Where it lives, first match wins:

* ``--compilation_cache=DIR`` on the command line (``none`` turns it off);
* ``JAX_COMPILATION_CACHE_DIR`` (JAX's own variable; left alone);
* ``FEDSEL_JAX_COMPILATION_CACHE`` (``none`` turns it off);
* ``~/.cache/fedsel_jax/xla``.
"""

from __future__ import annotations

import os

ENV = "FEDSEL_JAX_COMPILATION_CACHE"
DEFAULT = os.path.join("~", ".cache", "fedsel_jax", "xla")
OFF = ("none", "off", "")


def resolve(flag: str | None) -> str | None:
  """The cache directory the flag and environment ask for, or None (off)."""
  if flag is not None:
    return None if flag.strip().lower() in OFF else os.path.expanduser(flag)
  if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return os.environ["JAX_COMPILATION_CACHE_DIR"]
  if ENV in os.environ:
    value = os.environ[ENV]
    return None if value.strip().lower() in OFF else os.path.expanduser(value)
  return os.path.expanduser(DEFAULT)


def enable(flag: str | None = None, min_compile_seconds: float = 1.0) -> str | None:
  """Points JAX's persistent cache at ``resolve(flag)``; returns the directory.

  ``None`` from ``resolve`` turns JAX's cache off, also when
  ``JAX_COMPILATION_CACHE_DIR`` had turned it on at import. Executables
  that took less than ``min_compile_seconds`` to compile are not written
  (JAX's own threshold; small jits are cheaper to recompile than to load).
  A directory that cannot be created or written turns the cache off with a
  warning instead of failing the run: the cache only saves time.
  """
  import jax
  from jax.experimental.compilation_cache import compilation_cache
  path = resolve(flag)
  if path is not None:
    try:
      os.makedirs(path, exist_ok=True)
      if not os.access(path, os.W_OK):
        raise PermissionError(13, "not writable")
    except OSError as e:
      print(f"warning: compilation cache off ({path}: {e.strerror or e})", flush=True)
      path = None
  jax.config.update("jax_enable_compilation_cache", path is not None)
  jax.config.update("jax_compilation_cache_dir", path)
  if path is not None and "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_seconds))
  # JAX sets its cache up at the first compile of the process; one that came
  # before this call (a test, an earlier run in the process) would otherwise
  # keep the old setting.
  compilation_cache.reset_cache()
  return path
