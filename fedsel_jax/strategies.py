"""The strategy table, the static round settings and the mask dispatch.

:data:`STRATEGIES` names every selection rule (its score kind and whether P1's
penalty coordinates the clients); :class:`RoundSettings` holds everything
static about a round (changing a field recompiles); :func:`select_masks`
turns a round's scores, costs and budgets into the sampled clients' masks for
the configured rule. ``federated`` builds the round from these and
re-exports them.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from fedsel_jax import scores as scores_lib
from fedsel_jax import selection

# strategy -> (score kind or None, solve P1 with the penalty)
STRATEGIES: dict[str, tuple[str | None, bool]] = {
    "full": (None, False), "head": (None, False), "top": (None, False),
    "bottom": (None, False), "both": (None, False), "random": (None, False),
    "gradnorm": ("gradnorm", False), "rgn": ("rgn", False), "snr": ("snr", False),
    "proposed": ("gradnorm", True), "rgn_p1": ("rgn", True), "snr_p1": ("snr", True),
    # FL-LoRA: every adapter group for every client (needs model.lora.rank >= 1).
    "lora": (None, False),
}


def selection_mode(strategy: str) -> str:
  """Who selects a client's layers, and toward what:

  * ``"server"``: the server gathers the sampled clients' scores and solves P1
    with the consistency weight ``selection.lam`` (``proposed``, ``rgn_p1``,
    ``snr_p1``). ``lam > 0`` rewards clients for training the same layers
    (the paper's hypothesis), ``lam < 0`` for covering different ones
    (F3OCUS's, arXiv 2411.11912), ``lam = 0`` leaves each client its own
    best set;
  * ``"client"``: each client alone, by its own scores within its budget,
    with no coordination (``gradnorm``, ``rgn``, ``snr``: P1's ``lam = 0``
    case, without the server round trip of the scores);
  * ``"fixed"``: a rule that reads no scores (``full``, ``head``, ``top``,
    ``bottom``, ``both``, ``random``, ``lora``).
  """
  kind, penalised = STRATEGIES[strategy]
  return "server" if penalised else ("client" if kind is not None else "fixed")


@dataclasses.dataclass(frozen=True)
class RoundSettings:
  """Static settings of a round (changing one recompiles)."""

  strategy: str
  score: str = "gradnorm"
  local_steps: int = 5
  batch_size: int = 32
  sel_batches: int = 0
  client_chunk: int = 0          # 0 = all sampled clients in one vmap
  backprop_cut: bool = False
  cut_levels: tuple[int, ...] = ()  # with backprop_cut: the variants' cuts (() = 0..K)
  grad_gates: bool = False       # kernel gradients only for groups a chunk trains (grad_gates.py)
  diagnostics: bool = True
  diag_estimator: str = "full"   # diagnostics.py: full | sampled
  diag_batches: int = 1          # batches per client for the sampled estimator
  diag_population: bool = False  # E1/E2 over every client (round_data['population'])
  diag_power_iters: int = 0      # Hessian power iterations for L (0 = no L)
  solver_starts: int = 4
  unroll: bool = False           # unroll each client's step/batch loops (client.py)

  def __post_init__(self):
    if self.strategy not in STRATEGIES:
      raise ValueError(f"selection.strategy must be one of {list(STRATEGIES)}, "
                       f"got {self.strategy!r}")
    if self.score not in scores_lib.SCORES:
      raise ValueError(f"selection.score must be one of {list(scores_lib.SCORES)}, "
                       f"got {self.score!r}")

  @property
  def shares_score_pass(self) -> bool:
    """Whether one gradient pass serves the scores and the diagnostics.

    True in sample mode (not population) when the estimator is ``score``
    (the diagnostics read the score pass's own batches, any score kind), or
    when both need the example-weighted gradient of all the sampled clients'
    data: scores over all data (``sel_batches`` 0) of a kind that reads only
    the mean gradient, and the ``full`` estimator. The sampled clients'
    gradients are then kept until the diagnostics.
    """
    if not self.diagnostics or self.diag_population or self.score_kind is None:
      return False
    return self.diag_estimator == "score" or (
        self.diag_estimator == "full" and self.sel_batches <= 0
        and self.score_kind in ("gradnorm", "rgn"))

  @property
  def score_kind(self) -> str | None:
    kind, _ = STRATEGIES[self.strategy]
    if self.strategy == "proposed" or (kind == "snr" and self.score in scores_lib.VARIANCE):
      return self.score
    return kind


def select_masks(settings: RoundSettings, scores: jax.Array | None, costs: jax.Array,
                 budgets: jax.Array, lam: jax.Array, valid: jax.Array,
                 key: jax.Array, client_ids: jax.Array, backward=None) -> jax.Array:
  """bool[M, K] masks of the sampled clients for the configured strategy
  (``backward`` f32[K + 1]: depth-aware budgets, see selection)."""
  name = settings.strategy
  if name == "head":
    return jnp.zeros((budgets.shape[0], costs.shape[0]), bool)
  if name == "random":
    return selection.select_random(costs, budgets, key, client_ids=client_ids,
                                   client_valid=valid, backward=backward)
  if name in ("full", "lora"):   # lora: the candidates are the adapter groups (models/lora.py)
    return selection.select_full(costs, budgets, client_valid=valid)
  if name in ("top", "bottom", "both"):
    return getattr(selection, f"select_{name}")(costs, budgets, client_valid=valid,
                                                backward=backward)
  normalised = selection.normalize_scores(scores)
  if STRATEGIES[name][1]:
    out = selection.solve_p1(normalised, costs, budgets, lam, client_valid=valid,
                             backward=backward, num_starts=settings.solver_starts)
  else:
    out = selection.select_topk_scores(normalised, costs, budgets, client_valid=valid,
                                       backward=backward)
  return out & valid[:, None]
