"""Where a flagship chunk's update goes, on this CPU: forward, gradient, optimizer.

One chunk of 2 clients (``fl.client_chunk=2``) training the top block (what the
config's and the top-2 masks mostly give), 2 local Adam steps of batch 16, timed
alternately in one process, medians of 7 calls:

* ``fwd``: the loss alone, through all 6 blocks, for both steps' batches;
* ``grad``: the loss and its gradient w.r.t. the top block and the head, both steps;
* ``update``: ``client.make_client_update(blocks=(5,))`` vmapped, as the round runs
  a chunk (gradient, Adam, delta);

and one block's forward (768 tokens, the chunk's two clients) against its six
matmuls alone, and the share of padding among the round's token slots. So it
says how much of the round the selection can still act on (the backward pass)
and how fast the rest (the forward pass) runs against the matmul peak.

    PYTHONPATH=. python experiments/bench/probes/forward_share.py > experiments/bench/probes/forward_share.log
"""

import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from fedsel_jax import bench
from fedsel_jax import client as C
from fedsel_jax import train
from fedsel_jax.cli import load_config
from fedsel_jax.models.bert import BertLayer


def median_ms(fns: dict, repeats: int = 7) -> dict:
  for f, a in fns.values():
    jax.block_until_ready(f(*a))
  times = {n: [] for n in fns}
  for _ in range(repeats):
    for n, (f, a) in fns.items():
      t0 = time.perf_counter()
      jax.block_until_ready(f(*a))
      times[n].append(time.perf_counter() - t0)
  return {n: 1e3 * float(np.median(t)) for n, t in times.items()}


def chunk_parts(setup, rd) -> None:
  s, k, nc = setup.settings, setup.k, 2
  data = {f: jnp.asarray(np.asarray(rd[f])[:nc]) for f in ("x", "y", "mask", "num_examples")}
  mk = jnp.zeros((nc, k), bool).at[:, k - 1].set(True)
  keys = jax.random.split(jax.random.key(0), nc)
  loss_fn = C.make_loss_fn(setup.spec.module.apply)
  rows = jnp.arange(s.local_steps * s.batch_size).reshape(s.local_steps, s.batch_size)
  keep = C.differentiable_leaves(setup.index, blocks=(k - 1,))
  ones = jnp.ones(s.batch_size)

  def fwd(p, d, key):
    one = lambda d, key: jax.lax.map(
        lambda i: loss_fn(p, d["x"][rows[i]], d["y"][rows[i]], ones, key), jnp.arange(len(rows)))
    return jax.vmap(one)(d, key)

  def grad(p, d, key):
    tr, fr = C.split_leaves(p, keep)
    step = lambda d, key, i: jax.value_and_grad(lambda tr: loss_fn(
        C.merge_leaves(tr, fr, keep), d["x"][rows[i]], d["y"][rows[i]], ones, key))(tr)
    return jax.vmap(lambda d, key: jax.lax.map(lambda i: step(d, key, i),
                                                 jnp.arange(len(rows))))(d, key)

  update = jax.vmap(C.make_client_update(loss_fn, setup.client_opt, setup.index,
                                         local_steps=s.local_steps, batch_size=s.batch_size,
                                         blocks=(k - 1,), dense_delta=False),
                    in_axes=(None, 0, 0, 0))
  p = setup.params
  ms = median_ms({"fwd": (jax.jit(fwd), (p, data, keys)), "grad": (jax.jit(grad), (p, data, keys)),
                  "update": (jax.jit(update), (p, data, mk, keys))})
  tokens = nc * s.batch_size * np.asarray(rd["x"]).shape[-1]
  print(f"chunk of {nc} clients, top block, {s.local_steps} steps x {s.batch_size}: "
        f"forward {ms['fwd']:.1f} ms, + gradient {ms['grad'] - ms['fwd']:.1f} ms, "
        f"+ Adam and delta {ms['update'] - ms['grad']:.1f} ms = update {ms['update']:.1f} ms "
        f"({tokens} token slots per step)")
  print(f"  forward share of the update: {100 * ms['fwd'] / ms['update']:.0f}%")


def block_forward(setup, peak: float) -> None:
  cfg = setup.spec.module.cfg
  b, t, d, f = 32, 24, cfg.hidden_size, cfg.intermediate_size
  rng = np.random.default_rng(0)
  h = jnp.asarray(rng.normal(size=(b, t, d)), jnp.float32)
  keep = jnp.asarray(rng.random((b, t)) < 0.56).at[:, 0].set(True)
  layer = BertLayer(cfg)
  p = layer.init(jax.random.key(0), h, keep, False)
  P = p["params"]

  def matmuls(P, h):
    x = h.reshape(-1, d)
    q, k_, v = (x @ P[n]["kernel"] for n in ("query", "key", "value"))
    o = (q + k_ + v) @ P["attention_output"]["kernel"]
    return (o @ P["intermediate"]["kernel"]) @ P["output"]["kernel"]

  ms = median_ms({"block": (jax.jit(lambda p, h: layer.apply(p, h, keep, False)), (p, h)),
                  "matmuls": (jax.jit(matmuls), (P, h))}, repeats=30)
  fl = 2 * b * t * (4 * d * d + 2 * d * f)
  print(f"one block's forward on {b * t} tokens: {ms['block']:.2f} ms "
        f"({fl / ms['block'] / 1e6:.0f} GFLOP/s, {100 * fl / ms['block'] / 1e6 / (peak / 1e9):.0f}% "
        f"of the peak); its six matmuls alone {ms['matmuls']:.2f} ms "
        f"({100 * fl / ms['matmuls'] / 1e6 / (peak / 1e9):.0f}% of the peak)")


def main() -> None:
  setup = train.Setup(load_config("configs/default.py"))
  rd = setup.round_data(0)
  print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, jax {jax.__version__}, "
        f"{os.uname().release}, load {os.getloadavg()}")
  peak = bench.matmul_peak()
  print(f"fp32 matmul peak {peak / 1e9:.0f} GFLOP/s")
  x, m = np.asarray(rd["x"]), np.asarray(rd["mask"])
  print(f"round 0's real rows: {100 * (x[m] != 0).mean():.0f}% of their token slots are real "
        f"(padded to {x.shape[-1]})")
  block_forward(setup, peak)
  chunk_parts(setup, rd)
  print(f"# load after {os.getloadavg()}")


if __name__ == "__main__":
  main()
