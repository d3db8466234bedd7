"""``fl.client_chunk='auto'``: the largest chunk whose compiled round fits in memory.

A round vmaps ``client_chunk`` clients at a time (``chunks.scan_client_chunks``);
memory grows with the chunk, speed too (up to the device's width). ``'auto'``
picks, among the divisors of ``clients_per_round`` (a divisor needs no padding
slot, and a padding slot costs a whole client's compute), the largest whose
compiled round needs at most the budget, as XLA's memory analysis of the
compiled program counts it: arguments + outputs + temporaries - donated
(aliased) buffers. It compiles the divisors from the largest down until one
fits (memory is not monotone in the chunk for small models); a measurement is
kept for the process (per settings, shapes and chunk), and the chosen round
compiles once more when it runs.

The budget:

* ``'auto'``: half of the device's memory (``memory_stats()['bytes_limit']``
  on GPU/TPU; the host's physical memory on CPU);
* ``'auto:F'``: the fraction ``F`` in (0, 1] of it;
* ``'auto:NMB'``: ``N`` megabytes (2**20 bytes).

It sizes one run's round; a sweep's vmapped members (``--run_chunk``) multiply
it.
"""

from __future__ import annotations

import os
import re
from typing import Callable

import jax

from fedsel_jax.errors import ConfigError

AUTO = "auto"
_FORM = re.compile(r"^auto(?::(?:(?P<mb>\d+(?:\.\d*)?)MB|(?P<frac>\d*\.?\d+)))?$")
_MEASURED: dict = {}   # (cache key, chunk) -> compiled round MB


def is_auto(value) -> bool:
  return isinstance(value, str) and value.startswith(AUTO)


def check(field: str, value) -> None:
  """Validation rule: an integer >= 0 (0 = every sampled client at once) or an auto form."""
  if isinstance(value, str):
    match = _FORM.match(value)
    frac = match and match.group("frac")
    if match and (frac is None or 0 < float(frac) <= 1) and (
        match.group("mb") is None or float(match.group("mb")) > 0):
      return
    raise ConfigError(f"{field} must be an integer >= 0, 'auto', 'auto:F' with F in (0, 1] "
                      f"or 'auto:NMB' with N > 0, got {value!r}")
  if isinstance(value, bool) or not isinstance(value, int) or value < 0:
    raise ConfigError(f"{field} must be an integer >= 0 or 'auto', got {value!r}")


def device_memory_mb() -> tuple[float, str]:
  """(MB, what it is) of the first local device: its memory limit, or the host's RAM."""
  device = jax.local_devices()[0]
  try:
    stats = device.memory_stats() or {}
  except (AttributeError, NotImplementedError, RuntimeError):
    stats = {}
  if stats.get("bytes_limit"):
    return stats["bytes_limit"] / 2**20, f"{device.device_kind} memory"
  total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  return total / 2**20, "host memory"


def budget_mb(value: str) -> tuple[float, str]:
  """(MB, description) of the memory budget an auto form names."""
  match = _FORM.match(value)
  if match.group("mb") is not None:
    mb = float(match.group("mb"))
    return mb, f"{mb:.0f} MB"
  frac = float(match.group("frac") or 0.5)
  total, what = device_memory_mb()
  return frac * total, f"{frac:g} x {what} ({total:.0f} MB)"


def compiled_mb(compiled) -> float:
  """Peak bytes XLA's memory analysis gives a compiled program, in MB."""
  m = compiled.memory_analysis()
  total = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
           - m.alias_size_in_bytes)
  return total / 2**20


def divisors(m: int, multiple_of: int = 1) -> list[int]:
  """Ascending divisors of ``m`` that are multiples of ``multiple_of``."""
  return [c for c in range(1, m + 1) if m % c == 0 and c % multiple_of == 0]


def choose(candidates: list[int], measure: Callable[[int], float], limit_mb: float
           ) -> tuple[int | None, dict[int, float]]:
  """The largest candidate whose ``measure`` (MB) is at most ``limit_mb``;
  None if none fits. Returns it and every measurement taken.

  Scans from the largest down and stops at the first fit: memory is not
  monotone in the chunk (a tiny model's chunk of 2 can need more than its
  chunk of 4: the scan's carries and the compiled program's temporaries
  differ), so no candidate is skipped on a guess.
  """
  measured: dict[int, float] = {}
  for c in sorted(candidates, reverse=True):
    measured[c] = measure(c)
    if measured[c] <= limit_mb:
      return c, measured
  return None, measured


def resolve(value: str, m: int, measure: Callable[[int], float], cache_key,
            multiple_of: int = 1) -> tuple[int, str]:
  """The chunk for ``fl.client_chunk=value`` and a one-line report.

  Args:
    value: the auto form.
    m: clients per round.
    measure: chunk -> compiled round MB.
    cache_key: hashable description of everything else the round depends on.
    multiple_of: chunks must be multiples of this (the device count when the
      client axis is sharded).

  Raises:
    ConfigError: not even the smallest chunk fits the budget.
  """
  limit, what = budget_mb(value)
  candidates = divisors(m, multiple_of)
  if not candidates:
    raise ConfigError(f"fl.client_chunk={value!r}: no chunk size divides "
                      f"fl.clients_per_round={m} and is a multiple of the {multiple_of} devices")

  def cached(chunk: int) -> float:
    if (cache_key, chunk) not in _MEASURED:
      _MEASURED[cache_key, chunk] = measure(chunk)
    return _MEASURED[cache_key, chunk]

  chunk, measured = choose(candidates, cached, limit)
  sizes = ", ".join(f"{c}: {mb:.0f} MB" for c, mb in sorted(measured.items()))
  if chunk is None:
    raise ConfigError(f"fl.client_chunk={value!r}: even a chunk of {min(measured)} client(s) "
                      f"needs {measured[min(measured)]:.0f} MB, above the budget of {what}; "
                      "lower fl.batch_size or data.max_len, or raise the budget ('auto:NMB')")
  return chunk, (f"fl.client_chunk={value}: {chunk} of {m} clients per chunk (compiled round, "
                 f"MB by chunk: {sizes}; budget {limit:.0f} MB = {what})")
