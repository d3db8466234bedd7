"""The plain Python outer loop: set up, restore, run rounds, log, checkpoint."""

from __future__ import annotations

import functools
import math
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from tqdm import tqdm

from fedsel_jax import client as client_lib
from fedsel_jax import data as data_lib
from fedsel_jax import datasets
from fedsel_jax import federated
from fedsel_jax import masks as masks_lib
from fedsel_jax import metrics_writer
from fedsel_jax import models
from fedsel_jax import selection
from fedsel_jax.evaluate import make_eval_fn

OPTIMIZERS = ("sgd", "momentum", "adam", "adamw")
COSTS = ("unit", "params", "flops")
BUDGETS = ("fixed", "uniform", "truncnorm")


class ConfigError(ValueError):
  """A config field has a value outside its allowed set."""


def _allowed(field: str, value: Any, allowed) -> None:
  if value not in allowed:
    raise ConfigError(f"{field} must be one of {list(allowed)}, got {value!r}")


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks every field whose bad value could waste compute; raises ConfigError."""
  _allowed("selection.strategy", config.selection.strategy, federated.STRATEGIES)
  _allowed("model.name", config.model.name, models.MODELS)
  _allowed("data.name", config.data.name, datasets.SOURCES)
  _allowed("data.partition", config.data.partition, data_lib.PARTITIONS)
  _allowed("client_optim.name", config.client_optim.name, OPTIMIZERS)
  _allowed("server_optim.name", config.server_optim.name, OPTIMIZERS)
  _allowed("selection.cost", config.selection.cost, COSTS)
  _allowed("selection.budget.kind", config.selection.budget.kind, BUDGETS)
  _allowed("model.dtype", config.model.get("dtype", "float32"), ("float32", "bfloat16"))
  if config.data.partition == "dirichlet" and not config.data.alpha > 0:
    raise ConfigError(f"data.alpha must be > 0, got {config.data.alpha}")
  fl = config.fl
  for field in ("num_rounds", "clients_per_round", "local_steps", "batch_size"):
    if int(fl[field]) < 1:
      raise ConfigError(f"fl.{field} must be >= 1, got {fl[field]}")
  n = config.data.num_clients
  if n and fl.clients_per_round > n:
    raise ConfigError(f"fl.clients_per_round={fl.clients_per_round} exceeds "
                      f"data.num_clients={n}")
  lam = config.selection.lam
  if not (isinstance(lam, (int, float)) and math.isfinite(lam) and lam >= 0):
    raise ConfigError(f"selection.lam must be a finite number >= 0, got {lam!r}")
  if config.selection.sel_gap < 1:
    raise ConfigError(f"selection.sel_gap must be >= 1, got {config.selection.sel_gap}")


def make_optimizer(cfg: ml_collections.ConfigDict, prefix: str) -> optax.GradientTransformation:
  name = cfg.name
  _allowed(f"{prefix}.name", name, OPTIMIZERS)
  if name == "sgd":
    return optax.sgd(cfg.lr)
  if name == "momentum":
    return optax.sgd(cfg.lr, momentum=cfg.get("momentum", 0.9))
  if name == "adam":
    return optax.adam(cfg.lr)
  return optax.adamw(cfg.lr, weight_decay=cfg.get("weight_decay", 0.0))


@functools.partial(jax.jit, static_argnums=0)
def _init_params(module, key: jax.Array, example_input) -> Any:
  """Compiled once per model, not once per Setup (modules compare by their fields)."""
  return module.init(key, example_input)["params"]


class Setup:
  """Everything derived from a config before the first round (host side)."""

  def __init__(self, config: ml_collections.ConfigDict, dataset=None):
    """``dataset``: ``load_dataset(config.data)`` already loaded (a sweep reuses it)."""
    validate_config(config)
    self.config = config
    datasets.check_available(config.data)
    self.dataset = dataset if dataset is not None else datasets.load_dataset(config.data)
    ds = self.dataset
    seed = config.seed
    parts = data_lib.partition(ds, config.data.partition, config.data.num_clients, seed,
                               alpha=config.data.alpha, min_size=config.data.min_client_size)
    self.clients = data_lib.pad_clients(ds.train_x, ds.train_y, parts,
                                        config.data.get("max_examples", 0), seed)
    n = self.clients.num_clients
    if config.fl.clients_per_round > n:
      raise ConfigError(f"fl.clients_per_round={config.fl.clients_per_round} exceeds the "
                        f"{n} clients of this partition (data.num_clients)")
    self.test_x, self.test_y = ds.test_x, ds.test_y
    max_test = config.data.get("max_test", 0)
    if max_test and len(self.test_y) > max_test:
      keep = np.sort(np.random.default_rng(seed).choice(len(self.test_y), max_test, False))
      self.test_x, self.test_y = self.test_x[keep], self.test_y[keep]

    self.spec = models.build_model(config.model, ds.num_classes, ds.train_x.shape[1:])
    init_key = jax.random.fold_in(jax.random.key(seed), 0x1217)
    params = _init_params(self.spec.module, init_key, self.spec.example_input)
    if config.model.get("pretrained", "") and self.spec.load_pretrained is not None:
      params = self.spec.load_pretrained(params)
    self.params = jax.tree_util.tree_map(lambda p: jnp.asarray(p, jnp.float32), params)
    self.index = masks_lib.group_index(self.params, self.spec.groups)
    self.k = self.spec.groups.num_candidates

    sel = config.selection
    b = sel.budget
    self.budgets = selection.draw_budgets(b.kind, n, seed, value=b.value, low=b.low,
                                          high=b.high, mean=b.mean, std=b.std)
    sizes = masks_lib.group_sizes(self.params, self.index, self.k)
    self.costs = selection.layer_costs(sel.cost, param_counts=sizes,
                                       flops=2.0 * sizes.astype(np.float64))
    if sel.cost == "unit" and b.kind == "fixed" and b.value > self.k:
      raise ConfigError(f"selection.budget.value={b.value} exceeds the {self.k} candidate "
                        f"layers of model {config.model.name!r}")
    selection.check_budgets(self.budgets, self.costs)

    self.client_opt = make_optimizer(config.client_optim, "client_optim")
    self.server_opt = make_optimizer(config.server_optim, "server_optim")
    fl = config.fl
    self.settings = federated.RoundSettings(
        strategy=sel.strategy, score=sel.score, local_steps=fl.local_steps,
        batch_size=fl.batch_size, sel_batches=sel.sel_batches, client_chunk=fl.client_chunk,
        backprop_cut=fl.backprop_cut, diagnostics=config.diagnostics,
        solver_starts=sel.solver_starts, unroll=_unroll(config))
    loss_fn = client_lib.make_loss_fn(self.spec.module.apply)
    self.round_fn = jax.jit(federated.make_round_fn(
        loss_fn, self.index, self.k, self.client_opt, self.server_opt, self.costs,
        self.settings, client_sharding=client_sharding(config)), donate_argnums=0)
    self.evaluate = make_eval_fn(self.spec.module.apply, config.eval_batch_size)

  def initial_state(self) -> federated.ServerState:
    # A copy: round_fn donates its state, and Setup may start several runs.
    params = jax.tree_util.tree_map(jnp.copy, self.params)
    return federated.init_server_state(params, self.server_opt,
                                       self.clients.num_clients, self.k)

  def round_data(self, round_idx: int) -> dict[str, np.ndarray]:
    """Host arrays of round ``round_idx`` (a pure function of seed and round)."""
    c = self.config
    n = self.clients.num_clients
    ids = data_lib.sample_clients(c.seed, round_idx, n, c.fl.clients_per_round)
    m = len(ids)
    mp = federated.padded_clients(m, c.fl.client_chunk)
    slots = np.concatenate([ids, np.full(mp - m, n, np.int32)])
    rd = self.clients.take(np.minimum(slots, n - 1))
    rd.update(client_ids=slots, valid=slots < n,
              budgets=self.budgets[np.minimum(slots, n - 1)].astype(np.float32),
              lam=np.float32(c.selection.lam),
              reselect=np.bool_(round_idx % c.selection.sel_gap == 0),
              diagnose=np.bool_(round_idx % c.get("diagnostics_every", 1) == 0))
    return rd


def _unroll(config) -> bool:
  value = config.fl.get("unroll", False)
  if not isinstance(value, bool):
    raise ConfigError(f"fl.unroll must be one of [True, False], got {value!r}")
  return value


def client_sharding(config) -> jax.sharding.Sharding | None:
  """Shards each chunk's clients over all devices when ``fl.shard_clients``.

  Uses every device JAX sees: one host's GPUs/TPU cores, or all hosts' after
  ``jax.distributed.initialize()``. ``fl.client_chunk`` must be a multiple
  of the device count.
  """
  if not config.fl.get("shard_clients", False):
    return None
  n = jax.device_count()
  chunk = config.fl.client_chunk or config.fl.clients_per_round
  if chunk % n:
    raise ConfigError(f"fl.client_chunk={chunk} must be a multiple of the {n} devices "
                      "when fl.shard_clients=True")
  mesh = jax.make_mesh((n,), ("clients",), axis_types=(jax.sharding.AxisType.Auto,))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("clients"))


def _checkpointer(workdir: str) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, "checkpoints")),
      options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       setup: Setup | None = None, quiet: bool = False) -> dict[str, Any]:
  """Runs (or resumes) a federated run in ``workdir``; returns the final metrics.

  Writes ``config.json``, ``metrics.csv`` (one row per round),
  ``selection.npz`` (masks and scores per round) and orbax checkpoints in
  ``checkpoints/``; a second call on the same workdir resumes from the last
  checkpoint and reproduces the uninterrupted run.
  """
  os.makedirs(workdir, exist_ok=True)
  setup = setup or Setup(config)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))

  mngr = _checkpointer(workdir)
  state = setup.initial_state()
  start = 0
  if mngr.latest_step() is not None:
    start = int(mngr.latest_step())
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, state)
    state = mngr.restore(start, args=ocp.args.StandardRestore(abstract))
    if not quiet:
      print(f"resuming {workdir} from round {start}", flush=True)
  names = setup.spec.groups.names
  log = metrics_writer.RunWriter(workdir, names, start)
  key = jax.random.key(config.seed)
  num_rounds = config.fl.num_rounds
  # A live bar on a terminal; one plain line per evaluation in logs and CI.
  live = not quiet and sys.stderr.isatty()
  bar = tqdm(range(start, num_rounds), initial=start, total=num_rounds, disable=not live,
             desc=config.selection.strategy, dynamic_ncols=True, mininterval=1.0)
  ev = None
  for t in bar:
    t0 = time.perf_counter()
    rd = setup.round_data(t)
    state, metrics = setup.round_fn(state, rd, key)
    metrics = jax.device_get(metrics)
    seconds = time.perf_counter() - t0
    last = t + 1 == num_rounds
    ev = None
    if (t + 1) % config.eval_every == 0 or last:
      ev = setup.evaluate(state.params, setup.test_x, setup.test_y)
    extra = None
    if config.selection.get("check_exact", False) and "scores" in metrics:
      extra = _exact_gap(setup, rd, metrics)
    row = log.add_round(t, metrics, seconds, ev, rd["valid"], extra)
    bar.set_postfix(loss=f"{row['train_loss']:.3f}",
                    acc=f"{ev['accuracy']:.3f}" if ev else "-", s=f"{seconds:.2f}")
    if ev and not live and not quiet:
      print(f"{config.selection.strategy} round {t + 1}/{num_rounds}  "
            f"train_loss {row['train_loss']:.4f}  test_loss {ev['loss']:.4f}  "
            f"test_accuracy {ev['accuracy']:.4f}  {seconds:.2f} s/round", flush=True)
    if (t + 1) % config.checkpoint_every == 0 or last:
      log.flush()
      mngr.save(t + 1, args=ocp.args.StandardSave(state))
  mngr.wait_until_finished()
  bar.close()
  if ev is None:
    ev = setup.evaluate(state.params, setup.test_x, setup.test_y)
  final = {"strategy": config.selection.strategy, "rounds": num_rounds,
           "test_accuracy": ev["accuracy"], "test_loss": ev["loss"],
           "median_seconds_per_round": log.median_seconds()}
  log.write_final(final)
  return final


def _exact_gap(setup: Setup, rd: dict, metrics: dict) -> dict[str, float]:
  """The in-graph solver's gap to the exact MILP on this round's scores."""
  valid = rd["valid"]
  scores = np.asarray(selection.normalize_scores(jnp.asarray(metrics["scores"])))[valid]
  lam = float(rd["lam"])
  exact, info = selection.solve_p1_exact(scores, setup.costs, rd["budgets"][valid], lam)
  got = float(selection.p1_objective(jnp.asarray(metrics["masks"])[valid], scores, lam))
  best = float(info["objective"])
  return {"exact_objective": best, "solver_gap": best - got}
