"""Chunk-level kernel-gradient gates (fedsel_jax/grad_gates.py) against plain autodiff."""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from fedsel_jax import batches
from fedsel_jax import client as client_lib
from fedsel_jax import federated
from fedsel_jax import flops
from fedsel_jax import grad_gates
from fedsel_jax import main as main_lib
from fedsel_jax import masks as masks_lib
from fedsel_jax.models import build_model
from tests.test_core import K, naive_round, random_clients, round_data, tiny_model
from tests.test_variants import given_masks_round, random_masks

allclose = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_gated_dot_gradients():
  x = jax.random.normal(jax.random.key(0), (3, 5, 4))
  w = jax.random.normal(jax.random.key(1), (4, 6))
  loss = lambda f: lambda x, w: jnp.sum(jnp.sin(f(x, w)))
  want = jax.grad(loss(lambda x, w: x @ w), argnums=(0, 1))(x, w)
  for on in (1.0, 0.0):
    dx, dw = jax.grad(loss(lambda x, w: grad_gates.gated_dot(x, w, jnp.float32(on))),
                      argnums=(0, 1))(x, w)
    allclose(dx, want[0])
    allclose(dw, want[1] if on else np.zeros_like(w))
    sx, sw = jax.grad(loss(lambda x, w: grad_gates.gated_dot(x, w, bool(on))),
                      argnums=(0, 1))(x, w)
    allclose(sx, want[0])
    allclose(sw, want[1] if on else np.zeros_like(w))
  np.testing.assert_array_equal(grad_gates.gated_dot(x, w, jnp.float32(0)), x @ w)


def test_kernel_groups_name_the_candidate_dense_layers():
  _, params, index = tiny_model()
  groups = grad_gates.kernel_groups(index)
  assert groups == {(f"block_{k}",): k for k in range(K)}
  assert grad_gates.kernel_groups(index, trained=[1, 3]) == {("block_1",): 1, ("block_3",): 3}


def _chunk_update(index, spec, gate, axis_name=batches.CHUNK_AXIS, **kw):
  u = client_lib.make_client_update(client_lib.make_loss_fn(spec.module.apply), optax.sgd(0.1),
                                    index, local_steps=3, batch_size=4, dense_delta=False,
                                    gate=gate, **kw)
  return jax.vmap(u, in_axes=(None, 0, 0, 0), axis_name=axis_name)


def test_gates_stay_branches_under_the_chunk_vmap():
  """The chunk's union is unbatched: real conds (a batched predicate would
  become a select that runs both sides)."""
  spec, params, index = tiny_model()
  m = 3
  data = random_clients(m, seed=0)
  masks = np.zeros((m, K), bool)
  masks[0, 1] = masks[1, 3] = True
  keys = jax.random.split(jax.random.key(0), m)
  jaxpr = str(jax.make_jaxpr(_chunk_update(index, spec, True))(params, data, masks, keys))
  assert jaxpr.count("cond[") == K      # one per block kernel, in the scan body
  plain = str(jax.make_jaxpr(_chunk_update(index, spec, False))(params, data, masks, keys))
  assert "cond[" not in plain
  got = jax.jit(_chunk_update(index, spec, True))(params, data, masks, keys)
  want = jax.jit(_chunk_update(index, spec, False))(params, data, masks, keys)
  jax.tree_util.tree_map(allclose, got.delta, want.delta)


@pytest.mark.parametrize("seed,chunk,cut", [(0, 2, True), (1, 3, True), (2, 4, False),
                                            (3, 1, True)])
def test_gated_round_equals_naive_loop(seed, chunk, cut):
  """Random masks, uneven clients, padding slots: the gated round is the naive loop."""
  spec, params, index = tiny_model()
  m = 9 if chunk == 3 else 8
  rd = round_data(random_clients(m, seed=seed), np.arange(m) * 7, budgets=[K] * m)
  rd["valid"][-2:] = False
  rd["client_ids"][-2:] = 100
  masks = random_masks(m, seed) & rd["valid"][:, None]
  new, _ = given_masks_round(spec, index, params, rd, masks, chunk, cut=cut, grad_gates=True)
  want = naive_round(spec, index, params, rd, masks, jax.random.key(3))
  jax.tree_util.tree_map(allclose, new.params, want)


@pytest.mark.parametrize("name", ["mlp", "vit"])
def test_gated_chunks_execute_fewer_flops_for_random_masks(name):
  """The vit's attention projections are DenseGeneral: gated too."""
  if name == "mlp":
    cfg = ml_collections.ConfigDict(dict(name="mlp", depth=K, width=64, dtype="float32"))
    spec = build_model(cfg, num_classes=3, input_shape=(6,))
    params = spec.module.init(jax.random.key(0), spec.example_input)["params"]
    index = masks_lib.group_index(params, spec.groups)
    rd = dict(random_clients(4, seed=0), valid=np.ones(4, bool))
  else:
    spec, params, index = _image_model("vit", width=32, mlp_dim=32)
    rd = dict(_image_clients(4, seed=0), valid=np.ones(4, bool))

  def parts(gates):
    settings = federated.RoundSettings(strategy="random", local_steps=3, batch_size=4,
                                       client_chunk=2, backprop_cut=True, diagnostics=False,
                                       unroll=True, grad_gates=gates)
    return federated.make_round_parts(client_lib.make_loss_fn(spec.module.apply), index, K,
                                      optax.adam(0.01), np.ones(K, np.float32), settings)

  m = 4
  sparse = np.zeros((m, K), bool)
  sparse[:, 0] = True                   # every chunk's cut is 0 ...
  sparse[[0, 2], K - 1] = True          # ... but it trains 2 of K blocks
  full = np.ones((m, K), bool)
  gated, plain = parts(True), parts(False)
  # vit: 0.79 with its attention projections gated, 0.92 with only mlp1/mlp2 (Dense)
  assert (flops.executed_round_flops(gated, params, rd, sparse)
          < dict(mlp=0.8, vit=0.85)[name] * flops.executed_round_flops(plain, params, rd, sparse))
  np.testing.assert_allclose(flops.executed_round_flops(gated, params, rd, full),
                             flops.executed_round_flops(plain, params, rd, full), rtol=1e-3)


def test_bad_grad_gates_value_is_one_error_line(data_dir, capsys):
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  code = main_lib.main(["--config", os.path.join(root, "configs/digits.py:smoke"),
                        "--check_only", f"--config.data.data_dir={data_dir}",
                        "--config.fl.grad_gates=maybe"])
  err = capsys.readouterr().err
  assert code == 2
  lines = [l for l in err.splitlines() if l.startswith("error:")]
  assert len(lines) == 1 and "fl.grad_gates" in lines[0], err


def test_gated_digits_run_checks_and_trains(data_dir, tmp_path, capsys):
  """The flag reaches a real run (the smoke digits config, cut + gates)."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  code = main_lib.main(["--config", os.path.join(root, "configs/digits.py:smoke"),
                        "--workdir", str(tmp_path / "run"), f"--config.data.data_dir={data_dir}",
                        "--config.fl.grad_gates=True", "--config.fl.backprop_cut=True"])
  assert code == 0, capsys.readouterr().err


def test_fingerprint_leaves_out_the_flag_at_its_old_value():
  """Workdirs recorded before fl.grad_gates existed still match a config with it off;
  turning it on is another run."""
  from configs import default
  from fedsel_jax import workdir
  config = default.get_config()
  off = workdir.fingerprint(config)
  assert "fl.grad_gates" not in off["fields"]
  older = dict(off["fields"])            # what a workdir of before recorded
  assert workdir.differences(older, workdir.fingerprint(config)["fields"]) == []
  config.fl.grad_gates = True
  on = workdir.fingerprint(config)
  assert workdir.differences(older, on["fields"]) == ["fl.grad_gates: '(absent)' -> True"]
  assert on["sha256"] != off["sha256"]


def _image_model(name, **kw):
  """A K-block vit (DenseGeneral attention) or cnn (Conv blocks) on 8x8 images."""
  fields = dict(vit=dict(width=8, num_heads=2, mlp_dim=16, patch=4),
                cnn=dict(features=(4,) * K))[name]
  fields.update(kw)
  cfg = ml_collections.ConfigDict(dict(name=name, depth=K, dtype="float32", **fields))
  spec = build_model(cfg, num_classes=3, input_shape=(8, 8, 1))
  params = spec.module.init(jax.random.key(0), spec.example_input)["params"]
  return spec, params, masks_lib.group_index(params, spec.groups)


def _image_clients(m, seed, n_max=8):
  data = random_clients(m, n_max=n_max, seed=seed)
  rng = np.random.default_rng(seed)
  return dict(data, x=rng.normal(size=(m, n_max, 8, 8, 1)).astype(np.float32))


@pytest.mark.parametrize("name,kind", [("vit", "DenseGeneral"), ("cnn", "Conv")])
def test_dense_general_and_conv_kernels_are_gated(name, kind):
  """Gates on give plain autodiff's gradient, gates off zero kernel gradients of the
  group and nothing else changed; traced and static gates agree."""
  spec, params, index = _image_model(name)
  data = _image_clients(1, seed=0)
  x, y = jnp.asarray(data["x"][0, :4]), jnp.asarray(data["y"][0, :4])
  groups = grad_gates.kernel_groups(index)
  gated_paths = {p for p in groups if p[0] == "block_1"}
  assert len(gated_paths) == (4 + 2 if name == "vit" else 1)   # q, k, v, out, mlp1, mlp2
  loss = lambda p: client_lib.cross_entropy(spec.module.apply({"params": p}, x), y,
                                            jnp.ones(4))
  want = jax.grad(loss)(params)

  def grads(gates):
    def gated_loss(p):
      with grad_gates.gated(groups, gates):
        return loss(p)
    return jax.grad(gated_loss)(params)

  on, off = np.ones(K, bool), np.arange(K) != 1
  for got in (grads(jnp.asarray(on)), grads(on)):
    jax.tree_util.tree_map(allclose, got, want)
  for got in (grads(jnp.asarray(off)), grads(off)):
    flat = jax.tree_util.tree_leaves_with_path(got)
    for (path, g), w in zip(flat, jax.tree_util.tree_leaves(want)):
      names = tuple(str(getattr(p, "key", p)) for p in path)
      if names[:-1] in gated_paths and names[-1] == "kernel":
        np.testing.assert_array_equal(g, np.zeros_like(w))
      else:
        allclose(g, w)
  jaxpr = str(jax.make_jaxpr(lambda p: grads(jnp.asarray(off)))(params))
  assert jaxpr.count("cond[") == len(groups)


@pytest.mark.parametrize("name,seed,chunk", [("vit", 0, 2), ("cnn", 1, 3)])
def test_gated_image_round_equals_naive_loop(name, seed, chunk):
  spec, params, index = _image_model(name)
  m = 6
  rd = round_data(_image_clients(m, seed), np.arange(m) * 5, budgets=[K] * m)
  rd["valid"][-1] = False
  rd["client_ids"][-1] = 100
  masks = random_masks(m, seed) & rd["valid"][:, None]
  new, _ = given_masks_round(spec, index, params, rd, masks, chunk, cut=True, grad_gates=True)
  want = naive_round(spec, index, params, rd, masks, jax.random.key(3))
  jax.tree_util.tree_map(allclose, new.params, want)


def test_a_root_module_is_left_alone():
  """The gated call's inner apply of the unbound copy has the root path (): a model
  that is itself one DenseGeneral must not recurse (it is not gated)."""
  import flax.linen as nn
  mod = nn.DenseGeneral(4)
  x = jnp.ones((2, 3))
  params = mod.init(jax.random.key(0), x)["params"]
  loss = lambda p: jnp.sum(mod.apply({"params": p}, x) ** 2)

  def gated_loss(p):
    with grad_gates.gated({(): 0}, jnp.zeros(1)):
      return loss(p)

  jax.tree_util.tree_map(allclose, jax.grad(gated_loss)(params), jax.grad(loss)(params))
