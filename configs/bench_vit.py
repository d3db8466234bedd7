"""The ViT workloads of ../shared/BENCH.md's GPU rows, on synthetic images.

No dataset or checkpoint is needed: ``data.name='synthetic'``
(``fedsel_jax/datasets/synthetic.py``: 32-px class-prototype images plus
noise) and a randomly initialised CLIP vision tower whose patch embedding
stays fixed, as a pretrained one would (``model.embeddings='fixed'``), so
the cut and the selection save compute as in the paper's runs. Meant for

    python -m fedsel_jax.bench --config configs/bench_vit.py:ARG [--config.FIELD=...]

ARG:
  ``b32`` (default): ViT-B/32 size (CLIP ViT-B/32 tower, 87.5M parameters,
      images resized to 224 px in the graph as in configs/cifar10_clip.py),
      20 clients per round x 5 SGD steps x batch 64, chunks of 10, bf16
      compute; 100 clients, Dirichlet(0.1), at most 320 examples each.
  ``tiny``: BENCH.md's tiny ViT (32 px, patch 4, width 192, depth 6;
      variant ``T/4``, 2.7M parameters), 200 clients per round x 10 x 32,
      chunks of 50, bf16; 400 clients.
  ``tiny2000``: the tiny ViT with 2,000 clients per round (10 x 32 each),
      chunks of 250.
  ``smoke``: a CPU-sized version for tests (the ``tiny`` test tower, float32).

It is also a runnable training config
(``python -m fedsel_jax.main --config configs/bench_vit.py:smoke --workdir DIR``).
"""

import ml_collections

from configs import default


def get_config(arg: str = ""):
  c = default.paper_run(default.get_config())
  c.data.name = "synthetic"
  c.data.synthetic = ml_collections.ConfigDict(
      dict(size=32, channels=3, classes=10, train=32_000, test=1_000))
  c.data.image_size = 0
  c.data.partition = "dirichlet"
  c.data.num_clients = 100
  c.data.alpha = 0.1
  c.data.min_client_size = 20
  c.data.max_examples = 320
  c.data.max_test = 0
  c.model.name = "clip_vit"
  c.model.variant = "B/32"
  c.model.pretrained = ""
  c.model.embeddings = "fixed"
  c.model.use_projection = False
  c.fl.num_rounds = 20
  c.fl.clients_per_round = 20
  c.fl.client_chunk = 10
  c.fl.device_data_max_mb = 4096.0
  c.selection.lam = 0.05
  c.diagnostics.enabled = False
  if arg in ("", "b32"):
    pass
  elif arg in ("tiny", "tiny2000"):
    c.model.variant = "T/4"
    c.fl.local_steps = 10
    c.fl.batch_size = 32
    c.data.partition = "iid"
    c.data.max_examples = 0
    c.data.num_clients = 400 if arg == "tiny" else 2000
    c.data.synthetic.train = 80 * c.data.num_clients if arg == "tiny" else 40 * 2000
    c.fl.clients_per_round = 200 if arg == "tiny" else 2000
    c.fl.client_chunk = 50 if arg == "tiny" else 250
  elif arg == "smoke":
    default.smoke_run(c)
    c.model.variant = "tiny"
    c.model.dtype = "float32"
    c.data.synthetic.train = 400
    c.data.synthetic.test = 64
    c.data.num_clients = 8
    c.data.alpha = 0.5
    c.data.min_client_size = 8
    c.data.max_examples = 32
    c.fl.clients_per_round = 4
    c.fl.local_steps = 2
    c.fl.backprop_cut = True     # the GPU rows' mechanism, exercised at smoke size
  else:
    raise ValueError(f"configs/bench_vit.py takes '', 'b32', 'tiny', 'tiny2000' or 'smoke', "
                     f"got {arg!r}")
  return c
