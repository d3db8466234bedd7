"""Trace + lower time of a config's round and a hash of its StableHLO (locations dropped).

    PYTHONPATH=. python experiments/bench/probes/lowered_text.py CONFIG OUT.txt [FIELD=VALUE ...]

Two commits whose hashes agree compile the same program (and share the
persistent cache's entry).
"""
import re, sys, time, hashlib
import jax
from fedsel_jax import cli, train
config = cli.load_config(sys.argv[1]); cli.apply_overrides(config, sys.argv[3:])
setup = train.Setup(config)
rd, key = setup.round_data(0), jax.random.key(0)
t0 = time.perf_counter()
low = setup.round_fn.trace(setup.initial_state(), rd, key).lower()
t1 = time.perf_counter()
txt = low.as_text(debug_info=False)
txt = re.sub(r"loc\([^)]*\)", "", txt)
open(sys.argv[2], "w").write(txt)
print("trace+lower", round(t1 - t0, 2), "sha", hashlib.sha256(txt.encode()).hexdigest()[:16], len(txt))
