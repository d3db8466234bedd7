"""LoRA adapters for any model family, as extra leaves of the Flax tree.

A targeted kernel ``W: [fan_in, fan_out]`` of a block gets ``a: [fan_in, r]``
(random, ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` as PEFT) and ``b: [r, fan_out]``
(zero), and the layer computes ``x W + bias + (alpha / r) (x a) b``. With
``b = 0`` the output is exactly the base model's (``y + 0``, bit for bit).

The base module is not changed: :class:`LoraModule` applies it with a Flax
method interceptor that adds the adapter term to the output of every
targeted ``nn.Dense`` / ``nn.DenseGeneral`` (the adapter forward, used in
training: its backward pass never forms a ``fan_in x fan_out`` gradient).
:func:`merge_params` folds the adapters into the kernels, ``W + (alpha/r) a b``,
and evaluation applies the plain base module to the merged tree.

Parameter tree: the base tree plus ``lora/`` mirroring the module paths::

  lora/layer_0/query/{a, b}   lora/layer_0/key/{a, b}   ...

Layer groups (:func:`lora_groups`): candidate ``k`` becomes the adapters of
the base candidate ``k`` (named ``<name>_lora``); the base candidates' own
weights become fixed (frozen); fixed and common groups are unchanged (the
head stays common). So ``selection.strategy=lora`` (every adapter, every
client) and any other strategy selecting among adapters
(``model.lora.within_selection``) reuse masks, costs and aggregation as they
are, with sizes that count adapter parameters.

Which kernels are targets: each model family declares glob patterns over
module paths (``ModelSpec.lora_targets``), per ``model.lora.targets``:
``attention`` (q, k, v and output projections) or ``attention+mlp``.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fedsel_jax import masks as masks_lib
from fedsel_jax.masks import LayerGroups

PyTree = Any

TARGETS = ("attention", "attention+mlp")
_INIT_STREAM = 0x10AA


@dataclasses.dataclass(frozen=True)
class LoraSettings:
  """``config.model.lora``: rank r >= 1, alpha > 0 (scale = alpha / r), targets."""

  rank: int
  alpha: float = 16.0
  targets: str = "attention"

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


def config_error(config) -> str | None:
  """The first problem with ``config.model.lora`` and the strategy, or None.

  Only what the config alone decides; widths and blocks are checked by
  :func:`find_targets` when the model is built.
  """
  lo = config.model.lora
  strategy = config.selection.strategy
  if not isinstance(lo.rank, int) or isinstance(lo.rank, bool) or lo.rank < 0:
    return f"model.lora.rank must be an integer >= 1 (0 = no LoRA), got {lo.rank!r}"
  if lo.targets not in TARGETS:
    return f"model.lora.targets must be one of {list(TARGETS)}, got {lo.targets!r}"
  if not (isinstance(lo.alpha, (int, float)) and np.isfinite(lo.alpha) and lo.alpha > 0):
    return f"model.lora.alpha must be a finite number > 0, got {lo.alpha!r}"
  if not isinstance(lo.within_selection, bool):
    return f"model.lora.within_selection must be True or False, got {lo.within_selection!r}"
  wants = strategy == "lora" or lo.within_selection
  if wants and lo.rank < 1:
    why = "selection.strategy='lora'" if strategy == "lora" else "model.lora.within_selection"
    return f"model.lora.rank must be >= 1 with {why}, got {lo.rank}"
  if lo.rank >= 1 and not wants:
    return (f"model.lora.rank={lo.rank} needs selection.strategy='lora' or "
            f"model.lora.within_selection=True (got strategy {strategy!r})")
  return None


def settings_from_config(lora_cfg) -> LoraSettings | None:
  """LoraSettings of ``config.model.lora`` (None when absent or rank 0)."""
  if lora_cfg is None or int(lora_cfg.rank) == 0:
    return None
  return LoraSettings(rank=int(lora_cfg.rank), alpha=float(lora_cfg.alpha),
                      targets=str(lora_cfg.targets))


def _input_ndim(module_path: str, kernel_ndim: int) -> int:
  """Contracted input axes of a kernel: 2 for flax MultiHeadDotProductAttention's
  ``out`` DenseGeneral (``[heads, head_dim, out]``), else 1 (Dense ``[in, out]``,
  q/k/v DenseGeneral ``[in, heads, head_dim]``)."""
  return 2 if kernel_ndim == 3 and module_path.rsplit("/", 1)[-1] == "out" else 1


def find_targets(base_params: PyTree, groups: LayerGroups,
                 patterns: Mapping[str, tuple[str, ...]], settings: LoraSettings,
                 model_name: str) -> dict[str, tuple[int, int, int]]:
  """Targeted kernels: ``module path -> (candidate k, fan_in, fan_out)``.

  A kernel is targeted when its module path matches a pattern of the
  selected kinds and it lies in a candidate group. DenseGeneral kernels of
  ``nn.MultiHeadDotProductAttention`` count as ``[prod(in axes), prod(out)]``
  (q/k/v: one input axis; the output projection: two).

  Raises:
    ValueError: no block holds a targeted kernel, or the rank exceeds the
      narrowest targeted kernel's width (``min(fan_in, fan_out)``).
  """
  kinds = ("attention",) if settings.targets == "attention" else ("attention", "mlp")
  pats = [p for kind in kinds for p in patterns.get(kind, ())]
  index = masks_lib.group_index(base_params, groups)
  found: dict[str, tuple[int, int, int]] = {}
  for (path, leaf), k in zip(jax.tree_util.tree_leaves_with_path(base_params),
                             jax.tree_util.tree_leaves(index)):
    s = masks_lib.path_str(path)
    if k < 0 or not s.endswith("/kernel"):
      continue
    module = s[:-len("/kernel")]
    if any(fnmatch.fnmatchcase(module, p) for p in pats):
      split = _input_ndim(module, len(leaf.shape))
      found[module] = (int(k), int(np.prod(leaf.shape[:split])),
                       int(np.prod(leaf.shape[split:])))
  if not found:
    raise ValueError(f"model.lora: model {model_name!r} has no blocks with "
                     f"{settings.targets} kernels to adapt (model.lora.targets="
                     f"{settings.targets!r}; known kinds here: {sorted(patterns) or 'none'})")
  narrow_path, (_, fi, fo) = min(found.items(), key=lambda kv: min(kv[1][1:]))
  if settings.rank > min(fi, fo):
    raise ValueError(f"model.lora.rank must be <= {min(fi, fo)}, the width of the "
                     f"narrowest targeted kernel {narrow_path!r} ({fi} x {fo}); "
                     f"got {settings.rank}")
  return found


def lora_groups(groups: LayerGroups, targets: Mapping[str, tuple[int, int, int]]) -> LayerGroups:
  """Adapters of base candidate k become candidate ``<name>_lora``; base blocks fixed.

  Base candidates without a targeted kernel (none in the shipped models)
  have no adapter group and are frozen like the others.
  """
  candidates = []
  for k, (name, _) in enumerate(groups.candidates):
    prefixes = tuple(f"lora/{m}" for m, (kk, _, _) in targets.items() if kk == k)
    if prefixes:
      candidates.append((f"{name}_lora", prefixes))
  frozen = tuple(p for _, ps in groups.candidates for p in ps)
  return LayerGroups(candidates=tuple(candidates), common=groups.common,
                     fixed=tuple(groups.fixed) + frozen, base=groups.base)


def _nest(flat: Mapping[str, PyTree]) -> dict:
  out: dict = {}
  for path, value in flat.items():
    node = out
    *parents, last = path.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[last] = value
  return out


def _get(tree: PyTree, path: str) -> PyTree:
  for p in path.split("/"):
    tree = tree[p]
  return tree


def init_adapters(key: jax.Array, targets: Mapping[str, tuple[int, int, int]],
                  rank: int, dtype=jnp.float32) -> dict:
  """``{module path (nested): {'a': [fan_in, r] uniform, 'b': [r, fan_out] zeros}}``."""
  flat = {}
  for i, (module, (_, fan_in, fan_out)) in enumerate(sorted(targets.items())):
    bound = 1.0 / np.sqrt(fan_in)
    a = jax.random.uniform(jax.random.fold_in(key, i), (fan_in, rank), dtype, -bound, bound)
    flat[module] = {"a": a, "b": jnp.zeros((rank, fan_out), dtype)}
  return _nest(flat)


def split_params(params: PyTree) -> tuple[PyTree, PyTree]:
  """``(base params, adapters)`` of a LoRA parameter tree."""
  return {k: v for k, v in params.items() if k != "lora"}, params["lora"]


def merge_params(params: PyTree, targets: Mapping[str, tuple[int, int, int]],
                 scale: float) -> PyTree:
  """Base params with every targeted kernel replaced by ``W + scale * a @ b``.

  Args:
    params: base tree + ``lora/``; kernels [fan_in, fan_out] (or DenseGeneral
      shapes with the same fan sizes).
    targets: from :func:`find_targets`.
    scale: alpha / r.

  Returns:
    A base-shaped tree (no ``lora`` key) for the plain base module.
  """
  base, adapters = split_params(params)
  merged = jax.tree_util.tree_map(lambda x: x, base)  # a fresh dict structure
  for module in targets:
    ab = _get(adapters, module)
    node = _get(merged, module)
    w = node["kernel"]
    node["kernel"] = w + (scale * (ab["a"] @ ab["b"])).reshape(w.shape).astype(w.dtype)
  return merged


def _adapted_call(next_fun, args, kwargs, module: nn.Module, ab: PyTree, scale: float):
  """Output of a Dense/DenseGeneral plus ``scale * (x a) b``, in its dtype."""
  y = next_fun(*args, **kwargs)
  x = args[0] if args else kwargs["inputs"]
  axis = getattr(module, "axis", -1)
  split = len(axis) if isinstance(axis, (tuple, list)) else 1
  xf = x.reshape(x.shape[:x.ndim - split] + (-1,)).astype(y.dtype)
  extra = (xf @ ab["a"].astype(y.dtype)) @ ab["b"].astype(y.dtype)
  return y + (scale * extra).astype(y.dtype).reshape(y.shape)


class LoraModule:
  """A base Flax module with adapters; quacks like the module for fedsel_jax.

  ``init(key, x)`` gives ``{'params': base + lora}``; ``apply(variables, x,
  ..., method=...)`` runs the adapter forward; ``apply_merged`` runs the base
  module on :func:`merge_params` (evaluation).

  Attributes:
    base: the unchanged base module.
    targets: from :func:`find_targets`.
    settings: rank, alpha, targets.
  """

  def __init__(self, base: nn.Module, targets: Mapping[str, tuple[int, int, int]],
               settings: LoraSettings):
    self.base, self.targets, self.settings = base, dict(targets), settings

  def init(self, key: jax.Array, *args, **kwargs) -> dict:
    variables = dict(self.base.init(key, *args, **kwargs))
    adapters = init_adapters(jax.random.fold_in(key, _INIT_STREAM), self.targets,
                             self.settings.rank)
    return {**variables, "params": {**variables["params"], "lora": adapters}}

  def apply(self, variables: dict, *args, **kwargs):
    base, adapters = split_params(variables["params"])
    scale = self.settings.scale

    def interceptor(next_fun, call_args, call_kwargs, context):
      module = context.module
      if context.method_name == "__call__" and isinstance(module, (nn.Dense, nn.DenseGeneral)):
        path = "/".join(module.path)
        if path in self.targets:
          return _adapted_call(next_fun, call_args, call_kwargs, module,
                               _get(adapters, path), scale)
      return next_fun(*call_args, **call_kwargs)

    with nn.intercept_methods(interceptor):
      return self.base.apply({**variables, "params": base}, *args, **kwargs)

  def apply_merged(self, variables: dict, *args, **kwargs):
    merged = merge_params(variables["params"], self.targets, self.settings.scale)
    return self.base.apply({**variables, "params": merged}, *args, **kwargs)


def wrap(spec, settings: LoraSettings):
  """The ModelSpec of ``spec``'s model with adapters (see the module docstring).

  Raises:
    ValueError: the model has no targeted kernel in a block, or the rank is
      wider than one (:func:`find_targets`).
  """
  shapes = jax.eval_shape(spec.module.init, jax.random.key(0), spec.example_input)["params"]
  targets = find_targets(shapes, spec.groups, spec.lora_targets, settings, spec.name)
  module = LoraModule(spec.module, targets, settings)
  load = None
  if spec.load_pretrained is not None:
    def load(params):
      if set(params) == {"params"}:
        return {"params": load(params["params"])}
      base, adapters = split_params(params)
      return {**spec.load_pretrained(base), "lora": adapters}
  return dataclasses.replace(spec, module=module, groups=lora_groups(spec.groups, targets),
                             load_pretrained=load, eval_apply=module.apply_merged)
