"""Speed of one federated round, measured side by side in one process.

    python -m fedsel_jax.bench --config configs/default.py [--config.FIELD=...] \
        [--masks config,top2] [--json PATH] [--torch_peer experiments/bench/torch_peer.py]

For each mask kind it times, on the config's round-0 clients and data:

* ``round``: the project's jitted round (``train.Setup.round_fn``, or
  ``Setup.device_round_fn`` on the device store when the config's run uses
  it, as ``fl.device_data='auto'`` does when the store fits) with the masks
  given as data (no re-selection, no diagnostics: training, aggregation and
  the server step);
* ``loop``: a per-client Python loop over one jitted ``client_update``
  (masks as data, no cut: every block differentiated) streamed into the same
  aggregation (``--no_loop`` skips it: at 2,000 clients a round of it takes
  minutes on a GPU);
* ``torch_T``: the authors' sequential PyTorch pattern (``../shared/BENCH.md``)
  with T threads, when torch imports and ``--torch_peer`` names the peer file
  (loaded by path; nothing in the package imports ``experiments/``).

and prints samples/s = M * tau * B / median seconds, the ratios, executed
FLOPs (XLA cost analysis of each chunk's client-update variant, summed over
the round's chunks) against the analytic FLOPs the masks need, MFU (the median
round against the best matmul seen, so if anything an underestimate) against a
matmul peak in the model's compute dtype measured in the same run, peak memory
(process RSS high-water mark during each mode, and XLA's memory analysis of
the compiled round; on an accelerator the memory ratio compares the round's
device footprint by that analysis with torch's peak allocated) and the
compile time. The JSON is rewritten after
every mode (``"complete": false`` until the end), so a killed run keeps
what it finished. Mask kinds: ``config`` (what the config's own selection
picks in round 0), ``top2`` (consensus: every client trains the top 2 blocks),
``random`` (1-2 random blocks per client, seeded).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
import platform
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from fedsel_jax import aggregate
from fedsel_jax import device_data
from fedsel_jax import flops as flops_lib
from fedsel_jax import client as client_lib
from fedsel_jax import workdir as workdir_lib
from fedsel_jax.bench_report import format_row, progress_line, summarize
from fedsel_jax.timing import device_peak_mb
from fedsel_jax.timing import matmul_peak, paired_ratio, peak_method, peak_sizes, timed

PyTree = Any
MASK_KINDS = ("config", "top2", "random")


def bench_masks(setup, kind: str, rd: dict, key: jax.Array) -> np.ndarray:
  """bool[Mp, K] masks of one kind for the round's slots (padding slots False)."""
  valid = np.asarray(rd["valid"])
  mp, k = valid.shape[0], setup.k
  if kind == "config":
    _, metrics = setup.round_fn(setup.initial_state(), dict(rd, diagnose=np.bool_(False)), key)
    return np.asarray(metrics["masks"])
  masks = np.zeros((mp, k), bool)
  if kind == "top2":
    masks[:, k - 2:] = True
  elif kind == "random":
    rng = np.random.default_rng(0)
    for i in range(mp):
      masks[i, rng.choice(k, rng.integers(1, 3), replace=False)] = True
  else:
    raise ValueError(f"--masks must be among {MASK_KINDS}, got {kind!r}")
  return masks & valid[:, None]


def given_masks_inputs(setup, rd: dict, masks: np.ndarray):
  """(state factory, round data) for a round that trains exactly ``masks``."""
  ids = np.asarray(rd["client_ids"])
  n = setup.clients.num_clients
  rd = dict(rd, reselect=np.bool_(False), diagnose=np.bool_(False))

  def state():
    s = setup.initial_state()
    real = ids < n
    return s.replace(client_masks=s.client_masks.at[ids[real]].set(masks[real]),
                     seen=s.seen.at[ids[real]].set(True))

  return state, rd


def project_round(setup, rd: dict, masks: np.ndarray, key, repeats: int) -> dict:
  """Times the jitted round on given masks; compile time, memory analysis.

  The round reads its clients as a run's training loop does
  (``Setup.train_round``): from the device store when the run uses one
  (only slot ids cross per round), else from host round data.
  """
  make_state, rd = given_masks_inputs(setup, rd, masks)
  valid = np.asarray(rd["valid"])
  rows_mb = sum(np.asarray(rd[f])[valid].nbytes for f in ("x", "y", "mask")) / 2 ** 20
  if setup.uses_store:
    if setup.store is None:
      setup.store = device_data.place(setup.clients)
    fn, extra = setup.device_round_fn, (setup.store,)
    rd = {f: v for f, v in rd.items() if f not in ("x", "y", "mask")}
  else:
    fn, extra = setup.round_fn, ()
  dev_rd = jax.device_put(rd)
  t0 = time.perf_counter()
  compiled = fn.lower(make_state(), dev_rd, *extra, key).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  states = [make_state() for _ in range(repeats + 1)]
  it = iter(states)
  res = timed(lambda: compiled(next(it), dev_rd, *extra, key)[0].params, repeats)
  res["compile_s"] = compile_s
  res["round_data"] = "device store" if setup.uses_store else "host"
  res["device_peak_mb"] = device_peak_mb()
  if mem is not None:
    res["xla_temp_mb"] = mem.temp_size_in_bytes / 2 ** 20
    res["xla_args_mb"] = mem.argument_size_in_bytes / 2 ** 20
    # the round's device footprint: arguments (the model, its state, the data
    # store), outputs and temporaries, less what the outputs reuse
    res["xla_total_mb"] = (mem.argument_size_in_bytes + mem.output_size_in_bytes
                           + mem.temp_size_in_bytes - mem.alias_size_in_bytes) / 2 ** 20
    # what holds the round's clients only (torch holds those): the store less
    # the other clients' rows
    store = sum(a.nbytes for a in jax.tree_util.tree_leaves(extra)) / 2 ** 20
    res["store_mb"] = store
    res["round_footprint_mb"] = res["xla_total_mb"] - store + (rows_mb if extra else 0.)

  def round_calls(n: int) -> list[Callable[[], Any]]:
    """n calls of the compiled round, each on a fresh state (the round donates it)."""
    return [lambda st=st: compiled(st, dev_rd, *extra, key)[0].params
            for st in [make_state() for _ in range(n)]]

  return res, round_calls


def per_client_loop(setup, rd: dict, masks: np.ndarray, key, repeats: int) -> dict:
  """Times a Python loop over one jitted client_update per client (no vmap)."""
  s = setup.settings
  update = jax.jit(client_lib.make_client_update(
      client_lib.make_loss_fn(setup.spec.module.apply), setup.client_opt, setup.index,
      local_steps=s.local_steps, batch_size=s.batch_size, dense_delta=False,
      gate=s.grad_gates))
  acc = jax.jit(lambda agg, d, mk, w: aggregate.accumulate(
      agg, jax.tree_util.tree_map(lambda x: x[None], d), mk[None], w[None], setup.index))
  params, k = setup.params, setup.k
  real = [i for i in range(len(masks)) if rd["valid"][i]]
  clients = [({f: jnp.asarray(rd[f][i]) for f in ("x", "y", "mask", "num_examples")},
              jnp.asarray(masks[i]), jnp.float32(rd["num_examples"][i])) for i in real]

  def loop():
    agg = aggregate.init_aggregation(params, k)
    for i, (d, mk, w) in enumerate(clients):
      res = update(params, d, mk, jax.random.fold_in(key, i))
      agg = acc(agg, res.delta, mk, w)
    return aggregate.finalize(agg, setup.index)[0]

  return timed(loop, repeats)


PEER_PACKAGES = ("torch", "transformers")


def load_peer(path: str):
  """The torch peer module from a file path, or None (no path, or no torch).

  With torch installed but another package the peer imports missing, it
  says so on stderr and returns None: the bench then times the round and the
  loop only, instead of failing after set-up.
  """
  if not path or importlib.util.find_spec("torch") is None:
    return None
  if not os.path.exists(path):
    print(f"bench: no torch peer at {path!r}; timing the round and the loop only",
          file=sys.stderr)
    return None
  missing = [p for p in PEER_PACKAGES if importlib.util.find_spec(p) is None]
  if missing:
    print(f"bench: the torch peer needs {', '.join(missing)} (pip install -e '.[bench]'); "
          "timing the round and the loop only", file=sys.stderr)
    return None
  spec = importlib.util.spec_from_file_location("fedsel_torch_peer", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def bench_one(setup, kind: str, rd: dict, key, repeats: int, peer, threads,
              loop: bool = True, row: dict | None = None,
              progress: Callable[[str], None] = lambda mode: None) -> dict:
  """Every mode on one mask kind; returns the row of the report.

  ``row`` (a dict to fill in place, default a new one) and ``progress(mode)``,
  called after each mode, let the command print and save what it has as it
  goes, so a run stopped by a time limit keeps its finished modes.
  """
  masks = bench_masks(setup, kind, rd, key)
  valid = np.asarray(rd["valid"])
  s = setup.settings
  samples = int(valid.sum()) * s.local_steps * s.batch_size
  row = {} if row is None else row
  row.update(masks=kind, mean_blocks=float(masks[valid].sum(1).mean()), samples=samples,
             modes={}, needed_flops=flops_lib.needed_round_flops(setup, rd, masks))

  def done(name: str, res: dict) -> None:
    res["samples_per_s"] = samples / res["median_s"]
    row["modes"][name] = res
    progress(name)

  res, round_calls = project_round(setup, rd, masks, key, repeats)
  done("round", res)
  # The slower modes get fewer timed calls, but at least 3: a ratio against
  # one torch round moved 1.08x -> 1.38x between two runs minutes apart.
  slow = max(3, repeats // 2)
  if peer is not None:
    _time_peer(setup, rd, masks, peer, threads, slow, round_calls, row, done)
    progress("paired")
  row["executed_flops"] = flops_lib.executed_round_flops(flops_lib.counting_parts(setup),
                                                         setup.params, rd, masks)
  progress("flops")
  if loop:                                  # last: the figure a time limit can spare
    done("loop", per_client_loop(setup, rd, masks, key, slow))
  return row


def _time_peer(setup, rd, masks, peer, threads, slow: int, round_calls, row: dict,
               done: Callable[[str, dict], None]) -> None:
  """The torch modes and the alternated pairs of one row (in place). A failure
  of the peer (a package, a model it does not build, the GPU's memory) is
  recorded in ``row['torch_skipped']`` and ends the peer's part, not the row."""
  peers = {}
  try:
    for t in threads:
      peers[f"torch_{t}"] = fn = peer.make_round(setup, rd, masks, threads=t)
      getattr(peer, "reset_device_peak", lambda: None)()
      res = timed(fn, slow)
      res["device_peak_mb"] = getattr(peer, "device_peak_mb", lambda: None)()
      done(f"torch_{t}", res)
    best = min(peers, key=lambda name: row["modes"][name]["median_s"])
    row["paired"] = paired_ratio(round_calls(slow), peers[best], best)
  except Exception as e:  # pylint: disable=broad-except  # the round's figures stand alone
    row["torch_skipped"] = f"{type(e).__name__}: {str(e)[:300]}"
    print(f"bench: torch peer stopped: {row['torch_skipped']}", file=sys.stderr, flush=True)
    getattr(peer, "release_memory", lambda: None)()


def run(config, mask_kinds, repeats: int, peer_path: str, threads, loop: bool = True,
        save: Callable[[dict], None] = lambda report: None) -> dict:
  """The whole report as a dict (see the module docstring).

  ``save(report)`` is called after every mode with the report so far
  (``complete`` False, its rows summarised as they stand against the first
  matmul peak) and once at the end.
  """
  from fedsel_jax import main as main_lib   # heavy: datasets, models

  peer = load_peer(peer_path)       # before set-up: a missing package is said at once
  setup = main_lib.make_setup(config)   # its data- and model-dependent checks: ConfigError
  rd = setup.round_data(0)
  key = jax.random.key(config.seed)
  dtype = config.model.get("dtype", "float32")
  peak_before = matmul_peak(peak_sizes(), dtype=dtype)
  report = dict(
      device=jax.devices()[0].device_kind, platform=platform.platform(),
      jax=jax.__version__, cpus=os.cpu_count(), load=os.getloadavg(),
      date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
      settings=dataclasses.asdict(setup.settings),
      torch=None if peer is None else peer.version(),
      command="python -m fedsel_jax.bench " + " ".join(sys.argv[1:]),
      matmul_peak_dtype=dtype, matmul_peak_method=peak_method(),
      matmul_peak_samples=[peak_before], matmul_peak_flops=peak_before,
      complete=False, rows=[])
  print(f"{report['device']}, jax {report['jax']}, torch {report['torch']}; {dtype} matmul "
        f"peak {peak_before / 1e9:.0f} GFLOP/s", flush=True)

  def save_partial() -> None:
    """The report so far, its finished rows summarised against the first peak."""
    rows = [summarize(dict(r), peak_before) for r in report["rows"] if "round" in
            r.get("modes", {})]
    save(dict(report, rows=rows, load_after=os.getloadavg()))

  for kind in mask_kinds:
    row: dict[str, Any] = {}
    report["rows"].append(row)

    def progress(mode: str, row=row) -> None:
      save_partial()                # first: a kill right after the line keeps the mode
      line = progress_line(row, mode)
      if line:
        print(f"masks={row['masks']}:{line}", flush=True)

    bench_one(setup, kind, rd, key, repeats, peer, threads, loop, row, progress)
  rows = report["rows"]
  report["matmul_peak_samples"] = [peak_before, matmul_peak(peak_sizes(), dtype=dtype)]
  report["matmul_peak_flops"] = max(report["matmul_peak_samples"])
  report["rows"] = [summarize(row, report["matmul_peak_flops"]) for row in rows]
  report["load_after"] = os.getloadavg()
  report["complete"] = True
  save(report)
  return report


USAGE = ("usage: python -m fedsel_jax.bench --config configs/NAME.py[:ARG] [--masks "
         "config,top2,random] [--repeats N] [--json PATH] [--torch_peer FILE] "
         "[--torch_threads 1,2] [--no_loop] [--config.FIELD=VALUE ...]")
FLAGS = {"config": True, "masks": True, "repeats": True, "json": True, "torch_peer": True,
         "torch_threads": True, "no_loop": False, "help": False}
DEFAULT_PEER = "experiments/bench/torch_peer.py"


def parse(argv: list[str]) -> dict[str, Any]:
  """The bench's arguments, every one checked before any set-up (ConfigError)."""
  from fedsel_jax import cli
  from fedsel_jax import errors
  from fedsel_jax import validate
  values, overrides = cli.parse_command(argv, FLAGS, USAGE)
  config = cli.load_config(values["config"])
  cli.apply_overrides(config, overrides)
  validate.validate_config(config)
  masks = [m.strip() for m in values.get("masks", "config,top2").split(",") if m.strip()]
  bad = [m for m in masks if m not in MASK_KINDS] or ([] if masks else ["''"])
  if bad:
    raise errors.ConfigError(f"--masks must be a comma list of {list(MASK_KINDS)}, got "
                             f"{bad[0]!r}")
  repeats = _positive_int("--repeats", values.get("repeats", "5"))
  threads = [_positive_int("--torch_threads", t)
             for t in values.get("torch_threads", "1,2").split(",")]
  out = values.get("json", "")
  if out:
    folder = os.path.dirname(os.path.abspath(out))
    if (os.path.isdir(out) or not os.path.isdir(folder) or not os.access(folder, os.W_OK)
        or (os.path.exists(out) and not os.access(out, os.W_OK))):
      raise errors.ConfigError(f"--json {out!r}: not a writable file path (its folder must "
                               "exist and be writable)")
  return dict(config=config, masks=masks, repeats=repeats, json=out, threads=threads,
              loop="no_loop" not in values,
              peer=values.get("torch_peer", DEFAULT_PEER))


def _positive_int(flag: str, text: str) -> int:
  from fedsel_jax import errors
  try:
    value = int(text)
  except ValueError:
    value = 0
  if value < 1:
    raise errors.ConfigError(f"{flag} must be an integer >= 1, got {text!r}")
  return value


def main(argv: list[str] | None = None) -> int:
  """The command; bad input is one ``error:`` line and exit code 2, before any set-up."""
  from fedsel_jax import errors
  try:
    args = parse(sys.argv[1:] if argv is None else argv)
    report = run(args["config"], args["masks"], args["repeats"], args["peer"], args["threads"],
                 args["loop"], save=functools.partial(_save, args["json"]))
  except errors.UserError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    return e.exit_code
  print(f"{report['device']} ({report['cpus']} cpus), jax {report['jax']}, torch "
        f"{report['torch']}, load {report['load']} -> {report['load_after']}, {report['date']}")
  print(f"{report['matmul_peak_dtype']} matmul peak {report['matmul_peak_flops'] / 1e9:.0f} "
        f"GFLOP/s; settings "
        f"{report['settings']}")
  for row in report["rows"]:
    print(format_row(row))
  return 0


def _save(path: str, report: dict) -> None:
  """Writes the report to ``path`` (if any), replacing it whole."""
  if path:
    workdir_lib.write_json(path, report, strict=False)


if __name__ == "__main__":
  sys.exit(main())
