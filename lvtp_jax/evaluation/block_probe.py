r"""How decodable is each encoder block? Linear probes on a frozen Segmenter.

  python -m lvtp_jax.evaluation.block_probe --config configs/benchmark_seg.py \
      --workdir runs/benchmark_seg

An early-exit policy can only beat random exits where the early heads are
worse than the final decoder on some patches and know it. This measures
whether the model leaves room for that: for every encoder block k, a linear
softmax probe (on the block's patch tokens, standardised with the training
images' statistics) is fitted to the patches' majority labels on
`--train_images` training images and scored on `--eval_images` images of
config.data.split (token accuracy: the fraction of patches whose majority
label the probe predicts; patches with no labelled pixel are skipped).
The model's own heads (its auxiliary heads and the final decoder) are
scored on the same patches. If a probe after block 2 already matches the
final decoder, the task is solved there and no placement of exits can
rank policies (docs/benchmark_seg.md).

On synthetic_scenes/paths (and paths_short), `--by_steps` also scores
every read-out per distance along the tubes: off-tube patches, and tube
patches 0-2, 3-5, 6-8, 9-11 and 12+ cells from their marker
(scene_generator.path_steps; other groups with `--step_buckets`, e.g.
0,1,2,3-5,6-8,9-11,12+). Where the late blocks carry a tube's class
further from its marker, the heads after blocks 6 and 8 fall behind the
decoder on the far cells. `--heads_only` skips the probes (seconds instead
of minutes: the model's own heads only, e.g. to follow a run's
checkpoints).

Writes WORKDIR/block_probe.json (block_probe_heads.json with --heads_only)
and prints a table. The probes are fitted
full-batch with Adam (`--steps`, learning rate 1e-2, from zero weights);
they are a lower bound on what block k holds (a linear read-out, briefly
fitted), the heads are what the model learned.
"""

import json
import os
import sys
from typing import Any, Dict, List, Tuple

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np
import optax

from lvtp_jax.data import segmentation as seg_data
from lvtp_jax.data import segmentation_datasets
from lvtp_jax.evaluation import segmentation


def patch_labels(seg: np.ndarray, patch: int, num_classes: int,
                 ignore_index: int) -> np.ndarray:
  """[B, H, W] labels -> [B, N] majority label of each patch, -1 where it
  has no labelled pixel (ties: the lower class)."""
  b, h, w = seg.shape
  gh, gw = h // patch, w // patch
  cells = seg[:, :gh * patch, :gw * patch].reshape(b, gh, patch, gw, patch)
  cells = cells.transpose(0, 1, 3, 2, 4).reshape(b, gh * gw, patch * patch)
  counts = np.stack([(cells == c).sum(-1) for c in range(num_classes)], -1)
  del ignore_index   # ignored pixels match no class
  return np.where(counts.max(-1) > 0, counts.argmax(-1), -1)


def block_tokens_fn(model, blocks: Tuple[int, ...]):
  """jitted (params, images) -> {'block<k>': [B, N, D] patch tokens after
  block k, 'head<k>' / 'final': [B, N, C] the auxiliary heads' and the
  decoder's token logits} (compiled once, reused for every batch)."""
  def run(m, x):
    state, _ = m.encoder.embed(x)
    out = {}
    for i in range(m.depth):
      state, _ = m.encoder.run_block(i, state)
      tokens = state.x[:, m.num_prefix:]
      if i + 1 in blocks:
        out[f'block{i + 1}'] = tokens
      if i + 1 in m.aux_heads:
        out[f'head{i + 1}'] = m.aux_heads[i + 1](tokens)
    out['final'] = m.decode_head(m.encoder.norm(state.x)[:, m.num_prefix:])
    return out
  return jax.jit(lambda p, x: model.apply({'params': p}, x, method=run))


STEP_BUCKETS_TEXT = '0-2,3-5,6-8,9-11,12+'   # --step_buckets' default


def parse_buckets(text: str) -> Tuple[Tuple[int, Any], ...]:
  """'0,1,2,3-5,12+' -> ((0, 0), (1, 1), (2, 2), (3, 5), (12, None))."""
  buckets = []
  for part in (p.strip() for p in text.split(',')):
    try:
      if part.endswith('+'):
        buckets.append((int(part[:-1]), None))
      elif '-' in part:
        lo, hi = part.split('-')
        buckets.append((int(lo), int(hi)))
      else:
        buckets.append((int(part), int(part)))
    except ValueError:
      raise ValueError(f'--step_buckets: cannot read {part!r} in {text!r}; '
                       "write groups as 'a', 'a-b' or 'a+', comma-separated "
                       "(e.g. '0,1,2,3-5,12+').") from None
    lo, hi = buckets[-1]
    if lo < 0 or (hi is not None and hi < lo):
      raise ValueError(f'--step_buckets: {part!r} is not a range of steps '
                       '>= 0.')
  return tuple(buckets)


STEP_BUCKETS = parse_buckets(STEP_BUCKETS_TEXT)


def collect(config, model, params, prep, split: str, num: int,
            blocks: Tuple[int, ...], patch_steps=None
            ) -> Tuple[Dict[str, np.ndarray], np.ndarray]:
  """Per-patch features and labels of the first `num` images of `split`,
  flattened over images: ({name: [P, ...]}, labels [P]), labelled patches
  only. With `patch_steps` (position in the split -> [N] ints), the
  features also hold 'steps' [P]."""
  dataset = segmentation_datasets.get_dataset(config.data.name)
  source = segmentation_datasets.open_segmentation_source(
      config.data.name, split, config.data.data_dir or None)
  num = min(num, len(source))
  ecfg = config.eval
  batches = seg_data.eval_batches(
      source, batch_size=config.data.batch_size, size=ecfg.size,
      num_examples=num, mean=tuple(255.0 * m for m in prep['mean']),
      std=tuple(255.0 * s for s in prep['std']),
      short_size=ecfg.short_size or None, long_max=ecfg.long_max or None)
  feats: Dict[str, List[np.ndarray]] = {}
  labels = []
  forward = block_tokens_fn(model, blocks)
  seen = 0
  for batch in batches:
    rows = np.asarray(batch['mask'])
    out = {k: np.asarray(v, np.float32) for k, v in
           forward(params, jnp.asarray(batch['image'])).items()}
    if patch_steps is not None:   # batches follow the source's order
      steps = np.zeros(out['final'].shape[:2], np.int32)
      for row in range(int(rows.sum())):
        steps[row] = patch_steps(seen + row)
      seen += int(rows.sum())
      out['steps'] = steps
    lab = patch_labels(np.asarray(batch['segmentation']), model.patch_size,
                       model.num_classes, dataset.ignore_index)[rows]
    keep = lab >= 0
    labels.append(lab[keep])
    for k, v in out.items():
      feats.setdefault(k, []).append(v[rows][keep])
  return ({k: np.concatenate(v) for k, v in feats.items()},
          np.concatenate(labels))


def fit_probe(x: np.ndarray, y: np.ndarray, num_classes: int, steps: int
              ) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Full-batch softmax regression: (mean, std, weights, bias)."""
  mean, std = x.mean(0), x.std(0) + 1e-6
  xs = jnp.asarray((x - mean) / std)
  ys = jnp.asarray(y)
  w = (jnp.zeros((x.shape[1], num_classes)), jnp.zeros((num_classes,)))
  s = _OPT.init(w)
  for _ in range(steps):
    w, s = _probe_step(w, s, xs, ys)
  return mean, std, np.asarray(w[0]), np.asarray(w[1])


_OPT = optax.adam(1e-2)


@jax.jit
def _probe_step(w, s, xs, ys):
  """One Adam step of the softmax probe (compiled once per feature shape,
  shared by every block)."""
  loss = lambda w: optax.softmax_cross_entropy_with_integer_labels(
      xs @ w[0] + w[1], ys).mean()
  u, s = _OPT.update(jax.grad(loss)(w), s)
  return optax.apply_updates(w, u), s


def accuracy_by_steps(preds: Dict[str, np.ndarray], labels: np.ndarray,
                      steps: np.ndarray, buckets=STEP_BUCKETS
                      ) -> List[Dict[str, Any]]:
  """Token accuracy of every read-out per group of patches.

  preds: {read-out name: [P] predicted classes}; labels, steps: [P] (steps
  < 0 off the tubes). Returns one row per read-out: dict(name, patches
  {group: count}, token_accuracy {group: accuracy or None when empty}),
  groups 'off tubes' and 'steps a-b' / 'steps a+' per bucket.
  """
  groups = {'off tubes': steps < 0}
  for lo, hi in buckets:
    name = (f'steps {lo}+' if hi is None else f'steps {lo}' if hi == lo
            else f'steps {lo}-{hi}')
    groups[name] = (steps >= lo) & (True if hi is None else steps <= hi)
  rows = []
  for name, pred in preds.items():
    hit = pred == labels
    rows.append(dict(
        name=name, patches={g: int(m.sum()) for g, m in groups.items()},
        token_accuracy={g: float(hit[m].mean()) if m.any() else None
                        for g, m in groups.items()}))
  return rows


def _paths_steps(config, model):
  """position k in config.data.split -> [N] chain steps of the patches of
  its k-th example ('paths' scenes; the generator's own record of the
  example whose index the prepared split stores at k)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from lvtp_jax.data import scene_generator   # pylint: disable=g-import-not-at-top
  from lvtp_jax.data import synthetic_scenes  # pylint: disable=g-import-not-at-top
  name = config.data.name
  family, _, variant = name.partition('/')
  cfg = (synthetic_scenes.builder_config(variant)
         if family == 'synthetic_scenes' and variant else None)
  if cfg is None or not cfg.paths:
    chains = [f'synthetic_scenes/{c.name}'
              for c in synthetic_scenes.SyntheticScenes.BUILDER_CONFIGS
              if c.paths]
    raise ValueError(f'--by_steps needs config.data.name in {chains} (got '
                     f'{name!r}): only those scenes have chains to count '
                     'steps along.')
  if model.patch_size != scene_generator.PATH_CELL:
    raise ValueError(f'--by_steps: the model\'s patch size '
                     f'{model.patch_size} is not the paths\' cell '
                     f'{scene_generator.PATH_CELL} px.')
  if config.eval.size != cfg.image_size or config.eval.short_size:
    raise ValueError('--by_steps needs the images at their own size '
                     f'(config.eval.size={cfg.image_size}, short_size=0).')
  split = config.data.split
  raw = tfds.data_source(name, split=split,
                         data_dir=config.data.data_dir or None)
  return lambda k: scene_generator.path_steps(
      split, int(raw[k]['index']), size=cfg.image_size,
      difficulty=cfg.difficulty, path_layout=cfg.path_layout).ravel()


def run(config, workdir: str, train_images: int, eval_images: int,
        steps: int, blocks: Tuple[int, ...] = (),
        by_steps: bool = False, buckets=STEP_BUCKETS,
        probes: bool = True) -> Dict[str, Any]:
  """The probes and heads of the model of (config, workdir); with
  probes=False the heads only (no training images are read)."""
  if config.eval.mode != 'whole':
    raise ValueError("block_probe needs config.eval.mode='whole' (one token "
                     'grid per image).')
  model, params, prep, source = segmentation.build_model(config, workdir)
  patch_steps = _paths_steps(config, model) if by_steps else None
  blocks = tuple(blocks) or tuple(range(1, model.depth + 1))
  bad = [k for k in blocks if not 1 <= k <= model.depth]
  if bad:
    raise ValueError(f'--blocks {bad} out of range 1..{model.depth}.')
  train_split = config.data.get('train_split', 'train')
  if probes:
    tr, ytr = collect(config, model, params, prep, train_split, train_images,
                      blocks)
  else:
    blocks, ytr, train_images = (), np.zeros(0), 0
  ev, yev = collect(config, model, params, prep, config.data.split,
                    eval_images, blocks, patch_steps)
  rows, preds = [], {}
  for k in blocks:
    mean, std, w, b = fit_probe(tr[f'block{k}'], ytr, model.num_classes,
                                steps)
    pred = (((ev[f'block{k}'] - mean) / std) @ w + b).argmax(-1)
    preds[f'probe after block {k}'] = pred
    rows.append(dict(name=f'probe after block {k}', block=k,
                     token_accuracy=float((pred == yev).mean())))
  heads = sorted(int(n[4:]) for n in ev if n.startswith('head'))
  for name in [f'head{k}' for k in heads] + ['final']:
    block = model.depth if name == 'final' else int(name[4:])
    label = 'final decoder' if name == 'final' else f'aux head {block}'
    preds[label] = ev[name].argmax(-1)
    rows.append(dict(name=label, block=block, token_accuracy=float(
        (preds[label] == yev).mean())))
  out = dict(weights=source, train_split=train_split,
             train_images=train_images, train_patches=int(len(ytr)),
             eval_split=config.data.split, eval_images=eval_images,
             eval_patches=int(len(yev)), steps=steps, rows=rows)
  if by_steps:
    out['by_steps'] = accuracy_by_steps(preds, yev, ev['steps'], buckets)
  return out


def table(out: Dict[str, Any]) -> str:
  lines = ['| read-out | block | token accuracy |', '|---|---|---|']
  lines += [f"| {r['name']} | {r['block']} | {100 * r['token_accuracy']:.2f} |"
            for r in out['rows']]
  if 'by_steps' in out:
    groups = list(out['by_steps'][0]['patches'])
    counts = out['by_steps'][0]['patches']
    lines += ['', '| read-out | ' + ' | '.join(
        f'{g} ({counts[g]})' for g in groups) + ' |',
              '|---|' + '---|' * len(groups)]
    fmt = lambda v: '-' if v is None else f'{100 * v:.2f}'
    lines += [f"| {r['name']} | " + ' | '.join(
        fmt(r['token_accuracy'][g]) for g in groups) + ' |'
              for r in out['by_steps']]
  return '\n'.join(lines)


def main(argv):
  del argv
  f = flags.FLAGS
  out = run(f.config, f.workdir, f.train_images, f.eval_images, f.steps,
            tuple(int(b) for b in f.blocks), f.by_steps,
            parse_buckets(f.step_buckets), probes=not f.heads_only)
  print(table(out))
  path = os.path.join(f.workdir, 'block_probe_heads.json' if f.heads_only
                      else 'block_probe.json')
  with open(path, 'w') as fh:
    json.dump(out, fh, indent=1)
  print(f'wrote {path}', file=sys.stderr)


if __name__ == '__main__':
  config_flags.DEFINE_config_file('config', None, 'segmentation config',
                                  lock_config=False)
  flags.DEFINE_string('workdir', None, 'training workdir (its checkpoint)')
  flags.DEFINE_integer('train_images', 600, 'images the probes are fitted on')
  flags.DEFINE_integer('eval_images', 300, 'images of config.data.split the '
                       'probes and heads are scored on')
  flags.DEFINE_integer('steps', 400, 'Adam steps of each probe')
  flags.DEFINE_list('blocks', [], 'blocks to probe (default: all)')
  flags.DEFINE_bool('by_steps', False, 'synthetic_scenes/paths: also score '
                    'per distance along the tubes (module docstring)')
  flags.DEFINE_string('step_buckets', STEP_BUCKETS_TEXT, 'with '
                      "--by_steps: the groups of steps ('a', 'a-b', 'a+')")
  flags.DEFINE_bool('heads_only', False, 'score the model\'s own heads only '
                    '(no probes)')
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(main)
