"""Writes experiments/bench/README.md from the bench outputs in results/.

    python experiments/bench/make_readme.py

Reads every ``results/*.json`` written by ``python -m fedsel_jax.bench --json``
(and by ``before_after.py``, ``compile_time.py``, ``cache_rerun.py``,
``full_round.py``, ``round_memory.py``, ``scaling.py`` and ``lambda_speed.py`` with ``--json``) and the hand-written ``notes.md`` next to
this file, and writes the tables; no number in the README is typed by hand.
"""

from __future__ import annotations

import glob
import json
import math
import os

HERE = os.path.dirname(os.path.abspath(__file__))


def _load(r) -> str:
  return "/".join(f"{x:.1f}" for x in r)


def _peak_method(rep: dict) -> str:
  """How the report's matmul peak was taken (the bench changed it on 2026-12-02)."""
  if "matmul_peak_method" in rep:
    return (rep["matmul_peak_method"] + ": "
            + " / ".join(f"{x / 1e9:.0f}" for x in rep["matmul_peak_samples"]))
  if "matmul_peak_samples" in rep:
    return ("best of 5 products at 1024 and 2048, before and after the modes: "
            + " / ".join(f"{x / 1e9:.0f}" for x in rep["matmul_peak_samples"]))
  return "older method: median of 5 products at 2048, before the modes; reads low"


def bench_table(name: str, rep: dict) -> list[str]:
  s = rep["settings"]
  out = [f"### `{name}`", ""]
  if rep.get("complete") is False:
    out += ["**Stopped before the end** (a time limit): the modes it finished.", ""]
  if rep.get("command"):
    out += [f"`{rep['command']}`", ""]
  out += [f"{rep['device']} ({rep['cpus']} cores), {rep['platform']}, jax {rep['jax']}, torch "
         f"{rep['torch']}; {rep['date']}; load average {_load(rep['load'])} before, "
         f"{_load(rep.get('load_after') or [])} after; "
         f"{rep.get('matmul_peak_dtype', 'float32')} matmul peak measured in the run "
         f"{rep['matmul_peak_flops'] / 1e9:.0f} GFLOP/s ({_peak_method(rep)}); "
         f"chunk {s['client_chunk']}, "
         f"backprop_cut {s['backprop_cut']}, cut_levels {tuple(s.get('cut_levels', ()))}, "
         f"{s['local_steps']} steps x batch {s['batch_size']}.", "",
         "| masks | mode | s/round median [min-max] | samples/s | peak RSS MB | first call s |",
         "|---|---|---|---|---|---|"]
  for row in rep["rows"]:
    for mode, r in row["modes"].items():
      first = f"{r['first_s']:.1f}" + (f" (compile {r['compile_s']:.1f})" if "compile_s" in r
                                        else "")
      device = ""
      if r.get("device_peak_mb"):          # an accelerator: the figure the memory ratio uses
        device = f" (device {r.get('round_footprint_mb', r['device_peak_mb']):.0f})"
      out.append(f"| {row['masks']} ({row['mean_blocks']:.1f} blocks) | {mode} | "
                 f"{r['median_s']:.3f} [{r['min_s']:.3f}-{r['max_s']:.3f}] | "
                 f"{r['samples_per_s']:.0f} | {r['peak_rss_mb']:.0f}{device} | {first} |")
  out += ["", "| masks | round vs loop | round vs best torch | alternated with it, median "
          "[min-max] | memory vs torch | executed GFLOP | needed GFLOP | executed / needed "
          "| MFU (needed) |",
          "|---|---|---|---|---|---|---|---|---|"]
  for row in rep["rows"]:
    torch = (f"{row['speedup_over_torch_best']:.2f}x", f"{row['memory_over_torch']:.2f}x") \
        if "speedup_over_torch_best" in row else ("-", "-")
    pr = row.get("paired")     # reports before 2026-12-04 have none
    paired = (f"{pr['median']:.2f}x [{pr['min']:.2f}-{pr['max']:.2f}], "
              f"{len(pr['ratios'])} pairs" if pr else "-")
    counted = math.isfinite(row["needed_flops"])   # no analytic count with convolutions
    ratio = f"{row['executed_over_needed']:.2f}x" if "executed_over_needed" in row else "-"
    need = (f"{row['needed_flops'] / 1e9:.1f} | {ratio} | "
            f"{100 * row['mfu_needed']:.0f}%" if counted else "- | - | -")
    loop = f"{row['speedup_over_loop']:.2f}x" if "speedup_over_loop" in row else "-"
    executed = f"{row['executed_flops'] / 1e9:.1f}" if "executed_flops" in row else "-"
    memory = torch[1] + (" (device)" if row.get("memory_measure") == "device" else "")
    out.append(f"| {row['masks']} | {loop} | {torch[0]} | {paired} | "
               f"{memory} | {executed} | {need} |")
  return out + [""]


def before_after_table(name: str, rep: dict) -> list[str]:
  s = rep["settings"]
  out = [f"### `{name}` (commit {rep['rev']} against this one, same process)", "",
         f"load average {_load(rep['load'])} before, {_load(rep['load_after'])} after; chunk "
         f"{s['client_chunk']}, backprop_cut {s['backprop_cut']}"
         + (f", grad_gates {s['grad_gates']} (after only: the earlier commit has no gates)"
            if s.get("grad_gates") else "") + ".", "",
         "| masks | before s/round | after s/round | before / after | XLA temp MB before -> after "
         "| compile s before -> after |", "|---|---|---|---|---|---|"]
  for row in rep["rows"]:
    b, a = row["before"], row["after"]
    out.append(f"| {row['masks']} | {b['median_s']:.2f} | {a['median_s']:.2f} | "
               f"{row['ratio_before_over_after']:.2f}x | {b['xla_temp_mb']:.0f} -> "
               f"{a['xla_temp_mb']:.0f} | {b['compile_s']:.1f} -> {a['compile_s']:.1f} |")
  return out + [""]


def compile_table(name: str, rep: dict) -> list[str]:
  out = [f"### `{name}` (experiments/bench/compile_time.py)", "",
         f"load average {_load(rep['load'])} before, {_load(rep['load_after'])} after.", "",
         "| round | trace + compile s |", "|---|---|"]
  out += [f"| {r['variant']} | {r['compile_s']:.1f} |" for r in rep["rows"]]
  return out + [""]


def rerun_table(name: str, rep: dict) -> list[str]:
  sets = " ".join(rep["set"]) or "its defaults"
  rows = rep["rows"]
  how = ""
  if rows and "programs" in rows[0]:
    how = (f" {'the fused round (diagnostics compiled in)' if rep.get('fused') else 'the programs a run calls for round 0'}"
           f" on {'the device store' if rows[0]['program'] == 'store' else 'host data'};")
  out = [f"### `{name}` (experiments/bench/cache_rerun.py)", "",
         f"`{rep['config']}` with {sets};{how} two fresh processes on one new cache directory; "
         f"{rep.get('date', 'undated')}, commit {rep.get('commit', '?')}; load "
         f"average {_load(rep['load'])} before, {_load(rep['load_after'])} after.", "",
         "| process | trace + lower s | compile (or cache load) s | first call s | cache hit |",
         "|---|---|---|---|---|"]
  for r in rows:
    parts = r.get("programs", [])
    if len(parts) > 1:
      out += [f"| {r['variant']}: {p['name']} | {p['trace_lower_s']:.1f} | {p['compile_s']:.1f} "
              f"| {p['trace_lower_s'] + p['compile_s']:.1f} | {'yes' if p['cache_hit'] else 'no'} |"
              for p in parts]
    label = f"{r['variant']}{': both' if len(parts) > 1 else ''}"
    out.append(f"| {label} | {r['trace_lower_s']:.1f} | {r['compile_s']:.1f} | "
               f"{r['first_call_s']:.1f} | {'yes' if r['cache_hit'] else 'no'} |")
  return out + [""]


def _run_header(name: str, what: str, rep: dict, extra: str = "") -> list[str]:
  """Title, command and the date/cores/load line of a table of one script's run."""
  return [f"### `{name}` ({what})", "", f"`{rep['command']}`", "",
          f"{rep['date']}; {rep['cpus']} cores; load average {_load(rep['load'])} before, "
          f"{_load(rep['load_after'])} after" + (f"; {extra}" if extra else "."), ""]


def full_round_table(name: str, rep: dict) -> list[str]:
  out = _run_header(name, f"experiments/bench/full_round.py: commit {rep['rev']} against "
                          f"{rep['today']}", rep, "fresh processes, alternately.") + [
         "| side | compile s | first call s | s/round median |", "|---|---|---|---|"]
  out += [f"| {r['side']} | {r['compile_s']:.1f} | {r['first_s']:.3f} | {r['median_s']:.3f} |"
          for r in rep["runs"]]
  diffs = ", ".join(f"{k} {v:.2g}" for k, v in rep["max_rel_diff"].items())
  return out + ["", f"Speed-up (median of the sides' medians): {rep['speedup']:.2f}x; outputs' "
                    f"max relative difference: {diffs}.", ""]


def memory_table(name: str, rep: dict) -> list[str]:
  out = _run_header(name, "experiments/bench/round_memory.py", rep) + [
         "| clients / round | chunk | n_max (mean rows) | round data | XLA args MB | XLA temp MB "
         "| s/round |", "|---|---|---|---|---|---|---|"]
  for row in rep["rows"]:
    for way, w in row["ways"].items():
      out.append(f"| {row['clients_per_round']} | {row['chunk']} | {row['n_max']} "
                 f"({row['mean_rows']:.1f}) | {way} | {w['args_mb']:.2f} | {w['temp_mb']:.2f} | "
                 f"{w['round_s']:.3f} |")
  return out + [""]


def scaling_table(name: str, rep: dict) -> list[str]:
  out = _run_header(name, "experiments/bench/scaling.py", rep, f"device {rep['device']}.") + [
         "| clients / round | chunk | compile s | s/round median | ms per client | vs smallest M "
         "| XLA temp MB |", "|---|---|---|---|---|---|---|"]
  out += [f"| {r['clients']} | {r['chunk']} | {r['compile_s']:.1f} | {r['median_s']:.2f} | "
          f"{1e3 * r['s_per_client']:.3f} | {r['per_client_over_smallest']:.2f}x | "
          f"{r['xla_temp_mb']:.0f} |" for r in rep["rows"]]
  return out + [""]


def lambda_table(name: str, rep: dict) -> list[str]:
  s = rep["settings"]
  out = _run_header(name, "experiments/bench/lambda_speed.py", rep,
                    f"torch {rep['torch']}; chunk {s['client_chunk']}, backprop_cut "
                    f"{s['backprop_cut']}, grad_gates {s.get('grad_gates', False)}.") + [
         "| lambda | distinct masks | blocks / client | blocks in a chunk's union | round s | "
         "torch s | round vs torch | executed / needed |", "|---|---|---|---|---|---|---|---|"]
  for r in rep["rows"]:
    torch = (f"{r['torch']['median_s']:.3f} | {r['speedup_over_torch']:.2f}x"
             if "torch" in r else "- | -")
    out.append(f"| {r['lam']:g} | {r['distinct_masks']} | {r['mean_blocks']:.2f} | "
               f"{r['mean_chunk_union']:.2f} | {r['round']['median_s']:.3f} | {torch} | "
               f"{r['executed_flops'] / r['needed_flops']:.2f}x |")
  return out + [""]


def main():
  lines = ["# Round speed", ""]
  notes = os.path.join(HERE, "notes.md")
  if os.path.exists(notes):
    lines += open(notes).read().rstrip().splitlines() + [""]
  lines += ["## Results (generated by make_readme.py from results/*.json)", ""]
  for path in sorted(glob.glob(os.path.join(HERE, "results", "*.json"))):
    rep = json.load(open(path))
    name = os.path.relpath(path, HERE)
    if rep.get("rows") and "mean_chunk_union" in rep["rows"][0]:
      lines += lambda_table(name, rep)
    elif rep.get("rows") and "s_per_client" in rep["rows"][0]:
      lines += scaling_table(name, rep)
    elif "runs" in rep:
      lines += full_round_table(name, rep)
    elif rep.get("rows") and "ways" in rep["rows"][0]:
      lines += memory_table(name, rep)
    elif "rev" in rep:
      lines += before_after_table(name, rep)
    elif rep["rows"] and "first_call_s" in rep["rows"][0]:
      lines += rerun_table(name, rep)
    elif rep["rows"] and "variant" in rep["rows"][0]:
      lines += compile_table(name, rep)
    else:
      lines += bench_table(name, rep)
  with open(os.path.join(HERE, "README.md"), "w") as f:
    f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
  main()
