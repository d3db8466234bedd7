"""The cost model and the bench's needed FLOPs when trained layers sit below
the blocks (embeddings trained from scratch), against a hand count and
against XLA's count of the ideal gradient (autodiff w.r.t. exactly the
trained leaves, the others constants)."""

import itertools

import jax
import ml_collections
import numpy as np
import pytest

from fedsel_jax import costs as costs_lib
from fedsel_jax import flops
from fedsel_jax import masks as masks_lib
from fedsel_jax.models import build_model
from tests.helpers import xla_grad_flops

BLOCKS, HEAD, BASE = [10.0, 20.0, 30.0], 5.0, 3.0
# With trained base layers every backward pass runs through every block and
# the head: forward (3 + 60 + 5), activation gradients (60 + 5), weight
# gradients of the head, the base and the selected blocks.
HAND_BASE = {s: 3 + 60 + 5 + (60 + 5) + (5 + 3 + sum(BLOCKS[l] for l in s))
             for r in range(4) for s in itertools.combinations(range(3), r)}


def _masks(sets, k):
  m = np.zeros((len(sets), k), bool)
  for r, s in enumerate(sets):
    m[r, list(s)] = True
  return m


def test_cost_model_with_trained_base_layers_matches_a_hand_count():
  sets = list(HAND_BASE)
  masks = _masks(sets, 3)
  got = np.asarray(costs_lib.training_flops_per_sample(BLOCKS, HEAD, masks,
                                                       base_forward_flops=BASE))
  np.testing.assert_allclose(got, [HAND_BASE[s] for s in sets])
  model = costs_lib.depth_costs_from_flops(BLOCKS, HEAD, 0.0, BASE)
  np.testing.assert_allclose(model.constant + np.asarray(costs_lib.depth_set_cost(
      masks, model.weight, model.backward)), got)
  # additive: a low block costs its own weight gradients only
  assert HAND_BASE[(0,)] - HAND_BASE[()] == BLOCKS[0]
  weight, backward = costs_lib.budget_costs(
      "flops", [1, 1, 1], costs_lib.ForwardFlops(0.0, np.array(BLOCKS), HEAD, BASE))
  assert backward is None
  np.testing.assert_allclose(weight, np.array(BLOCKS) / BLOCKS[0])
  # a base of 0 FLOPs (an embedding lookup) still makes the backward reach the bottom
  lookup = np.asarray(costs_lib.training_flops_per_sample(BLOCKS, HEAD, masks[:1],
                                                          base_forward_flops=0.0))
  assert lookup[0] == HAND_BASE[()] - 2 * BASE


def _model(embeddings):
  cfg = ml_collections.ConfigDict(dict(name="mlp", depth=3, width=256, dtype="float32",
                                       embeddings=embeddings, pretrained=""))
  spec = build_model(cfg, num_classes=4, input_shape=(32,))
  params = spec.module.init(jax.random.key(0), spec.example_input)["params"]
  return spec, params, masks_lib.group_index(params, spec.groups)


@pytest.mark.parametrize("embeddings", ["fixed", "trained"])
def test_needed_flops_equal_xla_count_of_the_ideal_gradient(embeddings):
  spec, params, index = _model(embeddings)
  assert spec.groups.base == (() if embeddings == "fixed" else ("embed",))
  batch, k = 8, 3
  for sel in [(), (2,), (0,), (0, 2), (1,), (0, 1, 2)]:
    mask = np.isin(np.arange(k), sel)
    need = flops.needed_step_flops(params, index, k, 1, batch, mask, spec.groups.base)
    x = np.random.default_rng(0).normal(size=(batch, 32)).astype(np.float32)
    xla = xla_grad_flops(spec, params, index, mask, x, num_classes=4)
    # XLA also counts activations, bias gradients and the softmax: ~1% at width 256
    assert need <= xla <= 1.03 * need, (embeddings, sel, need, xla)


def test_from_scratch_models_declare_their_embeddings_as_base():
  forward_flops = lambda s: costs_lib.model_forward_flops(s.module, s.example_input, s.groups)
  spec, _, _ = _model("auto")
  assert spec.groups.base == ("embed",) and "embed" in spec.groups.common
  ff = forward_flops(spec)
  # the embedding (32 -> 256) is base, not head (256 -> 4)
  assert ff.base >= 2 * 32 * 256 and ff.common < 2 * 256 * 4 + 64
  fixed = forward_flops(_model("fixed")[0])
  assert fixed.base is None and fixed.fixed == ff.base and fixed.common == ff.common
  with pytest.raises(ValueError, match="LayerGroups.base"):
    masks_lib.LayerGroups(candidates=(), common=("head",), base=("embed",))
