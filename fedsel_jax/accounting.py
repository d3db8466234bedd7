"""Cost accounting of a run: what its rounds spend (SPEC.md, "Cost model").

Host side, one call per round: training FLOPs as selected (depth-aware),
the score pass's FLOPs, bytes up and down, per round (``metrics.csv``) and
in total (``final.json``). The cost *models* budgets are spent in live in
:mod:`fedsel_jax.costs`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from fedsel_jax.costs import DepthCosts
from fedsel_jax.costs import ForwardFlops
from fedsel_jax.costs import depth_set_cost
from fedsel_jax.costs import training_flops_per_sample

def communication_bytes(param_counts: jax.Array, masks: jax.Array, *,
                        common_params, fixed_params, bytes_per_param: int = 4,
                        score_bytes: int = 4, sends_scores: bool = True
                        ) -> tuple[jax.Array, jax.Array]:
  """Bytes moved per client in one round (float32 counts; ~1e-7 relative).

  Down: the full model (fixed + common + all candidates). Up: the K scores
  (when the round selects) plus the deltas of the common layers and of the
  selected candidates.

  Args:
    param_counts: int[K] parameters per candidate layer.
    masks: bool[M, K].
    common_params: parameters in the common layers.
    fixed_params: parameters in the fixed layers.
    bytes_per_param: 4 for float32, 2 for bfloat16.
    score_bytes: bytes per uploaded score.
    sends_scores: whether this round uploads scores.

  Returns:
    ``(down f32[M], up f32[M])``.
  """
  counts = jnp.asarray(param_counts, jnp.float32)
  masks = jnp.asarray(masks, bool)
  full = jnp.float32(fixed_params) + jnp.float32(common_params) + jnp.sum(counts)
  down = jnp.full(masks.shape[:1], full * bytes_per_param)
  selected = jnp.sum(jnp.where(masks, counts, 0.0), axis=-1)
  scores_up = counts.shape[0] * score_bytes if sends_scores else 0
  up = (selected + jnp.float32(common_params)) * bytes_per_param + scores_up
  return down, up


COST_COLUMNS = ("train_flops", "score_flops", "bytes_up", "bytes_down")


@dataclasses.dataclass(frozen=True)
class RunCosts:
  """What a run's rounds cost, per example and per parameter.

  Attributes:
    fixed_flops, block_flops (f64[K]), common_flops: forward FLOPs per
      example (:func:`fedsel_jax.costs.model_forward_flops`).
    base_flops: None, or the forward FLOPs of the trained layers below the
      blocks (every backward pass then reaches the bottom).
    fixed_params, block_params (int[K]), common_params: parameter counts.
    train_examples: examples one client's local training reads (tau x B).
    score_rows: score rows a client reads at most (score batches x B).
    bytes_per_param: 4 (float32 deltas and model).
  """

  fixed_flops: float
  block_flops: np.ndarray
  common_flops: float
  fixed_params: int
  block_params: np.ndarray
  common_params: int
  train_examples: int
  score_rows: int
  bytes_per_param: int = 4
  base_flops: float | None = None


def round_costs(run: RunCosts, masks, valid, scored, num_examples) -> dict[str, float]:
  """Totals of one round over the sampled clients (SPEC.md, "Cost model").

  * ``train_flops``: local training as selected, depth-aware
    (:func:`training_flops_per_sample` x ``train_examples``): what the masks
    need, which is what ``fl.backprop_cut`` realises;
  * ``score_flops``: the score pass of the clients that sent scores: a
    forward and a full backward (every candidate and common layer) over the
    examples they drew;
  * ``bytes_up``: K float32 scores (scoring clients) + the deltas of the
    common and selected layers; ``bytes_down``: the whole model.
  The E1/E2 diagnostics pass is analysis, not training, and is not charged.

  Args:
    run: the run's :class:`RunCosts`.
    masks: bool[M, K]; valid: bool[M]; scored: bool[M] clients that sent
      scores this round; num_examples: int[M] real examples per client.

  Returns:
    ``{name: float}`` for :data:`COST_COLUMNS`.
  """
  masks, valid = np.asarray(masks, bool), np.asarray(valid, bool)
  scored = np.asarray(scored, bool) & valid
  per_example = np.asarray(training_flops_per_sample(
      run.block_flops, run.common_flops, masks, fixed_forward_flops=run.fixed_flops,
      base_forward_flops=run.base_flops), np.float64)
  full = float(np.asarray(training_flops_per_sample(
      run.block_flops, run.common_flops, np.ones((1, masks.shape[1]), bool),
      fixed_forward_flops=run.fixed_flops, base_forward_flops=run.base_flops))[0])
  rows = np.minimum(np.asarray(num_examples, np.float64), run.score_rows)
  selected = (masks * np.asarray(run.block_params, np.float64)).sum(1) + run.common_params
  model = run.fixed_params + run.common_params + float(np.sum(run.block_params))
  k = masks.shape[1]
  return {
      "train_flops": float(np.sum(per_example[valid]) * run.train_examples),
      "score_flops": float(np.sum(rows[scored]) * full),
      "bytes_up": float(np.sum(selected[valid]) * run.bytes_per_param
                        + 4 * k * np.sum(scored)),
      "bytes_down": float(np.sum(valid) * model * run.bytes_per_param),
  }


def cost_totals(rows: list[dict]) -> dict[str, float]:
  """``total_<column>`` over a run's metrics rows (for final.json)."""
  return {f"total_{c}": float(sum(float(r[c]) for r in rows if r.get(c, "") != ""))
          for c in COST_COLUMNS}


def make_run_costs(params, index, num_candidates: int, forward_flops, *, local_steps: int,
                   batch_size: int, sel_batches: int, n_max: int) -> RunCosts:
  """:class:`RunCosts` of a run from its parameters and forward FLOPs.

  Args:
    params: the model's parameter pytree.
    index: leaf -> group table (:func:`fedsel_jax.masks.group_index`).
    num_candidates: K.
    forward_flops: :class:`fedsel_jax.costs.ForwardFlops` (or ``(fixed,
      blocks f[K], common)``, :func:`fedsel_jax.costs.model_forward_flops`).
    local_steps, batch_size, sel_batches: the run's ``fl`` / ``selection``
      settings; n_max: rows of the padded client arrays.
  """
  from fedsel_jax import scores as scores_lib  # pylint: disable=g-import-not-at-top
  from fedsel_jax.masks import COMMON, FIXED  # pylint: disable=g-import-not-at-top
  blocks = np.zeros((num_candidates,), np.int64)
  kinds = {FIXED: 0, COMMON: 0}
  for k, leaf in zip(jax.tree_util.tree_leaves(index), jax.tree_util.tree_leaves(params)):
    size = int(np.prod(leaf.shape))
    if k >= 0:
      blocks[k] += size
    else:
      kinds[k] += size
  fixed, block_flops, common, base = ForwardFlops(*forward_flops)
  return RunCosts(fixed_flops=float(fixed), block_flops=np.asarray(block_flops, np.float64),
                  base_flops=None if base is None else float(base),
                  common_flops=float(common), fixed_params=kinds[FIXED], block_params=blocks,
                  common_params=kinds[COMMON], train_examples=local_steps * batch_size,
                  score_rows=scores_lib.num_score_batches(n_max, batch_size, sel_batches)
                  * batch_size)


def peak_memory_mb(model: DepthCosts, masks, valid) -> float:
  """MiB the most demanding sampled client needs to train its mask, under the
  memory cost model in bytes (:mod:`fedsel_jax.memory_costs`)."""
  need = model.constant + np.asarray(depth_set_cost(masks, model.weight, model.backward))
  return float(np.max(need[np.asarray(valid, bool)])) / 2 ** 20
