"""Command line: ``python -m fedsel_jax.plot DIR [DIR ...] [--out OUT]``.

Regenerates every figure (``fedsel_jax.plotting``) of one or more finished
runs or sweeps from their saved files only (metrics.csv, selection.npz,
config.json, final.json, sweep.json); several DIRs are overlaid, one series
per combination and directory. For a sweep directory it also rewrites
summary.csv and summary.md. Figures go to OUT (default: the first DIR).
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> list[str]:
  p = argparse.ArgumentParser(prog="python -m fedsel_jax.plot", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("dirs", nargs="+", help="run or sweep directories")
  p.add_argument("--out", default=None, help="where the PNGs go (default: the first DIR)")
  args = p.parse_args(argv)
  for d in args.dirs:
    if not (os.path.exists(os.path.join(d, "sweep.json"))
            or os.path.exists(os.path.join(d, "metrics.csv"))):
      print(f"error: {d} holds neither sweep.json nor metrics.csv", file=sys.stderr)
      sys.exit(2)
  from fedsel_jax import plotting
  from fedsel_jax import stats
  for d in args.dirs:
    if os.path.exists(os.path.join(d, "sweep.json")):
      stats.write_tables(d)
  paths = plotting.write_plots(args.dirs, args.out or args.dirs[0])
  for path in paths:
    print(path)
  return paths


if __name__ == "__main__":
  main()
