"""Checks that the experiments' READMEs say what their committed outputs say.

    .venv/bin/python experiments/check_numbers.py   # exit 1 and one line per mismatch

For every README listed in ``READMES``:

1. each block between ``<!-- begin FILE -->`` and ``<!-- end FILE -->`` equals
   the committed FILE (relative to the README) line for line;
2. each ``summary.md`` it embeds equals the table ``fedsel_jax.stats``
   computes again from the committed member directories beside it;
3. every decimal number in its prose (outside code blocks, inline code and
   embedded blocks) equals, at the precision it is printed with, some number in the
   files named by ``<!-- sources: FILE ... -->``.
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
READMES = ("experiments/lambda_sweep/README.md", "experiments/paper_comparison/README.md",
           "experiments/baselines/README.md")
NUMBER = re.compile(r"(?<![\w.])-?\d+\.\d+(?:e[-+]?\d+)?(?!\d|\.\d)")
BLOCK = re.compile(r"<!-- begin (\S+) -->\n(.*?)<!-- end \1 -->", re.S)


def numbers(text: str) -> list[str]:
  return NUMBER.findall(text)


def _decimals(s: str) -> int:
  mantissa = s.split("e")[0]
  return len(mantissa.split(".")[1]) if "." in mantissa else 0


def matches(printed: str, value: float) -> bool:
  """Whether ``value`` prints as ``printed`` (same rounding, or as a percentage)."""
  x = float(printed)
  if "e" in printed:
    return math.isclose(abs(x), abs(value), rel_tol=10 ** -_decimals(printed))
  half = 0.5 * 10 ** -_decimals(printed) + 1e-12
  x, value = abs(x), abs(value)   # prose says "5.88 points below" for -5.88
  return abs(x - value) <= half or abs(x - 100 * value) <= half


def source_values(paths: list[str]) -> list[float]:
  out = []
  for p in paths:
    with open(p) as f:
      text = f.read()
    if p.endswith(".json"):
      out += [float(v) for v in re.findall(r"-?\d+\.\d+(?:e-?\d+)?", text)]
    else:
      out += [float(v) for v in NUMBER.findall(text)]
  return out


def check_summary(path: str) -> list[str]:
  """The committed summary.md against the table recomputed from the member dirs."""
  sys.path.insert(0, ROOT)
  from fedsel_jax import stats
  workdir = os.path.dirname(path)
  axes, baseline, members = stats.load_spec(workdir)
  rows = [stats.member_row(os.path.join(workdir, m["name"]), m["values"]) for m in members]
  again = stats.markdown_summary(rows, [f for f, _ in axes], baseline) + "\n"
  with open(path) as f:
    return [] if f.read() == again else [f"{path}: differs from the table its member "
                                         "directories give (rerun python -m fedsel_jax.plot)"]


def check_readme(readme: str) -> list[str]:
  base = os.path.dirname(readme)
  with open(readme) as f:
    text = f.read()
  errors = []
  for name, body in BLOCK.findall(text):
    path = os.path.join(base, name)
    if not os.path.exists(path):
      errors.append(f"{readme}: embeds {name}, which is not committed")
      continue
    with open(path) as f:
      if f.read().strip() != body.strip():
        errors.append(f"{readme}: the block of {name} differs from the committed file")
    if name.endswith("summary.md"):
      errors += check_summary(path)
  m = re.search(r"<!-- sources: (.*?) -->", text)
  sources = [p for s in (m.group(1).split() if m else [])
             for p in sorted(glob.glob(os.path.join(base, s)))]
  values = source_values(sources)
  prose = re.sub(r"```.*?```", "", BLOCK.sub("", text), flags=re.S)
  prose = re.sub(r"<!--.*?-->", "", prose, flags=re.S)
  prose = re.sub(r"`[^`\n]*`", "", prose)      # inline code: commands and config values
  for printed in numbers(prose):
    if not any(matches(printed, v) for v in values):
      errors.append(f"{readme}: {printed} is in none of its sources {sources}")
  return errors


def main() -> int:
  errors = []
  for readme in READMES:
    errors += check_readme(os.path.join(ROOT, readme))
  for e in errors:
    print(e)
  return 1 if errors else 0


if __name__ == "__main__":
  sys.exit(main())
