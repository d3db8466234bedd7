"""bench.json from bench_log.txt: the sweep against the CLI runs measured beside it.

    .venv/bin/python experiments/lambda_sweep/bench_summary.py

bench_log.txt is the stdout of ``bench_sweep.py`` (plus the sweeps' own
"trained in" lines), stopped after 18 of its 24 CLI runs for lack of time.
Like for like: the 12 CLI runs measured between the first two sweeps,
under the same load, against those two sweeps (24 runs each).
"""

import json
import os
import re
import statistics

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
  with open(os.path.join(HERE, "bench_log.txt")) as f:
    lines = f.read().splitlines()
  sweeps, cli, phase = [], [[], []], -1
  for line in lines:
    if m := re.match(r"sweep (\d): ([\d.]+) s", line):
      sweeps.append(float(m.group(2)))
      phase += 1
    elif m := re.match(r"cli lam=\S+ seed=\d: ([\d.]+) s", line):
      cli[phase].append(float(m.group(1)))
  first = cli[0]
  per_run_sweep = [s / 24 for s in sweeps]
  out = {
      "sweep_seconds": sweeps, "sweep_seconds_per_run": [round(x, 2) for x in per_run_sweep],
      "cli_runs_between_sweeps": len(first), "cli_seconds_between_sweeps": round(sum(first), 1),
      "cli_seconds_per_run_median": round(statistics.median(first), 1),
      "cli_seconds_per_run_range": [min(first), max(first)],
      "cli_runs_after_second_sweep": len(cli[1]),
      "cli_seconds_after_second_sweep": round(sum(cli[1]), 1),
      "speedup_per_run_vs_each_sweep": [round(statistics.mean(first) / x, 1)
                                        for x in per_run_sweep],
  }
  with open(os.path.join(HERE, "bench.json"), "w") as f:
    json.dump(out, f, indent=2)
  print(json.dumps(out, indent=2))


if __name__ == "__main__":
  main()
