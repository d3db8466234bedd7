"""Layer groups and layer masks over Flax parameter pytrees.

A model partitions its parameters into three kinds of *layer groups*
(SPEC.md, "Setting"):

* ``fixed``: never trained (embeddings, pre-LN, ...);
* ``common``: trained by every client every round, outside the budget (head);
* ``candidate``: the K groups that selection chooses among, ordered from the
  input to the output.

A group is named by path prefixes into the parameter tree: the path of a leaf
is its dict keys joined with ``/`` (``"block_3/attn/query/kernel"``); a prefix
matches whole components (``"block_1"`` matches ``"block_1/..."`` and not
``"block_10/..."``). Every leaf must belong to exactly one group.

Masks are data: a client's dense ``bool[K]`` mask becomes a pytree of scalar
booleans (one per leaf) via a static leaf -> group index table, so changing
masks never changes shapes and never recompiles.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any

FIXED = -2
COMMON = -1


@dataclasses.dataclass(frozen=True)
class LayerGroups:
  """Named parameter groups of a model.

  Attributes:
    candidates: ``((name, (prefix, ...)), ...)`` ordered input -> output.
    common: prefixes of parameters every client always trains.
    fixed: prefixes of parameters nobody trains.
    base: the prefixes of ``common`` that sit on the input side of the
      candidates (embeddings trained from scratch, :func:`train_fixed`).
      Training them makes every client's backward pass reach the bottom of
      the model whatever it selects; the cost model (``costs.py``) and the
      needed FLOPs (``flops.py``) read this, masks and aggregation do not.
  """

  candidates: tuple[tuple[str, tuple[str, ...]], ...]
  common: tuple[str, ...] = ()
  fixed: tuple[str, ...] = ()
  base: tuple[str, ...] = ()

  def __post_init__(self):
    stray = [p for p in self.base if p not in self.common]
    if stray:
      raise ValueError(f"LayerGroups.base {stray} must be among the common prefixes "
                       f"{list(self.common)}")

  @property
  def num_candidates(self) -> int:
    return len(self.candidates)

  @property
  def names(self) -> tuple[str, ...]:
    return tuple(name for name, _ in self.candidates)


def split_candidates(groups: LayerGroups, parts: tuple[tuple[str, tuple[str, ...]], ...]
                     ) -> LayerGroups:
  """Sub-block candidates: each candidate becomes one candidate per part.

  Candidate ``(name, (prefix,))`` and parts ``(("attn", ("ln1", "attn")),
  ("mlp", ("ln2", "mlp1", "mlp2")))`` give ``name.attn`` with prefixes
  ``prefix/ln1, prefix/attn`` and then ``name.mlp``, so the order stays
  input -> output. Every parameter of a block must fall in one part
  (:func:`group_index` checks).

  Args:
    groups: the model's block-level groups (one prefix per candidate).
    parts: ``((part name, (sub-prefix, ...)), ...)`` in forward order.
  """
  candidates = []
  for name, prefixes in groups.candidates:
    if len(prefixes) != 1:
      raise ValueError(f"candidate {name!r} has several prefixes; cannot split it")
    for part, subs in parts:
      candidates.append((f"{name}.{part}", tuple(f"{prefixes[0]}/{s}" for s in subs)))
  return dataclasses.replace(groups, candidates=tuple(candidates))


def train_fixed(groups: LayerGroups) -> LayerGroups:
  """The fixed groups become common: every client trains them every round
  (a model trained from scratch, whose random embeddings must learn). They
  sit below the candidates, so they also become ``base``."""
  return dataclasses.replace(groups, fixed=(), common=tuple(groups.fixed) + tuple(groups.common),
                             base=tuple(groups.base) + tuple(groups.fixed))


def path_str(path) -> str:
  """Joins a ``jax.tree_util`` key path into ``a/b/c``."""
  parts = []
  for k in path:
    if isinstance(k, jax.tree_util.DictKey):
      parts.append(str(k.key))
    elif isinstance(k, jax.tree_util.GetAttrKey):
      parts.append(str(k.name))
    elif isinstance(k, jax.tree_util.SequenceKey):
      parts.append(str(k.idx))
    else:
      parts.append(str(k))
  return "/".join(parts)


def _matches(path: str, prefix: str) -> bool:
  prefix = prefix.strip("/")
  return path == prefix or path.startswith(prefix + "/")


def under_any(path: str, prefixes) -> bool:
  """Whether the leaf path ``a/b/c`` lies under one of the group ``prefixes``."""
  return any(_matches(path, p) for p in prefixes)


def leaf_paths(params: PyTree) -> list[str]:
  return [path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]


def group_index(params: PyTree, groups: LayerGroups) -> PyTree:
  """Maps every leaf to its group: ``k >= 0`` candidate, COMMON or FIXED.

  Args:
    params: a parameter pytree (arrays or ShapeDtypeStructs).
    groups: the model's layer groups.

  Returns:
    A pytree with the structure of ``params`` whose leaves are Python ints.

  Raises:
    ValueError: if a leaf belongs to no group or to several, naming it.
  """
  table = [(k, p) for k, (_, ps) in enumerate(groups.candidates) for p in ps]
  table += [(COMMON, p) for p in groups.common] + [(FIXED, p) for p in groups.fixed]

  def assign(path, _):
    s = path_str(path)
    hits = sorted({k for k, p in table if _matches(s, p)})
    if len(hits) != 1:
      what = "no group" if not hits else f"several groups {hits}"
      raise ValueError(f"parameter {s!r} belongs to {what}; every parameter "
                       "must be in exactly one of fixed/common/candidates")
    return hits[0]

  idx = jax.tree_util.tree_map_with_path(assign, params)
  used = set(jax.tree_util.tree_leaves(idx))
  empty = [n for k, n in enumerate(groups.names) if k not in used]
  if empty:
    raise ValueError(f"candidate layer groups match no parameter: {empty}")
  return idx


def mask_tree(mask: jax.Array, index: PyTree) -> PyTree:
  """Dense candidate mask -> pytree of scalar booleans (trainable leaves).

  Args:
    mask: bool[K] one client's candidate mask (may be traced).
    index: output of :func:`group_index`.

  Returns:
    Pytree with the structure of ``index``; leaf = True where the client
    trains that parameter (its selected candidates and every common leaf).
  """
  mask = jnp.asarray(mask, bool)

  def leaf(k):
    if k == COMMON:
      return jnp.bool_(True)
    if k == FIXED:
      return jnp.bool_(False)
    return mask[k]

  return jax.tree_util.tree_map(leaf, index)


def tree_to_mask(tree_mask: PyTree, index: PyTree, num_candidates: int) -> np.ndarray:
  """Inverse of :func:`mask_tree`: bool[K] from a per-leaf boolean pytree.

  Raises ValueError if the leaves of one candidate group disagree.
  """
  out = [None] * num_candidates
  for k, v in zip(jax.tree_util.tree_leaves(index), jax.tree_util.tree_leaves(tree_mask)):
    if k < 0:
      continue
    v = np.asarray(v)
    if v.all() != v.any() or (out[k] is not None and out[k] != bool(v.all())):
      raise ValueError(f"candidate group {k} is partially masked")
    out[k] = bool(v.all())
  return np.array([bool(v) for v in out])


def group_reduce(values: PyTree, index: PyTree, num_candidates: int) -> jax.Array:
  """Sums per-leaf scalars into per-candidate totals.

  Args:
    values: pytree of scalars (e.g. per-leaf squared norms), same structure
      as ``index``.
    index: output of :func:`group_index`.
    num_candidates: K.

  Returns:
    f32[K] totals over the leaves of each candidate group.
  """
  out = jnp.zeros((num_candidates,), jnp.float32)
  for k, v in zip(jax.tree_util.tree_leaves(index), jax.tree_util.tree_leaves(values)):
    if k >= 0:
      out = out.at[k].add(jnp.asarray(v, jnp.float32))
  return out


def group_sq_norms(tree: PyTree, index: PyTree, num_candidates: int) -> jax.Array:
  """f32[K]: squared L2 norm of each candidate group of ``tree``."""
  sq = jax.tree_util.tree_map(lambda x: jnp.sum(jnp.square(x.astype(jnp.float32))), tree)
  return group_reduce(sq, index, num_candidates)


def group_sizes(params: PyTree, index: PyTree, num_candidates: int) -> np.ndarray:
  """int64[K]: number of parameters in each candidate group."""
  out = np.zeros((num_candidates,), np.int64)
  for k, v in zip(jax.tree_util.tree_leaves(index), jax.tree_util.tree_leaves(params)):
    if k >= 0:
      out[k] += int(np.prod(v.shape))
  return out


def describe(params: PyTree, groups: LayerGroups) -> list[tuple[str, str, int]]:
  """Rows ``(kind, group name, parameter count)`` in order, for listings."""
  index = group_index(params, groups)
  counts: dict[int, int] = {}
  for k, v in zip(jax.tree_util.tree_leaves(index), jax.tree_util.tree_leaves(params)):
    counts[k] = counts.get(k, 0) + int(np.prod(v.shape))
  rows = [("fixed", ",".join(groups.fixed) or "-", counts.get(FIXED, 0))]
  rows += [("candidate", name, counts.get(k, 0)) for k, name in enumerate(groups.names)]
  rows += [("common", ",".join(groups.common) or "-", counts.get(COMMON, 0))]
  return rows
