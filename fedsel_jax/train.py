"""The plain Python outer loop: set up, restore, run rounds, log, checkpoint."""

from __future__ import annotations

import csv
import functools
import io
import json
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

from fedsel_jax import bound as bound_lib
from fedsel_jax import checkpoints as checkpoints_lib
from fedsel_jax import client as client_lib
from fedsel_jax import data as data_lib
from fedsel_jax import datasets
from fedsel_jax import errors
from fedsel_jax import federated
from fedsel_jax import local_only
from fedsel_jax import masks as masks_lib
from fedsel_jax import metrics_writer
from fedsel_jax import models
from fedsel_jax import selection
from fedsel_jax import signals
from fedsel_jax import validate
from fedsel_jax import workdir as workdir_lib
from fedsel_jax.evaluate import make_eval_fn

# Re-exported: callers and tests use train.ConfigError / train.validate_config.
ConfigError = errors.ConfigError
validate_config = validate.validate_config


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
    # Forward FLOPs per example (fixed, blocks, common): depth-aware budgets and cost logs.
    self.flops = selection.model_forward_flops(self.spec.module, self.spec.example_input,
                                               self.spec.groups)
    self.costs, self.backward = selection.budget_costs(sel.cost, sizes, self.flops)
    self.run_costs = selection.make_run_costs(
        self.params, self.index, self.k, self.flops, local_steps=config.fl.local_steps,
        batch_size=config.fl.batch_size, sel_batches=sel.sel_batches,
        n_max=self.clients.mask.shape[1])
    if sel.cost == "unit" and b.kind == "fixed" and b.value > self.k:
      raise ConfigError(f"selection.budget.value={b.value} exceeds the {self.k} candidate "
                        f"layers of model {config.model.name!r}")
    selection.check_budgets(self.budgets, self.costs, self.backward)

    self.client_opt = make_optimizer(config.client_optim)
    self.server_opt = make_optimizer(config.server_optim)
    fl = config.fl
    self.settings = federated.RoundSettings(
        strategy=sel.strategy, score=sel.score, local_steps=fl.local_steps,
        batch_size=fl.batch_size, sel_batches=sel.sel_batches, client_chunk=fl.client_chunk,
        backprop_cut=fl.backprop_cut, cut_levels=tuple(fl.cut_levels),
        diagnostics=config.diagnostics.enabled, diag_estimator=config.diagnostics.estimator,
        diag_batches=config.diagnostics.batches, diag_population=config.diagnostics.population,
        diag_power_iters=config.diagnostics.power_iters,
        solver_starts=sel.solver_starts, unroll=_unroll(config))
    self.population = population_data(config, self.clients)
    loss_fn = client_lib.make_loss_fn(self.spec.module.apply)
    self.round_fn = jax.jit(federated.make_round_fn(
        loss_fn, self.index, self.k, self.client_opt, self.server_opt, self.costs,
        self.settings, client_sharding=client_sharding(config), backward=self.backward),
        donate_argnums=0)
    self.evaluate = make_eval_fn(self.spec.apply_for_eval, config.eval_batch_size)

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
              diagnose=np.bool_(round_idx % c.diagnostics.every == 0))
    if self.population is not None:
      rd["population"] = self.population
    return rd


def population_data(config, clients: data_lib.ClientArrays) -> dict | None:
  """Every client's data on the device once, for ``diagnostics.population``.

  Rule: the padded arrays (N rounded up to the round's chunk, x n_max
  examples) must fit ``diagnostics.population_max_mb``; the gradient pass
  streams them in chunks like a round (docs/diagnostics.md).
  """
  d = config.diagnostics
  if not (d.enabled and d.population):
    return None
  n, m = clients.num_clients, config.fl.clients_per_round
  chunk = min(config.fl.client_chunk, m) if config.fl.client_chunk > 0 else m  # the round's chunk
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


def _rows_csv(rows: list[dict]) -> str:
  """The metrics rows as CSV text (the content of metrics.csv)."""
  out = io.StringIO()
  fields = list(dict.fromkeys(k for r in rows for k in r))
  w = csv.DictWriter(out, fieldnames=fields, lineterminator="\n")
  w.writeheader()
  w.writerows(rows)
  return out.getvalue() if rows else ""


def _parse_rows(text: str) -> list[dict]:
  return list(csv.DictReader(io.StringIO(text))) if text else []


def _write_atomic(path: str, write) -> None:
  tmp = path + ".tmp"
  write(tmp)
  os.replace(tmp, path)


def _row(round_idx: int, metrics: dict, seconds: float, names: tuple[str, ...],
         ev: dict | None) -> dict:
  row: dict[str, Any] = {"round": round_idx, "train_loss": float(metrics["train_loss"]),
                         "test_loss": "" if ev is None else ev["loss"],
                         "test_accuracy": "" if ev is None else ev["accuracy"],
                         "seconds": round(seconds, 4),
                         "clients_nonfinite": int(metrics["clients_nonfinite"]),
                         "round_skipped": int(bool(metrics["round_skipped"]))}
  for key in ("penalty", "disagreement", "objective", "e1", "e2", "e2_bound", "grad_sq",
              "grad_sq_cand", "f_diag", "lipschitz", "update_sq") + bound_lib.SAMPLED_COLUMNS:
    if key in metrics:
      value = float(metrics[key])
      row[key] = "" if np.isnan(value) else value
  for name, s in zip(names, np.asarray(metrics["coverage"])):
    row[f"S_{name}"] = int(s)
  return row


class _Run:
  """The mutable host-side record of a run: rows, selection history, files."""

  def __init__(self, workdir: str, config: ml_collections.ConfigDict):
    self.workdir = workdir
    self.config = config
    self.fingerprint = workdir_lib.fingerprint(config)["sha256"]
    self.ckpts = checkpoints_lib.RunCheckpoints(workdir, config.checkpoint_keep)
    self.rows: list[dict] = []
    self.history: dict[str, list] = {"masks": [], "scores": []}
    self.layer_names: tuple[str, ...] = ()   # candidate names, for diagnostics.npz
    self.tensorboard = metrics_writer.TensorBoardMirror(workdir)

  def resume(self, initial: federated.ServerState, quiet: bool):
    """(first round to run, state) after restoring the newest intact checkpoint."""
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, initial)
    got = self.ckpts.restore_latest(abstract)
    if got is None:
      return 0, initial
    start, state, rows_csv, history = got
    if start > self.config.fl.num_rounds:
      raise ConfigError(f"fl.num_rounds={self.config.fl.num_rounds} is below the {start} "
                        f"rounds already done in {self.workdir}; raise it, or use --restart "
                        "or another --workdir")
    self.rows = _parse_rows(rows_csv)
    self.history = {k: list(v) for k, v in history.items()}
    self.history.setdefault("scores", [])
    if not quiet:
      print(f"resuming {self.workdir} from round {start}", flush=True)
    # The checkpoint is the source of truth: files written after it are redone.
    self.write_files()
    return start, jax.device_put(state)

  def history_arrays(self) -> dict[str, np.ndarray]:
    return {k: np.stack(v) for k, v in self.history.items() if v}

  def write_files(self) -> None:
    if self.config.diagnostics.enabled:   # running columns, recomputed from all rows
      bound_lib.add_bound_columns(self.rows, bound_lib.effective_step(
          self.config.fl.local_steps, self.config.client_optim.lr, self.config.server_optim.lr))
    text = _rows_csv(self.rows)

    def write_csv(tmp):
      with open(tmp, "w", newline="") as f:
        f.write(text)
    _write_atomic(os.path.join(self.workdir, "metrics.csv"), write_csv)
    arrays, layers = bound_lib.split_history(self.history_arrays(), self.layer_names)
    if layers:   # the per-layer terms ride in the checkpointed history too
      def write_layers(tmp):
        with open(tmp, "wb") as f:
          np.savez(f, **layers)
      _write_atomic(os.path.join(self.workdir, "diagnostics.npz"), write_layers)
    sel = os.path.join(self.workdir, "selection.npz")
    if arrays:
      def write_npz(tmp):
        with open(tmp, "wb") as f:
          np.savez(f, **arrays)
      _write_atomic(sel, write_npz)

  def checkpoint(self, step: int, state: federated.ServerState) -> None:
    with signals.critical():
      self.write_files()
      self.tensorboard.write(self.rows)
      self.ckpts.save(step, state, _rows_csv(self.rows), self.history_arrays(),
                      self.fingerprint)


class _Divergence:
  """Counts rounds in a row that changed nothing because every update was non-finite."""

  def __init__(self, config: ml_collections.ConfigDict, setup: "Setup", workdir: str):
    self.config, self.setup, self.workdir = config, setup, workdir
    self.bad_in_a_row = 0
    self.warned = False
    self.last_saved = None

  def observe(self, t: int, metrics: dict, quiet: bool) -> None:
    bad_clients = int(metrics["clients_nonfinite"])
    if bad_clients and not self.warned and not quiet:
      self.warned = True
      print(f"warning: round {t}: {bad_clients} of {self.config.fl.clients_per_round} clients "
            "returned a non-finite loss or update and were left out of the aggregate "
            "(counted per round in metrics.csv, clients_nonfinite)", file=sys.stderr, flush=True)
    self.bad_in_a_row = self.bad_in_a_row + 1 if bool(metrics["round_skipped"]) else 0
    limit = self.config.fl.max_bad_rounds
    if self.bad_in_a_row >= limit:
      saved = f"round {self.last_saved}" if self.last_saved is not None else "none yet"
      raise errors.DivergedError(
          f"training diverged: rounds {t - limit + 1}-{t} changed nothing (every update "
          f"non-finite, fl.max_bad_rounds={limit}); likely cause: {self.cause(metrics)}; "
          f"the last checkpoint ({saved}) in {self.workdir}/checkpoints holds finite weights")

  def cause(self, metrics: dict) -> str:
    c = self.config
    if self.setup.nonfinite_rows:
      return (f"{self.setup.nonfinite_rows} training examples hold NaN or inf "
              f"(data.name={c.data.name!r})")
    lrs = (f"client_optim.lr={c.client_optim.lr:g} ({c.client_optim.name}), "
           f"server_optim.lr={c.server_optim.lr:g} ({c.server_optim.name})")
    if int(metrics["clients_nonfinite"]) == 0:
      return f"the server step overflowed: server_optim.lr too large ({lrs})"
    return f"a learning rate too large for this model ({lrs})"

  @property
  def in_streak(self) -> bool:
    """True while rounds change nothing: no checkpoint then, so the last one
    written before the streak survives ``checkpoint_keep``."""
    return self.bad_in_a_row > 0


def claim_workdir(config: ml_collections.ConfigDict, workdir: str,
                  restart: bool = False, quiet: bool = False) -> workdir_lib.Lock:
  """Locks ``workdir`` for this run and checks it holds this run or none.

  With ``restart`` a previous run is moved aside first. Returns the held
  lock. Writes the fingerprint and config.json only after the check.
  """
  path = workdir_lib.check_path(workdir)
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
  lock = lock or claim_workdir(config, workdir, restart=restart, quiet=quiet)
  try:
    setup = setup or Setup(config)
    if config.fl.local_only:
      return local_only.train_and_evaluate(setup, lock.workdir, quiet=quiet)
    return _train(config, lock.workdir, setup, quiet)
  finally:
    lock.release()


def _train(config, workdir: str, setup: "Setup", quiet: bool) -> dict[str, Any]:
  run = _Run(workdir, config)
  run.layer_names = setup.spec.groups.names
  start, state = run.resume(setup.initial_state(), quiet)
  run.tensorboard.start(start)
  guard = _Divergence(config, setup, workdir)
  guard.last_saved = start if start else None
  key = jax.random.key(config.seed)
  names = setup.spec.groups.names
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
      rd = setup.round_data(t)
      state, metrics = setup.round_fn(state, rd, key)
      metrics = jax.device_get(metrics)
      seconds = time.perf_counter() - t0
      last = t + 1 == num_rounds
      ev = None
      if (t + 1) % config.eval_every == 0 or last:
        ev = setup.evaluate(state.params, setup.test_x, setup.test_y)
      run.rows.append(_row(t, metrics, seconds, names, ev))
      run.rows[-1].update(selection.round_costs(setup.run_costs, metrics["masks"], rd["valid"],
                                                metrics["scored"], rd["num_examples"]))
      _record_selection(run, setup, config, rd, metrics)
      bound_lib.append_layer_terms(run.history, t, metrics)
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
  final = final_metrics(setup, run, ev, state.params)
  write_final(workdir, final)
  return final


def final_metrics(setup: "Setup", run: _Run, ev: dict, params) -> dict[str, Any]:
  """final.json's content: accuracy, loss, median round time, cost totals."""
  config = setup.config
  final = {"strategy": config.selection.strategy, "rounds": config.fl.num_rounds,
           "test_accuracy": ev["accuracy"], "test_loss": ev["loss"],
           "median_seconds_per_round": float(np.median([float(r["seconds"]) for r in run.rows]))
           if run.rows else float("nan"), **selection.cost_totals(run.rows)}
  if setup.holdout is not None:
    final["client_holdout_accuracy"] = local_only.federated_holdout(setup, params)
  return final


def write_final(workdir: str, final: dict[str, Any]) -> None:
  """final.json of a finished run (atomically)."""
  def write(tmp):
    with open(tmp, "w") as f:
      json.dump(final, f, indent=2)
  _write_atomic(os.path.join(workdir, "final.json"), write)


def _record_selection(run: _Run, setup: "Setup", config, rd: dict, metrics: dict) -> None:
  valid = rd["valid"]
  run.history["masks"].append(np.asarray(metrics["masks"])[valid])
  if "scores" in metrics:
    run.history["scores"].append(np.asarray(metrics["scores"])[valid])
  if config.selection.check_exact and "scores" in metrics:
    run.rows[-1].update(_exact_gap(setup, rd, metrics))


def _exact_gap(setup: Setup, rd: dict, metrics: dict) -> dict[str, float]:
  """The in-graph solver's gap to the exact MILP on this round's scores."""
  valid = rd["valid"]
  scores = np.asarray(selection.normalize_scores(jnp.asarray(metrics["scores"])))[valid]
  lam = float(rd["lam"])
  _, info = selection.solve_p1_exact(scores, setup.costs, rd["budgets"][valid], lam,
                                     backward=setup.backward)
  got = float(selection.p1_objective(jnp.asarray(metrics["masks"])[valid], scores, lam))
  best = float(info["objective"])
  return {"exact_objective": best, "solver_gap": best - got}
