"""R runs of one program at once: the round function vmapped over a run axis.

The runs of a group (``sweep_spec.run_groups``) differ only in traced values
and host data: lambda, learning rates, seeds (partition, budgets, client
sampling, init, keys). ``make_runs_fn`` vmaps ``federated.make_round_fn`` over
the state, the round data, the learning rates and the key; the optimizers
are built inside the trace so that a learning rate is an array, not a
constant. Each run keeps its own workdir with exactly the files of a single
run (``train.train_and_evaluate``; the same ``train.claim_workdir`` and
``run_record`` pieces): fingerprint.json, config.json, metrics.csv (cost
columns included), selection.npz, TensorBoard events, checkpoints and
final.json, and resumes from its newest intact checkpoint. A run that
diverges (``fl.max_bad_rounds`` rounds in a row that changed nothing) stops
as a single run would: its rows are written, no checkpoint after the streak
begins, no final.json; ``diverged.json`` holds the one-line reason, and the
other runs of the chunk go on.

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

from fedsel_jax import client as client_lib
from fedsel_jax import errors
from fedsel_jax import federated
from fedsel_jax import run_record
from fedsel_jax import train

EXAMPLE_AXIS_KEYS = ("x", "y", "mask")    # round-data arrays [Mp, n_max, ...]
# Round-level flags, equal in every run of a group (they depend on the round
# and on fields that are not run-axis fields): never given the run axis, so
# the round's lax.conds on them stay conds under vmap (a batched predicate
# would run the diagnostics and the score pass in every round, as selects).
ROUND_FLAGS = ("diagnose", "reselect")
# Fault injection for the resume test: SIGKILL after this many checkpoint saves.
KILL_ENV = "FEDSEL_SWEEP_KILL_AFTER_SAVES"
_saves = 0


class _OptimizerConfig(dict):
  """A config node whose ``lr`` may be a tracer (ConfigDicts refuse those)."""
  __getattr__ = dict.__getitem__


def _traced_optimizer(cfg, lr: jax.Array):
  return train.make_optimizer(_OptimizerConfig(cfg.to_dict(), lr=lr))


def make_runs_fn(setup: train.Setup, shared_data: bool) -> Callable:
  """``runs_fn(states, round_data, lrs f32[R, 2], keys[R]) -> (states, metrics)``.

  Args:
    setup: any run of the group (its static parts are everyone's).
    shared_data: every run sees the same round data except ``lam``
      (then only ``lam`` carries the run axis, the rest is not copied R times).

  ``states`` and every metric carry a leading run axis R; ``lrs[:, 0]`` is
  the client and ``lrs[:, 1]`` the server learning rate. Built with
  ``backprop_cut=False`` and ``grad_gates=False``: under vmap the per-chunk
  switch and the gates' branches would run every branch (both change speed,
  not results).
  """
  config = setup.config
  loss_fn = client_lib.make_loss_fn(setup.spec.module.apply)
  settings = dataclasses.replace(setup.settings, backprop_cut=False, grad_gates=False)

  def one_run(state, rd, lrs, key):
    client_opt = _traced_optimizer(config.client_optim, lrs[0])
    server_opt = _traced_optimizer(config.server_optim, lrs[1])
    round_fn = federated.make_round_fn(loss_fn, setup.index, setup.k, client_opt, server_opt,
                                       setup.costs, settings, backward=setup.backward)
    return round_fn(state, rd, key)

  def runs_fn(states, rd, lrs, keys):
    rd_axes = {k: (0 if k == "lam" or not (shared_data or k in ROUND_FLAGS) else None)
               for k in rd}
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

  With ``shared_data`` only ``lam`` is stacked (the runs differ in nothing else);
  the :data:`ROUND_FLAGS` never are.
  """
  if shared_data:
    return dict(rds[0], lam=np.stack([r["lam"] for r in rds]))
  padded = [pad_examples(r, n_max) for r in rds]
  for k in ROUND_FLAGS:
    if k in rds[0] and any(r[k] != rds[0][k] for r in rds):
      raise ValueError(f"round flag {k!r} differs between the runs of a vmapped group")
  return {k: (rds[0][k] if k in ROUND_FLAGS else np.stack([r[k] for r in padded]))
          for k in rds[0]}


def unstack(tree: Any, j: int) -> Any:
  """Run ``j`` of a stacked pytree."""
  return jax.tree_util.tree_map(lambda a: a[j], tree)


def _maybe_kill() -> None:
  """SIGKILL this process at the save ``$FEDSEL_SWEEP_KILL_AFTER_SAVES`` (tests).

  Saves are synchronous, so the kill lands at a known point: after some runs
  of the chunk saved this round and before the others did.
  """
  global _saves
  _saves += 1
  limit = os.environ.get(KILL_ENV)
  if limit and _saves >= int(limit):
    os.kill(os.getpid(), signal.SIGKILL)


def run_chunk(setups: list[train.Setup], workdirs: list[str], runs_fn: Callable,
              shared_data: bool, n_max: int, quiet: bool = False) -> list[dict | None]:
  """Trains (or resumes) R runs together; each run's final.json dict (None: diverged).

  Every workdir is claimed as a single run claims it (lock, fingerprint,
  config.json) and resumed from its newest intact checkpoint; runs that
  stopped at different rounds (a kill between their saves) go on in
  separate groups until they finish.
  """
  locks = []
  try:
    for s, wd in zip(setups, workdirs):
      locks.append(train.claim_workdir(s.config, wd, quiet=True))
    runs = [run_record.RunRecord(lock.workdir, s.config) for s, lock in zip(setups, locks)]
    resumed = [run.resume(s.initial_state(), quiet=True) for s, run in zip(setups, runs)]
    finals: dict[int, dict] = {}
    for start in sorted({r[0] for r in resumed}):
      idx = [j for j, r in enumerate(resumed) if r[0] == start]
      if start and not quiet:
        print(f"resuming {len(idx)} runs from round {start}", flush=True)
      out = _train_together([setups[j] for j in idx], [runs[j] for j in idx],
                            [resumed[j][1] for j in idx], start, runs_fn, shared_data, n_max,
                            quiet)
      finals.update(zip(idx, out))
    return [finals[j] for j in range(len(setups))]
  finally:
    for lock in locks:
      lock.release()


def _observe(guard: run_record.DivergenceGuard, run: run_record.RunRecord, t: int, m: dict
             ) -> str | None:
  """The divergence message if run ``run`` stops at round ``t``, else None."""
  try:
    guard.observe(t, m, quiet=True)
  except errors.DivergedError as e:
    run.write_files()      # the failed rounds' rows, for inspection; no checkpoint
    return run_record.record_diverged(run.workdir, e)
  return None


def _train_together(setups, runs, states, start: int, runs_fn: Callable, shared_data: bool,
                    n_max: int, quiet: bool) -> list[dict | None]:
  """Rounds ``start..num_rounds`` of R runs as one vmapped program."""
  c0 = setups[0].config
  state = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *states)
  keys = jax.vmap(jax.random.key)(jnp.asarray([s.config.seed for s in setups]))
  lrs = jnp.asarray([[s.config.client_optim.lr, s.config.server_optim.lr] for s in setups],
                    jnp.float32)
  evaluate = setups[0].evaluate      # one compiled evaluation for every run
  num_rounds, r = c0.fl.num_rounds, len(setups)
  guards = [run_record.DivergenceGuard(s.config, s, run.workdir) for s, run in zip(setups, runs)]
  stopped: list[str | None] = [None] * r
  for guard, run in zip(guards, runs):
    run.layer_names = setups[0].spec.groups.names
    run.tensorboard.start(start)
    guard.last_saved = start if start else None
  evs = [None] * r
  try:
    for t in range(start, num_rounds):
      if all(stopped):
        break
      t0 = time.perf_counter()
      rds = [s.round_data(t) for s in setups]
      state, metrics = runs_fn(state, stack_round_data(rds, shared_data, n_max), lrs, keys)
      metrics = jax.device_get(metrics)
      seconds = (time.perf_counter() - t0) / r     # the round's wall time, per run
      last = t + 1 == num_rounds
      evs = [None] * r
      if (t + 1) % c0.eval_every == 0 or last:
        evs = [None if stopped[j] else evaluate(unstack(state.params, j), s.test_x, s.test_y)
               for j, s in enumerate(setups)]
      for j, (s, run) in enumerate(zip(setups, runs)):
        if not stopped[j]:
          m = unstack(metrics, j)
          run_record.record_round(run, s, t, m, rds[j], seconds, evs[j])
          stopped[j] = _observe(guards[j], run, t, m)
      _progress(evs, r, t, num_rounds, seconds, quiet)
      if (t + 1) % c0.checkpoint_every == 0 or last:
        for j, run in enumerate(runs):
          if not stopped[j] and not guards[j].in_streak:
            run.checkpoint(t + 1, unstack(state, j))
            guards[j].last_saved = t + 1
            _maybe_kill()
  finally:
    for run in runs:
      run.ckpts.close()
      run.tensorboard.close()
  finals: list[dict | None] = []
  for j, (s, run) in enumerate(zip(setups, runs)):
    if stopped[j]:
      finals.append(None)
      continue
    ev = evs[j] or evaluate(unstack(state.params, j), s.test_x, s.test_y)
    final = run_record.final_metrics(s, run, ev, unstack(state.params, j))
    run_record.write_final(run.workdir, final)
    finals.append(final)
  return finals


def _progress(evs, r: int, t: int, num_rounds: int, seconds: float, quiet: bool) -> None:
  accs = [e["accuracy"] for e in evs if e is not None]
  if accs and not quiet:
    print(f"  {r} runs round {t + 1}/{num_rounds}  test_accuracy "
          f"{min(accs):.4f}..{max(accs):.4f}  {seconds * r:.3f} s/round", flush=True)
