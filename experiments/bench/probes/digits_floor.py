"""The floor of the digits round on this CPU: the smallest JAX round of the
digits MLP (width 128, 4 residual blocks, 10 clients x 5 SGD steps x 16, every
layer trained, no masks, no aggregation weights, no server optimizer), against
the smallest torch loop of the same work (a model per client, 5 steps, delta
averaged), in one process, alternating, median of 30 calls each, several
passes. It bounds what any JAX round of this workload can reach against the
torch pattern on this host; `python -m fedsel_jax.bench` measures the real one.
``need2`` rows: the same with only the embedding, the top 2 blocks and the
head trained (what a 2-block mask needs, the embedding being trained below
the blocks), torch with ``requires_grad`` off on the other 2 blocks.

    PYTHONPATH=. python experiments/bench/probes/digits_floor.py
    XLA_FLAGS=--xla_cpu_use_xnnpack=false PYTHONPATH=. python experiments/bench/probes/digits_floor.py
"""
import os, platform, time
import jax, jax.numpy as jnp, numpy as np, torch

C, S, B, D, W, L, O = 10, 5, 16, 64, 128, 4, 10
rng = np.random.default_rng(0)
params = {"in": rng.normal(0, .1, (D, W)), "out": rng.normal(0, .1, (W, O)),
          **{f"b{i}": rng.normal(0, .05, (W, W)) for i in range(L)}}
params = {k: v.astype(np.float32) for k, v in params.items()}
xs = rng.normal(size=(C, S, B, D)).astype(np.float32)
ys = rng.integers(0, O, (C, S, B))


def loss(p, x, y):
  h = jax.nn.relu(x @ p["in"])
  for i in range(L):
    h = h + jax.nn.relu(h @ p[f"b{i}"])
  lg = h @ p["out"]
  return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(lg), y[:, None], 1))


def client(p, x, y):
  def step(q, xy):
    g = jax.grad(loss)(q, *xy)
    return jax.tree.map(lambda a, b: a - .1 * b, q, g), None
  q, _ = jax.lax.scan(step, p, (x, y))
  return jax.tree.map(jnp.subtract, q, p)


# The work the digits masks need (2 of the 4 blocks selected): the trained
# embedding below the blocks makes every backward pass reach the bottom, so
# only the weight gradients of the 2 unselected blocks can be skipped.
NEED2 = ("in", "b2", "b3", "out")


def client_need2(p, x, y):
  tr = {k: p[k] for k in NEED2}
  fx = {k: v for k, v in p.items() if k not in NEED2}
  def step(q, xy):
    g = jax.grad(lambda q: loss({**fx, **q}, *xy))(q)
    return jax.tree.map(lambda a, b: a - .1 * b, q, g), None
  q, _ = jax.lax.scan(step, tr, (x, y))
  return jax.tree.map(jnp.subtract, q, tr)


def vmapped_need2(p, x, y):
  d = jax.vmap(client_need2, (None, 0, 0))(p, x, y)
  return {**p, **{k: p[k] + d[k].mean(0) for k in d}}


def vmapped(p, x, y):
  d = jax.vmap(client, (None, 0, 0))(p, x, y)
  return jax.tree.map(lambda a, b: a + b.mean(0), p, d)


def sequential(p, x, y):
  def body(acc, xy):
    return jax.tree.map(jnp.add, acc, client(p, *xy)), None
  acc, _ = jax.lax.scan(body, jax.tree.map(jnp.zeros_like, p), (x, y))
  return jax.tree.map(lambda a, b: a + b / C, p, acc)


class TorchMLP(torch.nn.Module):
  def __init__(self):
    super().__init__()
    self.inp = torch.nn.Linear(D, W, bias=False)
    self.blocks = torch.nn.ModuleList(torch.nn.Linear(W, W, bias=False) for _ in range(L))
    self.out = torch.nn.Linear(W, O, bias=False)

  def forward(self, x):
    h = torch.relu(self.inp(x))
    for b in self.blocks:
      h = h + torch.relu(b(h))
    return self.out(h)


def torch_round(model, xt, yt, frozen=()):
  base = {k: v.clone() for k, v in model.state_dict().items()}
  acc = {k: torch.zeros_like(v) for k, v in base.items()}
  for i in frozen:                      # requires_grad: no weight gradients for these blocks
    model.blocks[i].weight.requires_grad_(False)
  for c in range(C):
    model.load_state_dict(base)
    opt = torch.optim.SGD([q for q in model.parameters() if q.requires_grad], lr=.1)
    for s in range(S):
      opt.zero_grad()
      torch.nn.functional.cross_entropy(model(xt[c, s]), yt[c, s]).backward()
      opt.step()
    for k, v in model.state_dict().items():
      acc[k] += (v - base[k]) / C
  model.load_state_dict({k: base[k] + acc[k] for k in base})
  for q in model.parameters():
    q.requires_grad_(True)


def median_ms(fn, n=30):
  fn()
  ts = []
  for _ in range(n):
    t0 = time.perf_counter(); fn(); ts.append(time.perf_counter() - t0)
  return 1e3 * float(np.median(ts))


def main():
  print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} {platform.platform()} "
        f"jax {jax.__version__} torch {torch.__version__} XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r} "
        f"load {os.getloadavg()}")
  p, x, y = (jax.device_put(a) for a in (params, xs, ys))
  jv, js, jn = jax.jit(vmapped), jax.jit(sequential), jax.jit(vmapped_need2)
  model = TorchMLP()
  xt, yt = torch.from_numpy(xs), torch.from_numpy(ys)
  for _ in range(3):
    row = {"jax_vmap": median_ms(lambda: jax.block_until_ready(jv(p, x, y))),
           "jax_scan": median_ms(lambda: jax.block_until_ready(js(p, x, y)))}
    row["jax_need2"] = median_ms(lambda: jax.block_until_ready(jn(p, x, y)))
    for t in (1, 2):
      torch.set_num_threads(t)
      row[f"torch_{t}"] = median_ms(lambda: torch_round(model, xt, yt))
      row[f"torch_need2_{t}"] = median_ms(lambda: torch_round(model, xt, yt, frozen=(0, 1)))
    best_jax, best_torch = min(row["jax_vmap"], row["jax_scan"]), min(row["torch_1"], row["torch_2"])
    need_torch = min(row["torch_need2_1"], row["torch_need2_2"])
    print(" ".join(f"{k} {v:.2f} ms" for k, v in row.items()),
          f"| best torch / best jax {best_torch / best_jax:.2f}x, "
          f"need2: {need_torch / row['jax_need2']:.2f}x")
  print(f"# load after {os.getloadavg()}")


if __name__ == "__main__":
  main()
