"""Weight gradients only for the candidate groups some client of a chunk trains.

A client-update variant (``client.make_client_update(blocks=...)``) trains a
static set of groups; with random masks a chunk's clients select only some
of them, and the backward pass would still compute the weight gradients of
every group in the set, for every client, only for the update to mask them
to zero. Under ``vmap`` a per-client choice cannot skip work (a batched
predicate turns ``lax.cond`` into ``select``, which runs both sides), but a
*chunk-level* one can: the chunk's union of masks is unbatched
(``batches.chunk_max``, a ``pmax`` over the chunk's vmap axis), so a
``lax.cond`` on it stays a real branch.

:func:`gated` installs a Flax method interceptor that runs every ``nn.Dense``
whose kernel belongs to a candidate group through :func:`gated_dot`: the
forward product is ``nn.Dense``'s own; its backward pass always computes the
input gradient (the layers below need it) and computes the kernel gradient
only when the group's gate is on (zeros otherwise, exactly what the update's
mask would have made of it). ``nn.DenseGeneral`` (the q/k/v/out projections
of ``nn.MultiHeadDotProductAttention``) and ``nn.Conv`` kernels are gated the
same way through :func:`gated_call`, which runs the module's own ``__call__``
on an unbound copy. Biases, norms and attention products are left
to autodiff (their weight gradients cost O(tokens x width)). Results are
identical to the ungated update (``tests/test_grad_gates.py``): a gate is off
only where every client of the chunk masks the gradient anyway.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fedsel_jax import batches

PyTree = Any


def kernel_groups(index: PyTree, trained: Sequence[int] | None = None
                  ) -> dict[tuple[str, ...], int]:
  """Module path -> candidate group of each ``kernel`` leaf of a candidate group.

  Args:
    index: the static leaf -> group table (``masks.group_index``), shaped
      like the params (without the ``'params'`` key).
    trained: keep only these groups (a variant's; default every candidate).
  """
  out = {}
  for path, g in jax.tree_util.tree_leaves_with_path(index):
    names = tuple(str(getattr(p, "key", getattr(p, "name", p))) for p in path)
    if (names and names[-1] == "kernel" and int(g) >= 0
        and (trained is None or int(g) in trained)):
      out[names[:-1]] = int(g)
  return out


def _dot(x: jax.Array, w: jax.Array, precision) -> jax.Array:
  """``nn.Dense``'s product: the last axis of x against the first of w."""
  return jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())), precision=precision)


def _gated_dense(mod: nn.Dense, inputs: jax.Array, on) -> jax.Array:
  """``nn.Dense.__call__`` of a bound ``mod`` with :func:`gated_dot` for its product
  (``on``: a traced f32 gate or a bool fixed at trace time)."""
  kernel = mod.get_variable("params", "kernel")
  bias = mod.get_variable("params", "bias") if mod.use_bias else None
  if mod.dot_general is not None or mod.dot_general_cls is not None:
    raise NotImplementedError(f"gated Dense {mod.path} has its own dot_general")
  inputs, kernel, bias = mod.promote_dtype(inputs, kernel, bias, dtype=mod.dtype)
  y = gated_dot(inputs, kernel, on, mod.precision)
  if bias is not None:
    y += jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
  return y


def gated_call(fn, x: jax.Array, kernel: jax.Array, rest: dict, on) -> jax.Array:
  """``fn(x, kernel, rest)`` whose backward pass computes the kernel's gradient only
  if the gate is on; the gradients of ``x`` and ``rest`` (a bias) always.

  Args:
    fn: a function linear in ``kernel`` (a module's product).
    x: its input.
    kernel: the gated weight.
    rest: the module's other parameters (dict of arrays).
    on: f32 scalar gate (1 = compute the kernel gradient, 0 = zeros),
      unbatched under ``vmap`` for the branch to be skipped; or a bool fixed
      at trace time: no branch in the program, what the gated program runs
      once its branches are taken (the bench compiles it so to count a
      chunk's FLOPs: XLA's cost analysis counts a conditional as its
      costlier branch).
  """
  static = isinstance(on, (bool, np.bool_))

  @jax.custom_vjp
  def call(x, kernel, rest, gate):
    del gate
    return fn(x, kernel, rest)

  def fwd(x, kernel, rest, gate):
    return fn(x, kernel, rest), (x, kernel, rest, gate)

  def bwd(res, g):
    x, kernel, rest, gate = res
    dx, drest = jax.vjp(lambda a, r: fn(a, kernel, r), x, rest)[1](g)
    dkernel = lambda: jax.vjp(lambda k: fn(x, k, rest), kernel)[1](g)[0]
    zeros = lambda: jnp.zeros_like(kernel)
    if static:
      dk = dkernel() if on else zeros()
    else:
      dk = jax.lax.cond(gate > 0, dkernel, zeros)
    return dx, dk, drest, jnp.zeros_like(gate)

  call.defvjp(fwd, bwd)
  return call(x, kernel, rest, jnp.float32(0) if static else on)


def gated_dot(x: jax.Array, w: jax.Array, on, precision=None) -> jax.Array:
  """``x @ w`` (``nn.Dense``'s product, x [..., D], w [D, F]) whose backward pass
  computes the gradient of ``w`` only if the gate ``on`` is on (:func:`gated_call`)."""
  return gated_call(lambda a, k, _: _dot(a, k, precision), x, w, {}, on)


def _gated_module(mod: nn.Module, inputs: jax.Array, on) -> jax.Array:
  """A bound ``nn.DenseGeneral`` / ``nn.Conv`` call, its kernel gradient gated: the
  module's own ``__call__`` runs on an unbound copy given the same parameters."""
  params = dict(mod.variables["params"])
  kernel = params.pop("kernel")
  unbound = mod.clone(parent=None)
  fn = lambda x, k, rest: unbound.apply({"params": {"kernel": k, **rest}}, x)
  return gated_call(fn, inputs, kernel, params, on)


def _gateable(mod: nn.Module) -> bool:
  """Whether the interceptor gates this module type (only ``params`` variables)."""
  if type(mod) is nn.Dense:
    return True
  return type(mod) in (nn.DenseGeneral, nn.Conv) and set(mod.variables) == {"params"}


@contextlib.contextmanager
def gated(groups: dict[tuple[str, ...], int], gates: jax.Array) -> Iterator[None]:
  """Within this context, the dense, dense-general and conv layers of ``groups`` use
  ``gates[group]``.

  Args:
    groups: :func:`kernel_groups` of the model's index.
    gates: bool[K] (a traced array: a branch per layer; a numpy array:
      fixed at trace time, see :func:`gated_call`): where the kernel
      gradients of a group are needed. Only layers called through
      ``module.apply`` while the context is active (while the loss is
      traced) are affected.
  """
  if isinstance(gates, np.ndarray):
    gates = [bool(g) for g in gates]
  else:
    gates = jnp.asarray(gates, jnp.float32)

  def interceptor(next_fun, args, kwargs, context):
    mod = context.module
    # A root module (path ()) is never gated: _gated_module's inner apply of the
    # unbound copy comes back through this interceptor with that path.
    if (context.method_name == "__call__" and mod.path and tuple(mod.path) in groups
        and not mod.is_initializing() and _gateable(mod) and len(args) + len(kwargs) == 1):
      inputs = args[0] if args else kwargs["inputs"]
      on = gates[groups[tuple(mod.path)]]
      return _gated_dense(mod, inputs, on) if type(mod) is nn.Dense else _gated_module(
          mod, inputs, on)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    yield


def chunk_gates(mask: jax.Array) -> jax.Array:
  """bool[K]: the groups some client of this client's chunk selects (unbatched under
  the chunk's vmap; the client's own mask outside one)."""
  return batches.chunk_max(mask.astype(jnp.int32)) > 0
