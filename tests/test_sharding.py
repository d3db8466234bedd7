"""The client axis sharded over 8 CPU devices gives the single-device round."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = r'''
import jax, numpy as np, optax
assert jax.device_count() == 8, jax.devices()
from tests.test_core import tiny_model, random_clients, round_data, K
from fedsel_jax import client as client_lib, federated
spec, params, index = tiny_model()
m = 16
rd = round_data(random_clients(m, seed=7), np.arange(m), budgets=[2] * m)
settings = federated.RoundSettings(strategy="random", local_steps=3, batch_size=4,
                                   client_chunk=8, diagnostics=True)
mesh = jax.make_mesh((8,), ("clients",), axis_types=(jax.sharding.AxisType.Auto,))
sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("clients"))
outs = []
for sh in (None, sharding):
  fn = jax.jit(federated.make_round_fn(client_lib.make_loss_fn(spec.module.apply), index, K,
                                       optax.sgd(0.1), optax.sgd(1.0), np.ones(K, np.float32),
                                       settings, client_sharding=sh))
  state = federated.init_server_state(params, optax.sgd(1.0), m, K)
  outs.append(fn(state, rd, jax.random.key(0)))
(a, ma), (b, mb) = outs
for x, y in zip(jax.tree_util.tree_leaves(a.params), jax.tree_util.tree_leaves(b.params)):
  np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
np.testing.assert_allclose(ma["e2"], mb["e2"], rtol=1e-4, atol=1e-9)
print("SHARDED_OK")
'''


def test_sharded_round_equals_single_device():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0 and "SHARDED_OK" in proc.stdout, proc.stderr[-3000:]
