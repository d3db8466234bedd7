"""Federated partitions, padded client arrays and client sampling.

Everything here is a pure function of its arguments and a seed: the same seed
gives the same partition, the same padded arrays and the same clients per
round on any machine.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from fedsel_jax.datasets.base import Dataset

PARTITIONS = ("iid", "dirichlet", "natural")


@dataclasses.dataclass(frozen=True)
class ClientArrays:
  """All clients' training data padded to one rectangle.

  Attributes:
    x: ``[N, n_max, ...]`` inputs; padded rows repeat real rows.
    y: int32 ``[N, n_max]`` labels.
    mask: bool ``[N, n_max]``; True for real examples (they come first).
    num_examples: int32 ``[N]`` real examples per client.
  """

  x: np.ndarray
  y: np.ndarray
  mask: np.ndarray
  num_examples: np.ndarray

  @property
  def num_clients(self) -> int:
    return len(self.num_examples)

  def take(self, ids: np.ndarray) -> dict[str, np.ndarray]:
    """The arrays of clients ``ids`` (int[M]) as a dict for ``round_fn``."""
    return dict(x=self.x[ids], y=self.y[ids], mask=self.mask[ids],
                num_examples=self.num_examples[ids])


def partition_iid(num_examples: int, num_clients: int, seed: int) -> list[np.ndarray]:
  """Shuffles ``range(num_examples)`` and cuts it into near-equal parts."""
  if num_clients > num_examples:
    raise ValueError(f"data.num_clients={num_clients} exceeds the {num_examples} "
                     "training examples")
  perm = np.random.default_rng(seed).permutation(num_examples)
  return [np.sort(p) for p in np.array_split(perm, num_clients)]


def partition_dirichlet(labels: np.ndarray, num_clients: int, alpha: float, seed: int,
                        min_size: int = 10, max_tries: int = 1000) -> list[np.ndarray]:
  """Label-skew partition: class c's examples split by ``Dirichlet(alpha)``.

  The usual recipe (Hsu et al. 2019; the paper's CIFAR-10 split): for every
  class draw client proportions from ``Dir(alpha * 1_N)``, cut that class's
  shuffled examples accordingly, and redraw everything until every client has
  at least ``min_size`` examples. Every example lands on exactly one client.

  Args:
    labels: int[n] class of each training example.
    num_clients: N.
    alpha: concentration > 0; small = skewed, large = near IID.
    seed: the only source of randomness.
    min_size: minimum examples per client.
    max_tries: redraws before giving up with a clear error.

  Returns:
    N sorted int arrays of example indices.
  """
  if not alpha > 0:
    raise ValueError(f"data.alpha must be > 0, got {alpha}")
  labels = np.asarray(labels)
  if num_clients * min_size > len(labels):
    raise ValueError(f"data.num_clients={num_clients} x data.min_client_size={min_size} "
                     f"exceeds the {len(labels)} training examples")
  rng = np.random.default_rng(seed)
  classes = np.unique(labels)
  for _ in range(max_tries):
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for c in classes:
      idx = rng.permutation(np.flatnonzero(labels == c))
      props = rng.dirichlet(np.full(num_clients, alpha))
      cuts = (np.cumsum(props)[:-1] * len(idx)).astype(int)
      for i, chunk in enumerate(np.split(idx, cuts)):
        parts[i].append(chunk)
    out = [np.sort(np.concatenate(p)) for p in parts]
    if min(len(p) for p in out) >= min_size:
      return out
  raise ValueError(f"could not give every one of data.num_clients={num_clients} clients "
                   f"data.min_client_size={min_size} examples with data.alpha={alpha} in "
                   f"{max_tries} draws; lower min_client_size or num_clients, or raise alpha")


def partition_natural(groups: np.ndarray, num_clients: int, seed: int) -> list[np.ndarray]:
  """One client per natural group (speaking role, domain, language).

  ``num_clients`` = 0 keeps every group; otherwise a group with many examples
  is cut IID into several clients so that there are ``num_clients`` in all,
  proportionally to group sizes (at least one client per group).
  """
  groups = np.asarray(groups)
  ids = np.unique(groups)
  members = [np.flatnonzero(groups == g) for g in ids]
  if num_clients in (0, len(ids)):
    return members
  if num_clients < len(ids):
    raise ValueError(f"data.num_clients={num_clients} is below the {len(ids)} natural "
                     "groups; use 0 (one client per group) or a larger number")
  sizes = np.array([len(m) for m in members], float)
  share = np.maximum(1, np.floor(sizes / sizes.sum() * num_clients)).astype(int)
  while share.sum() < num_clients:   # hand out the rest to the largest groups
    share[np.argmax(sizes / share)] += 1
  while share.sum() > num_clients:
    share[np.argmax(np.where(share > 1, share, 0))] -= 1
  rng = np.random.default_rng(seed)
  out = []
  for m, s in zip(members, share):
    out += [np.sort(p) for p in np.array_split(rng.permutation(m), s)]
  return out


def partition(dataset: Dataset, kind: str, num_clients: int, seed: int, *,
              alpha: float = 0.5, min_size: int = 10) -> list[np.ndarray]:
  """Dispatches to a partitioner by name (``config.data.partition``)."""
  if kind == "iid":
    return partition_iid(len(dataset.train_y), num_clients, seed)
  if kind == "dirichlet":
    return partition_dirichlet(dataset.train_y, num_clients, alpha, seed, min_size)
  if kind == "natural":
    if dataset.train_groups is None:
      raise ValueError(f"data.partition='natural' needs a dataset with natural groups; "
                       f"{dataset.name!r} has none (use 'iid' or 'dirichlet')")
    return partition_natural(dataset.train_groups, num_clients, seed)
  raise ValueError(f"data.partition must be one of {list(PARTITIONS)}, got {kind!r}")


def pad_clients(x: np.ndarray, y: np.ndarray, parts: list[np.ndarray],
                max_examples: int = 0, seed: int = 0) -> ClientArrays:
  """Gathers each client's examples into one padded rectangle.

  Args:
    x: ``[n, ...]`` all training inputs.
    y: int[n] labels.
    parts: per-client index arrays (from a partitioner).
    max_examples: cap per client (a seeded subsample keeps it pure); 0 = the
      largest client's size.
    seed: for the subsample.

  Returns:
    ClientArrays with ``n_max`` = min(largest client, max_examples). Padded
    rows repeat the client's own rows so that any gather stays in range and
    finite; ``mask`` marks the real ones.
  """
  rng = np.random.default_rng(seed)
  if max_examples:
    parts = [np.sort(rng.choice(p, max_examples, replace=False)) if len(p) > max_examples
             else p for p in parts]
  n_max = max(len(p) for p in parts)
  if min(len(p) for p in parts) == 0:
    raise ValueError("a client has no examples; check the partition settings")
  idx = np.stack([np.resize(p, n_max) for p in parts])
  counts = np.array([len(p) for p in parts], np.int32)
  mask = np.arange(n_max)[None, :] < counts[:, None]
  return ClientArrays(x=x[idx], y=np.asarray(y, np.int32)[idx], mask=mask,
                      num_examples=counts)


def sample_clients(seed: int, round_idx: int, num_clients: int,
                   clients_per_round: int) -> np.ndarray:
  """int32[M]: clients of round ``round_idx``, uniform without replacement.

  A pure function of ``(seed, round_idx)``: a resumed run samples the same
  clients as an uninterrupted one.
  """
  if clients_per_round > num_clients:
    raise ValueError(f"fl.clients_per_round={clients_per_round} exceeds "
                     f"data.num_clients={num_clients}")
  rng = np.random.default_rng([seed, round_idx, 0x5A4D])
  return np.sort(rng.choice(num_clients, clients_per_round, replace=False)).astype(np.int32)
