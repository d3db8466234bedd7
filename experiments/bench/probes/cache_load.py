"""Where a warm-cache first call of the flagship round goes: cProfile of `lowered.compile()`
on a persistent-cache hit (run cache_rerun.py first; pass its cache folder).

    PYTHONPATH=. python experiments/bench/probes/cache_load.py /tmp/fedsel_jax_rerun_cache_XXXX
"""
import logging, sys, time, cProfile, pstats
import jax
from fedsel_jax import cli, compile_cache, train
logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
for n in ("jax._src.compiler", "jax._src.compilation_cache", "jax._src.cache_key"):
  logging.getLogger(n).setLevel(logging.DEBUG)
compile_cache.enable(sys.argv[1])
config = cli.load_config("configs/default.py")
setup = train.Setup(config)
rd, key = setup.round_data(0), jax.random.key(0)
lowered = setup.round_fn.trace(setup.initial_state(), rd, key).lower()
print("LOWERED", time.strftime("%X"), flush=True)
pr = cProfile.Profile(); pr.enable(); t = time.perf_counter()
lowered.compile()
pr.disable(); print("COMPILE", time.perf_counter() - t, flush=True)
pstats.Stats(pr).sort_stats("cumulative").print_stats(15)
