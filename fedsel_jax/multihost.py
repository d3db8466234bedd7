"""One run over several processes: JAX's multi-controller runtime, nothing home-made.

``python -m fedsel_jax.main ... --jax_distributed [--coordinator_address HOST:PORT
--num_processes P --process_id I]`` calls :func:`jax.distributed.initialize`
before anything else (without the three flags JAX detects them on TPU pods,
SLURM and the other clusters it knows). With ``fl.shard_clients=True`` every
chunk's client axis is then sharded over the devices of all processes (one
global mesh, ``round_programs.client_sharding``) and XLA turns the per-layer aggregation
sums into cross-process all-reduces.

Every process runs the same program on the same inputs: the round data is a
pure function of (seed, round), so each process builds it on the host and
passes it as a replicated array; the round's outputs are replicated
(``out_shardings``), so every process reads the metrics. Only process 0 (the
primary) touches the workdir: the lock, fingerprint, metrics, checkpoints,
final.json and figures; it prints, the others are quiet. A resumed run's
state and first round are read by the primary and broadcast to the others.
On CPU the cross-process collectives use gloo.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

PyTree = Any


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
  """``jax.distributed.initialize`` (gloo collectives for CPU processes)."""
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  kwargs = dict(coordinator_address=coordinator_address, num_processes=num_processes,
                process_id=process_id)
  jax.distributed.initialize(**{k: v for k, v in kwargs.items() if v is not None})


def is_primary() -> bool:
  """Whether this process writes files and prints (process 0, or a single process)."""
  return jax.process_index() == 0


def broadcast(tree: PyTree) -> PyTree:
  """The primary's value of ``tree`` on every process (as host arrays)."""
  if jax.process_count() == 1:
    return tree
  from jax.experimental import multihost_utils
  out = multihost_utils.broadcast_one_to_all(tree)
  return jax.tree_util.tree_map(np.asarray, out)


def barrier(name: str) -> None:
  """Every process waits here for the others (no-op in a single process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)
