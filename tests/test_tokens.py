"""TokenState: gather / scatter / compact bookkeeping, checked against NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lvtp_jax.tokens import state as ts

B, P, N, D = 3, 1, 12, 4


def _state(seed=0):
  x = jax.random.normal(jax.random.PRNGKey(seed), (B, P + N, D))
  return ts.init_state(x, num_prefix=P)


def test_init_state_maps_every_patch_to_its_own_slot():
  s = _state()
  np.testing.assert_array_equal(s.src, np.tile(np.arange(P, P + N), (B, 1)))
  assert s.valid.all() and (s.size == 1).all()
  assert s.capacity == P + N and s.num_patches == N


def test_gather_then_patch_values_resolves_every_kept_patch():
  s = _state()
  rng = np.random.default_rng(0)
  idx = np.stack([np.concatenate([[0], np.sort(rng.choice(
      np.arange(P, P + N), 7, replace=False))]) for _ in range(B)])
  g = ts.gather(s, jnp.asarray(idx))
  assert g.capacity == 8
  x = np.asarray(s.x)
  for b in range(B):
    kept = set(idx[b, 1:].tolist())
    for n in range(N):
      slot = int(g.src[b, n])
      if P + n in kept:
        # The slot the patch now points at holds that patch's features.
        np.testing.assert_array_equal(np.asarray(g.x[b, slot]), x[b, P + n])
      else:
        assert slot == -1
  # Unmerge: per-patch features come back for kept patches, fill elsewhere.
  per_patch = np.asarray(ts.patch_values(g.x, g.src, fill=0.0))
  for b in range(B):
    for n in range(N):
      want = x[b, P + n] if P + n in set(idx[b].tolist()) else np.zeros(D)
      np.testing.assert_array_equal(per_patch[b, n], want)


def test_scatter_inverts_gather():
  s = _state()
  idx = jnp.asarray(np.tile([0, 2, 5, 7, 11], (B, 1)))
  g = ts.gather(s, idx)
  back = ts.scatter(g.x, idx, jnp.zeros_like(s.x))
  mask = np.zeros((B, P + N), bool)
  mask[:, [0, 2, 5, 7, 11]] = True
  np.testing.assert_array_equal(np.asarray(back)[mask], np.asarray(s.x)[mask])
  assert (np.asarray(back)[~mask] == 0).all()


def test_gather_invalid_entries_claim_nothing():
  s = _state()
  idx = jnp.asarray(np.tile([0, 3, 4, 4], (B, 1)))
  idx_valid = jnp.asarray(np.tile([True, True, True, False], (B, 1)))
  g = ts.gather(s, idx, idx_valid)
  np.testing.assert_array_equal(np.asarray(g.valid), np.asarray(idx_valid))
  assert (np.asarray(g.size)[:, 3] == 0).all()
  src = np.asarray(g.src)
  assert (src[:, 3 - P] == 1).all() and (src[:, 4 - P] == 2).all()
  assert ((src >= 0).sum(axis=1) == 2).all()


def test_compact_keeps_order_prefix_and_counts_overflow():
  s = _state()
  keep = np.zeros((B, P + N), bool)
  keep[0, [3, 5, 9]] = True            # fits
  keep[1, [2, 4, 6, 8, 10, 12]] = True  # 6 kept, capacity leaves room for 4
  keep[2, :] = False                    # only the prefix survives
  new, idx, overflow = ts.compact(s, jnp.asarray(keep), capacity=5,
                                  num_prefix=P)
  idx, overflow, valid = map(np.asarray, (idx, overflow, new.valid))
  np.testing.assert_array_equal(idx[0, :4], [0, 3, 5, 9])
  np.testing.assert_array_equal(valid[0], [1, 1, 1, 1, 0])
  np.testing.assert_array_equal(idx[1], [0, 2, 4, 6, 8])
  np.testing.assert_array_equal(np.nonzero(overflow[1])[0], [10, 12])
  assert not overflow[0].any() and not overflow[2].any()
  np.testing.assert_array_equal(valid[2], [1, 0, 0, 0, 0])
  # Sizes are conserved over the valid slots that remain.
  assert float(new.size[0].sum()) == 4.0
  # Every patch either points at a valid slot holding its features or is -1.
  src = np.asarray(new.src)
  for b in range(B):
    for n in range(N):
      if src[b, n] >= 0:
        assert valid[b, src[b, n]]
        np.testing.assert_array_equal(np.asarray(new.x[b, src[b, n]]),
                                      np.asarray(s.x[b, P + n]))
    assert (src[b] >= 0).sum() == valid[b].sum() - P


def _compact_reference(valid, keep, capacity, num_prefix):
  """NumPy: stable argsort of "kept first", cut at the capacity."""
  keep = (keep | (np.arange(keep.shape[1]) < num_prefix)) & valid
  order = np.argsort(~keep, axis=1, kind='stable')[:, :capacity]
  return order, keep.sum(axis=1)


@pytest.mark.parametrize('capacity', [P, 4, 7, P + N])
def test_compact_matches_a_stable_argsort_reference(capacity):
  rng = np.random.default_rng(capacity)
  x = jax.random.normal(jax.random.PRNGKey(1), (B, P + N, D))
  s = ts.init_state(x, num_prefix=P)
  valid = rng.random((B, P + N)) < 0.8         # some slots already empty
  valid[:, :P] = True
  s = s.replace(valid=jnp.asarray(valid))
  keep = rng.random((B, P + N)) < 0.5
  new, idx, overflow = ts.compact(s, jnp.asarray(keep), capacity, P)
  want_idx, n_keep = _compact_reference(valid, keep, capacity, P)
  np.testing.assert_array_equal(np.asarray(idx), want_idx)
  want_valid = np.arange(capacity)[None] < n_keep[:, None]
  np.testing.assert_array_equal(np.asarray(new.valid), want_valid)
  np.testing.assert_array_equal(np.asarray(new.x), np.asarray(x)[
      np.arange(B)[:, None], want_idx])
  kept = (keep | (np.arange(P + N) < P)) & valid
  rank = np.cumsum(kept, axis=1) - 1
  np.testing.assert_array_equal(np.asarray(overflow), kept & (rank >= capacity))
  for b in range(B):                # a patch's slot is where it was moved to
    for n in range(N):
      slot = int(new.src[b, n])
      if kept[b, P + n] and rank[b, P + n] < capacity:
        assert want_idx[b, slot] == P + n
      else:
        assert slot == -1


def test_compact_rejects_impossible_capacity():
  s = _state()
  with pytest.raises(ValueError, match='capacity'):
    ts.compact(s, s.valid, capacity=P + N + 1, num_prefix=P)


def test_remap_src_composes_with_merges():
  # Two old slots merged into one new slot: both patches point at it.
  src = jnp.asarray([[1, 2, 3]])
  old_to_new = jnp.asarray([[0, 1, 1, -1]])
  np.testing.assert_array_equal(ts.remap_src(src, old_to_new), [[1, 1, -1]])


def test_ops_are_jittable_without_retracing():
  traces = []

  @jax.jit
  def f(s, keep):
    traces.append(1)
    new, _, overflow = ts.compact(s, keep, capacity=6, num_prefix=P)
    return new, overflow.sum()

  for seed in range(3):
    keep = jax.random.bernoulli(jax.random.PRNGKey(seed), 0.5, (B, P + N))
    new, _ = f(_state(seed), keep)
    assert new.x.shape == (B, 6, D)
  assert len(traces) == 1
