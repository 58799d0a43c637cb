"""docs/extending.md cannot go stale: its example policies run here.

Every ```python block of the guide is executed, in order, in one namespace;
the policies it registers get a test-only name (so a real policy of the
same name can come later) and are removed from the registry after this
module, so the other tests see the registry as the package leaves it. Each
runs on the tiny Segmenter (tests/tiny_segmenter.py: 4 x 4 patches,
3 blocks, auxiliary heads after blocks 1 and 2) in masked and in buffer
mode, and the buffer mode must reproduce the masked oracle while removing
tokens.
"""

import os
import re

import jax
import numpy as np
import pytest

from lvtp_jax import pruning
from lvtp_jax.pruning import describe
from lvtp_jax.pruning import registry
from tests import tiny_segmenter as tiny

DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))), 'docs', 'extending.md')
PREFIX = 'test_extending_'
_BLOCK = re.compile(r'^```python\n(.*?)^```', re.M | re.S)


@pytest.fixture(scope='module')
def guide():
  """{name in the guide: registered policy}, registered for this module."""
  with open(DOC) as f:
    blocks = _BLOCK.findall(f.read())
  assert len(blocks) >= 2, 'docs/extending.md lost its python blocks'
  real = registry.register
  added = []

  def register(policy):
    policy.name = PREFIX + policy.name      # an instance attribute
    added.append(policy.name)
    return real(policy)

  try:
    with pytest.MonkeyPatch.context() as patch:
      patch.setattr(registry, 'register', register)
      namespace = {'__name__': 'docs_extending'}
      for i, block in enumerate(blocks):
        code = compile(block, f'{DOC} (python block {i + 1})', 'exec')
        exec(code, namespace)  # pylint: disable=exec-used
    yield {name[len(PREFIX):]: registry.get(name) for name in added}
  finally:
    for name in added:
      registry._REGISTRY.pop(name, None)  # pylint: disable=protected-access


MODEL = tiny.model()
PARAMS = tiny.random_params(MODEL)


def _both_modes(cfg, capacities=None):
  out = {}
  for mode in ('masked', 'buffer'):
    setting = dict(cfg, mode=mode)
    if mode == 'buffer' and capacities:
      setting['capacities'] = capacities
    pruned = pruning.attach(MODEL, setting)
    out[mode] = jax.jit(lambda p, x, m=pruned: m.apply(
        {'params': p}, x, return_aux=True))(PARAMS, tiny.images(11))
  return out['masked'], out['buffer']


def test_the_guide_registers_both_kinds(guide):
  assert {p.kind for p in guide.values()} == {'exit', 'reduce'}
  for policy in guide.values():
    # What `python -m lvtp_jax.pruning` prints has a meaning for every field.
    assert policy.summary and all(
        meaning for _, _, meaning in describe.policy_fields(policy))
    assert describe.describe([policy.name], general=False).startswith(
        f'{policy.name}  [kind: {policy.kind};')


def test_the_exit_example_in_both_modes(guide):
  name = guide['low_entropy'].name
  # exit_fraction 0.5 at both boundaries: 16 -> 8 -> 4 active patches.
  (masked, maux), (buffer, baux) = _both_modes(
      dict(name=name), capacities=(0.5, 0.25))
  np.testing.assert_array_equal(baux['overflow'], 0)
  np.testing.assert_array_equal(baux['exit_stage'], maux['exit_stage'])
  np.testing.assert_array_equal(baux['tokens_per_block'],
                                maux['tokens_per_block'])
  np.testing.assert_array_equal(baux['tokens_per_block'][:, -1], tiny.N // 4)
  np.testing.assert_allclose(buffer, masked, rtol=0, atol=2e-5)
  np.testing.assert_allclose(baux['token_logits'], maux['token_logits'],
                             rtol=0, atol=2e-5)


def test_the_reduction_example_in_both_modes(guide):
  policy = guide['low_norm']
  cfg = {'name': policy.name, policy.name: dict(keep_rate=0.5, layers=(1, 2))}
  (masked, maux), (buffer, baux) = _both_modes(cfg)
  for key in ('tokens_per_block', 'mlp_tokens_per_block'):
    np.testing.assert_array_equal(baux[key], maux[key])
  counts = policy.token_counts(pruning.build_spec(cfg, MODEL).params,
                               1 + tiny.N, 1, MODEL.depth)
  assert counts == (17, 9, 5, 5)
  np.testing.assert_array_equal(baux['mlp_tokens_per_block'],
                                np.broadcast_to(np.array(counts[1:]) - 1,
                                                (tiny.B, MODEL.depth)))
  assert baux['state'].capacity == 5 and maux['state'].capacity == 17
  np.testing.assert_array_equal(baux['state'].src, maux['state'].src)
  np.testing.assert_allclose(buffer, masked, rtol=0, atol=2e-5)


def test_the_examples_name_a_bad_field(guide):
  low_norm, low_entropy = guide['low_norm'].name, guide['low_entropy'].name
  with pytest.raises(ValueError, match=rf'{low_norm}\.keep_rate=0\.0'):
    pruning.attach(MODEL, {'name': low_norm, low_norm: dict(keep_rate=0.0)})
  with pytest.raises(ValueError, match=r"beyond the model's 3 blocks"):
    pruning.attach(MODEL, {'name': low_norm, low_norm: dict(layers=(4,))})
  with pytest.raises(ValueError, match=rf'{low_entropy}\.exit_fraction'):
    pruning.attach(MODEL, {'name': low_entropy,
                           low_entropy: dict(exit_fraction=(1.5,))})
