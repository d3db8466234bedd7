"""The authors' sequential PyTorch round (../../shared/BENCH.md), the bench's peer.

Loaded by path from ``python -m fedsel_jax.bench --torch_peer THIS_FILE``;
the package never imports it. For each client: load the global state dict
into the model, ``requires_grad`` on the selected blocks and the head only, a
fresh optimizer, tau steps on minibatches of the client's padded data from
host memory, return theta_i - theta on the trained tensors; after all
clients the server averages each tensor over the clients that returned it,
weighted by example counts. Same model (transformers ``BertModel`` from the
same MiniLM checkpoint, mean pooling, a Linear head with the JAX head's
weights), same masks, same padded data, same batch size and steps. The
digits MLP (``models.small.MLP``) and CLIP vision towers
(``CLIPVisionModel``, ``configs/bench_vit.py``) are rebuilt from the JAX
weights. On a GPU the peer runs there (``make_round``).
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import transformers

from fedsel_jax import weights


def version() -> str:
  """torch's and transformers' versions and the device the peer runs on."""
  dev = (f"cuda: {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "cpu")
  return f"{torch.__version__}, transformers {transformers.__version__}, {dev}"


def release_memory() -> None:
  """Returns torch's cached device memory (after a failure, e.g. out of memory)."""
  if torch.cuda.is_available():
    torch.cuda.empty_cache()


class Classifier(torch.nn.Module):
  """BertModel + masked mean pooling + Linear, as ``models.bert.BertClassifier``."""

  def __init__(self, encoder: torch.nn.Module, head: torch.nn.Linear):
    super().__init__()
    self.encoder, self.head = encoder, head

  def forward(self, ids: torch.Tensor) -> torch.Tensor:
    keep = (ids != 0).float()
    h = self.encoder(input_ids=ids, attention_mask=keep.long()).last_hidden_state
    pooled = (h * keep[..., None]).sum(1) / keep.sum(1, keepdim=True).clamp_min(1e-9)
    return self.head(pooled)


def build_model(setup) -> Classifier:
  """The flagship MiniLM classifier in torch, dropout off like the JAX model."""
  cfg = transformers.BertConfig.from_pretrained(weights.minilm_dir())
  cfg.hidden_dropout_prob = cfg.attention_probs_dropout_prob = 0.0
  encoder = transformers.BertModel.from_pretrained(weights.minilm_dir(), config=cfg,
                                                   add_pooling_layer=False)
  kernel = np.asarray(setup.params["head"]["classifier"]["kernel"])
  head = torch.nn.Linear(kernel.shape[0], kernel.shape[1])
  with torch.no_grad():
    head.weight.copy_(torch.from_numpy(kernel.T.copy()))
    head.bias.copy_(torch.from_numpy(np.array(setup.params["head"]["classifier"]["bias"])))
  return Classifier(encoder, head)


class MLP(torch.nn.Module):
  """``models.small.MLP``: Linear embed, residual Linear(relu) blocks, Linear(relu) head."""

  def __init__(self, setup):
    super().__init__()
    p = setup.params
    lin = lambda name: _linear(p[name])
    self.embed = lin("embed")
    self.blocks = torch.nn.ModuleList([lin(f"block_{k}") for k in range(setup.k)])
    self.head = lin("head")

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = self.embed(x.reshape(x.shape[0], -1))
    for block in self.blocks:
      x = x + block(torch.relu(x))
    return self.head(torch.relu(x))


def _linear(p) -> torch.nn.Linear:
  kernel = np.asarray(p["kernel"])
  lin = torch.nn.Linear(kernel.shape[0], kernel.shape[1])
  with torch.no_grad():
    lin.weight.copy_(torch.from_numpy(kernel.T.copy()))
    lin.bias.copy_(torch.from_numpy(np.asarray(p["bias"]).copy()))
  return lin


class VisionClassifier(torch.nn.Module):
  """CLIPVisionModel + Linear on its pooled output, as ``models.clip.ClipVisionClassifier``
  without a projection: images NCHW, resized bilinearly to the tower's size when
  they differ (as the JAX model does in its graph)."""

  def __init__(self, encoder: torch.nn.Module, head: torch.nn.Linear, size: int):
    super().__init__()
    self.encoder, self.head, self.size = encoder, head, size

  def forward(self, images: torch.Tensor) -> torch.Tensor:
    if images.shape[-1] != self.size:
      images = torch.nn.functional.interpolate(images, size=(self.size, self.size),
                                               mode="bilinear", align_corners=False)
    return self.head(self.encoder(pixel_values=images).pooler_output.float())


def build_vision_model(setup):
  """(model, encoder prefix) of the config's CLIP tower with the JAX weights."""
  cfg = setup.spec.module.cfg
  if cfg.projection_dim:
    raise NotImplementedError("the torch peer builds CLIP towers without a projection")
  hf = transformers.CLIPVisionConfig(
      hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
      num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
      image_size=cfg.image_size, patch_size=cfg.patch_size, num_channels=cfg.num_channels,
      layer_norm_eps=cfg.layer_norm_eps, hidden_act=cfg.hidden_act, attention_dropout=0.0)
  encoder = transformers.CLIPVisionModel(hf)
  keys = encoder.state_dict()
  prefix = "vision_model." if "vision_model.pre_layrnorm.weight" in keys else ""
  state = {k: torch.from_numpy(v) for k, v in weights.export_tensors(
      setup.params, weights.clip_vision_key_map(cfg.num_layers, False, prefix)).items()}
  missing, unexpected = encoder.load_state_dict(state, strict=False)
  if unexpected or [k for k in missing if "position_ids" not in k]:
    raise ValueError(f"CLIP key map mismatch: missing {missing}, unexpected {unexpected}")
  head = _linear(setup.params["head"]["classifier"])
  return VisionClassifier(encoder, head, cfg.image_size), "encoder." + prefix


def model_and_prefixes(setup):
  """(torch model, block index -> parameter-name prefix, common prefixes, input dtype,
  NHWC -> NCHW) for the config's model."""
  name = setup.config.model.name
  if name in ("minilm", "bert"):
    return (build_model(setup), (lambda l: f"encoder.encoder.layer.{l}."), ["head."],
            torch.int64, False)
  if name == "mlp":
    return MLP(setup), (lambda l: f"blocks.{l}."), ["head."], torch.float32, False
  if name == "clip_vit":
    model, enc = build_vision_model(setup)
    return (model, (lambda l: f"{enc}encoder.layers.{l}."), [f"{enc}post_layernorm.", "head."],
            torch.float32, True)
  raise NotImplementedError(f"the torch peer builds minilm/bert, mlp and clip_vit models, "
                            f"not {name!r}")


def make_optimizer(setup, params):
  c = setup.config.client_optim
  if c.name == "adam":
    return torch.optim.Adam(params, lr=c.lr)
  if c.name == "adamw":
    return torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay)
  return torch.optim.SGD(params, lr=c.lr, momentum=c.momentum if c.name == "momentum" else 0.)


def reset_device_peak() -> None:
  """Starts a new peak of torch's device memory (a no-op on the CPU)."""
  if torch.cuda.is_available():
    torch.cuda.reset_peak_memory_stats()


def device_peak_mb() -> float | None:
  """torch's peak device memory allocated since the reset (MB); None on the CPU."""
  return torch.cuda.max_memory_allocated() / 2 ** 20 if torch.cuda.is_available() else None


def device() -> torch.device:
  """The GPU when torch sees one (the JAX round runs on the accelerator too)."""
  return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def make_round(setup, rd: dict, masks: np.ndarray, threads: int):
  """A callable running one sequential round; returns the new state dict.

  On a GPU the model, the global state and the clients' padded data live on
  it (the authors' pattern with its data already on the device: a lower
  bound on their time); with ``model.dtype='bfloat16'`` the forward and
  backward passes run under ``torch.autocast`` in bfloat16 with float32
  weights, as the JAX round computes in bfloat16 with float32 parameters.
  """
  torch.set_num_threads(threads)
  dev = device()
  model, prefix, common, x_dtype, nchw = model_and_prefixes(setup)
  model = model.to(dev)
  global_state = copy.deepcopy(model.state_dict())
  s = setup.settings
  clients = []
  for i in np.flatnonzero(rd["valid"]):
    n = int(rd["num_examples"][i])
    rows = (np.arange(s.local_steps * s.batch_size) % n).reshape(s.local_steps, s.batch_size)
    x = torch.from_numpy(np.asarray(rd["x"][i])).to(x_dtype)
    x = x.permute(0, 3, 1, 2).contiguous() if nchw else x
    clients.append((x.to(dev), torch.from_numpy(np.asarray(rd["y"][i]).astype(np.int64)).to(dev),
                    torch.from_numpy(rows).to(dev),
                    [prefix(l) for l in np.flatnonzero(masks[i])] + common, float(n)))
  loss_fn = torch.nn.CrossEntropyLoss()
  bf16 = setup.config.model.get("dtype", "float32") == "bfloat16"
  autocast = lambda: torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16)

  def one_round():
    torch.set_num_threads(threads)
    sums, totals = {}, {}
    for x, y, rows, prefixes, w in clients:
      model.load_state_dict(global_state)
      trained = []
      for name, p in model.named_parameters():
        p.requires_grad_(any(name.startswith(q) for q in prefixes))
        if p.requires_grad:
          trained.append((name, p))
      opt = make_optimizer(setup, [p for _, p in trained])
      for r in rows:
        opt.zero_grad(set_to_none=True)
        with autocast():
          loss = loss_fn(model(x[r]), y[r])
        loss.backward()
        opt.step()
      with torch.no_grad():
        for name, p in trained:
          delta = p.detach() - global_state[name]
          sums[name] = sums.get(name, 0.) + w * delta
          totals[name] = totals.get(name, 0.) + w
    new = dict(global_state)
    for name, total in sums.items():
      new[name] = global_state[name] + total / totals[name]
    if dev.type == "cuda":
      torch.cuda.synchronize()
    return new

  return one_round
