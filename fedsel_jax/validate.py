"""Every check of a run's config, in one pass, before anything is computed.

``validate_config(config)`` raises :class:`~fedsel_jax.errors.ConfigError`
with one message naming the field, its value and what is allowed. It checks
types against the declared defaults (``configs/default.py`` declares every
field), ranges, named choices, the model's input modality against the
dataset's, and cross-field rules. Checks that need the data or the model
(the number of clients a partition yields, a budget above the number of
candidate layers) run in ``train.Setup``, still before the first round.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import ml_collections

from fedsel_jax import auto_chunk
from fedsel_jax import device_data
from fedsel_jax.errors import ConfigError

OPTIMIZERS = ("sgd", "momentum", "adam", "adamw")
LAM_MAX = 1e6
COSTS = ("unit", "params", "flops", "memory")
BUDGETS = ("fixed", "uniform", "truncnorm")
DTYPES = ("float32", "bfloat16")
TASKS = ("pronoun", "genre", "play")

# What each data source yields and which models read it.
DATA_MODALITY = {"digits": "image", "cifar10": "image", "mnist": "image", "domainnet": "image",
                 "shakespeare": "tokens", "xglue": "tokens", "synthetic": "image"}
MODEL_MODALITY = {"mlp": "image", "cnn": "image", "vit": "image", "clip_vit": "image",
                  "minilm": "tokens", "bert": "tokens", "roberta": "tokens", "xlmr": "tokens"}


def _int(lo: int | None = None, hi: int | None = None) -> Callable[[str, Any], None]:
  def check(field, value):
    if isinstance(value, bool) or not isinstance(value, int):
      raise ConfigError(f"{field} must be an integer, got {value!r}")
    if lo is not None and value < lo:
      raise ConfigError(f"{field} must be >= {lo}, got {value}")
    if hi is not None and value > hi:
      raise ConfigError(f"{field} must be <= {hi}, got {value}")
  return check


def _num(lo: float | None = None, hi: float | None = None, *, strict_lo: bool = False,
         strict_hi: bool = False) -> Callable[[str, Any], None]:
  def check(field, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise ConfigError(f"{field} must be a number, got {value!r}")
    if not math.isfinite(value):
      raise ConfigError(f"{field} must be a finite number, got {value}")
    if lo is not None and (value <= lo if strict_lo else value < lo):
      raise ConfigError(f"{field} must be {'>' if strict_lo else '>='} {lo}, got {value}")
    if hi is not None and (value >= hi if strict_hi else value > hi):
      raise ConfigError(f"{field} must be {'<' if strict_hi else '<='} {hi}, got {value}")
  return check


def _bool(field, value):
  if not isinstance(value, bool):
    raise ConfigError(f"{field} must be True or False, got {value!r}")


def _choice(*allowed) -> Callable[[str, Any], None]:
  def check(field, value):
    if value not in allowed:
      raise ConfigError(f"{field} must be one of {list(allowed)}, got {value!r}")
  return check


def _positive_ints(field, value):
  if not isinstance(value, (tuple, list)) or not value or not all(
      isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value):
    raise ConfigError(f"{field} must be a non-empty tuple of integers >= 1, got {value!r}")


def _levels(field, value):
  # The upper bound K depends on the model: federated.make_round_parts checks it.
  if not isinstance(value, (tuple, list)) or not all(
      isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
    raise ConfigError(f"{field} must be a tuple of integers >= 0, got {value!r}")


# field -> check; a field absent from a config is skipped (e.g. data.task
# exists only where the source reads it).
RULES: dict[str, Callable[[str, Any], None]] = {
    "seed": _int(0, 2**31 - 1),
    "data.num_clients": _int(0), "data.alpha": _num(0, strict_lo=True),
    "data.min_client_size": _int(1), "data.max_examples": _int(0), "data.max_test": _int(0),
    "data.max_len": _int(4), "data.min_lines": _int(1), "data.max_roles": _int(0),
    "data.task": _choice(*TASKS), "data.image_size": _int(0),
    "data.synthetic.size": _int(1), "data.synthetic.channels": _int(1),
    "data.synthetic.classes": _int(2), "data.synthetic.train": _int(1),
    "data.synthetic.test": _int(1),
    "model.dtype": _choice(*DTYPES), "model.width": _int(1), "model.depth": _int(1),
    "model.num_heads": _int(1),
    "model.features": _positive_ints, "model.max_len": _int(4),
    "model.pooling": _choice("mean", "cls"),
    "model.embeddings": _choice("auto", "fixed", "trained"),  # = models.EMBEDDINGS
    "model.sub_blocks": _bool,
    "fl.num_rounds": _int(1), "fl.clients_per_round": _int(1), "fl.local_steps": _int(1),
    "fl.batch_size": _int(1), "fl.client_chunk": auto_chunk.check, "fl.backprop_cut": _bool,
    "fl.cut_levels": _levels, "fl.grad_gates": _bool,
    "fl.unroll": _bool, "fl.shard_clients": _bool, "fl.max_bad_rounds": _int(1),
    "fl.device_data": _choice(*device_data.MODES),
    "fl.device_data_max_mb": _num(0, strict_lo=True),
    "client_optim.name": _choice(*OPTIMIZERS), "server_optim.name": _choice(*OPTIMIZERS),
    "client_optim.lr": _num(0, strict_lo=True), "server_optim.lr": _num(0, strict_lo=True),
    "client_optim.momentum": _num(0, 1, strict_hi=True),
    "server_optim.momentum": _num(0, 1, strict_hi=True),
    "client_optim.weight_decay": _num(0), "server_optim.weight_decay": _num(0),
    # Either sign: lam < 0 rewards diversity (F3OCUS). Bounded so that lam times
    # a cohort's pair count stays finite in float32 (scores are normalised per
    # client, so |lam| of a few already forces consensus or full spread).
    "selection.lam": _num(-LAM_MAX, LAM_MAX),
    "selection.sel_gap": _int(1), "selection.sel_batches": _int(0),
    "selection.cost": _choice(*COSTS), "selection.check_exact": _bool,
    "selection.solver_starts": _int(1),
    "selection.budget.kind": _choice(*BUDGETS), "selection.budget.value": _num(0, strict_lo=True),
    "selection.budget.low": _num(0, strict_lo=True), "selection.budget.high": _num(0, strict_lo=True),
    "selection.budget.mean": _num(), "selection.budget.std": _num(0, strict_lo=True),
    "eval_every": _int(1), "eval_batch_size": _int(1), "checkpoint_every": _int(1),
    "checkpoint_keep": _int(1),
    # docs/diagnostics.md; the population's memory rule needs data (device_data.population_data)
    "diagnostics.enabled": _bool, "diagnostics.every": _int(1),
    "diagnostics.batches": _int(1),
    "diagnostics.population": _bool, "diagnostics.population_max_mb": _num(0, strict_lo=True),
    "diagnostics.power_iters": _int(0),
    # LoRA (fedsel_jax/models/lora.py) and the local-only baseline (local_only.py).
    "model.lora.alpha": _num(0, strict_lo=True),   # rank: lora.config_error
    "model.lora.targets": _choice("attention", "attention+mlp"),
    "model.lora.within_selection": _bool, "fl.local_only": _bool,
    "data.client_holdout": _num(0, 1, strict_hi=True),
}


def _defaults() -> ml_collections.ConfigDict:
  from configs import default
  return default.get_config()


def _check_types(config: ml_collections.ConfigDict, reference: ml_collections.ConfigDict,
                 prefix: str = "") -> None:
  """Every field declared in configs/default.py keeps its declared kind."""
  for key, ref in reference.items():
    name = f"{prefix}{key}"
    if key not in config:
      raise ConfigError(f"config field {name} is missing (declared in configs/default.py)")
    value = config[key]
    if isinstance(ref, ml_collections.ConfigDict):
      if not isinstance(value, ml_collections.ConfigDict):
        raise ConfigError(f"{name} must be a group of fields, got {value!r}")
      _check_types(value, ref, name + ".")
    elif isinstance(ref, bool) and not isinstance(value, bool):
      raise ConfigError(f"{name} must be True or False, got {value!r}")
    elif isinstance(ref, str) and not isinstance(value, str):
      raise ConfigError(f"{name} must be a string, got {value!r}")
    elif isinstance(ref, (tuple, list)) and not isinstance(value, (tuple, list)):
      raise ConfigError(f"{name} must be a tuple, got {value!r}")


def _get(config, field):
  node = config
  for part in field.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      return _MISSING
    node = node[part]
  return node


_MISSING = object()


def _check_names(config) -> None:
  from fedsel_jax import data as data_lib
  from fedsel_jax import datasets
  from fedsel_jax import federated
  from fedsel_jax import models
  from fedsel_jax import scores
  _choice(*federated.STRATEGIES)("selection.strategy", config.selection.strategy)
  _choice(*scores.SCORES)("selection.score", config.selection.score)
  _choice(*models.MODELS)("model.name", config.model.name)
  _choice(*datasets.SOURCES)("data.name", config.data.name)
  _choice(*data_lib.PARTITIONS)("data.partition", config.data.partition)
  from fedsel_jax import diagnostics
  _choice(*diagnostics.ESTIMATORS)("diagnostics.estimator", config.diagnostics.estimator)
  for i, s in enumerate(config.compare_strategies):   # also 'probe', 'local:<strategy>'
    if s != "probe":
      _choice(*federated.STRATEGIES)(f"compare_strategies[{i}]", s.removeprefix("local:"))


def _check_cross_fields(config) -> None:
  data, model, fl, sel = config.data, config.model, config.fl, config.selection
  have, need = DATA_MODALITY.get(data.name), MODEL_MODALITY.get(model.name)
  if have and need and have != need:
    fits = sorted(m for m, k in MODEL_MODALITY.items() if k == have)
    raise ConfigError(f"model.name={model.name!r} reads {need} but data.name={data.name!r} "
                      f"yields {have}; use one of {fits}")
  if model.name == "vit":                # models/small.py: heads split the width
    width, heads = model.get("width", 192), model.get("num_heads", 3)
    if width % heads:
      raise ConfigError(f"model.width={width} must be a multiple of model.num_heads={heads} "
                        f"for model.name='vit' (e.g. {heads * max(1, width // heads)})")
  if data.partition in ("iid", "dirichlet") and data.num_clients < 1:
    raise ConfigError(f"data.num_clients must be >= 1 for data.partition={data.partition!r}, "
                      f"got {data.num_clients} (0 means one client per group, natural only)")
  if data.num_clients and fl.clients_per_round > data.num_clients:
    raise ConfigError(f"fl.clients_per_round={fl.clients_per_round} exceeds "
                      f"data.num_clients={data.num_clients}")
  b = sel.budget
  if b.kind in ("uniform", "truncnorm") and b.low > b.high:
    raise ConfigError(f"selection.budget.low={b.low} must be <= selection.budget.high={b.high}")
  _check_baselines(config)
  _check_diagnostics(config)


def _check_diagnostics(config) -> None:
  """The ``score`` estimator reads the score pass: a score-based strategy, sample mode."""
  from fedsel_jax import federated
  d = config.diagnostics
  if not d.enabled or d.estimator != "score":
    return
  if d.population:
    raise ConfigError("diagnostics.estimator='score' needs diagnostics.population=False (the "
                      "score pass covers the sampled clients only); use 'full' or 'sampled'")
  kind, _ = federated.STRATEGIES[config.selection.strategy]
  if kind is None:
    with_scores = sorted(s for s, (k, _) in federated.STRATEGIES.items() if k is not None)
    raise ConfigError(f"diagnostics.estimator='score' needs a strategy that computes scores, "
                      f"got selection.strategy={config.selection.strategy!r}; use one of "
                      f"{with_scores}, or diagnostics.estimator='sampled'")


def _check_baselines(config) -> None:
  """LoRA needs its strategy (or within_selection) and a rank; local-only a
  server-free strategy."""
  from fedsel_jax import local_only
  from fedsel_jax.models import lora
  problem = lora.config_error(config)
  if problem:
    raise ConfigError(problem)
  if config.fl.local_only:
    _choice(*local_only.LOCAL_STRATEGIES)("selection.strategy (with fl.local_only)",
                                          config.selection.strategy)


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError (one line) for the first field that cannot work."""
  _check_types(config, _defaults())
  _check_names(config)
  for field, check in RULES.items():
    value = _get(config, field)
    if value is not _MISSING:
      check(field, value)
  _check_cross_fields(config)
