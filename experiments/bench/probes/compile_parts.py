"""Compile time of the flagship round by part: without diagnostics, `top` without
diagnostics, the whole round (trace + lower, then compile; dot and scatter counts of the HLO).

    PYTHONPATH=. python experiments/bench/probes/compile_parts.py > experiments/bench/probes/compile_parts.log
"""
import time, jax, dataclasses, re
from fedsel_jax import client, federated, train
from fedsel_jax.cli import load_config
c = load_config("configs/default.py")
setup = train.Setup(c)
rd = dict(setup.round_data(0), diagnose=False)
key = jax.random.key(0)
for name, kw in [("no diagnostics", dict(diagnostics=False)),
                 ("top, no diagnostics", dict(diagnostics=False, strategy="top")),
                 ("proposed, diagnostics", dict())]:
  s = dataclasses.replace(setup.settings, **kw)
  # The fused round (diagnostics compiled in), as this log measured it.
  fn = jax.jit(federated.make_round_fn(client.make_loss_fn(setup.spec.module.apply), setup.index,
                                       setup.k, setup.client_opt, setup.server_opt, setup.costs,
                                       s, backward=setup.backward), donate_argnums=0)
  jax.clear_caches()
  t0 = time.perf_counter(); lo = fn.trace(setup.initial_state(), rd, key).lower(); t1 = time.perf_counter()
  txt = lo.as_text()
  co = lo.compile(); t2 = time.perf_counter()
  print(f"{name}: trace+lower {t1-t0:.1f} compile {t2-t1:.1f} dots {txt.count('dot_general')} scatters {txt.count('stablehlo.scatter')}", flush=True)
