"""Digits (scikit-learn, offline): a residual MLP, Dirichlet label skew.

The MLP (4 candidate blocks) rather than the CNN keeps a round at
milliseconds on CPU: XLA:CPU runs convolutions inside loops slowly (see
fedsel_jax/client.py); ``--config.model.name=cnn`` works too.

    python -m fedsel_jax.main --config configs/digits.py --workdir runs/digits \
        --config.selection.strategy=full

prints the final test accuracy (above 0.90 for ``full`` with 30 clients,
alpha 0.5). ``configs/digits.py:smoke`` is a seconds-long version for tests.
"""

from configs import default


def get_config(arg: str = ""):
  c = default.get_config()
  c.data.name = "digits"
  c.data.partition = "dirichlet"
  c.data.num_clients = 30
  c.data.alpha = 0.5
  c.data.min_client_size = 10
  c.data.max_examples = 0
  c.data.max_test = 0
  c.model.name = "mlp"
  c.model.pretrained = ""
  c.model.width = 128
  c.model.depth = 4
  c.model.features = (32, 32, 64, 64)   # used with model.name=cnn
  c.fl.num_rounds = 60
  c.fl.clients_per_round = 10
  c.fl.local_steps = 5
  c.fl.batch_size = 16
  c.fl.client_chunk = 10
  c.fl.backprop_cut = False
  c.client_optim.name = "sgd"
  c.client_optim.lr = 0.1
  c.selection.strategy = "proposed"
  c.selection.sel_batches = 0
  c.selection.budget.kind = "fixed"
  c.selection.budget.value = 2
  c.eval_every = 10
  c.checkpoint_every = 10
  c.compare_strategies = ()
  c.diagnostics.estimator = "full"   # every example; shares the all-data score pass
  c.diagnostics.power_iters = 20
  if arg == "smoke":
    c.data.num_clients = 8
    c.fl.num_rounds = 3
    c.fl.clients_per_round = 4
    c.fl.client_chunk = 2
    c.fl.local_steps = 2
    c.model.width = 16
    c.model.depth = 3
    c.model.features = (8, 8, 8)
    c.eval_every = 1
    c.checkpoint_every = 1
    c.diagnostics.every = 1
    c.diagnostics.power_iters = 0    # the HVP pass doubles the compile time; tests turn it on
  elif arg:
    raise ValueError(f"configs/digits.py takes '' or 'smoke', got {arg!r}")
  return c
