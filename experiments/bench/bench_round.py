"""Times one federated round: the per-client loop against the chunked vmap.

    python experiments/bench/bench_round.py --workload mlp_cpu
    python experiments/bench/bench_round.py --workload vit_tiny --dtype bfloat16   # GPU
    python experiments/bench/bench_round.py --workload lam_sweep

Workloads follow shared/BENCH.md: every client trains 2 random candidate
blocks plus the common layers; synthetic normal inputs. Both modes run in
one process, side by side, and the script prints samples/s = M*tau*B /
(median round time after warm-up), the first-call (compile) time and their
ratio, with the device and versions.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from fedsel_jax import aggregate
from fedsel_jax import client as client_lib
from fedsel_jax import federated
from fedsel_jax import masks as masks_lib
from fedsel_jax.models import build_model

WORKLOADS = {
    # name: model config, input shape, clients M, local steps tau, batch B, chunk
    "mlp_cpu": (dict(name="mlp", width=64, depth=4), (8, 8, 1), 1000, 5, 8, 1000),
    "vit_tiny": (dict(name="vit", patch=4, width=192, depth=6, num_heads=3, mlp_dim=768),
                 (32, 32, 3), 200, 10, 32, 200),
    "vit_b32": (dict(name="vit", patch=32, width=768, depth=12, num_heads=12, mlp_dim=3072),
                (224, 224, 3), 20, 5, 64, 10),
}


def setup(workload: str, dtype: str, clients: int | None, chunk: int | None, budget: int = 2):
  mcfg, shape, m, tau, b, default_chunk = WORKLOADS[workload]
  m = clients or m
  chunk = chunk or default_chunk
  cfg = ml_collections.ConfigDict(dict(mcfg, dtype=dtype))
  spec = build_model(cfg, 10, shape)
  params = spec.module.init(jax.random.key(0), spec.example_input)["params"]
  index = masks_lib.group_index(params, spec.groups)
  k = spec.groups.num_candidates
  rng = np.random.default_rng(0)
  n = tau * b
  rd = dict(x=rng.normal(size=(m, n) + shape).astype(np.float32),
            y=rng.integers(0, 10, (m, n)).astype(np.int32), mask=np.ones((m, n), bool),
            num_examples=np.full(m, n, np.int32), client_ids=np.arange(m, dtype=np.int32),
            valid=np.ones(m, bool), budgets=np.full(m, budget, np.float32),
            lam=np.float32(0), reselect=np.bool_(True))
  return spec, params, index, k, rd, (m, tau, b, chunk)


def timed(fn, repeats):
  t0 = time.perf_counter()
  jax.block_until_ready(fn())
  first = time.perf_counter() - t0
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return first, statistics.median(times)


def bench_modes(args):
  spec, params, index, k, rd, (m, tau, b, chunk) = setup(args.workload, args.dtype,
                                                         args.clients, args.chunk)
  loss_fn = client_lib.make_loss_fn(spec.module.apply)
  opt = optax.sgd(0.01)
  settings = federated.RoundSettings(strategy="random", local_steps=tau, batch_size=b,
                                     client_chunk=chunk, diagnostics=False,
                                     backprop_cut=args.backprop_cut)
  round_fn = jax.jit(federated.make_round_fn(loss_fn, index, k, opt, optax.sgd(1.0),
                                             np.ones(k, np.float32), settings))
  state = federated.init_server_state(params, optax.sgd(1.0), m, k)
  key = jax.random.key(0)
  dev_rd = jax.device_put(rd)
  results = {}
  results["chunked"] = timed(lambda: round_fn(state, dev_rd, key)[0].params, args.repeats)

  # The per-client loop: one jitted client update per client, streamed sums.
  update = jax.jit(client_lib.make_client_update(loss_fn, opt, index, local_steps=tau,
                                                 batch_size=b, cut=0))
  acc = jax.jit(lambda agg, d, mk, w: aggregate.accumulate(
      agg, jax.tree_util.tree_map(lambda x: x[None], d), mk[None], w[None], index))
  masks = np.zeros((m, k), bool)
  rng = np.random.default_rng(1)
  for i in range(m):
    masks[i, rng.choice(k, 2, replace=False)] = True
  per_client = [({f: dev_rd[f][i] for f in ("x", "y", "mask", "num_examples")},
                 jnp.asarray(masks[i])) for i in range(m)]

  def loop():
    agg = aggregate.init_aggregation(params, k)
    for i, (d, mk) in enumerate(per_client):
      res = update(params, d, mk, jax.random.fold_in(key, i))
      agg = acc(agg, res.delta, mk, jnp.float32(tau * b))
    mean, covered = aggregate.finalize(agg, index)
    return mean

  results["loop"] = timed(loop, max(1, args.repeats // 2))
  samples = m * tau * b
  out = {"workload": args.workload, "clients": m, "local_steps": tau, "batch": b,
         "chunk": chunk, "dtype": args.dtype}
  for mode, (first, med) in results.items():
    out[mode] = {"first_call_s": round(first, 3), "median_round_s": round(med, 4),
                 "samples_per_s": round(samples / med, 1)}
  out["speedup_chunked_over_loop"] = round(results["loop"][1] / results["chunked"][1], 2)
  return out


def bench_sweep(args):
  """L lambda values in one vmapped program against L separate runs."""
  spec, params, index, k, rd, (m, tau, b, chunk) = setup("mlp_cpu", args.dtype,
                                                         args.clients or 100, args.chunk or 100)
  lams = np.linspace(0, 0.7, args.num_lams).astype(np.float32)
  loss_fn = client_lib.make_loss_fn(spec.module.apply)
  settings = federated.RoundSettings(strategy="proposed", local_steps=tau, batch_size=b,
                                     client_chunk=chunk, diagnostics=False, sel_batches=1)
  round_fn = federated.make_round_fn(loss_fn, index, k, optax.sgd(0.01), optax.sgd(1.0),
                                     np.ones(k, np.float32), settings)
  single = jax.jit(round_fn)
  sweep = jax.jit(federated.make_sweep_fn(round_fn))
  state = federated.init_server_state(params, optax.sgd(1.0), m, k)
  states = federated.stack_states(state, len(lams))
  key = jax.random.key(0)
  dev_rd = jax.device_put(rd)
  res_sweep = timed(lambda: sweep(states, dev_rd, jnp.asarray(lams), key)[0].params,
                    args.repeats)
  res_sep = timed(lambda: [single(state, dict(dev_rd, lam=l), key)[0].params for l in lams],
                  args.repeats)
  samples = len(lams) * m * tau * b
  return {"workload": "lam_sweep (mlp, proposed)", "lams": len(lams), "clients": m,
          "local_steps": tau, "batch": b,
          "one_program": {"first_call_s": round(res_sweep[0], 3),
                          "median_s": round(res_sweep[1], 4),
                          "samples_per_s": round(samples / res_sweep[1], 1)},
          "separate_runs": {"first_call_s": round(res_sep[0], 3),
                            "median_s": round(res_sep[1], 4),
                            "samples_per_s": round(samples / res_sep[1], 1)},
          "speedup": round(res_sep[1] / res_sweep[1], 2)}


def main():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workload", default="mlp_cpu", choices=list(WORKLOADS) + ["lam_sweep"])
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--clients", type=int, default=None)
  p.add_argument("--chunk", type=int, default=None)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--num-lams", type=int, default=8)
  p.add_argument("--backprop-cut", action="store_true")
  args = p.parse_args()
  out = bench_sweep(args) if args.workload == "lam_sweep" else bench_modes(args)
  out["device"] = str(jax.devices()[0].device_kind)
  out["platform"] = f"{platform.processor() or platform.machine()}, jax {jax.__version__}"
  print(json.dumps(out, indent=2))


if __name__ == "__main__":
  main()
