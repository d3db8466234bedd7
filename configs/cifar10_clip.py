"""The paper's CIFAR-10 run: CLIP ViT-B/32 vision tower + linear head.

Dirichlet(alpha=0.1) label skew over 100 clients, 20 per round, 500 rounds,
batch 64, lr 0.01, heterogeneous budgets of 1-2 blocks (truncated normal),
bf16 compute with fp32 master weights.

Needs, once, on a machine with network (then copy the folders here):
  * CIFAR-10 prepared for TFDS in ``data.data_dir``:
      python -c "import tensorflow_datasets as tfds; \
        tfds.builder('cifar10', data_dir='$HOME/tensorflow_datasets', \
        file_format='array_record').download_and_prepare()"
  * the CLIP checkpoint (``openai/clip-vit-base-patch32``: config.json and
    model.safetensors) in the folder given as ``model.pretrained``.
Then:
    python -m fedsel_jax.main --config configs/cifar10_clip.py --workdir runs/cifar10_clip \
        --config.model.pretrained=/path/to/clip-vit-base-patch32
Missing data or weights end with one ``error:`` line naming the path.
``configs/cifar10_clip.py:smoke`` is a seconds-long run on the same data and weights.
"""

from configs import default


def get_config(arg: str = ""):
  c = default.paper_run(default.get_config())
  c.data.name = "cifar10"
  c.data.image_size = 0          # native 32 px; the model resizes to 224 on the device
  c.data.normalize = "clip"
  c.data.partition = "dirichlet"
  c.data.num_clients = 100
  c.data.alpha = 0.1
  c.data.min_client_size = 20
  c.model.name = "clip_vit"
  c.model.variant = "B/32"
  # The head reads CLIP's image embedding (ln_post + visual_projection, both
  # common layers as SPEC.md says); False = the post-LN class token.
  c.model.use_projection = True
  c.model.pretrained = "~/models/clip-vit-base-patch32"
  c.fl.clients_per_round = 20
  c.fl.client_chunk = 10
  c.selection.lam = 0.05
  if arg == "smoke":
    default.smoke_run(c)
  elif arg:
    raise ValueError(f"configs/cifar10_clip.py takes '' or 'smoke', got {arg!r}")
  return c
