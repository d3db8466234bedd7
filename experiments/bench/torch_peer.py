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
digits MLP (``models.small.MLP``) is rebuilt from the JAX weights.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import transformers

from fedsel_jax import weights


def version() -> str:
  return f"{torch.__version__}, transformers {transformers.__version__}"


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


def model_and_prefixes(setup):
  """(torch model, block index -> parameter-name prefix) for the config's model."""
  name = setup.config.model.name
  if name in ("minilm", "bert"):
    return build_model(setup), (lambda l: f"encoder.encoder.layer.{l}."), torch.int64
  if name == "mlp":
    return MLP(setup), (lambda l: f"blocks.{l}."), torch.float32
  raise NotImplementedError(f"the torch peer builds minilm/bert and mlp models, not {name!r}")


def make_optimizer(setup, params):
  c = setup.config.client_optim
  if c.name == "adam":
    return torch.optim.Adam(params, lr=c.lr)
  if c.name == "adamw":
    return torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay)
  return torch.optim.SGD(params, lr=c.lr, momentum=c.momentum if c.name == "momentum" else 0.)


def make_round(setup, rd: dict, masks: np.ndarray, threads: int):
  """A callable running one sequential round; returns the new state dict."""
  torch.set_num_threads(threads)
  model, prefix, x_dtype = model_and_prefixes(setup)
  global_state = copy.deepcopy(model.state_dict())
  s = setup.settings
  clients = []
  for i in np.flatnonzero(rd["valid"]):
    n = int(rd["num_examples"][i])
    rows = (np.arange(s.local_steps * s.batch_size) % n).reshape(s.local_steps, s.batch_size)
    clients.append((torch.from_numpy(np.asarray(rd["x"][i])).to(x_dtype),
                    torch.from_numpy(np.asarray(rd["y"][i]).astype(np.int64)), rows,
                    [prefix(l) for l in np.flatnonzero(masks[i])] + ["head."], float(n)))
  loss_fn = torch.nn.CrossEntropyLoss()

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
        loss_fn(model(x[r]), y[r]).backward()
        opt.step()
      with torch.no_grad():
        for name, p in trained:
          delta = p.detach() - global_state[name]
          sums[name] = sums.get(name, 0.) + w * delta
          totals[name] = totals.get(name, 0.) + w
    new = dict(global_state)
    for name, total in sums.items():
      new[name] = global_state[name] + total / totals[name]
    return new

  return one_round
