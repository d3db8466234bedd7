"""Budgets and costs: per-client budgets, layer costs and the cost model.

Host side, called once per run from the config (budgets, layer costs), and
the per-round cost model of SPEC.md ("Cost model"), re-exported by
:mod:`fedsel_jax.selection`.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

BUDGET_KINDS = ("fixed", "uniform", "truncnorm")
COST_KINDS = ("unit", "params", "flops")

# Relative slack the in-graph selectors grant a budget: float32 sums of costs
# (a depth-aware set's weight and backward parts) may land a few ulps above a
# budget they meet exactly. Below selection.FEASIBILITY_RTOL.
BUDGET_SLACK = 1e-6

# Budgets draw from their own stream of the run seed, so adding other uses of
# the seed (partitions, sampling) never changes them.
_BUDGET_STREAM = 0xB0D6E7



def _is_int(x) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _require(ok: bool, field: str, allowed: str, got) -> None:
  if not ok:
    raise ValueError(f"selection.budget.{field} must be {allowed}, got {got!r}")


def draw_budgets(kind: str, num_clients: int, seed: int, *, value=None,
                 low=None, high=None, mean=None, std=None) -> np.ndarray:
  """Per-client budgets (in cost units), a pure function of ``seed``.

  Drawn once per run from a stream of ``seed`` reserved for budgets, so a
  client keeps its budget for the whole run and changes elsewhere in the
  code never change them.

  Args:
    kind: ``"fixed"`` (every client ``value``), ``"uniform"`` (integers
      uniform on ``[low, high]``) or ``"truncnorm"`` (the paper's:
      ``round(x)``, ``x`` normal(``mean``, ``std``) truncated to
      ``[low, high]``).
    num_clients: N >= 1.
    seed: the run seed.
    value: fixed budget > 0.
    low, high: integers, ``1 <= low <= high`` (uniform, truncnorm).
    mean, std: finite, ``std > 0`` (truncnorm).

  Returns:
    f32[N] budgets.

  Raises:
    ValueError: naming the offending ``selection.budget.*`` field.
  """
  _require(kind in BUDGET_KINDS, "kind", f"one of {BUDGET_KINDS}", kind)
  _require(_is_int(num_clients) and num_clients >= 1, "num_clients",
           "an integer >= 1", num_clients)
  rng = np.random.default_rng([int(seed), _BUDGET_STREAM])
  if kind == "fixed":
    _require(value is not None and np.isfinite(value) and value > 0, "value",
             "a finite number > 0", value)
    return np.full((num_clients,), value, np.float32)
  _require(_is_int(low) and low >= 1, "low", "an integer >= 1", low)
  _require(_is_int(high) and high >= low, "high",
           f"an integer >= selection.budget.low ({low})", high)
  if kind == "uniform":
    return rng.integers(low, high, endpoint=True, size=num_clients).astype(np.float32)
  _require(mean is not None and np.isfinite(mean), "mean", "a finite number", mean)
  _require(std is not None and np.isfinite(std) and std > 0, "std",
           "a finite number > 0", std)
  from scipy import stats  # pylint: disable=g-import-not-at-top
  x = stats.truncnorm.rvs((low - mean) / std, (high - mean) / std, loc=mean,
                          scale=std, size=num_clients, random_state=rng)
  return np.clip(np.rint(x), low, high).astype(np.float32)


def layer_costs(kind: str = "unit", *, param_counts=None, flops=None
                ) -> np.ndarray:
  """Candidate layer costs, in units of the mean candidate layer.

  Dividing by the mean keeps budgets portable: a budget of 2 means "two
  average layers" for every kind, and ``"unit"`` is the paper's setting.

  Args:
    kind: ``"unit"`` (all 1), ``"params"`` (parameter count) or ``"flops"``
      (forward FLOPs, an additive proxy; runs with ``selection.cost =
      'flops'`` use the depth-aware :func:`budget_costs` instead).
    param_counts: int[K] parameters per candidate layer (gives K for unit).
    flops: f32[K] forward FLOPs per sample per candidate layer.

  Returns:
    f32[K] > 0 with mean 1.

  Raises:
    ValueError: naming ``selection.cost`` for an unknown kind or a missing
      or non-positive input.
  """
  if kind not in COST_KINDS:
    raise ValueError(f"selection.cost must be one of {COST_KINDS}, got {kind!r}")
  source = {"unit": param_counts if param_counts is not None else flops,
            "params": param_counts, "flops": flops}[kind]
  if source is None:
    need = "param_counts or flops" if kind == "unit" else (
        "param_counts" if kind == "params" else "flops")
    raise ValueError(f"selection.cost={kind!r} needs {need}")
  source = np.asarray(source, np.float64)
  if source.ndim != 1 or source.size == 0:
    raise ValueError(f"selection.cost={kind!r}: expected one value per candidate "
                     f"layer, got shape {source.shape}")
  if kind == "unit":
    return np.ones(source.shape, np.float32)
  if not np.all(np.isfinite(source) & (source > 0)):
    raise ValueError(f"selection.cost={kind!r}: every layer's {kind} must be > 0, "
                     f"got {source.tolist()}")
  return (source / source.mean()).astype(np.float32)


def budget_costs(kind: str, param_counts, forward_flops=None
                 ) -> tuple[np.ndarray, np.ndarray | None]:
  """The costs budgets are spent in, for ``selection.cost``.

  ``"unit"`` and ``"params"``: additive :func:`layer_costs`. ``"flops"``:
  the depth-aware training FLOPs per example (:func:`depth_costs_from_flops`,
  without the constant every client pays) in units of the cheapest
  non-empty set, i.e. training one block alone (normally the top one): a
  budget of 2 buys twice that. With trained layers below the blocks
  (``ForwardFlops.base``) every backward pass reaches the bottom anyway, so
  the FLOPs costs are additive (backward None).

  Args:
    kind: ``selection.cost``.
    param_counts: int[K] parameters per candidate layer.
    forward_flops: :class:`ForwardFlops` (or ``(fixed, blocks f[K], common)``)
      forward FLOPs per example (:func:`model_forward_flops`); needed for
      ``"flops"``.

  Returns:
    ``(costs f32[K], backward f32[K + 1] or None)``.
  """
  if kind != "flops":
    return layer_costs(kind, param_counts=param_counts), None
  if forward_flops is None:
    raise ValueError("selection.cost='flops' needs the model's forward FLOPs")
  ff = ForwardFlops(*forward_flops)
  if not np.all(np.asarray(ff.blocks) > 0):
    raise ValueError(f"selection.cost='flops': every block's FLOPs must be > 0, got "
                     f"{np.asarray(ff.blocks).tolist()}")
  model = depth_costs_from_flops(ff.blocks, ff.common, ff.fixed, ff.base)
  model = model.scaled(model.cheapest_set)
  backward = None if ff.base is not None else model.backward.astype(np.float32)
  return model.weight.astype(np.float32), backward


def check_lam(lam) -> float:
  """Returns ``float(lam)``; raises ValueError naming ``selection.lam``.

  Either sign is allowed: ``lam > 0`` pays for disagreement between clients
  on a layer (the paper), ``lam < 0`` rewards clients for covering different
  layers (F3OCUS's opposite hypothesis, arXiv 2411.11912).
  """
  try:
    value = float(lam)
  except (TypeError, ValueError):
    value = float("nan")
  if not np.isfinite(value):
    raise ValueError(f"selection.lam must be a finite number, got {lam!r}")
  return value


def check_budgets(budgets, costs, backward=None) -> None:
  """Raises ValueError (naming ``selection.budget``) if a client can afford
  no candidate layer at all, i.e. some budget < the cheapest layer's cost.

  Args:
    budgets: f32[N].
    costs: f32[K].
    backward: f32[K + 1] or None (depth-aware: a single block l costs
      ``costs[l] + backward[l]``).
  """
  budgets = np.asarray(budgets, np.float64)
  single = np.asarray(costs, np.float64)
  if backward is not None:
    single = single + np.asarray(backward, np.float64)[:-1]
  cheapest = float(np.min(single))
  # The solvers grant BUDGET_SLACK, so a budget that meets the cheapest set up
  # to float32 rounding (depth-aware costs in units of that set) affords it.
  afford = budgets * (1 + BUDGET_SLACK) >= cheapest
  if not np.all(np.isfinite(budgets)) or not np.all(afford):
    bad = np.flatnonzero(~afford)
    raise ValueError(
        f"selection.budget: every budget must be >= the cheapest layer's cost "
        f"({cheapest:g}); clients {bad[:10].tolist()} have "
        f"{budgets[bad[:10]].tolist()}")


# ----------------------------------------------------------------------------
# Cost model (SPEC.md, "Cost model").


def training_flops_per_sample(forward_flops: jax.Array, head_forward_flops,
                              masks: jax.Array, *, fixed_forward_flops=0.0,
                              base_forward_flops=None) -> jax.Array:
  """f32[M]: training FLOPs per example of one local step, per client.

  Convention: FLOPs = 2 x MACs; backward through a layer costs 2x its
  forward, split equally into activation gradients (1x) and weight
  gradients (1x). With ``l_min`` the client's lowest selected block:

  * forward through everything: fixed + base + all blocks + head;
  * head: weight gradients always; activation gradients if any block is
    selected (they are what reaches the blocks);
  * activation gradients for every block ``l >= l_min`` (backprop stops
    below ``l_min``); weight gradients only for selected blocks.
  * trained layers below the blocks (``base_forward_flops`` not None, e.g.
    embeddings trained from scratch): the backward pass always reaches
    them, so ``l_min`` is 0 for every client and the head's activation
    gradients are always paid; their weight gradients cost 1x their
    forward (no gradient into the input).

  So all blocks selected costs ``fixed + 3 (blocks + head)``, nothing
  selected ``fixed + blocks + 2 head`` (without base layers).

  Args:
    forward_flops: f32[K] forward FLOPs per example of each candidate block.
    head_forward_flops: scalar, forward FLOPs of the common layers above
      the blocks.
    masks: bool[M, K].
    fixed_forward_flops: scalar, forward FLOPs of the fixed layers.
    base_forward_flops: None, or the forward FLOPs of the trained layers
      below the blocks (0.0 for an embedding lookup still makes the
      backward reach the bottom).

  Returns:
    f32[M].
  """
  f = jnp.asarray(forward_flops, jnp.float32)
  head = jnp.asarray(head_forward_flops, jnp.float32)
  masks = jnp.asarray(masks, bool)
  if base_forward_flops is None:
    base = jnp.float32(0.0)
    any_selected = jnp.any(masks, axis=-1)
    above_lowest = jnp.cumsum(masks, axis=-1) > 0    # at or above the lowest selected block
  else:
    base = jnp.asarray(base_forward_flops, jnp.float32)
    any_selected = jnp.ones(masks.shape[:-1], bool)
    above_lowest = jnp.ones(masks.shape, bool)
  forward = fixed_forward_flops + base + jnp.sum(f) + head
  activation_grads = (jnp.sum(jnp.where(above_lowest, f, 0.0), axis=-1)
                      + jnp.where(any_selected, head, 0.0))
  weight_grads = jnp.sum(jnp.where(masks, f, 0.0), axis=-1) + head + base
  return forward + activation_grads + weight_grads


@dataclasses.dataclass(frozen=True)
class DepthCosts:
  """A depth-aware cost model: what a layer set S costs one client step.

  ``cost(S) = constant + sum_{l in S} weight[l] + backward[lowest(S)]``
  with ``lowest(S)`` the lowest selected block (K when S is empty). The
  backward pass from the output down to block j costs ``backward[j]``
  (non-increasing in j, ``backward[K] = 0``): training a low block pays for
  activation gradients through every block above it, so the cost of a set
  is not the sum of its layers'.

  Attributes:
    weight: f32[K] weight-gradient cost of each candidate block.
    backward: f32[K + 1] backward-pass cost down to each block.
    constant: cost every client pays (forward, common weight gradients).
  """

  weight: np.ndarray
  backward: np.ndarray
  constant: float = 0.0

  def scaled(self, unit: float) -> "DepthCosts":
    return DepthCosts(self.weight / unit, self.backward / unit, self.constant / unit)

  @property
  def cheapest_set(self) -> float:
    """Cost beyond ``constant`` of the cheapest non-empty set (one block)."""
    return float(np.min(self.weight + self.backward[:-1]))


def depth_costs_from_flops(forward_flops, head_forward_flops, fixed_forward_flops=0.0,
                           base_forward_flops=None) -> DepthCosts:
  """The FLOPs cost model of :func:`training_flops_per_sample` as DepthCosts.

  ``weight[l] = f_l``, ``backward[j] = head + sum_{l >= j} f_l`` (j < K),
  ``constant = fixed + sum f + 2 head`` (forward and the head's weight
  gradients), all per example. With trained layers below the blocks
  (``base_forward_flops`` not None) every client's backward pass is the full
  one: ``backward = 0`` and ``constant = fixed + 2 base + 2 sum f + 3 head``.

  Args:
    forward_flops: f32[K] forward FLOPs per example of each candidate block.
    head_forward_flops: forward FLOPs of the common layers above the blocks.
    fixed_forward_flops: forward FLOPs of the fixed layers.
    base_forward_flops: None, or forward FLOPs of the trained layers below
      the blocks.
  """
  f = np.asarray(forward_flops, np.float64)
  head = float(head_forward_flops)
  if base_forward_flops is not None:
    base = float(base_forward_flops)
    return DepthCosts(weight=f, backward=np.zeros(len(f) + 1),
                      constant=float(fixed_forward_flops) + 2 * base + 2 * float(f.sum())
                      + 3 * head)
  backward = np.concatenate([head + np.cumsum(f[::-1])[::-1], [0.0]])
  return DepthCosts(weight=f, backward=backward,
                    constant=float(fixed_forward_flops) + float(f.sum()) + 2 * head)


def _prefix_flops(rows, prefix: str) -> float:
  path = tuple(prefix.strip("/").split("/"))
  return float(sum(r.flops for r in rows if tuple(r.path) == path))


class ForwardFlops(NamedTuple):
  """Forward FLOPs per example of a model's groups (:func:`model_forward_flops`).

  Attributes:
    fixed: the fixed groups.
    blocks: f64[K] each candidate.
    common: the common groups above the candidates (the head).
    base: None when no trained group sits below the candidates, else the
      forward FLOPs of those (``LayerGroups.base``; 0.0 for a lookup).
  """

  fixed: float
  blocks: np.ndarray
  common: float
  base: float | None = None


def model_forward_flops(module, example_input, groups) -> ForwardFlops:
  """Forward FLOPs per example of a model's fixed, candidate, common and base groups.

  Measured by XLA's cost analysis of each submodule named by a group prefix
  (flax's module table, as in ``nn.tabulate(compute_flops=True)``), at one
  example. A prefix that names no submodule (a bare parameter such as a
  position embedding) counts 0.

  Args:
    module: the flax module (``ModelSpec.module``).
    example_input: a batch of inputs; its first example is used.
    groups: the model's :class:`fedsel_jax.masks.LayerGroups`.

  Returns:
    :class:`ForwardFlops`; ``common`` leaves out the ``base`` groups.
  """
  from flax.linen import summary  # pylint: disable=g-import-not-at-top
  table = summary._get_module_table(  # pylint: disable=protected-access
      module, depth=None, show_repeated=False, compute_flops=True,
      compute_vjp_flops=False)
  rows = table(jax.random.key(0), np.asarray(example_input)[:1])
  blocks = np.array([sum(_prefix_flops(rows, p) for p in prefixes)
                     for _, prefixes in groups.candidates])
  base = groups.base
  return ForwardFlops(
      fixed=sum(_prefix_flops(rows, p) for p in groups.fixed), blocks=blocks,
      common=sum(_prefix_flops(rows, p) for p in groups.common if p not in base),
      base=float(sum(_prefix_flops(rows, p) for p in base)) if base else None)


def lowest_selected(masks: jax.Array) -> jax.Array:
  """i32[...]: index of the lowest selected layer, K if none."""
  masks = jnp.asarray(masks, bool)
  k = masks.shape[-1]
  return jnp.min(jnp.where(masks, jnp.arange(k), k), axis=-1)


def depth_set_cost(masks: jax.Array, weight: jax.Array, backward: jax.Array) -> jax.Array:
  """f32[...]: ``sum_{l in S} weight[l] + backward[lowest(S)]`` (no constant).

  Args:
    masks: bool[..., K].
    weight: f32[K].
    backward: f32[K + 1].
  """
  masks = jnp.asarray(masks, bool)
  w = jnp.sum(jnp.where(masks, jnp.asarray(weight, jnp.float32), 0.0), axis=-1)
  return w + jnp.asarray(backward, jnp.float32)[lowest_selected(masks)]
