"""fp32 matmul throughput of torch (2 threads) and of XLA:CPU (jax) on this host, side by side.

    PYTHONPATH=. python experiments/bench/probes/matmul_peak.py > experiments/bench/probes/matmul_peak_HOST.log

Best of 20 calls per shape (square, and MiniLM's 384 -> 1536 MLP shape at
768 tokens), alternating the two libraries per shape; prints the date, the
host, the CPU model and its AVX-512/AMX flags and the load.
"""
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

torch.set_num_threads(2)


def best(fn, reps=20):
  ts = []
  for _ in range(reps):
    t0 = time.perf_counter()
    fn()
    ts.append(time.perf_counter() - t0)
  return min(ts)


cpu = open("/proc/cpuinfo").read()
model = next(line.split(":", 1)[1].strip() for line in cpu.splitlines() if line.startswith("model name"))
isa = sorted({w for w in cpu.split() if w.startswith(("avx512", "amx"))})
print(time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "host", platform.node(), "|", model,
      "|", " ".join(isa) or "no AVX-512/AMX", "| load", os.getloadavg())
print("jax", jax.__version__, "torch", torch.__version__, "XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))
f = jax.jit(lambda x, y: x @ y)
for m, k, n in [(384, 384, 384), (768, 384, 1536), (1024, 1024, 1024), (2048, 2048, 2048)]:
  a = np.random.rand(m, k).astype(np.float32)
  b = np.random.rand(k, n).astype(np.float32)
  ta, tb, ja, jb = torch.from_numpy(a), torch.from_numpy(b), jnp.asarray(a), jnp.asarray(b)
  f(ja, jb).block_until_ready()
  tt = best(lambda: ta @ tb)
  tj = best(lambda: f(ja, jb).block_until_ready())
  flops = 2 * m * k * n
  print(f"{m}x{k}x{n}: torch {flops / tt / 1e9:.0f} GFLOP/s, jax {flops / tj / 1e9:.0f} GFLOP/s, "
        f"torch/jax {tj / tt:.2f}")
print("load after", os.getloadavg())
