"""What exists, without reading code: the registered policies and every
config.pruning field, with defaults and one-line meanings.

  python -m lvtp_jax.pruning              # every policy, the general fields
  python -m lvtp_jax.pruning tome lvtp    # these policies only
  python -m lvtp_jax.pruning --general    # the general fields only

The meanings live next to the defaults they explain: a policy's `summary`
and `field_help` class attributes (registry.Policy), keyed like its
config_defaults() (a nested block's fields as 'block.field'); the general
fields' here (GENERAL_HELP, from spec.py's module docstring). Every field
must have one: tests/test_describe.py checks it, so a new field without a
meaning fails the tests.
"""

import argparse
import sys
import textwrap
from typing import Any, List, Optional, Sequence, Tuple

import ml_collections

from lvtp_jax.pruning import registry
from lvtp_jax.pruning import spec as spec_lib

# The fields of config.pruning that are not a policy's block (spec.py).
GENERAL_HELP = {
    'name': "the registry name of the policy that runs: 'none' (the unpruned "
            'model), an exit policy (a Segmenter with auxiliary heads) or an '
            'in-block reduction (a ViT or a Segmenter), all listed here; or '
            "'<exit>+<reduction>' (e.g. 'lvtp+tome'): both in one Segmenter "
            'forward, the reduction in the blocks before the first stage '
            'boundary, each configured by its own block.',
    'mode': "'masked': the buffer keeps all its slots and a pruned token "
            'only becomes an empty slot (exact reference semantics, no '
            "savings: the oracle the tests compare with); 'buffer': the "
            'tokens move into smaller buffers of static size (exit '
            "policies: `capacities`; in-block reductions: each block's "
            'token count), where the savings come from.',
    'layers': 'exit policies: the auxiliary layers (1-based blocks) at which '
              'the policy decides; () = all of config.model.aux_layers, '
              'every one of which stays a stage boundary. With '
              "`aux_source`='final_head_on_intermediate': the boundaries "
              'themselves (required).',
    'aux_source': 'exit policies: where the class logits at a boundary come '
                  "from: 'aux_heads' (the model's auxiliary heads, at "
                  "config.model.aux_layers) or 'final_head_on_intermediate' "
                  "(the final decoder on the intermediate tokens, at "
                  '`layers`: the zero-training choice for a model without '
                  'auxiliary heads).',
    'capacities': 'exit policies, buffer mode: the patch slots after each '
                  'stage boundary as fractions of the N patches (rounded up; '
                  'prefix slots on top); one per boundary, one for all, or '
                  '() = 1.0; non-increasing; ignored in masked mode.',
    'overflow': 'exit policies, buffer mode: when more patches stay active '
                "than the next capacity holds, 'exit_confident' force-exits "
                'the surplus the head is most confident about (max softmax '
                "probability; ties: the later patch), 'exit_last' the last "
                "in patch order; counted in aux['overflow'], never silent.",
    'exit_summary': "exit policies: 'none' (exited patches leave the "
                    "attention, as DToP and LVTP) or 'per_class' (at every "
                    'boundary the exiting patches of each predicted class '
                    'merge into one size-weighted summary slot that stays as '
                    'a key and query with proportional attention and is '
                    'never decoded; ours).',
    'dense': 'in-block reductions on the Segmenter: how every patch gets a '
             "token for the decoder: 'source', the token that represents it "
             '(TokenState.src; a patch no token represents takes that of the '
             "nearest patch that has one), 'interpolate', the token of the "
             'nearest kept patch (alone in its slot), so that merged, fused '
             "or dropped patches are filled from their kept neighbours, or "
             "'canvas' (models with auxiliary heads): a patch that left takes "
             'the auxiliary prediction of its slot at the last auxiliary '
             "layer where it was still kept ('source' before the first).",
    'decode': "in-block reductions on the Segmenter: 'grid', the decoder "
              'runs on one token per patch (`dense`), or \'reduced\', on the '
              'final slots with proportional attention for the patches each '
              'decodes for, its logits then copied to them; both give the '
              'same logits, reduced is cheaper for the mask transformer.',
    'calibrate.images': 'evaluation, exit policies in buffer mode: > 0 '
                        'measures `capacities` instead of taking them, from '
                        'the policy in masked mode on this many images of '
                        '`calibrate.split` (per window in slide mode); 0: '
                        'off.',
    'calibrate.quantile': 'the quantile over the calibration images of the '
                          'fraction of patches still active after each '
                          'boundary that becomes its capacity; 1.0 = the '
                          'largest seen, lower trades overflow for speed.',
    'calibrate.split': 'the data split the calibration images come from.',
}

# Signals a policy can declare (registry.py's module docstring).
SIGNAL_HELP = {
    'aux_logits': '[B, Kp, C] auxiliary-head logits of the patch slots at '
                  'the stage boundary.',
    'cls_attn': "[B, H, K] the CLS query's attention row, of the block.",
    'attn': "[B, H, K, K] the block's full attention map.",
    'keys': "[B, H, K, hd] the block's attention keys.",
    'image': "the policy's prepare() of the input images, once per image "
             '(per window): per-patch low-level features, a per-image key.',
}

_WIDTH = 79


def leaves(cfg: ml_collections.ConfigDict,
           prefix: str = '') -> List[Tuple[str, Any]]:
  """(dotted path, value) of every field of `cfg`, nested blocks flattened,
  in the order the fields were set."""
  out = []
  for key, value in cfg.items():
    if isinstance(value, ml_collections.ConfigDict):
      out.extend(leaves(value, f'{prefix}{key}.'))
    else:
      out.append((f'{prefix}{key}', value))
  return out


def general_fields() -> List[Tuple[str, Any, str]]:
  """(path under config.pruning, default, meaning) of the fields that are
  not a policy's block; meaning '' where GENERAL_HELP has none."""
  cfg = spec_lib.config_defaults()
  for name in registry.names():
    if name in cfg:
      del cfg[name]
  return [(path, value, GENERAL_HELP.get(path, ''))
          for path, value in leaves(cfg)]


def policy_fields(policy: registry.Policy) -> List[Tuple[str, Any, str]]:
  """(path under config.pruning.<name>, default, meaning) of the fields of
  the policy's block; meaning '' where its field_help has none."""
  return [(path, value, policy.field_help.get(path, ''))
          for path, value in leaves(policy.config_defaults())]


_KINDS = {
    'exit': 'exit: acts at the stage boundaries of a Segmenter with '
            'auxiliary heads and sends patches to the exit canvas '
            '(engine.py).',
    'reduce': 'reduce: an in-block reduction, acts inside blocks of a ViT or '
              'a Segmenter, between attention and MLP (inblock.py).',
}


def _kind(policy: registry.Policy) -> str:
  # spec.build_spec treats 'none' apart too: its spec is None.
  return '-' if policy.name == 'none' else policy.kind


def _wrap(text: str, indent: int) -> List[str]:
  pad = ' ' * indent
  return textwrap.wrap(text, _WIDTH, initial_indent=pad,
                       subsequent_indent=pad, break_on_hyphens=False) or [pad]


def _field_lines(prefix: str, fields: Sequence[Tuple[str, Any, str]]
                 ) -> List[str]:
  lines = []
  for path, default, meaning in fields:
    lines.append(f'  {prefix}{path} = {default!r}')
    lines.extend(_wrap(meaning or '(no description)', 6))
  return lines


def describe_policy(name: str) -> str:
  """The listing of one registered policy."""
  policy = registry.get(name)
  signals = ', '.join(sorted(policy.signals)) or '-'
  lines = [f'{name}  [kind: {_kind(policy)}; signals: {signals}]']
  lines.extend(_wrap(policy.summary or '(no description)', 4))
  fields = policy_fields(policy)
  if fields:
    lines.extend(_field_lines(f'config.pruning.{name}.', fields))
  else:
    lines.append('  (no config fields)')
  return '\n'.join(lines)


def describe_general() -> str:
  """The listing of the general config.pruning fields and the signals."""
  lines = ['General fields (config.pruning.<field>):']
  lines.extend(_field_lines('config.pruning.', general_fields()))
  lines.append('')
  lines.append('Signals a policy can declare (registry.SIGNALS):')
  for signal in sorted(registry.SIGNALS):
    lines.append(f'  {signal}')
    lines.extend(_wrap(SIGNAL_HELP.get(signal, '(no description)'), 6))
  return '\n'.join(lines)


def describe(names: Optional[Sequence[str]] = None,
             general: bool = True) -> str:
  """The listing of the policies `names` (all, after a header, when None)
  and, with `general`, of the general fields and the signals."""
  everything = names is None
  names = registry.names() if everything else list(names)
  parts = []
  if everything:
    head = _wrap('Pruning policies (config.pruning.name): '
                 + ', '.join(registry.names()) + '.', 0)
    head.append('Kinds:')
    for text in _KINDS.values():
      head.extend(_wrap(text, 2))
    head.extend(_wrap('Set a field in the config file or on the command '
                      'line, e.g. --config.pruning.tome.r=8.', 0))
    parts.append('\n'.join(head))
  parts.extend(describe_policy(name) for name in names)
  if general:
    parts.append(describe_general())
  return '\n\n'.join(parts) + '\n'


def main(argv: Optional[Sequence[str]] = None) -> int:
  """`python -m lvtp_jax.pruning [policy ...] [--general]`."""
  parser = argparse.ArgumentParser(
      prog='python -m lvtp_jax.pruning',
      description='Lists the registered pruning policies with their '
                  'config.pruning fields, defaults and meanings.')
  parser.add_argument(
      'policies', nargs='*', metavar='policy',
      help=f'print only these policies (of {", ".join(registry.names())}); '
           "a composed name such as 'lvtp+tome' prints both parts.")
  parser.add_argument('--general', action='store_true',
                      help='print only the general config.pruning fields '
                           'and the signals.')
  args = parser.parse_args(argv)
  names = []
  for name in args.policies:
    for part in name.split(spec_lib.COMPOSE):
      if part not in registry.names():
        parser.error(f'{part!r} is not a registered pruning policy; known: '
                     f'{", ".join(registry.names())}.')
      names.append(part)
  if args.general:
    text = describe(names, general=True)
  elif names:
    text = describe(names, general=False)
  else:
    text = describe()
  sys.stdout.write(text)
  return 0
