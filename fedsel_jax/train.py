"""The plain Python outer loop: set up, restore, run rounds, log, checkpoint."""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from tqdm import tqdm

from fedsel_jax import auto_chunk
from fedsel_jax import client as client_lib
from fedsel_jax import data as data_lib
from fedsel_jax import datasets
from fedsel_jax import device_data
from fedsel_jax import errors
from fedsel_jax import federated
from fedsel_jax import local_only
from fedsel_jax import masks as masks_lib
from fedsel_jax import memory_costs
from fedsel_jax import models
from fedsel_jax import multihost
from fedsel_jax import round_programs
from fedsel_jax import run_record
from fedsel_jax import selection
from fedsel_jax import validate
from fedsel_jax import workdir as workdir_lib
from fedsel_jax.evaluate import make_eval_fn

# Re-exported: callers and tests use train.ConfigError / train.validate_config.
ConfigError = errors.ConfigError
validate_config = validate.validate_config
final_metrics = run_record.final_metrics
write_final = run_record.write_final


def make_optimizer(cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """The optax optimizer of ``client_optim`` / ``server_optim`` (checked by validate)."""
  name = cfg.name
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
    self._set_data(dataset)
    self._set_model()
    self._set_costs()
    self._set_round()

  def _set_data(self, dataset) -> None:
    """The partition, the padded client arrays, the hold-out and the test set."""
    config = self.config
    datasets.check_available(config.data)
    self.dataset = dataset if dataset is not None else datasets.load_dataset(config.data)
    ds = self.dataset
    seed = config.seed
    parts = data_lib.partition(ds, config.data.partition, config.data.num_clients, seed,
                               alpha=config.data.alpha, min_size=config.data.min_client_size)
    self.holdout = None   # per-client held-out rows (data.client_holdout)
    if config.data.client_holdout:
      parts, held = local_only.split_parts(parts, config.data.client_holdout, seed)
      self.holdout = local_only.pad_holdout(ds.train_x, ds.train_y, held, parts)
    self.clients = data_lib.pad_clients(ds.train_x, ds.train_y, parts,
                                        config.data.get("max_examples", 0), seed)
    n = self.clients.num_clients
    if config.fl.clients_per_round > n:
      raise ConfigError(f"fl.clients_per_round={config.fl.clients_per_round} exceeds the "
                        f"{n} clients of this partition (data.num_clients)")
    self.test_x, self.test_y = ds.test_x, ds.test_y
    x = ds.train_x.reshape(len(ds.train_x), -1)
    self.nonfinite_rows = int(np.sum(~np.isfinite(x).all(1))) if x.dtype.kind == "f" else 0
    max_test = config.data.get("max_test", 0)
    if max_test and len(self.test_y) > max_test:
      keep = np.sort(np.random.default_rng(seed).choice(len(self.test_y), max_test, False))
      self.test_x, self.test_y = self.test_x[keep], self.test_y[keep]

  def _set_model(self) -> None:
    """The model, its (pretrained) float32 parameters and the group table."""
    config, ds, seed = self.config, self.dataset, self.config.seed
    self.spec = models.build_model(config.model, ds.num_classes, ds.train_x.shape[1:])
    init_key = jax.random.fold_in(jax.random.key(seed), 0x1217)
    params = _init_params(self.spec.module, init_key, self.spec.example_input)
    if config.model.get("pretrained", ""):
      if self.spec.load_pretrained is None:   # else 'auto' would freeze random embeddings
        raise ValueError(f"model.pretrained={config.model.pretrained!r}: model.name="
                         f"{config.model.name!r} loads no pretrained weights; allowed: '' "
                         "(trained from scratch)")
      params = self.spec.load_pretrained(params)
    self.params = jax.tree_util.tree_map(lambda p: jnp.asarray(p, jnp.float32), params)
    self.index = masks_lib.group_index(self.params, self.spec.groups)
    self.k = self.spec.groups.num_candidates

  def _set_costs(self) -> None:
    """Budgets, layer costs (unit, params, flops or memory) and cost logs."""
    config, n, seed = self.config, self.clients.num_clients, self.config.seed
    sel = config.selection
    b = sel.budget
    self.budgets = selection.draw_budgets(b.kind, n, seed, value=b.value, low=b.low,
                                          high=b.high, mean=b.mean, std=b.std)
    sizes = masks_lib.group_sizes(self.params, self.index, self.k)
    # Forward FLOPs per example (fixed, blocks, common): depth-aware budgets and cost logs.
    self.flops = selection.model_forward_flops(self.spec.module, self.spec.example_input,
                                               self.spec.groups)
    self.memory = None    # the memory cost model in bytes (selection.cost='memory')
    if sel.cost == "memory":
      rows = min(config.fl.batch_size, self.clients.mask.shape[1])
      self.memory = memory_costs.memory_depth_costs(
          client_lib.make_loss_fn(self.spec.module.apply), self.params, self.index, self.k,
          self.clients.x[0, :rows], self.clients.y[0, :rows], config.client_optim.name)
      self.costs, self.backward = memory_costs.budget_costs(self.memory)
    else:
      self.costs, self.backward = selection.budget_costs(sel.cost, sizes, self.flops)
    self.run_costs = selection.make_run_costs(
        self.params, self.index, self.k, self.flops, local_steps=config.fl.local_steps,
        batch_size=config.fl.batch_size, sel_batches=sel.sel_batches,
        n_max=self.clients.mask.shape[1])
    # Unit budgets count layers: one above K is a mistake, whichever way it is drawn.
    field, top = ("value", b.value) if b.kind == "fixed" else ("high", b.high)
    if sel.cost == "unit" and top > self.k:
      raise ConfigError(f"selection.budget.{field}={top} exceeds the {self.k} candidate "
                        f"layers of model {config.model.name!r}")
    selection.check_budgets(self.budgets, self.costs, self.backward)

  def _set_round(self) -> None:
    """Optimizers, the static round settings, the jitted round and evaluation."""
    config, sel, fl = self.config, self.config.selection, self.config.fl
    self.client_opt = make_optimizer(config.client_optim)
    self.server_opt = make_optimizer(config.server_optim)
    auto = auto_chunk.is_auto(fl.client_chunk)
    self.chunk_report = None   # what fl.client_chunk='auto' measured and chose
    self.settings = federated.RoundSettings(
        strategy=sel.strategy, score=sel.score, local_steps=fl.local_steps,
        batch_size=fl.batch_size, sel_batches=sel.sel_batches,
        client_chunk=0 if auto else fl.client_chunk, backprop_cut=fl.backprop_cut,
        cut_levels=tuple(fl.cut_levels), grad_gates=fl.grad_gates,
        diagnostics=config.diagnostics.enabled, diag_estimator=config.diagnostics.estimator,
        diag_batches=config.diagnostics.batches, diag_population=config.diagnostics.population,
        diag_power_iters=config.diagnostics.power_iters,
        solver_starts=sel.solver_starts, unroll=_unroll(config))
    self.population = None
    if auto:
      self._choose_chunk(fl.client_chunk)
    self.population = device_data.population_data(config, self.clients, self.chunk)
    # The round, and the E1/E2 diagnostics as their own program unless they
    # share its score pass (round_programs.py; diagnose_fn None then).
    self.round_fn, self.diagnose_fn = self._make_programs(self.settings)
    self.uses_store, self.device_data_note = device_data.wanted(
        fl.device_data, self.clients, fl.device_data_max_mb, fl.get("shard_clients", False))
    self.store = None   # placed by the first train_round (sweeps and the bench never do)
    self.device_round_fn = self.device_diagnose_fn = None
    if self.uses_store:
      self.device_round_fn, self.device_diagnose_fn = round_programs.on_store(
          *self._bodies(self.settings, None), self.clients.mask.shape[1])
    self._nan_shapes: dict = {}   # the diagnostics' shapes, for rounds not diagnosed
    self.evaluate = make_eval_fn(self.spec.apply_for_eval, config.eval_batch_size)

  def _round_args(self) -> tuple:
    """``federated.make_round_fn``'s leading arguments for this run."""
    return (client_lib.make_loss_fn(self.spec.module.apply), self.index, self.k,
            self.client_opt, self.server_opt, self.costs)

  def _bodies(self, settings: federated.RoundSettings, sharding):
    return round_programs.bodies(*self._round_args(), settings, sharding, self.backward)

  def fused_round_body(self, settings: federated.RoundSettings | None = None, sharding=None):
    """The unjitted round with the diagnostics compiled in: one program, the
    reference the run's two programs are tested against."""
    return federated.make_round_fn(*self._round_args(), settings or self.settings,
                                   client_sharding=sharding, backward=self.backward)

  def _make_programs(self, settings: federated.RoundSettings):
    """The jitted round and diagnostics (or None) on host round data (``round_data``)."""
    sharding = round_programs.client_sharding(self.config, settings.client_chunk)
    # Several processes: every output replicated, so each process reads the metrics.
    out = (None if sharding is None or jax.process_count() == 1 else
           jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec()))
    return round_programs.jit_programs(*self._bodies(settings, sharding), out)

  def data_report(self) -> dict[str, Any]:
    """final.json's ``client_data``: whether rounds read the device store, and padding."""
    fl = self.config.fl
    return dict(on_device=self.store is not None, **device_data.padding_report(
        self.clients, fl.clients_per_round, federated.padded_clients(fl.clients_per_round,
                                                                     self.chunk)))

  def train_round(self, state, round_idx: int, key):
    """(state, metrics, round data) of one round of a run: on the device store
    when there is one (only slot ids cross to the device), else host data."""
    diagnose = bool(round_idx % self.config.diagnostics.every == 0)
    if not self.uses_store:
      rd = self.round_data(round_idx)
      return (*round_programs.run(self.round_fn, self.diagnose_fn, state, rd, key, diagnose,
                                  nan_shapes=self._nan_shapes), rd)
    if self.store is None:
      self.store = device_data.place(self.clients)
    rd = self.round_data(round_idx, clients=False)
    return (*round_programs.run(self.device_round_fn, self.device_diagnose_fn, state, rd, key,
                                diagnose, (self.store,), self._nan_shapes), rd)

  def _choose_chunk(self, value: str) -> None:
    """Resolves ``fl.client_chunk='auto...'`` by compiling candidate rounds
    (auto_chunk.py); sets ``chunk``, ``settings`` and ``chunk_report``."""
    m = self.config.fl.clients_per_round
    state, key = self.initial_state(), jax.random.key(self.config.seed)
    rd0 = self.round_data(0)   # every candidate divides m: the same data, no padding slot

    def measure(chunk: int) -> float:
      settings = dataclasses.replace(self.settings, client_chunk=chunk)
      rd = dict(rd0)
      population = device_data.population_data(self.config, self.clients, chunk)
      if population is not None:
        rd["population"] = population
      return round_programs.compiled_mb(*self._make_programs(settings), state, rd, key)

    shapes = jax.tree_util.tree_map(lambda a: (a.shape, str(a.dtype)), (state, rd0))
    cache_key = (self.settings, str(jax.tree_util.tree_structure(shapes)),
                 tuple(jax.tree_util.tree_leaves(shapes)), self.costs.tobytes(),
                 None if self.backward is None else self.backward.tobytes())
    shard = jax.device_count() if self.config.fl.get("shard_clients", False) else 1
    chunk, self.chunk_report = auto_chunk.resolve(value, m, measure, cache_key, shard)
    self.settings = dataclasses.replace(self.settings, client_chunk=chunk)

  @property
  def chunk(self) -> int:
    """Clients per chunk of a round, ``fl.client_chunk`` resolved (0 = all)."""
    return self.settings.client_chunk

  def initial_state(self) -> federated.ServerState:
    # A copy: round_fn donates its state, and Setup may start several runs.
    params = jax.tree_util.tree_map(jnp.copy, self.params)
    return federated.init_server_state(params, self.server_opt,
                                       self.clients.num_clients, self.k)

  def round_data(self, round_idx: int, clients: bool = True) -> dict[str, np.ndarray]:
    """Host arrays of round ``round_idx`` (a pure function of seed and round).

    ``clients=False`` leaves out the clients' x, y and mask (the device store
    holds them; ``num_examples`` stays, the record needs it).
    """
    c = self.config
    n = self.clients.num_clients
    ids = data_lib.sample_clients(c.seed, round_idx, n, c.fl.clients_per_round)
    m = len(ids)
    mp = federated.padded_clients(m, self.chunk)
    slots = np.concatenate([ids, np.full(mp - m, n, np.int32)])
    owner = np.minimum(slots, n - 1)   # padding slots repeat the last client
    rd = (self.clients.take(owner) if clients else
          dict(num_examples=self.clients.num_examples[owner]))
    rd.update(client_ids=slots, valid=slots < n,
              budgets=self.budgets[owner].astype(np.float32),
              lam=np.float32(c.selection.lam),
              reselect=np.bool_(round_idx % c.selection.sel_gap == 0),
              diagnose=np.bool_(round_idx % c.diagnostics.every == 0))
    if self.population is not None:
      rd["population"] = self.population
    return rd


def _unroll(config) -> bool:
  value = config.fl.get("unroll", False)
  if not isinstance(value, bool):
    raise ConfigError(f"fl.unroll must be one of [True, False], got {value!r}")
  return value


def claim_workdir(config: ml_collections.ConfigDict, workdir: str,
                  restart: bool = False, quiet: bool = False) -> workdir_lib.Lock:
  """Locks ``workdir`` for this run and checks it holds this run or none.

  With ``restart`` a previous run is moved aside first. Returns the held
  lock. Writes the fingerprint and config.json only after the check. In a
  multi-process run only the primary touches the workdir (the others get an
  unheld lock; multihost.py).
  """
  path = workdir_lib.check_path(workdir)
  if not multihost.is_primary():
    return workdir_lib.Lock(path)
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise errors.WorkdirError(f"cannot create --workdir {path}: {e.strerror}") from e
  lock = workdir_lib.Lock(path)
  lock.acquire()
  try:
    if restart:
      moved = workdir_lib.restart(path)
      if moved and not quiet:
        print(f"moved the previous run in {path} to {moved}", flush=True)
    if workdir_lib.check_fingerprint(path, config):
      done = workdir_lib.rounds_done(path)
      if done > config.fl.num_rounds:
        raise ConfigError(f"fl.num_rounds={config.fl.num_rounds} is below the {done} rounds "
                          f"already done in {path}; raise it, or use --restart or another "
                          "--workdir")
    workdir_lib.write_run_files(path, config)
  except BaseException:
    lock.release()
    raise
  return lock


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       setup: Setup | None = None, quiet: bool = False,
                       restart: bool = False, lock: workdir_lib.Lock | None = None
                       ) -> dict[str, Any]:
  """Runs (or resumes) a federated run in ``workdir``; returns the final metrics.

  Writes ``fingerprint.json``, ``config.json``, ``metrics.csv`` (one row per
  round), ``selection.npz`` (masks and scores per round) and orbax
  checkpoints in ``checkpoints/``. A second call on the same workdir with
  the same config resumes from the newest intact checkpoint and reproduces
  the uninterrupted run; another config is refused (``restart`` moves the
  old run aside). ``lock``: a lock from :func:`claim_workdir` already held
  (released here at the end).
  """
  if lock is None:   # the set-up's checks first: a config that fails one writes nothing
    setup = setup or Setup(config)
    lock = claim_workdir(config, workdir, restart=restart, quiet=quiet)
  try:   # a lock held by the caller is released whatever fails here
    setup = setup or Setup(config)
    if config.fl.local_only:
      return local_only.train_and_evaluate(setup, lock.workdir, quiet=quiet)
    return _train(config, lock.workdir, setup, quiet)
  finally:
    lock.release()


def _train(config, workdir: str, setup: "Setup", quiet: bool) -> dict[str, Any]:
  primary = multihost.is_primary()
  quiet = quiet or not primary
  run = run_record.RunRecord(workdir, config, primary=primary)
  run.layer_names = setup.spec.groups.names
  if setup.chunk_report and not quiet:
    print(setup.chunk_report, flush=True)
  if setup.device_data_note and not quiet:
    print(f"note: client data not on the device: {setup.device_data_note}", flush=True)
  start, state = run.resume(setup.initial_state(), quiet)
  if jax.process_count() > 1:   # the primary read the checkpoint: everyone starts from it
    start, state = multihost.broadcast((np.int32(start), jax.device_get(state)))
    start = int(start)
  run.tensorboard.start(start)
  guard = run_record.DivergenceGuard(config, setup, workdir)
  guard.last_saved = start if start else None
  guard.seed_loss(run.rows)   # a resumed run compares its losses with its first round's
  key = jax.random.key(config.seed)
  num_rounds = config.fl.num_rounds
  # A live bar on a terminal; one plain line per evaluation in logs and CI.
  live = not quiet and sys.stderr.isatty()
  bar = tqdm(range(start, num_rounds), initial=start, total=num_rounds, disable=not live,
             desc=config.selection.strategy, dynamic_ncols=True, mininterval=1.0)
  ev = None
  t = start
  try:
    for t in bar:
      t0 = time.perf_counter()
      state, metrics, rd = setup.train_round(state, t, key)
      metrics = jax.device_get(metrics)
      seconds = time.perf_counter() - t0
      last = t + 1 == num_rounds
      ev = None
      if (t + 1) % config.eval_every == 0 or last:
        ev = setup.evaluate(state.params, setup.test_x, setup.test_y)
      run_record.record_round(run, setup, t, metrics, rd, seconds, ev)
      bar.set_postfix(loss=f"{run.rows[-1]['train_loss']:.3f}",
                      acc=f"{ev['accuracy']:.3f}" if ev else "-", s=f"{seconds:.2f}")
      if ev and not live and not quiet:
        print(f"{config.selection.strategy} round {t + 1}/{num_rounds}  "
              f"train_loss {run.rows[-1]['train_loss']:.4f}  test_loss {ev['loss']:.4f}  "
              f"test_accuracy {ev['accuracy']:.4f}  {seconds:.2f} s/round", flush=True)
      try:
        guard.observe(t, metrics, quiet)
      except errors.DivergedError:
        run.write_files()   # the failed rounds' rows, for inspection; no checkpoint
        raise
      if ((t + 1) % config.checkpoint_every == 0 or last) and not guard.in_streak:
        run.checkpoint(t + 1, state)
        guard.last_saved = t + 1
  except errors.Interrupted as e:
    raise errors.Interrupted(e.signum, t) from None
  finally:
    bar.close()
    run.ckpts.close()
    run.tensorboard.close()
  if ev is None:
    ev = setup.evaluate(state.params, setup.test_x, setup.test_y)
  final = run_record.final_metrics(setup, run, ev, state.params)
  if primary:
    kept = run_record.read_final(workdir) if start == num_rounds else None
    if kept is not None and kept.get("rounds") == num_rounds:
      return kept   # a finished run rerun: its final.json stays as the run wrote it
    run_record.write_final(workdir, final)
  return final


