"""R runs of one program at once: the round function vmapped over a run axis.

The runs of a group (``sweep_spec.run_groups``) differ only in traced values
and host data: lambda, learning rates, seeds (partition, budgets, client
sampling, init, keys). ``make_runs_fn`` vmaps ``federated.make_round_fn`` over
the state, the round data, the learning rates and the key; the optimizers
are built inside the trace so that a learning rate is an array, not a
constant. Each run keeps its own workdir with exactly the files of a single
run (``train.train_and_evaluate``): config.json, metrics.csv, selection.npz,
TensorBoard events, orbax checkpoints and final.json, and resumes from the
latest checkpoint every run of the chunk holds.

Equal to R single runs because every per-client computation is invariant
to padding the example axis (threefry bits are drawn per element, padding
rows weigh 0 and sort last, all-padding score batches are skipped).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from fedsel_jax import client as client_lib
from fedsel_jax import federated
from fedsel_jax import metrics_writer
from fedsel_jax import train

EXAMPLE_AXIS_KEYS = ("x", "y", "mask")    # round-data arrays [Mp, n_max, ...]
# Fault injection for the resume test: SIGKILL after this many checkpoint saves.
KILL_ENV = "FEDSEL_SWEEP_KILL_AFTER_SAVES"
_saves = 0


class _OptimizerConfig(dict):
  """A config node whose ``lr`` may be a tracer (ConfigDicts refuse those)."""
  __getattr__ = dict.__getitem__


def _traced_optimizer(cfg, lr: jax.Array, prefix: str):
  return train.make_optimizer(_OptimizerConfig(cfg.to_dict(), lr=lr), prefix)


def make_runs_fn(setup: train.Setup, shared_data: bool) -> Callable:
  """``runs_fn(states, round_data, lrs f32[R, 2], keys[R]) -> (states, metrics)``.

  Args:
    setup: any run of the group (its static parts are everyone's).
    shared_data: every run sees the same round data except ``lam``
      (then only ``lam`` carries the run axis, the rest is not copied R times).

  ``states`` and every metric carry a leading run axis R; ``lrs[:, 0]`` is
  the client and ``lrs[:, 1]`` the server learning rate. Built with
  ``backprop_cut=False``: under vmap the per-chunk switch would run every
  branch (the cut changes speed, not results).
  """
  config = setup.config
  loss_fn = client_lib.make_loss_fn(setup.spec.module.apply)
  settings = dataclasses.replace(setup.settings, backprop_cut=False)

  def one_run(state, rd, lrs, key):
    client_opt = _traced_optimizer(config.client_optim, lrs[0], "client_optim")
    server_opt = _traced_optimizer(config.server_optim, lrs[1], "server_optim")
    round_fn = federated.make_round_fn(loss_fn, setup.index, setup.k, client_opt, server_opt,
                                       setup.costs, settings)
    return round_fn(state, rd, key)

  def runs_fn(states, rd, lrs, keys):
    rd_axes = {k: (0 if k == "lam" or not shared_data else None) for k in rd}
    return jax.vmap(one_run, in_axes=(0, rd_axes, 0, 0))(states, rd, lrs, keys)

  return jax.jit(runs_fn, donate_argnums=0)


def pad_examples(rd: dict[str, np.ndarray], n_max: int) -> dict[str, np.ndarray]:
  """Round data with its example axis padded to ``n_max`` (padding: mask False)."""
  out = dict(rd)
  for k in EXAMPLE_AXIS_KEYS:
    a = rd[k]
    widths = [(0, 0), (0, n_max - a.shape[1])] + [(0, 0)] * (a.ndim - 2)
    out[k] = np.pad(a, widths)
  return out


def stack_round_data(rds: list[dict], shared_data: bool, n_max: int) -> dict:
  """One round's data of R runs: arrays gain a leading run axis.

  With ``shared_data`` only ``lam`` is stacked (the runs differ in nothing else).
  """
  if shared_data:
    return dict(rds[0], lam=np.stack([r["lam"] for r in rds]))
  padded = [pad_examples(r, n_max) for r in rds]
  return {k: np.stack([r[k] for r in padded]) for k in rds[0]}


def unstack(tree: Any, j: int) -> Any:
  """Run ``j`` of a stacked pytree."""
  return jax.tree_util.tree_map(lambda a: a[j], tree)


def _restore_states(setups, mngrs) -> tuple[int, list]:
  """(start round, states): the latest checkpoint every run holds, else round 0."""
  latest = [m.latest_step() or 0 for m in mngrs]
  start = min(latest)
  if start and not all(start in m.all_steps() for m in mngrs):
    start = 0
  states = []
  for s, m in zip(setups, mngrs):
    state = s.initial_state()
    if start:
      abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, state)
      state = m.restore(start, args=ocp.args.StandardRestore(abstract))
    states.append(state)
  return start, states


def _maybe_kill(mngrs) -> None:
  """SIGKILL this process at the save ``$FEDSEL_SWEEP_KILL_AFTER_SAVES`` (tests).

  Waits for the saves in flight first, so that the kill lands at a known
  point: after some runs of the chunk saved this round and others did not.
  """
  global _saves
  _saves += 1
  limit = os.environ.get(KILL_ENV)
  if limit and _saves >= int(limit):
    for m in mngrs:
      m.wait_until_finished()
    os.kill(os.getpid(), signal.SIGKILL)


def run_chunk(setups: list[train.Setup], workdirs: list[str], runs_fn: Callable,
              shared_data: bool, n_max: int, quiet: bool = False) -> list[dict]:
  """Trains (or resumes) R runs together; returns each run's final.json dict."""
  configs = [s.config for s in setups]
  c0 = configs[0]
  names = setups[0].spec.groups.names
  for c, wd in zip(configs, workdirs):
    os.makedirs(wd, exist_ok=True)
    with open(os.path.join(wd, "config.json"), "w") as f:
      f.write(c.to_json_best_effort(indent=2))
  mngrs = [train._checkpointer(wd) for wd in workdirs]
  start, states = _restore_states(setups, mngrs)
  if start and not quiet:
    print(f"resuming {len(workdirs)} runs from round {start}", flush=True)
  state = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *states)
  logs = [metrics_writer.RunWriter(wd, names, start) for wd in workdirs]
  keys = jax.vmap(jax.random.key)(jnp.asarray([c.seed for c in configs]))
  lrs = jnp.asarray([[c.client_optim.lr, c.server_optim.lr] for c in configs], jnp.float32)
  evaluate = setups[0].evaluate      # one compiled evaluation for every run
  num_rounds, r = c0.fl.num_rounds, len(setups)
  evs = [None] * r
  for t in range(start, num_rounds):
    t0 = time.perf_counter()
    rd = stack_round_data([s.round_data(t) for s in setups], shared_data, n_max)
    state, metrics = runs_fn(state, rd, lrs, keys)
    metrics = jax.device_get(metrics)
    seconds = (time.perf_counter() - t0) / r     # the round's wall time, per run
    last = t + 1 == num_rounds
    evs = [None] * r
    if (t + 1) % c0.eval_every == 0 or last:
      evs = [evaluate(unstack(state.params, j), s.test_x, s.test_y)
             for j, s in enumerate(setups)]
    for j, log in enumerate(logs):
      valid = rd["valid"] if shared_data else rd["valid"][j]
      log.add_round(t, unstack(metrics, j), seconds, evs[j], valid)
    if evs[0] is not None and not quiet:
      accs = [e["accuracy"] for e in evs]
      print(f"  {r} runs round {t + 1}/{num_rounds}  test_accuracy "
            f"{min(accs):.4f}..{max(accs):.4f}  {seconds * r:.3f} s/round", flush=True)
    if (t + 1) % c0.checkpoint_every == 0 or last:
      for j, (log, mngr) in enumerate(zip(logs, mngrs)):
        log.flush()
        mngr.save(t + 1, args=ocp.args.StandardSave(unstack(state, j)))
        _maybe_kill(mngrs)
  finals = []
  for j, (s, log, mngr) in enumerate(zip(setups, logs, mngrs)):
    mngr.wait_until_finished()
    ev = evs[j] or evaluate(unstack(state.params, j), s.test_x, s.test_y)
    final = {"strategy": s.config.selection.strategy, "rounds": num_rounds,
             "test_accuracy": ev["accuracy"], "test_loss": ev["loss"],
             "median_seconds_per_round": log.median_seconds()}
    log.write_final(final)
    finals.append(final)
  return finals
