"""Batch loops that stop at a client's last non-empty batch (batches.py), and
the size-sorted chunk scans that make them pay (chunks.scan_client_chunks)."""

import jax
import jax.numpy as jnp
import numpy as np

from fedsel_jax import batches
from fedsel_jax import chunks


def _body(carry, x):
  row, w = x
  return carry + w * jnp.sin(row), None


def test_scan_first_equals_the_full_scan_when_the_skipped_batches_are_empty():
  rng = np.random.default_rng(0)
  rows = jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)
  for n in (0, 1, 5, 16, 24):
    w = jnp.asarray((np.arange(24).reshape(6, 4) < n).astype(np.float32))
    count = batches.nonempty_batches(jnp.int32(n), 4)
    full = jax.lax.scan(_body, jnp.zeros(4), (rows, w))[0]
    got = jax.jit(lambda *a: batches.scan_first(_body, *a))(jnp.zeros(4), (rows, w), count)
    assert int(count) == -(-n // 4)
    assert np.asarray(got).tobytes() == np.asarray(full).tobytes(), n
  # unroll keeps the static scan (a dynamic loop cannot unroll)
  got = batches.scan_first(_body, jnp.zeros(4), (rows, w), jnp.int32(1), unroll=True)
  assert np.asarray(got).tobytes() == np.asarray(full).tobytes()


def _iterations(sizes, chunk, by_size):
  """Batch-loop iterations a chunked vmapped pass executes, and its outputs."""
  calls = []

  def client(_, c):
    def body(carry, i):      # batch i of a client with n batches is empty when i >= n
      jax.debug.callback(lambda: calls.append(1))
      return carry + jnp.where(i < c["n"], i, 0), None
    return batches.scan_first(body, jnp.int32(0), jnp.arange(8), c["n"])

  sizes = jnp.asarray(sizes, jnp.int32)
  fn = jax.jit(lambda s: chunks.scan_client_chunks(
      client, None, dict(n=s), chunk, sizes_of=(lambda c: c["n"]) if by_size else None)[1])
  out = jax.block_until_ready(fn(sizes))
  jax.effects_barrier()
  return len(calls), np.asarray(out)


def test_size_sorted_chunks_run_each_chunk_only_as_long_as_its_largest_client():
  sizes = [1, 8, 1, 8, 2, 8, 1, 2]
  want = np.array([sum(range(n)) for n in sizes])
  unsorted, out_u = _iterations(sizes, 2, by_size=False)
  by_size, out_s = _iterations(sizes, 2, by_size=True)
  np.testing.assert_array_equal(out_u, want)
  np.testing.assert_array_equal(out_s, want)           # back in slot order
  # a chunk runs its largest client's count (batches.chunk_max: the loop's
  # trip count is unbatched, and the callback fires once per iteration): slot order (1,8 | 1,8 | 2,8 | 1,2) runs 8+8+8+2,
  # by size (1,1 | 1,2 | 2,8 | 8,8) runs 1+2+8+8
  assert (unsorted, by_size) == (26, 19)


def test_a_size_sorted_scan_gathers_one_chunk_at_a_time_and_keeps_slot_order():
  # 8 clients x 1 MB of rows each: sorting must not copy the inputs or the
  # kept outputs whole (each chunk gathers its slots and writes back to them).
  mp, chunk, rows = 8, 2, 2 ** 18
  x = jnp.arange(mp * rows, dtype=jnp.float32).reshape(mp, rows)
  sizes = jnp.asarray([5, 1, 7, 2, 8, 3, 6, 4], jnp.int32)

  def client(_, c):
    return c["x"] * 2.0 + c["n"]

  def run(by_size):
    return jax.jit(lambda x, s: chunks.scan_client_chunks(
        client, None, dict(x=x, n=s), chunk, init=jnp.int32(0),
        combine=lambda carry, out, c: (carry * 10 + jnp.sum(c["n"]), out),
        sizes_of=(lambda c: c["n"]) if by_size else None))

  (carry_u, kept_u), (carry_s, kept_s) = run(False)(x, sizes), run(True)(x, sizes)
  assert np.asarray(kept_s).tobytes() == np.asarray(kept_u).tobytes()   # slot order
  # combine saw the chunks by size: (1,2), (3,4), (5,6), (7,8) -> 3,7,11,15
  assert int(carry_s) == 3 * 1000 + 7 * 100 + 11 * 10 + 15
  temp = run(True).lower(x, sizes).compile().memory_analysis().temp_size_in_bytes
  assert temp < x.nbytes / 2, (temp, x.nbytes)


def test_trace_once_replays_one_trace_and_gives_its_shapes():
  """The round's shape-first spots (ordered scans, skipped conds) trace their function
  once: the replay equals the function and its program is the same."""
  calls = []

  def fn(x, tree):
    calls.append(1)
    return {"a": jnp.sin(x) * tree["w"], "b": (x.sum(), jnp.int32(3))}

  def outer(x, w):
    replay, shapes = chunks.trace_once(fn, x, {"w": w})
    assert shapes["a"].shape == (3,) and shapes["b"][1].dtype == jnp.int32
    skipped = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    return jax.lax.cond(w > 0, lambda: replay(x, {"w": w}), lambda: skipped), fn(x, {"w": w})

  x = jnp.arange(3.)
  (got, want) = jax.jit(outer)(x, 2.)
  assert len(calls) == 2                     # once for trace_once, once for `want`
  jax.tree_util.tree_map(np.testing.assert_array_equal, got, want)
  lowered = lambda f: jax.jit(f).lower(x, 2.).as_text(debug_info=False)
  assert lowered(lambda x, w: chunks.trace_once(fn, x, {"w": w})[0](x, {"w": w})) == \
      lowered(lambda x, w: fn(x, {"w": w}))


def test_trace_once_refuses_another_structure():
  replay, _ = chunks.trace_once(lambda t: t["a"] + t["b"], {"a": 1., "b": 2.})
  assert replay({"a": 3., "b": 4.}) == 7.
  try:
    replay({"b": 1., "c": 2.})
  except TypeError as e:
    assert "traced with" in str(e)
  else:
    raise AssertionError("a different structure was replayed")
