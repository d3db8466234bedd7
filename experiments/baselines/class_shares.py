"""Share of each class in a config's global test set (what majority-class guessing scores).

    python experiments/baselines/class_shares.py --config configs/default.py --seeds 0 1 2 \
        --out experiments/baselines/flagship/test_classes.json

The test set is subsampled per seed (``data.max_test``), so each seed has its own shares.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from configs import load_config  # noqa: E402
from fedsel_jax import train  # noqa: E402


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="configs/default.py")
  parser.add_argument("--seeds", type=int, nargs="+", default=[0])
  parser.add_argument("--out", required=True)
  args = parser.parse_args()
  out = dict(config=args.config, seeds={})
  for seed in args.seeds:
    config = load_config(args.config)
    config.unlock()
    config.seed = seed
    config.data.client_holdout = 0.2   # as run_baselines.py
    y = np.asarray(train.Setup(config).test_y)
    classes, counts = np.unique(y, return_counts=True)
    out["seeds"][str(seed)] = dict(
        test_examples=int(len(y)), majority_share=float(counts.max() / len(y)),
        share={int(c): float(n / len(y)) for c, n in zip(classes, counts)})
  with open(args.out, "w") as f:
    json.dump(out, f, indent=1)
  print(json.dumps(out))


if __name__ == "__main__":
  main()
