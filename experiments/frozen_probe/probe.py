"""A central linear probe on the frozen encoder's pooled features: the head's reference.

    python experiments/frozen_probe/probe.py --config configs/default.py

This script fits on ALL training examples of the dataset (13,131 lines for the
flagship), the strongest form. The same probe as a row of any run's results
table, fitted on the clients' training rows (what the federated runs see), is
``--config.compare_strategies='("head", "probe")'`` (fedsel_jax/probe.py).

The ``head`` strategy trains only the classifier (a linear layer on the
mean-pooled features) on top of the frozen pretrained encoder, federated. Its
central counterpart is a logistic regression fitted on the pooled features of
ALL training examples (no federation, no client drift, no round budget): a
strong reference for that head, though not a bound for other frozen readouts
(the hidden state at the [MASK] position, a non-linear head) and, with 600 test
lines, only within about +-2 points.

The inverse regularisation C is chosen on a held-out 10% of the training set
(seeded); the probe is refitted on all of it and scored on the demo's test set
(the ``data.max_test`` subsample that ``train.py`` evaluates on) and on the full
test split. Writes ``results.json`` next to ``--out`` (default: this folder).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from configs import load_config  # noqa: E402
from fedsel_jax import probe as probe_lib  # noqa: E402
from fedsel_jax import train  # noqa: E402


def pooled_features(setup: train.Setup, x: np.ndarray, batch: int = 256) -> np.ndarray:
  """The head's input features at the pretrained weights (fedsel_jax.probe)."""
  return probe_lib.batched(probe_lib.make_features_fn(setup.spec.apply_for_eval),
                           setup.params, x, batch)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="configs/default.py")
  parser.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
  args = parser.parse_args()

  start = time.time()
  setup = train.Setup(load_config(args.config))
  ds = setup.dataset
  x_tr, y_tr = pooled_features(setup, ds.train_x), ds.train_y
  x_te = pooled_features(setup, ds.test_x)
  x_demo = pooled_features(setup, setup.test_x)
  print(f"features: train {x_tr.shape}, test {x_te.shape}, demo test {x_demo.shape} "
        f"({time.time() - start:.0f} s)", flush=True)

  probe, val_acc, best = probe_lib.fit_probe(x_tr, y_tr, setup.config.seed)
  for c, acc in val_acc.items():
    print(f"C={c:g}: held-out accuracy {acc:.4f}", flush=True)
  majority = int(np.bincount(y_tr).argmax())
  results = {
      "config": args.config, "dataset": ds.name, "num_train": int(len(y_tr)),
      "num_test": int(len(ds.test_y)), "num_demo_test": int(len(setup.test_y)),
      "held_out_accuracy": {str(c): a for c, a in val_acc.items()}, "best_C": best,
      "probe_test_accuracy": float(probe.score(x_te, ds.test_y)),
      "probe_demo_test_accuracy": float(probe.score(x_demo, setup.test_y)),
      "majority_test_accuracy": float(np.mean(ds.test_y == majority)),
      "majority_demo_test_accuracy": float(np.mean(setup.test_y == majority)),
      "seconds": round(time.time() - start, 1),
  }
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "results.json"), "w") as f:
    json.dump(results, f, indent=1)
  print(json.dumps(results, indent=1))


if __name__ == "__main__":
  main()
