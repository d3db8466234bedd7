"""The baselines study: full, proposed, top, LoRA, proposed-within-LoRA, local-only, head, probe.

    python experiments/baselines/run_baselines.py --config configs/digits.py \
        --seeds 0 1 2 --out experiments/baselines/digits

Every row runs with everything else equal (clients, data, budgets, rounds,
optimizer; ``data.client_holdout`` = 0.2 for all, so every row is also scored
on the same held-out 20% of each client's examples) and seeds run one after
another. Writes ``<out>/results.json`` (every run's numbers) and
``<out>/table.md`` (mean +- std over seeds), and keeps each run's workdir in
``--runs`` (not committed).

Costs (per round, from the run's own masks; see ``costs``):
* trained parameters: mean over sampled clients of selected + common groups;
* bytes up: float32 deltas of those parameters (+ 4 bytes per score);
  bytes down: float32 values of every layer trained so far in the run (the
  ones that differ from the pretrained model the client already holds);
* training FLOPs: the SPEC cost model for dense layers (2 FLOPs per weight
  and example forward; 2 more for the activation gradient of every block at or
  above the client's lowest trained block; 2 more for each trained weight),
  times local steps x batch, over the sampled clients, plus the score pass of
  score-based strategies. It counts weight matmuls only, which for the
  residual MLP of configs/digits.py is nearly all of the work. It is what an
  implementation that stops backprop below ``l_min`` spends (``fl.backprop_cut``).
  A trained layer below the blocks (``LayerGroups.base``: the digits
  embedding, trained from scratch) makes ``l_min = 0`` for every client, and
  needs no activation gradient of its own.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from configs import load_config  # noqa: E402
from fedsel_jax import errors  # noqa: E402
from fedsel_jax import federated  # noqa: E402
from fedsel_jax import local_only  # noqa: E402
from fedsel_jax import masks as masks_lib  # noqa: E402
from fedsel_jax import probe  # noqa: E402
from fedsel_jax import train  # noqa: E402

# row -> config overrides (applied after the --set ones)
ROWS = {
    "full": {"selection.strategy": "full"},
    "proposed": {"selection.strategy": "proposed"},
    "top": {"selection.strategy": "top"},
    "lora_r4": {"selection.strategy": "lora", "model.lora.rank": 4},
    "lora_r16": {"selection.strategy": "lora", "model.lora.rank": 16},
    "proposed_in_lora_r16": {"selection.strategy": "proposed", "model.lora.rank": 16,
                             "model.lora.within_selection": True},
    # Rank 4 at scale alpha / r = 1, as rank 16 has with the default alpha = 16
    # (which gives rank 4 a scale of 4).
    "lora_r4_alpha4": {"selection.strategy": "lora", "model.lora.rank": 4,
                       "model.lora.alpha": 4.0},
    "local_top": {"selection.strategy": "top", "fl.local_only": True},
    "local_full": {"selection.strategy": "full", "fl.local_only": True},
    "head": {"selection.strategy": "head"},
    "probe": {"selection.strategy": "head"},
}


def parse_value(text: str):
  try:
    return json.loads(text)
  except json.JSONDecodeError:
    return text


def set_field(config, dotted: str, value) -> None:
  node = config
  *path, last = dotted.split(".")
  for p in path:
    node = node[p]
  node[last] = value


def block_sizes(setup) -> tuple[np.ndarray, np.ndarray, int, int, int | None]:
  """(trainable size per candidate [K], backward-through size per candidate [K],
  common size, all-leaves size, size of the common layers below the blocks or
  None): candidate k's backward-through size counts its block's base weights
  too (LoRA: the frozen block under the adapters)."""
  index, k = setup.index, setup.k
  below = tuple(setup.spec.groups.base)
  sizes = masks_lib.group_sizes(setup.params, index, k)
  block_names = [n[:-len("_lora")] if n.endswith("_lora") else n for n in setup.spec.groups.names]
  through = sizes.astype(np.float64).copy()
  common = total = base = 0
  for path, g, leaf in zip(masks_lib.leaf_paths(setup.params), jax.tree_util.tree_leaves(index),
                           jax.tree_util.tree_leaves(setup.params)):
    n = int(np.prod(leaf.shape))
    total += n
    common += n if g == masks_lib.COMMON else 0
    base += n if g == masks_lib.COMMON and masks_lib.under_any(path, below) else 0
    top = path.split("/")[0]
    if g == masks_lib.FIXED and top in block_names:
      through[block_names.index(top)] += n
  return sizes, through, common, total, (base if below else None)


def head_size(setup) -> int:
  """Parameters of the ``head`` module: all the probe fits (a trained
  embedding, common in federated rows, stays frozen under the probe)."""
  return sum(int(np.prod(leaf.shape)) for path, leaf in
             zip(masks_lib.leaf_paths(setup.params), jax.tree_util.tree_leaves(setup.params))
             if path.split("/")[0] == "head")


def step_flops(mask: np.ndarray, sizes, through, common: int, total: int,
               base: int | None = None) -> float:
  """Training FLOPs of one example step of a client with ``mask`` (bool[K])."""
  k = len(mask)
  lowest = 0 if base is not None else (int(np.argmax(mask)) if mask.any() else k)
  backward = 2.0 * (through[lowest:].sum() + common - (base or 0))
  return 2.0 * total + backward + 2.0 * (sizes[mask].sum() + common)


def costs(setup, masks_per_round: list[np.ndarray], local: bool) -> dict[str, float]:
  """Per-round means of trained params, bytes up/down and training FLOPs."""
  c = setup.config
  sizes, through, common, total, base = block_sizes(setup)
  scored = federated.STRATEGIES[c.selection.strategy][0] is not None
  batch, steps = c.fl.batch_size, c.fl.local_steps
  n = setup.clients.num_examples
  score_rows = np.mean(n) if c.selection.sel_batches == 0 else c.selection.sel_batches * batch
  trained, up, down, flops = [], [], [], []
  ever = np.zeros(setup.k, bool)
  for t, masks in enumerate(masks_per_round):
    per_client = masks @ sizes + common
    trained.append(per_client.mean())
    ever |= masks.any(axis=0)
    m = len(masks)
    up.append(0 if local else 4.0 * (per_client.sum() + (setup.k * m if scored else 0)))
    down.append(0 if local else 4.0 * m * (sizes[ever].sum() + common))
    f = sum(steps * batch * step_flops(mk, sizes, through, common, total, base) for mk in masks)
    if scored and t % c.selection.sel_gap == 0:
      f += m * score_rows * step_flops(np.ones(setup.k, bool), sizes, through, common, total,
                                       base)
    flops.append(f)
  return {"trained_params": float(np.mean(trained)), "bytes_up": float(np.mean(up)),
          "bytes_down": float(np.mean(down)), "train_flops": float(np.mean(flops))}


def run_row(base_config, row: str, seed: int, workdir: str) -> dict:
  c = base_config.copy_and_resolve_references()
  c.unlock()
  c.seed = seed
  for key, value in ROWS[row].items():
    set_field(c, key, value)
  train.validate_config(c)
  setup = train.Setup(c)
  start = time.perf_counter()
  if row == "probe":
    final = probe.train_and_evaluate(setup, workdir, quiet=True)
    _, _, _, total, _ = block_sizes(setup)
    final.update(trained_params=float(head_size(setup)), bytes_up=0.0, bytes_down=0.0,
                 train_flops=float(2.0 * total * final["num_train"]))  # one forward pass
  else:
    try:
      final = train.train_and_evaluate(c, workdir, setup=setup, quiet=True)
    except errors.DivergedError as e:   # main's guard stops a diverged run: a NaN row
      nan = float("nan")
      spread = {"mean": nan, "std": nan, "min": nan, "max": nan}
      return dict(row=row, seed=seed, strategy=c.selection.strategy, test_accuracy=nan,
                  client_holdout_accuracy=spread, trained_params=nan, bytes_up=nan,
                  bytes_down=nan, train_flops=nan, diverged=str(e))
    local = c.fl.local_only
    if local:   # every client, every round, its static mask
      masks = np.asarray(local_only.local_masks(setup, np.arange(setup.clients.num_clients)))
      history = [masks] * c.fl.num_rounds
    else:
      with np.load(os.path.join(workdir, "selection.npz")) as f:
        history = list(f["masks"])
    final.update(costs(setup, history, local))
  final.update(row=row, seed=seed, wall_seconds=round(time.perf_counter() - start, 1))
  return final


def summarize(results: list[dict], rows: list[str]) -> str:
  lines = ["| row | test acc (mean +- std, seeds) | client held-out acc (mean over clients; "
           "mean +- std, seeds) | spread over clients (std) | trained params / client | "
           "train GFLOPs / round | MB up / round | MB down / round |",
           "|---|---|---|---|---|---|---|---|"]
  for row in rows:
    rs = [r for r in results if r["row"] == row]
    if not rs:
      continue
    acc = np.array([r["test_accuracy"] for r in rs])
    held = np.array([r["client_holdout_accuracy"]["mean"] for r in rs])
    held_sd = np.array([r["client_holdout_accuracy"]["std"] for r in rs])
    mean = lambda k: np.mean([r[k] for r in rs])  # noqa: E731
    lines.append(
        f"| {row} | {acc.mean():.4f} +- {acc.std():.4f} | {held.mean():.4f} +- {held.std():.4f} "
        f"| {held_sd.mean():.4f} | {mean('trained_params'):,.0f} | "
        f"{mean('train_flops') / 1e9:.3f} | {mean('bytes_up') / 1e6:.3f} | "
        f"{mean('bytes_down') / 1e6:.3f} |")
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="configs/digits.py")
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  parser.add_argument("--rows", nargs="+", default=[r for r in ROWS if "alpha" not in r],
                      choices=list(ROWS))
  parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                      help="config overrides for every row (JSON values)")
  parser.add_argument("--out", default="experiments/baselines/digits")
  parser.add_argument("--runs", default="runs/baselines")
  parser.add_argument("--append", action="store_true",
                      help="add rows/seeds to an existing results.json (same --set)")
  args = parser.parse_args()
  config = load_config(args.config)
  config.unlock()
  config.data.client_holdout = 0.2
  config.compare_strategies = ()
  config.diagnostics.enabled = False   # E1/E2 logging only; training is the same without it
  for item in args.set:
    key, value = item.split("=", 1)
    set_field(config, key, parse_value(value))
  os.makedirs(args.out, exist_ok=True)
  results_path = os.path.join(args.out, "results.json")
  results = []
  if args.append and os.path.exists(results_path):
    with open(results_path) as f:
      previous = json.load(f)
    results = previous["results"]
    if previous["set"] != args.set:
      raise SystemExit(f"--append needs the same --set as {results_path}: {previous['set']}")
  for seed in args.seeds:
    for row in args.rows:
      if any(r["row"] == row and r["seed"] == seed for r in results):
        continue
      final = run_row(config, row, seed, os.path.join(args.runs, f"{row}_seed{seed}"))
      results.append(final)
      print(f"{row} seed {seed}: test {final['test_accuracy']:.4f} held-out "
            f"{final['client_holdout_accuracy']['mean']:.4f} ({final['wall_seconds']} s)",
            flush=True)
      with open(results_path, "w") as f:
        json.dump({"config": args.config, "set": args.set,
                   "seeds": sorted({r["seed"] for r in results}), "results": results},
                  f, indent=1)
  table = summarize(results, list(dict.fromkeys([r["row"] for r in results])))
  with open(os.path.join(args.out, "table.md"), "w") as f:
    f.write(table + "\n")
  print(table)


if __name__ == "__main__":
  main()
