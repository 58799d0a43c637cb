"""Pictures of an evaluation sweep: Pareto plots and exit maps.

  pareto_miou.png           mIoU vs effective GFLOPs, one colour per policy
  pareto_boundary_miou.png  boundary mIoU vs effective GFLOPs
  pareto_top1.png           classification: top-1 vs effective GFLOPs
  token_maps.png            classification: which patches each in-block
                            reduction kept, fused or merged
  exit_maps.png             for the first images: the image, its label, and
                            per pruned setting the stage each patch left at
Written by eval.py (and train.py's final evaluation) next to results.json.

One Pareto plot from several runs (a base model and its fine-tunes):

  python -m lvtp_jax.evaluation.plots --out docs/ \
      runs/quickstart_cls/results.json runs/quickstart_cls_evit0.7/results.json

merges the rows of every results.json (the unpruned row of the first file
only; the 'pick/...' rows of lvtp_jax.evaluation.selection left out, they
repeat sweep rows) and writes the Pareto plots to --out; rows with a
`family` (e.g. 'evit (fine-tuned)') are grouped and drawn by it.
"""

import argparse
import json
import os
import sys
from typing import Any, Dict, List, Tuple

import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np

_STAGE_COLOURS = ('#d62728', '#ff7f0e', '#2ca02c', '#9467bd', '#8c564b')


def front(points: List[Tuple[float, float]]) -> List[int]:
  """Indices of the Pareto-optimal (lowest cost, highest quality) points,
  in order of cost: a point is on the front when no other point costs no
  more and is strictly better, or costs strictly less and is as good."""
  keep = []
  for i, (x, y) in enumerate(points):
    dominated = any((x2 <= x and y2 > y) or (x2 < x and y2 >= y)
                    for j, (x2, y2) in enumerate(points) if j != i)
    if not dominated:
      keep.append(i)
  return sorted(keep, key=lambda i: points[i])


def pareto(rows: List[Dict[str, Any]], path: str, metric: str = 'miou',
           title: str = '', max_drop: float = 6.0) -> str:
  """One point per row: x = gflops_effective, y = rows[metric].

  Every row of a policy (or of its `family`, e.g. 'evit (fine-tuned)',
  when the row has one) is a dot; its Pareto front (front()) is joined and
  labelled; fine-tuned families are drawn dashed with squares. The
  unpruned model is a black star with a dashed line at its quality; an
  unpruned row with a family (the fine-tunes' control: the same extra
  steps without a policy) is a hollow star with a dotted line. Rows more
  than max_drop points below the unpruned model are left off the axes and
  named in a note, so one failed setting does not flatten the rest.
  """
  fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
  group = lambda r: r.get('family') or r['policy']
  policies = sorted({group(r) for r in rows if r['policy'] != 'none'})
  unpruned = [r for r in rows if r['policy'] == 'none'
              and not r.get('family')]
  controls = [r for r in rows if r['policy'] == 'none' and r.get('family')]
  floor = unpruned[-1][metric] - max_drop if unpruned else -np.inf
  cmap = plt.get_cmap('tab10')
  off = []
  for i, policy in enumerate(policies):
    mine = [r for r in rows if group(r) == policy and r['policy'] != 'none']
    off += [r['name'] for r in mine if r[metric] < floor]
    mine = [r for r in mine if r[metric] >= floor]
    if not mine:
      continue
    pts = [(r['gflops_effective'], r[metric]) for r in mine]
    ax.plot(*zip(*pts), 'o', color=cmap(i % 10), ms=3, alpha=0.45)
    best = front(pts)
    tuned = 'fine-tuned' in policy
    ax.plot([pts[j][0] for j in best], [pts[j][1] for j in best],
            's--' if tuned else 'o-', color=cmap(i % 10), label=policy,
            ms=5, lw=1)
    for j in best:
      ax.annotate(mine[j]['name'], pts[j], fontsize=5, xytext=(3, 3),
                  textcoords='offset points', color=cmap(i % 10))
  if unpruned:
    r = unpruned[-1]
    ax.plot(r['gflops_effective'], r[metric], '*', color='k', ms=11,
            label='unpruned')
    ax.axhline(r[metric], color='k', ls='--', lw=0.6)
  for r in controls:
    ax.plot(r['gflops_effective'], r[metric], '*', mfc='none', color='k',
            ms=11, label=r['family'])
    ax.axhline(r[metric], color='k', ls=':', lw=0.6)
  if off:
    ax.text(0.01, 0.01, 'off the axes (more than %g below): %s' % (
        max_drop, ', '.join(off)), transform=ax.transAxes, fontsize=5)
  ax.set_xlabel('effective GFLOPs per image (2 x MACs)')
  ax.set_ylabel({'miou': 'mIoU (%)',
                 'boundary_miou': 'boundary mIoU (%)',
                 'top1': 'top-1 (%)'}.get(metric, metric))
  ax.set_title(title or f'{metric} vs effective GFLOPs (lines: Pareto '
               'fronts)', fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, loc='lower right')
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return path


def _rgb(image: np.ndarray, prep: Dict[str, Any]) -> np.ndarray:
  """A normalised image [H, W, 3] back to RGB in [0, 1]."""
  return np.clip(image * np.asarray(prep['std']) + np.asarray(prep['mean']),
                 0, 1)


def _labels(label: np.ndarray, num_colours: int = 20) -> np.ndarray:
  cmap = plt.get_cmap('tab20')
  rgb = cmap(np.asarray(label) % num_colours)[..., :3]
  rgb[np.asarray(label) == 255] = 0.0
  return rgb


def _upsample(grid_map: np.ndarray, h: int, w: int) -> np.ndarray:
  """A per-patch map [gh, gw] repeated to pixels [h, w]."""
  gh, gw = grid_map.shape
  return np.kron(grid_map, np.ones((-(-h // gh), -(-w // gw)),
                                   grid_map.dtype))[:h, :w]


def _paint_groups(base: np.ndarray, groups: np.ndarray,
                  alpha: float) -> np.ndarray:
  """`base` [H, W, 3] with token_groups' patches drawn on it: black where
  dropped (-1), one tab20 colour (weight alpha) per shared token."""
  up = _upsample(groups, *base.shape[:2])
  img = base.copy()
  img[up == -1] = 0.0
  cmap = plt.get_cmap('tab20')
  for k, slot in enumerate(sorted(set(groups[groups >= 0].tolist()))):
    colour = np.asarray(cmap(k % 20)[:3])
    img[up == slot] = (1 - alpha) * base[up == slot] + alpha * colour
  return img


def exit_maps(visuals: Dict[str, Any], path: str, max_images: int = 4,
              max_settings: int = 8) -> str:
  """Image | label | one exit map per pruned setting, for the first images
  (the first max_settings settings that kept maps, config.eval.exit_maps).

  An exit map tints every patch by the boundary it exited at (red: the
  first, orange: the second, ...); patches that reached the decoder keep
  the image's grey. For an in-block reduction (a map with 'src') the
  patches that share a token after the last block get one colour per token
  (tab20, faint), dropped patches are black; a composed policy shows both,
  exits on top.
  """
  maps: Dict[str, List[Dict[str, np.ndarray]]] = visuals['maps']
  names = list(maps)[:max_settings]
  count = min(max_images, min(len(maps[n]) for n in names))
  has_label = maps[names[0]][0]['label'] is not None
  cols = (2 if has_label else 1) + len(names)
  fig, axes = plt.subplots(count, cols, figsize=(1.9 * cols, 1.9 * count),
                           dpi=120, squeeze=False)
  for i in range(count):
    first = maps[names[0]][i]
    rgb = _rgb(first['image'], visuals['prep'])
    panels = [('image', rgb)]
    if has_label:
      panels.append(('label', _labels(first['label'])))
    grey = np.repeat(rgb.mean(-1, keepdims=True), 3, axis=-1)
    for name in names:
      m = maps[name][i]
      stage, src = m['exit_stage'], m.get('src')
      tint = grey.copy()
      if src is not None:   # an in-block reduction ran: its merge map
        tint = _paint_groups(grey, token_groups(src, m['grid']), alpha=0.5)
      if stage is None:
        panels.append((name, tint))
        continue
      up = _upsample(stage, *rgb.shape[:2])
      for s in range(int(stage.max())):
        colour = np.asarray(matplotlib.colors.to_rgb(
            _STAGE_COLOURS[s % len(_STAGE_COLOURS)]))
        tint[up == s] = 0.45 * grey[up == s] + 0.55 * colour
      panels.append((name, tint))
    for ax, (title, img) in zip(axes[i], panels):
      ax.imshow(img, interpolation='nearest')
      ax.set_xticks([])
      ax.set_yticks([])
      if i == 0:
        ax.set_title(title, fontsize=6)
  fig.suptitle('exit stage per patch: red = first boundary, orange = second, '
               'grey = reached the decoder;\nin-block reductions: one faint '
               'colour per token of merged patches, black = dropped',
               fontsize=7)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return path


def token_groups(src: np.ndarray, grid: Tuple[int, int]) -> np.ndarray:
  """[N] final slot of every patch -> [h, w] group ids: -1 for a patch no
  token represents (dropped), -2 for a patch alone in its token, else the
  slot of the token the patch shares with others (merged or fused)."""
  src = np.asarray(src)
  ids, counts = np.unique(src[src >= 0], return_counts=True)
  shared = set(ids[counts > 1].tolist())
  out = np.where(src < 0, -1, -2)
  for slot in shared:
    out[src == slot] = slot
  return out.reshape(grid)


def token_maps(visuals: Dict[str, Any], path: str, max_images: int = 6) -> str:
  """Which patches each in-block reduction kept, fused or merged.

  One row per setting that kept maps (config.eval.token_maps), one column per
  image: patches alone in their token (kept) show the image; patches that
  share a token with others are tinted, one colour per token (ToMe's source
  map as coloured groups; EViT's fused token is one colour over every patch
  it absorbed); patches no token represents are black.
  """
  maps = [m for m in visuals['token_maps'] if 'src' in m]
  if not maps:
    return ''
  count = min(max_images, min(len(m['images']) for m in maps))
  fig, axes = plt.subplots(len(maps) + 1, count,
                           figsize=(1.5 * count, 1.55 * (len(maps) + 1)),
                           dpi=120, squeeze=False)
  first = maps[0]
  for j in range(count):
    rgb = _rgb(first['images'][j], visuals['prep'])
    axes[0, j].imshow(rgb, interpolation='nearest')
    axes[0, j].set_title(f'label {first["labels"][j]}', fontsize=6)
    for i, m in enumerate(maps, start=1):
      img = _paint_groups(rgb, token_groups(m['src'][j], m['grid']),
                          alpha=0.65)
      axes[i, j].imshow(img, interpolation='nearest')
      axes[i, j].set_title(f'{m["name"]}: pred {m["pred"][j]}', fontsize=6)
  for ax in axes.ravel():
    ax.set_xticks([])
    ax.set_yticks([])
  fig.suptitle('after the last block: image = own token,\ncolour = patches '
               'sharing one token, black = dropped', fontsize=6)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return path


def write_figures(workdir: str, rows: List[Dict[str, Any]],
                  visuals: Dict[str, Any]) -> List[str]:
  """The Pareto plots (rows with a segmentation metric or top-1, except
  rows marked in_plots=False) and the exit and token maps."""
  out = []
  rows = [r for r in rows if r.get('in_plots', True)]
  seg = [r for r in rows if 'miou' in r]
  if seg:
    for metric in ('miou', 'boundary_miou'):
      out.append(pareto(seg, os.path.join(workdir, f'pareto_{metric}.png'),
                        metric))
  cls = [r for r in rows if 'top1' in r]
  if cls:
    out.append(pareto(cls, os.path.join(workdir, 'pareto_top1.png'), 'top1',
                      max_drop=60.0))
  if visuals and visuals.get('maps'):
    out.append(exit_maps(visuals, os.path.join(workdir, 'exit_maps.png')))
  if visuals and visuals.get('token_maps'):
    out.append(token_maps(visuals, os.path.join(workdir, 'token_maps.png')))
  return [p for p in out if p]


def merged_rows(paths: List[str]) -> List[Dict[str, Any]]:
  """The rows of several results.json for one plot (module docstring)."""
  rows = []
  for i, path in enumerate(paths):
    with open(path) as f:
      rows += [r for r in json.load(f)['rows']
               if not r['name'].startswith('pick/')
               and (i == 0 or r['policy'] != 'none' or r.get('family'))]
  return rows


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog='python -m lvtp_jax.evaluation.plots',
                                   description='One Pareto plot of several '
                                   'runs\' results.json.')
  parser.add_argument('results', nargs='+', help='results.json files; the '
                      'unpruned row comes from the first')
  parser.add_argument('--out', required=True, help='folder for the plots')
  args = parser.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  for path in write_figures(args.out, merged_rows(args.results), None):
    print(f'wrote {path}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
