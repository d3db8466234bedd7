"""Lists a model's layer groups: ``python -m fedsel_jax.models --list NAME``.

Prints one row per group (kind, name, parameters) in input -> output order,
e.g. for ``minilm``: the embeddings (fixed), ``layer_0 .. layer_5``
(candidates) and the head (common). With ``--lora-rank R`` (also spelled
``--config.model.lora.rank=R``) the candidates are the blocks' LoRA adapters
``layer_0_lora ..`` and the blocks' own weights are listed as fixed.
"""

from __future__ import annotations

import argparse
import sys

import jax
import ml_collections
import numpy as np

from fedsel_jax import masks as masks_lib
from fedsel_jax.models import MODELS, build_model
from fedsel_jax.models import lora

# Input shapes of the small models when listed on their own.
_SHAPES = {"mlp": (8, 8, 1), "cnn": (8, 8, 1), "vit": (32, 32, 3)}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m fedsel_jax.models", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--list", metavar="NAME", required=True,
                      help=f"model name: one of {', '.join(MODELS)}")
  parser.add_argument("--pretrained", default=None,
                      help="checkpoint ('' = random init; default: the model's usual one)")
  parser.add_argument("--num-classes", type=int, default=10)
  parser.add_argument("--lora-rank", "--config.model.lora.rank", dest="lora_rank", type=int,
                      default=0, help="list the LoRA adapter groups of this rank (0 = off)")
  parser.add_argument("--lora-alpha", "--config.model.lora.alpha", dest="lora_alpha",
                      type=float, default=16.0)
  parser.add_argument("--lora-targets", "--config.model.lora.targets", dest="lora_targets",
                      default="attention", choices=lora.TARGETS)
  args = parser.parse_args(argv)
  if args.list not in MODELS:
    print(f"error: model name must be one of {list(MODELS)}, got {args.list!r}", file=sys.stderr)
    return 2
  if args.lora_rank < 0:
    print(f"error: model.lora.rank must be an integer >= 1 (0 = no LoRA), got {args.lora_rank}",
          file=sys.stderr)
    return 2
  cfg = ml_collections.ConfigDict({"name": args.list, "dtype": "float32"})
  cfg.lora = ml_collections.ConfigDict({"rank": args.lora_rank, "alpha": args.lora_alpha,
                                        "targets": args.lora_targets,
                                        "within_selection": True})
  if args.pretrained is not None:
    cfg.pretrained = args.pretrained
  elif args.list == "minilm":
    cfg.pretrained = "minilm"
  else:
    cfg.pretrained = ""
  try:
    spec = build_model(cfg, args.num_classes, _SHAPES.get(args.list, ()))
  except Exception as e:  # a missing checkpoint: one line, not a traceback
    print(f"error: {e}", file=sys.stderr)
    return 2
  shapes = jax.eval_shape(lambda: spec.module.init(jax.random.key(0), spec.example_input))
  rows = masks_lib.describe(shapes["params"], spec.groups)
  total = sum(n for _, _, n in rows)
  print(f"{args.list}: {spec.groups.num_candidates} candidate layers, {total:,} parameters")
  print(f"{'kind':<10} {'group':<28} {'params':>12}")
  for kind, name, n in rows:
    print(f"{kind:<10} {name:<28} {n:>12,}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
