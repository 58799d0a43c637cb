"""Where the mIoU a pruning policy costs goes: context or exit predictions.

  python -m lvtp_jax.evaluation.loss_split \
      --config configs/quickstart.py:sweep=policies --workdir runs/quickstart \
      --names dtop_p0.95,lvtp,lvtp_sum

For each named setting of config.sweep (masked or buffer mode), the same
images are scored three ways ('whole' evaluation only):
  pruned       the pruned model as it is;
  oracle_fill  the pruned model, but every exited patch takes the unpruned
               model's final token logits: what is left of the loss comes
               from the patches that stayed (they lost the exited patches'
               context);
  exit_only    the unpruned model, but every exited patch takes the pruned
               model's exit prediction: the loss of the early predictions
               alone, with full context for the others.
The token maps are upsampled exactly as the Segmenter does. Nothing here
changes a results row; the table is printed.
"""

from typing import Any, Dict, List, Sequence

from absl import app
from absl import flags
import jax.numpy as jnp
from ml_collections import config_flags

from lvtp_jax.evaluation import seg_runner
from lvtp_jax.evaluation import segmentation
from lvtp_jax.models import segmenter

WAYS = ('pruned', 'oracle_fill', 'exit_only')


def _hybrid(pruned_fwd, base_fwd, num_stages: int, patch: int, way: str):
  def fwd(x):
    logits, aux = pruned_fwd(x)
    if way == 'pruned':
      return logits, aux
    _, base = base_fwd(x)
    exited = (aux['exit_stage'] < num_stages)[..., None]
    if way == 'oracle_fill':
      tokens = jnp.where(exited, base['token_logits'], aux['token_logits'])
    else:
      tokens = jnp.where(exited, aux['token_logits'], base['token_logits'])
    return segmenter.upsample_cropped(tokens, patch, x.shape[1:3]), aux
  return fwd


def split(config, model, params, prep, setting) -> Dict[str, Dict[str, Any]]:
  """{way: metrics} for one setting (a config from sweep_settings)."""
  if setting.eval.mode != 'whole':
    raise ValueError("loss_split needs config.eval.mode='whole' (the token "
                     'maps of sliding windows overlap).')
  if setting.pruning.name == 'none':
    raise ValueError(f'setting {setting.eval.name!r} is not pruned.')
  pm, _, _ = segmentation.attach_setting(setting, model, params, prep)
  pruned_fwd = seg_runner.forward_fn(pm, params)
  base_fwd = seg_runner.forward_fn(model, params)
  out = {}
  for way in WAYS:
    fwd = _hybrid(pruned_fwd, base_fwd, pm.pruning.num_stages,
                  model.patch_size, way)
    out[way], *_ = seg_runner.run_split(setting, pm, params, prep,
                                        forward=fwd, desc=way)
  return out


def run(config, workdir: str, names: Sequence[str]) -> List[Dict[str, Any]]:
  model, params, prep, _ = segmentation.build_model(config, workdir)
  settings = {s.eval.name: s for s in segmentation.sweep_settings(config)}
  unknown = [n for n in names if n not in settings]
  if unknown:
    raise ValueError(f'{unknown} are not settings of config.sweep; known: '
                     f'{sorted(settings)}.')
  base, *_ = seg_runner.run_split(config, model, params, prep,
                                  desc='unpruned')
  rows = []
  for name in names:
    got = split(config, model, params, prep, settings[name])
    rows.append(dict(name=name, unpruned=base, **got))
  return rows


def format_rows(rows) -> str:
  lines = ['| setting | unpruned mIoU | ' + ' | '.join(
      f'{w} mIoU (Δ)' for w in WAYS) + ' |', '|---' * (2 + len(WAYS)) + '|']
  for r in rows:
    u = r['unpruned']['miou']
    cells = [f"{r[w]['miou']:.2f} ({r[w]['miou'] - u:+.2f})" for w in WAYS]
    lines.append(f"| {r['name']} | {u:.2f} | " + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def main(argv):
  del argv
  f = flags.FLAGS
  print(format_rows(run(f.config, f.workdir, f.names)))


if __name__ == '__main__':
  # Defined here, not at import: eval.py defines flags of the same names.
  config_flags.DEFINE_config_file('config', None, 'experiment config')
  flags.DEFINE_string('workdir', None, 'training workdir')
  flags.DEFINE_list('names', None, 'eval.name of the sweep settings')
  flags.mark_flags_as_required(['config', 'workdir', 'names'])
  app.run(main)
