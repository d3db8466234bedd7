"""The federation's training data on the device once; rounds gather in-graph.

Without this, every round gathers its sampled clients' padded arrays on the
host (``ClientArrays.take``) and copies them to the device: ``Mp x n_max``
rows per round, where ``n_max`` is the largest client of the federation, so
the copy grows with the largest client, not with the average one.

Here the set-up places one *flat store* on the device: every client's real
rows, concatenated (no padding at all), with each client's offset and count.
A round passes only its slot ids; inside the jitted round each chunk of
``client_chunk`` clients gathers its own padded ``[C, n_max]`` rows when the
chunk scan reaches it (``chunks.Deferred``), so the whole round's
``[Mp, n_max]`` arrays never exist. Row ``j`` of client ``i``
is its real row ``j mod n_i``, exactly the rule of ``data.pad_clients``
(``np.resize``), so the rebuilt arrays equal the host ones bit for bit; a
run gives the same numbers either way on XLA:CPU (``tests/test_device_data.py``;
on an accelerator the two are different programs, which XLA may fuse
differently).

Storage waste is zero (the store holds each real row once); what remains is
one chunk's transient padding at a time, ``C x n_max`` rows; the host path's
round arrays hold ``Mp x n_max`` rows against the sampled clients' real
rows, which :func:`padding_report` states. The round's own
computation does not grow with it: a client update reads ``tau x B`` rows.

``fl.device_data``: ``'auto'`` (the store on the device when it fits
``fl.device_data_max_mb``, otherwise host gathers, said in one line), ``'on'``,
``'off'``. The training loop of a run (``Setup.train_round``) uses it; runs
that shard the client axis over devices or processes (``fl.shard_clients``)
keep the host path (their round data is a global array laid out over the
client mesh), and so do vmapped sweep groups, the bench and
``fl.client_chunk='auto'``, which sizes the host-data round.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from fedsel_jax.chunks import Deferred
from fedsel_jax.data import ClientArrays
from fedsel_jax.errors import ConfigError

MODES = ("auto", "on", "off")
FIELDS = ("x", "y", "mask", "num_examples")


def flat_store(clients: ClientArrays) -> dict[str, np.ndarray]:
  """Host arrays of the store: ``x [T, ...]``, ``y [T]``, ``offsets``, ``counts`` int32[N]."""
  counts = np.asarray(clients.num_examples, np.int32)
  offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int32)
  real = clients.mask   # real rows first, in order: row-major selection concatenates them
  return dict(x=clients.x[real], y=clients.y[real], offsets=offsets, counts=counts)


def store_mb(clients: ClientArrays) -> float:
  """Device megabytes the flat store takes."""
  rows = int(np.sum(clients.num_examples))
  per_row = clients.x[0, 0].nbytes + clients.y[0, 0].nbytes
  return (rows * per_row + 8 * clients.num_clients) / 2 ** 20


def gather(store: dict, slots: jax.Array, n_max: int) -> dict[str, jax.Array]:
  """The padded round arrays of ``slots`` (int[Mp]; ids >= N are padding slots).

  Equals ``ClientArrays.take(minimum(slots, N - 1))``: padding slots repeat
  the last client, as on the host.
  """
  n = store["counts"].shape[0]
  ids = jnp.minimum(slots, n - 1)
  counts = store["counts"][ids]
  j = jnp.arange(n_max, dtype=jnp.int32)
  rows = store["offsets"][ids][:, None] + j[None, :] % counts[:, None]
  return dict(x=store["x"][rows], y=store["y"][rows], mask=j[None, :] < counts[:, None],
              num_examples=counts)


@dataclasses.dataclass(frozen=True)
class StoreRows:
  """``Deferred.build`` of one field: the padded rows of ``field`` for a chunk's slots."""

  field: str
  n_max: int

  def __call__(self, store: dict, slots: jax.Array) -> jax.Array:
    return gather(store, slots, self.n_max)[self.field]


def with_gather(round_fn: Callable, n_max: int, per_chunk: bool = True) -> Callable:
  """``fn(state, round_data, store, *rest)``: ``round_fn(state, round_data', *rest)``
  on in-graph gathered data (a round's ``rest`` is its key; the separate
  diagnostics' is ``masks, aggregated, key, round_idx``).

  ``round_data`` is ``Setup.round_data(t, clients=False)``: the host round
  data without x, y and mask (its ``num_examples`` is replaced by the
  store's); ``store`` is the device store (:func:`place`). ``per_chunk``:
  x and y are gathered chunk by chunk inside the round's scans (False: the
  whole round's ``[Mp, n_max]`` rows up front, the reference the tests
  compare with).
  """

  def on_store(first, rd: dict, store: dict, *rest):
    ids = rd["client_ids"]
    small = gather(store, ids, n_max)           # XLA drops its unused x and y rows
    if not per_chunk:
      return round_fn(first, dict(rd, **small), *rest)
    rows = {f: Deferred(ids, store, StoreRows(f, n_max)) for f in ("x", "y")}
    return round_fn(first, dict(rd, mask=small["mask"], num_examples=small["num_examples"],
                                **rows), *rest)

  on_store.__name__ = f"{getattr(round_fn, '__name__', 'round_fn')}_on_store"
  return on_store


def place(clients: ClientArrays) -> dict[str, Any]:
  """The store on the default device (once, at set-up)."""
  return jax.device_put(flat_store(clients))


def wanted(mode: str, clients: ClientArrays, max_mb: float, sharded: bool) -> tuple[bool, str]:
  """(use the device store, why not if not) for ``fl.device_data=mode``."""
  if mode == "off":
    return False, ""
  if sharded:
    return False, "fl.shard_clients: the round data is a global array over the client mesh"
  mb = store_mb(clients)
  if mode == "auto" and mb > max_mb:
    return False, (f"its {mb:.0f} MB exceed fl.device_data_max_mb={max_mb:g}; rounds gather "
                   "on the host")
  return True, ""


def padding_report(clients: ClientArrays, clients_per_round: int, slots: int) -> dict[str, float]:
  """What the store and a round's padded arrays hold against the real rows.

  ``round_rows_over_real``: expected ``slots x n_max`` over the expected real
  rows of ``clients_per_round`` uniformly sampled clients.
  """
  counts = np.asarray(clients.num_examples, np.float64)
  n_max = clients.mask.shape[1]
  return dict(real_rows=float(counts.sum()), store_rows=float(counts.sum()),
              rectangle_rows=float(len(counts) * n_max), n_max=float(n_max),
              mean_rows=float(counts.mean()),
              round_rows_over_real=float(slots * n_max / (clients_per_round * counts.mean())),
              store_mb=store_mb(clients))


def population_data(config, clients: ClientArrays, chunk: int) -> dict | None:
  """Every client's data on the device once, for ``diagnostics.population``.

  Rule: the padded arrays (N rounded up to the round's chunk, x n_max
  examples) must fit ``diagnostics.population_max_mb``; the gradient pass
  streams them in chunks like a round (docs/diagnostics.md).
  """
  d = config.diagnostics
  if not (d.enabled and d.population):
    return None
  n, m = clients.num_clients, config.fl.clients_per_round
  chunk = min(chunk, m) if chunk > 0 else m  # the round's chunk
  slots = -(-n // chunk) * chunk
  mb = slots * sum(a[0].nbytes for a in (clients.x, clients.y, clients.mask)) / 2 ** 20
  if mb > d.population_max_mb:
    raise ConfigError(f"diagnostics.population must be False for this federation: its padded "
                      f"data ({slots} clients x {clients.x.shape[1]} examples) takes {mb:.0f} MB, "
                      f"above diagnostics.population_max_mb={d.population_max_mb}")
  pad = np.minimum(np.arange(slots), n - 1)
  counts = np.where(np.arange(slots) < n, clients.num_examples[pad], 0).astype(np.int32)
  return jax.device_put(dict(x=clients.x[pad], y=clients.y[pad], num_examples=counts,
                             client_ids=np.arange(slots, dtype=np.int32)))
