"""The bench command's report: ratios and MFU of a row, and its printed lines
(``fedsel_jax.bench``)."""

from __future__ import annotations

import numpy as np


def summarize(row: dict, peak: float) -> dict:
  """Ratios and MFU of one report row (in place)."""
  modes = row["modes"]
  rt = modes["round"]["median_s"]
  if "loop" in modes:
    row["speedup_over_loop"] = modes["loop"]["median_s"] / rt
  torch = [v["median_s"] for k, v in modes.items() if k.startswith("torch_")]
  if torch:
    row["speedup_over_torch_best"] = min(torch) / rt
    # On an accelerator (torch reports its device peak): the round's footprint
    # by XLA's memory analysis against torch's peak allocated during its round;
    # on the CPU, the process's RSS high-water marks.
    peers = [v for k, v in modes.items() if k.startswith("torch_")]
    device = (modes["round"].get("round_footprint_mb") and peers
              and all(v.get("device_peak_mb") for v in peers))
    row["memory_measure"] = "device" if device else "rss"
    ours, theirs = (("round_footprint_mb", "device_peak_mb") if device
                    else ("peak_rss_mb", "peak_rss_mb"))
    row["memory_over_torch"] = modes["round"][ours] / min(v[theirs] for v in peers)
  row["mfu_needed"] = row["needed_flops"] / rt / peak
  if "executed_flops" in row:               # a run stopped before the count has none
    row["executed_over_needed"] = row["executed_flops"] / row["needed_flops"]
    row["mfu_executed"] = row["executed_flops"] / rt / peak
  return row


def format_mode(name: str, r: dict) -> str:
  """One mode's line of the printed report."""
  extra = (f"  compile {r['compile_s']:.1f} s, data: {r['round_data']}"
           if "compile_s" in r else "")
  device = ""
  if r.get("device_peak_mb"):               # an accelerator: the figure the ratio uses
    device = (f" (device: round footprint {r['round_footprint_mb']:.0f} MB)"
              if "round_footprint_mb" in r else f" (device {r['device_peak_mb']:.0f} MB)")
  return (f"  {name:<8} {r['median_s']:.3f} s/round [{r['min_s']:.3f}-{r['max_s']:.3f}]"
          f"  {r['samples_per_s']:.0f} samples/s  peak RSS {r['peak_rss_mb']:.0f} MB{device}"
          f"  first call {r['first_s']:.1f} s{extra}")


def format_row(row: dict) -> str:
  lines = [f"masks={row['masks']} (mean {row['mean_blocks']:.2f} blocks/client), "
           f"{row['samples']} samples/round"]
  lines += [format_mode(name, r) for name, r in row["modes"].items()]
  lines.append((f"  round vs loop {row['speedup_over_loop']:.2f}x"
                if "speedup_over_loop" in row else "  (no loop timed)") + (
      f"; vs best torch {row['speedup_over_torch_best']:.2f}x, memory "
      f"{row['memory_over_torch']:.2f}x torch"
      f"{' (device)' if row.get('memory_measure') == 'device' else ''}"
      if "speedup_over_torch_best" in row else ""))
  if "paired" in row:
    pr = row["paired"]
    lines.append(f"  round vs {pr['peer']}, alternated: {pr['median']:.2f}x "
                 f"[{pr['min']:.2f}-{pr['max']:.2f}] over {len(pr['ratios'])} pairs")
  if np.isfinite(row["needed_flops"]):
    needed = (f"needed {row['needed_flops'] / 1e9:.1f} G ({row['executed_over_needed']:.2f}x); "
              f"MFU {100 * row['mfu_needed']:.0f}% needed, ")
  else:                                 # flops.needed_round_flops: no count with convolutions
    needed = "needed: no analytic count for this model; MFU "
  lines.append(f"  FLOPs executed {row['executed_flops'] / 1e9:.1f} G, {needed}"
               f"{100 * row['mfu_executed']:.0f}% executed")
  return "\n".join(lines)


def progress_line(row: dict, mode: str) -> str:
  """What a finished step adds to the printed progress ('' for nothing)."""
  if mode in row["modes"]:
    return format_mode(mode, row["modes"][mode])
  if mode == "paired" and "paired" in row:
    pr = row["paired"]
    return f"  round vs {pr['peer']}, alternated: {pr['median']:.2f}x over {len(pr['ratios'])}"
  if mode == "flops":
    return f"  FLOPs executed {row['executed_flops'] / 1e9:.1f} G"
  return ""
