"""Forward pass alone of the flagship MiniLM classifier on 160 sequences (10 clients x 16), JAX
against torch (1 and 2 threads), in one process; median of 10 calls.

    PYTHONPATH=. python experiments/bench/probes/forward_pass.py
    XLA_FLAGS=--xla_cpu_use_thunk_runtime=false PYTHONPATH=. python experiments/bench/probes/forward_pass.py
"""
import sys, time, jax, jax.numpy as jnp, numpy as np, importlib.util, torch
from fedsel_jax import train
from fedsel_jax.cli import load_config
c = load_config("configs/default.py")
setup = train.Setup(c)
rd = setup.round_data(0)
x = np.asarray(rd["x"][:10, :16]).reshape(160, -1)
print("x", x.shape, "nonpad frac", (x != 0).mean())
spec = importlib.util.spec_from_file_location("peer", "experiments/bench/torch_peer.py"); peer = importlib.util.module_from_spec(spec); spec.loader.exec_module(peer)
p = setup.params
fwd = jax.jit(lambda p, x: setup.spec.module.apply({"params": p}, x, train=False))
xj = jnp.asarray(x)
def t(fn, n=10):
  fn(); ts=[]
  for _ in range(n):
    t0=time.perf_counter(); fn(); ts.append(time.perf_counter()-t0)
  return np.median(ts)
print("jax fwd", t(lambda: fwd(p, xj).block_until_ready()))
for th in (1,2):
  torch.set_num_threads(th)
  m = peer.build_model(setup).eval()
  xt = torch.from_numpy(x).long()
  with torch.no_grad():
    print("torch fwd", th, t(lambda: m(xt)))
