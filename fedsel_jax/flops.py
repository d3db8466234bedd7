"""FLOPs of a round's local training: executed (XLA) and needed (analytic).

* executed: XLA's cost analysis of the client-update variant each chunk of
  the round runs (compiled with the local-step loop unrolled, since XLA
  counts a loop body once), summed over the round's chunks;
* needed (``../shared/BENCH.md``): forward through every layer; backward down
  to each client's lowest selected block; weight gradients of the selected
  blocks and the common layers only. Counted from the parameter shapes:
  a dense kernel of P weights costs 2 P FLOPs per token forward, as much
  again for its input gradient and for its weight gradient; attention
  (blocks with a ``query`` or ``q_proj`` kernel of width d) adds 4 T d per
  token forward and twice that backward; the lowest selected block needs no
  gradient of its input (its query/key/value kernels, or its first kernel).
  A ViT's patch embedding (``patch_embedding`` convolution, stride = kernel)
  is a dense layer on the T - 1 patches. Embedding lookups, norms,
  activations and image resizing count 0.
  Common layers below the blocks (``LayerGroups.base``: embeddings trained
  from scratch) cost their forward per token and their weight gradients,
  and make every backward pass reach the bottom whatever the mask: every
  block's activation gradients, the lowest one's input gradient included.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedsel_jax import client as client_lib
from fedsel_jax import federated
from fedsel_jax import masks as masks_lib

PyTree = Any
_INPUT_KERNELS = ("query", "key", "value", "q_proj", "k_proj", "v_proj")
_QUERY_KERNELS = ("query/kernel", "q_proj/kernel")
# A ViT's patch embedding: a convolution whose stride is its kernel size, i.e.
# a dense layer on every patch (all tokens but the class token).
PATCH_KERNEL = "patch_embedding/kernel"


def _flops_of(compiled) -> float:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost["flops"])


def counting_parts(setup) -> federated.RoundParts:
  """``setup``'s round parts with the local-step loop unrolled (for cost analysis)."""
  return federated.make_round_parts(
      client_lib.make_loss_fn(setup.spec.module.apply), setup.index, setup.k,
      setup.client_opt, setup.costs, dataclasses.replace(setup.settings, unroll=True))


def executed_round_flops(parts: federated.RoundParts, params: PyTree, rd: dict,
                         masks: np.ndarray) -> float:
  """FLOPs XLA executes for a round's client updates.

  Args:
    parts: the round's static parts, built with ``settings.unroll=True``
      (:func:`counting_parts`), else each local-step loop counts once.
    params: theta^t.
    rd: the round data (``x, y, mask, num_examples, valid``; Mp slots).
    masks: bool[Mp, K] the round's masks.

  Returns:
    The sum over the round's chunks (grouped as ``federated.train_step``
    groups them) of the XLA cost analysis of the variant the chunk runs;
    with ``grad_gates`` compiled with the chunk's gates fixed
    (``client.make_client_update(static_gates=)``), since XLA counts a
    conditional as its costlier branch.
  """
  valid = np.asarray(rd["valid"])
  mp = valid.shape[0]
  weights = np.where(valid, rd["num_examples"], 0).astype(np.float32)
  order = np.asarray(federated.group_order(jnp.asarray(masks), jnp.asarray(valid))) \
      if len(parts.updates) > 1 else np.arange(mp)
  chunk = parts.chunk_size(mp)
  table = parts.variant_table()
  data = {f: np.asarray(rd[f])[order] for f in ("x", "y", "mask", "num_examples")}
  masks = np.asarray(masks)[order]
  keys = jax.random.split(jax.random.key(0), mp)
  costs: dict[tuple[int, tuple[int, ...]], float] = {}
  total = 0.
  for start in range(0, mp, chunk):
    sl = slice(start, start + chunk)
    v = int(federated.pick_variant(table, jnp.asarray(masks[sl]), jnp.asarray(weights[order][sl])))
    real = masks[sl] & valid[order][sl, None]
    gates = tuple(np.flatnonzero(real.any(0))) if parts.settings.grad_gates else ()
    if (v, gates) not in costs:
      fn = jax.jit(jax.vmap(_chunk_update(parts, v, gates), in_axes=(None, 0, 0, 0)))
      chunk_data = {f: a[sl] for f, a in data.items()}
      costs[v, gates] = _flops_of(fn.lower(params, chunk_data, masks[sl], keys[sl]).compile())
    total += costs[v, gates]
  return total


def _chunk_update(parts: federated.RoundParts, v: int, gates: tuple[int, ...]):
  """Variant ``v``'s client update; with ``grad_gates``, the one whose gates are fixed
  to the chunk's union of masks (what the gated program executes)."""
  if not parts.settings.grad_gates:
    return parts.updates[v]
  s = parts.settings
  return client_lib.make_client_update(parts.loss_fn, parts.client_opt, parts.index,
                                       local_steps=s.local_steps, batch_size=s.batch_size,
                                       blocks=parts.variants[v], unroll=s.unroll,
                                       dense_delta=False, gate=True, static_gates=gates)


def block_kernels(params: PyTree, index: PyTree, k: int) -> dict[int, list[tuple[str, tuple]]]:
  """Group -> [(leaf path, shape)] of its dense kernels (FIXED and COMMON too).

  Raises:
    NotImplementedError: for kernels that are not 2-D (convolutions).
  """
  out: dict[int, list] = {}
  for (path, p), g in zip(jax.tree_util.tree_leaves_with_path(params),
                          jax.tree_util.tree_leaves(index)):
    name = masks_lib.path_str(path)
    if not name.endswith("kernel"):
      continue
    shape = tuple(p.shape)
    if len(shape) == 4 and name.endswith(PATCH_KERNEL):
      shape = (int(np.prod(shape[:3])), shape[3])          # [p, p, C, D] -> [p p C, D]
    elif len(shape) != 2:
      raise NotImplementedError(f"needed FLOPs count dense kernels only, not {name} {p.shape}")
    out.setdefault(g, []).append((name, shape))
  return out


def needed_step_flops(params: PyTree, index: PyTree, k: int, tokens: int, batch: int,
                      mask: np.ndarray, base: tuple[str, ...] = ()) -> float:
  """Analytic FLOPs of one local step of one client (module docstring).

  Args:
    params, index: the model and its group table.
    k: K.
    tokens: T, sequence length (1 for feature vectors).
    batch: B.
    mask: bool[K] the client's selected blocks.
    base: the common prefixes below the blocks (``LayerGroups.base``).
  """
  kern = block_kernels(params, index, k)
  size = lambda ks: sum(int(np.prod(s)) for _, s in ks)
  common = kern.get(masks_lib.COMMON, [])
  bottom = [(n, s) for n, s in common if masks_lib.under_any(n, base)]
  top = [(n, s) for n, s in common if not masks_lib.under_any(n, base)]
  patches = lambda ks: sum(int(np.prod(s)) for n, s in ks if n.endswith(PATCH_KERNEL))
  if tokens < 2 and any(patches(ks) for ks in kern.values()):
    raise NotImplementedError("a patch embedding needs the ViT's token count (patches + 1)")
  dense = {g: 2. * tokens * size(ks) - 2. * patches(ks)   # no patch at the class token
           for g, ks in kern.items() if g != masks_lib.COMMON}
  attn = {}
  for g, ks in kern.items():
    q = [s for n, s in ks if n.endswith(_QUERY_KERNELS)]
    attn[g] = 4. * tokens * tokens * q[0][1] if (g >= 0 and q) else 0.
  head = 2. * size(top)                 # reads pooled features: once per example
  below = 2. * tokens * size(bottom)    # trained layers under the blocks, per token
  blocks = [l for l in range(k) if l in dense]
  forward = dense.get(masks_lib.FIXED, 0.) + below + sum(dense[l] + attn[l] for l in blocks) + head
  sel = [l for l in blocks if mask[l]]
  backward = head + below                                # weight gradients of the common layers
  if sel or base:
    c = 0 if base else sel[0]
    backward += head                                     # into the pooled features
    for l in blocks:
      if l >= c:
        backward += dense[l] + 2. * attn[l]             # activation gradients
    if not base:                                         # the lowest block's input needs none
      ks = kern[c]
      inputs = [s for n, s in ks if n.split("/")[-2] in _INPUT_KERNELS] or [ks[0][1]]
      backward -= 2. * tokens * sum(int(np.prod(s)) for s in inputs)
    backward += sum(dense[l] for l in sel)              # weight gradients
  return batch * (forward + backward)


def needed_round_flops_from(params: PyTree, index: PyTree, k: int, tokens: int, batch: int,
                            local_steps: int, masks: np.ndarray,
                            valid: np.ndarray | None = None,
                            base: tuple[str, ...] = ()) -> float:
  """Analytic FLOPs of a round: ``local_steps`` steps of every valid client.

  Args:
    masks: bool[Mp, K]; valid: bool[Mp] (default all); base: as in
      :func:`needed_step_flops`.
  """
  valid = np.ones(len(masks), bool) if valid is None else np.asarray(valid)
  return local_steps * float(sum(needed_step_flops(params, index, k, tokens, batch, m, base)
                                 for m, v in zip(masks, valid) if v))


def needed_round_flops(setup, rd: dict, masks: np.ndarray) -> float:
  """Analytic FLOPs the round's masks need (nan for models with convolutions)."""
  x = np.asarray(rd["x"])
  tokens = x.shape[2] if x.ndim == 3 and np.issubdtype(x.dtype, np.integer) else 1
  module = setup.spec.module
  vit = getattr(getattr(module, "base", module), "cfg", None)   # through a LoRA wrapper
  if hasattr(vit, "num_patches"):                 # a ViT: the patches and the class token
    tokens = vit.num_patches + 1
  s = setup.settings
  try:
    return needed_round_flops_from(setup.params, setup.index, setup.k, tokens, s.batch_size,
                                   s.local_steps, masks, rd["valid"],
                                   base=tuple(setup.spec.groups.base))
  except NotImplementedError:
    return float("nan")
