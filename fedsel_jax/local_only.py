"""Local-only baseline and per-client held-out splits (SPEC.md, "Beyond the paper").

``fl.local_only=True``: every client fine-tunes the pretrained model alone,
with the layers its strategy and budget give it (a server-free strategy:
:data:`LOCAL_STRATEGIES`), for the same ``num_rounds x local_steps`` local
steps a federated client would be offered, and never aggregates. Round ``t``
of client ``i`` is exactly the federated ``client_update`` (fresh optimizer
state, the same minibatch and dropout keys as client ``i`` would draw in
round ``t`` of the federated run), applied to the client's own model.

``data.client_holdout = f > 0`` sets aside a seeded fraction ``f`` of every
client's examples (at least one of each client with two or more) before
training, for federated and local runs alike, so that both are scored on the
same per-client held-out rows next to the global test set.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from fedsel_jax import client as client_lib
from fedsel_jax import data as data_lib
from fedsel_jax import federated
from fedsel_jax import workdir as workdir_lib

PyTree = Any

# Strategies whose masks need no server (no scores, no P1).
LOCAL_STRATEGIES = ("full", "top", "bottom", "both", "head", "lora")
_HOLDOUT_STREAM = 0x401D


def split_parts(parts: list[np.ndarray], frac: float, seed: int
                ) -> tuple[list[np.ndarray], list[np.ndarray]]:
  """Splits each client's example indices into (train, held-out).

  Args:
    parts: per-client index arrays (from a partitioner).
    frac: share held out, 0 < frac < 1; rounded, at least 1 and at most
      ``n_i - 1`` examples for a client with ``n_i >= 2``.
    seed: run seed (own stream: partitions and budgets do not move).

  Returns:
    ``(train_parts, held_parts)``, sorted index arrays; a client with one
    example keeps it for training and holds none out.
  """
  rng = np.random.default_rng([seed, _HOLDOUT_STREAM])
  train, held = [], []
  for p in parts:
    n = len(p)
    h = 0 if n < 2 else min(n - 1, max(1, int(round(frac * n))))
    perm = rng.permutation(p)
    held.append(np.sort(perm[:h]))
    train.append(np.sort(perm[h:]))
  return train, held


def pad_holdout(x: np.ndarray, y: np.ndarray, held: list[np.ndarray],
                train: list[np.ndarray]) -> data_lib.ClientArrays:
  """Held-out rows padded like training data; a client without any gets
  ``num_examples`` 0 (its one padding row is a training row, never scored)."""
  parts = [h if len(h) else t[:1] for h, t in zip(held, train)]
  out = data_lib.pad_clients(x, y, parts)
  counts = np.array([len(h) for h in held], np.int32)
  return data_lib.ClientArrays(x=out.x, y=out.y, mask=out.mask & (counts[:, None] > 0),
                               num_examples=counts)


def client_accuracies(evaluate: Callable, params_of: Callable[[int], PyTree],
                      x: np.ndarray, y: np.ndarray, counts: np.ndarray) -> np.ndarray:
  """f64[N]: accuracy of ``params_of(i)`` on client i's first ``counts[i]`` rows
  of ``x[i], y[i]`` (NaN for a client with no rows)."""
  out = np.full(len(counts), np.nan)
  for i, n in enumerate(counts):
    if n:
      out[i] = evaluate(params_of(i), x[i, :n], y[i, :n])["accuracy"]
  return out


def spread(values: np.ndarray) -> dict[str, float]:
  """Mean, std (population), min, max over the finite entries."""
  v = np.asarray(values, np.float64)
  v = v[np.isfinite(v)]
  return {"mean": float(v.mean()), "std": float(v.std()), "min": float(v.min()),
          "max": float(v.max())}


def make_local_round(setup) -> Callable:
  """``local_round(params [C, ...], data, masks bool[C, K], keys [C]) -> (params, loss f32[C])``:
  one federated ``client_update`` per client on its own model, applied locally."""
  s = setup.settings
  cut = setup.k if s.strategy == "head" else 0
  update = client_lib.make_client_update(
      client_lib.make_loss_fn(setup.spec.module.apply), setup.client_opt, setup.index,
      local_steps=s.local_steps, batch_size=s.batch_size, cut=cut, unroll=s.unroll)

  def one(params, d, mask, key):
    res = update(params, d, mask, key)
    return jax.tree_util.tree_map(jnp.add, params, res.delta), res.loss

  return jax.jit(jax.vmap(one), donate_argnums=0)


def local_masks(setup, ids: np.ndarray) -> jax.Array:
  """bool[C, K]: the strategy's masks for clients ``ids`` under their budgets."""
  c = setup.config
  valid = jnp.ones(len(ids), bool)
  return federated.select_masks(setup.settings, None, jnp.asarray(setup.costs, jnp.float32),
                                jnp.asarray(setup.budgets[ids], jnp.float32),
                                jnp.float32(c.selection.lam), valid, jax.random.key(0),
                                jnp.asarray(ids, jnp.int32))


def train_clients(setup, ids: np.ndarray, clients: data_lib.ClientArrays | None = None,
                  local_round: Callable | None = None) -> tuple[PyTree, np.ndarray]:
  """Trains clients ``ids`` (one vmapped chunk) alone for all rounds.

  Returns:
    ``(params with a leading axis [C], mean training loss f32[C])``.
  """
  clients = clients or setup.clients
  c = setup.config
  local_round = local_round or make_local_round(setup)
  ids = np.asarray(ids, np.int32)
  data = clients.take(ids)
  masks = local_masks(setup, ids)
  params = jax.tree_util.tree_map(lambda p: jnp.broadcast_to(p, (len(ids),) + p.shape),
                                  setup.params)
  params = jax.tree_util.tree_map(jnp.copy, params)
  key = jax.random.key(c.seed)
  losses = []
  for t in range(c.fl.num_rounds):
    # The federated round's training key (federated.make_round_fn), per client id.
    train_key = jax.random.split(jax.random.fold_in(key, t), 3)[1]
    keys = jax.vmap(lambda i: jax.random.fold_in(train_key, i))(jnp.asarray(ids))
    params, loss = local_round(params, data, masks, keys)
    losses.append(np.asarray(loss))
  return params, np.mean(losses, axis=0)


def train_and_evaluate(setup, workdir: str, quiet: bool = False) -> dict[str, Any]:
  """Runs the local-only baseline of ``setup.config``; writes final.json and clients.csv."""
  os.makedirs(workdir, exist_ok=True)
  c = setup.config
  n = setup.clients.num_clients
  chunk = setup.chunk or n   # fl.client_chunk, resolved ('auto': the federated round's)
  local_round = make_local_round(setup)
  test_acc, held_acc, losses = np.zeros(n), np.full(n, np.nan), np.zeros(n)
  start = time.perf_counter()
  for lo in range(0, n, chunk):
    ids = np.arange(lo, min(lo + chunk, n))
    padded = np.resize(ids, chunk)   # one compiled shape; repeated clients are dropped
    params, loss = train_clients(setup, padded, local_round=local_round)
    of = lambda j: jax.tree_util.tree_map(lambda p: p[j], params)  # noqa: E731
    for j, i in enumerate(ids):
      test_acc[i] = setup.evaluate(of(j), setup.test_x, setup.test_y)["accuracy"]
      losses[i] = loss[j]
    if setup.holdout is not None:
      h = setup.holdout
      held_acc[ids] = client_accuracies(setup.evaluate, of, h.x[ids], h.y[ids],
                                        h.num_examples[ids])
    if not quiet:
      print(f"local-only {c.selection.strategy}: clients {lo}..{ids[-1]} of {n} done "
            f"({time.perf_counter() - start:.0f} s)", flush=True)
  seconds = time.perf_counter() - start
  final = {"strategy": f"local_{c.selection.strategy}", "rounds": c.fl.num_rounds,
           "test_accuracy": float(np.mean(test_acc)),
           "test_accuracy_std": float(np.std(test_acc)),
           "test_loss": float("nan"),
           "median_seconds_per_round": seconds / c.fl.num_rounds,
           "client_test_accuracy": spread(test_acc)}
  if setup.holdout is not None:
    final["client_holdout_accuracy"] = spread(held_acc)
  workdir_lib.write_final(workdir, final)
  with open(os.path.join(workdir, "clients.csv"), "w") as f:
    f.write("client,num_examples,train_loss,test_accuracy,holdout_accuracy\n")
    for i in range(n):
      f.write(f"{i},{setup.clients.num_examples[i]},{losses[i]:.6f},{test_acc[i]:.6f},"
              f"{held_acc[i]:.6f}\n")
  return final


def federated_holdout(setup, params: PyTree) -> dict[str, float] | None:
  """Spread of the global model's accuracy over the clients' held-out rows."""
  if setup.holdout is None:
    return None
  h = setup.holdout
  return spread(client_accuracies(setup.evaluate, lambda _: params, h.x, h.y, h.num_examples))
