"""Timing and memory of the bench command's modes: wall clock of whole calls,
the process's RSS high-water mark, the device's peak memory, a measured
matmul peak, and alternated round/peer pairs (``fedsel_jax.bench``)."""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp


def _clear_peak_rss() -> None:
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")          # resets VmHWM (Linux >= 4.0)
  except OSError:
    pass


def _peak_rss_mb() -> float:
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) / 1024.
  except OSError:
    pass
  return float("nan")


def timed(fn: Callable[[], Any], repeats: int) -> dict[str, float]:
  """First call and the median/min/max of ``repeats`` further calls (seconds)."""
  _clear_peak_rss()
  t0 = time.perf_counter()
  jax.block_until_ready(fn())
  first = time.perf_counter() - t0
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return dict(first_s=first, median_s=statistics.median(times), min_s=min(times),
              max_s=max(times), peak_rss_mb=_peak_rss_mb())


def device_peak_mb() -> float | None:
  """JAX's peak device memory in use so far (MB), or None where the backend keeps
  no statistics (the CPU: the RSS stands for it there)."""
  stats = jax.devices()[0].memory_stats()
  if not stats or "peak_bytes_in_use" not in stats:
    return None
  return stats["peak_bytes_in_use"] / 2 ** 20


def peak_sizes() -> tuple[int, ...]:
  """Matrix sides for :func:`matmul_peak`: an accelerator needs large ones to peak."""
  return (1024, 2048) if jax.default_backend() == "cpu" else (4096, 8192)


def peak_method() -> str:
  """How :func:`matmul_peak` measures on this backend, for the report."""
  chain = 1 if jax.default_backend() == "cpu" else 8
  return (f"best of 5 calls of {chain} dependent product{'s' if chain > 1 else ''} "
          f"at sides {' and '.join(map(str, peak_sizes()))}, before and after the modes")


def matmul_peak(sizes: tuple[int, ...] = (1024, 2048), repeats: int = 5,
                dtype: str = "float32", chain: int | None = None) -> float:
  """Measured matmul FLOP/s of the default device in ``dtype`` (the model's
  compute dtype): the best of ``repeats`` timed calls at each size (a peak,
  so the fastest run, not the median: on a shared machine a median can fall
  below what the round itself reaches). Each call runs ``chain`` dependent
  products in one program (default 1 on the CPU, 8 on an accelerator, where
  one call's dispatch would otherwise be a few percent of a product)."""
  chain = chain or (1 if jax.default_backend() == "cpu" else 8)
  best = 0.
  for n in sizes:
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.dtype(dtype))
    b = (jax.random.normal(jax.random.key(1), (n, n)) / n ** 0.5).astype(dtype)  # keeps scale

    @jax.jit
    def mm(x, b):
      for _ in range(chain):
        x = x @ b
      return x

    res = timed(lambda: mm(a, b), repeats)
    best = max(best, chain * 2 * n ** 3 / res["min_s"])
  return best


def paired_ratio(round_thunks: list, peer_fn: Callable[[], Any], peer: str) -> dict:
  """Round and peer called alternately; ``peer seconds / round seconds`` per pair.

  A drift of the machine's speed during the run (a shared host) moves both
  sides of a pair alike, where the separate blocks of ``timed`` can land in
  different phases of it.
  """
  ratios = []
  for call in round_thunks:
    t0 = time.perf_counter()
    jax.block_until_ready(call())
    t1 = time.perf_counter()
    jax.block_until_ready(peer_fn())
    ratios.append((time.perf_counter() - t1) / (t1 - t0))
  return dict(peer=peer, ratios=ratios, median=statistics.median(ratios), min=min(ratios),
              max=max(ratios))
