"""The paper's DomainNet run: CLIP ViT-B/32, domain = client group.

Six domains (real, painting, clipart, quickdraw, infograph, sketch), the
10-class subset of FedBN (bird, feather, headphones, ice_cream, teapot, tiger,
whale, windmill, wine_glass, zebra); each domain's examples are split IID over
5 clients (30 clients), 10 per round.

Needs, once, on a machine with network: the six TFDS ``domainnet/<domain>``
configs prepared in ``data.data_dir`` (``tfds.builder('domainnet/real',
data_dir=D, file_format='array_record').download_and_prepare()`` for each
domain) and the CLIP checkpoint folder as ``model.pretrained``:
    python -m fedsel_jax.main --config configs/domainnet_clip.py --workdir runs/domainnet \
        --config.model.pretrained=/path/to/clip-vit-base-patch32
"""

from configs import default


def get_config(arg: str = ""):
  c = default.paper_run(default.get_config())
  c.data.name = "domainnet"
  c.data.image_size = 64         # stored size; the model resizes to 224 on the device
  c.data.normalize = "clip"
  c.data.partition = "natural"   # natural groups = domains
  c.data.num_clients = 30
  c.model.name = "clip_vit"
  c.model.variant = "B/32"
  # The head reads CLIP's image embedding (ln_post + visual_projection, both
  # common layers as SPEC.md says); False = the post-LN class token.
  c.model.use_projection = True
  c.model.pretrained = "~/models/clip-vit-base-patch32"
  c.fl.clients_per_round = 10
  c.fl.client_chunk = 10
  if arg == "smoke":
    default.smoke_run(c)
  elif arg:
    raise ValueError(f"configs/domainnet_clip.py takes '' or 'smoke', got {arg!r}")
  return c
