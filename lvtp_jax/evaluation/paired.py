"""Is setting B better than setting A on these images? A paired bootstrap.

  python -m lvtp_jax.evaluation.paired \
      --config configs/quickstart.py:sweep=selection --workdir runs/quickstart \
      --pairs dtop_p0.9_sum:lvtp_sum_k2_gap0.3,dtop_p0.65_sum:lvtp_sum_rgb4_k2

or, after lvtp_jax.evaluation.selection, `--picks runs/quickstart/selection/
picks.json`: at every cut, the pick of `--reference` (DToP) against the pick
of every other policy.

mIoU is a dataset-level number (one confusion matrix summed over all the
images, segmentation_metrics), so the difference between two settings has
no per-image spread to read a standard error from. The paired bootstrap
resamples the images instead: each of R resamples draws N of the N images
with replacement, sums both settings' per-image confusion matrices over the
same draw, and takes B's mIoU (and boundary mIoU) minus A's. Reported per
pair and metric: the observed difference, the percentile interval of the
resampled differences (95% by default) and the share of resamples in which
B >= A. Both settings run on the same model and the same images (checked:
the ground-truth pixel counts of every image must agree).

What the interval covers: which images the evaluation happened to draw. It
does not cover training variance (another seed of the same recipe, or the
same seed trained on another CPU), which moves the quickstart's mIoU by
0.3-1.0 (docs/quickstart_seg.md); compare across models for that.
"""

import json
from typing import Any, Dict, List, Sequence, Tuple

from absl import app
from absl import flags
import ml_collections
from ml_collections import config_flags
import numpy as np

from lvtp_jax.evaluation import seg_runner
from lvtp_jax.evaluation import segmentation
from lvtp_jax.evaluation import segmentation_metrics

METRICS = {'miou': 'image_confusion',
           'boundary_miou': 'image_boundary_confusion'}
# Resamples summed at once: [chunk, C, C] float64 (C = 150: 46 MB).
_CHUNK = 256


def resampled_miou(per_image: np.ndarray, counts: np.ndarray) -> np.ndarray:
  """mIoU (percent) of every resample.

  Args:
    per_image: int [N, C, C] confusion matrices of the N images.
    counts: int [R, N], how often each image is drawn in each resample
      (rows sum to N for a bootstrap; all ones gives the observed mIoU).

  Returns:
    float64 [R].
  """
  per_image = np.asarray(per_image, np.float64)
  n, c, _ = per_image.shape
  flat = per_image.reshape(n, c * c)
  out = []
  for start in range(0, counts.shape[0], _CHUNK):
    summed = counts[start:start + _CHUNK].astype(np.float64) @ flat
    out.append(segmentation_metrics.mean_iou(summed.reshape(-1, c, c)))
  return np.concatenate(out)


def bootstrap_counts(num_images: int, resamples: int,
                     seed: int) -> np.ndarray:
  """int [resamples, num_images]: draws of num_images images with
  replacement, as counts per image (numpy Generator, `seed`)."""
  if num_images < 2:
    raise ValueError(f'a bootstrap needs at least 2 images, got {num_images}.')
  if resamples < 100:
    raise ValueError(f'resamples={resamples}: use at least 100 for a '
                     'percentile interval (default 10000).')
  rng = np.random.default_rng(seed)
  return rng.multinomial(num_images, np.full(num_images, 1.0 / num_images),
                         size=resamples)


def compare(a: Dict[str, np.ndarray], b: Dict[str, np.ndarray],
            counts: np.ndarray, level: float = 0.95) -> Dict[str, Any]:
  """B - A for every metric of METRICS.

  Args:
    a, b: the per-image confusion matrices of the two settings (run_split's
      metric dict with per_image=True), the same images in the same order.
    counts: bootstrap_counts(N, R, seed).
    level: of the percentile interval.

  Returns:
    {metric: dict(a, b, diff (observed B - A), low, high (the interval of
    the resampled differences), p_b_ge_a (share of resamples with B >= A),
    std (of the resampled differences))}.
  """
  if not 0 < level < 1:
    raise ValueError(f'level={level}: a probability in (0, 1), e.g. 0.95.')
  full_a, full_b = a['image_confusion'], b['image_confusion']
  if full_a.shape != full_b.shape or not np.array_equal(
      full_a.sum(axis=-1), full_b.sum(axis=-1)):
    raise ValueError(
        'the two settings were not evaluated on the same images (their '
        f'per-image ground-truth counts differ; shapes {full_a.shape} and '
        f'{full_b.shape}): evaluate both on the same split, size and mode.')
  if counts.shape[1] != full_a.shape[0]:
    raise ValueError(f'counts are for {counts.shape[1]} images, the settings '
                     f'have {full_a.shape[0]}.')
  ones = np.ones((1, full_a.shape[0]), np.int64)
  out = {}
  for metric, key in METRICS.items():
    out[metric] = summarise(
        float(resampled_miou(a[key], ones)[0]),
        float(resampled_miou(b[key], ones)[0]),
        resampled_miou(b[key], counts) - resampled_miou(a[key], counts),
        level)
  return out


def summarise(obs_a: float, obs_b: float, diffs: np.ndarray,
              level: float) -> Dict[str, Any]:
  """One comparison's record from the observed values and the resampled
  differences B - A (see compare)."""
  tail = 100 * (1 - level) / 2
  low, high = np.percentile(diffs, [tail, 100 - tail])
  return dict(a=obs_a, b=obs_b, diff=obs_b - obs_a, low=float(low),
              high=float(high), p_b_ge_a=float(np.mean(diffs >= 0)),
              std=float(diffs.std()))


def compare_accuracy(correct_a: np.ndarray, correct_b: np.ndarray,
                     counts: np.ndarray, level: float = 0.95
                     ) -> Dict[str, Any]:
  """Top-1 (percent) of B minus A, paired over the same images: per-image
  hits [N] (bool) of both settings, resampled with bootstrap_counts(N, R,
  seed); the record of compare() for one metric."""
  if not 0 < level < 1:
    raise ValueError(f'level={level}: a probability in (0, 1), e.g. 0.95.')
  a = np.asarray(correct_a, np.float64)
  b = np.asarray(correct_b, np.float64)
  if a.shape != b.shape or counts.shape[1] != a.shape[0]:
    raise ValueError(f'per-image hits of {a.shape} and {b.shape} images and '
                     f'counts for {counts.shape[1]}: evaluate both settings '
                     'on the same images.')
  n = a.shape[0]
  resampled = lambda hits: 100.0 * (counts @ hits) / n
  return summarise(100.0 * a.mean(), 100.0 * b.mean(),
                   resampled(b) - resampled(a), level)


def pairs_from_picks(picks: Sequence[Dict[str, Any]],
                     reference: str) -> List[Tuple[str, str]]:
  """(reference pick, other pick) at every cut of selection's picks.json,
  for every other policy with a pick at that cut (grid setting names)."""
  out = []
  for cut in dict.fromkeys(p['cut'] for p in picks):
    at = {p['policy']: p['name'] for p in picks if p['cut'] == cut}
    if reference not in at:
      raise ValueError(f'the picks have no policy {reference!r} (have '
                       f'{sorted(at)}); set --reference.')
    if at[reference] is None:
      continue
    out += [(at[reference], name) for policy, name in sorted(at.items())
            if policy != reference and name is not None]
  return list(dict.fromkeys(out))


def parse_pairs(items: Sequence[str]) -> List[Tuple[str, str]]:
  """['A:B', ...] (the --pairs flag) -> [(A, B), ...]."""
  pairs = []
  for item in items:
    a, sep, b = item.partition(':')
    if not sep or not a or not b or ':' in b:
      raise ValueError(f'--pairs item {item!r}: write A:B, two eval.name of '
                       'config.sweep.')
    pairs.append((a, b))
  return pairs


def _evaluate(setting, model, params, prep) -> Dict[str, Any]:
  pruned, pcfg, _ = segmentation.attach_setting(setting, model, params, prep)
  result, _, windows, num, stats = seg_runner.run_split(
      setting, pruned, params, prep, desc=setting.eval.name, per_image=True)
  return dict(result, policy=pcfg.name, num_images=num,
              gflops_effective=segmentation.effective_gflops(
                  model, stats, windows, pruned.pruning))


def run(config: ml_collections.ConfigDict, workdir: str,
        pairs: Sequence[Tuple[str, str]], resamples: int = 10000,
        seed: int = 0, level: float = 0.95) -> List[Dict[str, Any]]:
  """One row per pair (a, b): both settings' GFLOPs and compare()'s
  numbers. The settings are config.sweep entries, named by eval.name."""
  settings = {s.eval.name: s for s in segmentation.sweep_settings(config)}
  unknown = sorted({n for pair in pairs for n in pair} - set(settings))
  if unknown:
    raise ValueError(f'{unknown} are not settings of config.sweep (the '
                     'names are eval.name, e.g. of sweeps.selection_grid()).')
  model, params, prep, _ = segmentation.build_model(config, workdir)
  evaluated = {}
  rows = []
  counts = None
  for a, b in pairs:
    for name in (a, b):
      if name not in evaluated:
        evaluated[name] = _evaluate(settings[name], model, params, prep)
    ea, eb = evaluated[a], evaluated[b]
    if counts is None:
      counts = bootstrap_counts(len(ea['image_confusion']), resamples, seed)
    rows.append(dict(a=a, b=b, policy_a=ea['policy'], policy_b=eb['policy'],
                     gflops_a=ea['gflops_effective'],
                     gflops_b=eb['gflops_effective'],
                     num_images=len(ea['image_confusion']),
                     resamples=resamples, seed=seed, level=level,
                     **compare(ea, eb, counts, level)))
  return rows


def format_rows(rows: Sequence[Dict[str, Any]]) -> str:
  """Markdown: one line per pair and metric."""
  lines = ['| A | B | GFLOPs A / B | metric | A | B | B - A | '
           'interval | P(B >= A) |', '|' + '---|' * 9]
  for r in rows:
    for metric in METRICS:
      m = r[metric]
      lines.append(
          f"| {r['a']} | {r['b']} | {r['gflops_a']:.3f} / "
          f"{r['gflops_b']:.3f} | {metric} | {m['a']:.2f} | {m['b']:.2f} | "
          f"{m['diff']:+.2f} | [{m['low']:+.2f}, {m['high']:+.2f}] | "
          f"{m['p_b_ge_a']:.3f} |")
  return '\n'.join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  if bool(f.pairs) == bool(f.picks):
    raise app.UsageError('give --pairs A:B,... or --picks picks.json '
                         '(one of the two).')
  if f.pairs:
    pairs = parse_pairs(f.pairs)
  else:
    with open(f.picks) as fh:
      pairs = pairs_from_picks(json.load(fh)['picks'], f.reference)
  rows = run(f.config, f.workdir, pairs, f.resamples, f.seed, f.level)
  print(format_rows(rows))
  if f.out:
    with open(f.out, 'w') as fh:
      json.dump(rows, fh, indent=2)
    print(f'wrote {f.out}')


def _define_flags() -> None:
  config_flags.DEFINE_config_file('config', None, 'experiment config whose '
                                  'sweep names the settings')
  flags.DEFINE_string('workdir', None, 'training workdir (its checkpoint is '
                      'evaluated)')
  flags.DEFINE_list('pairs', [], 'A:B,... eval.name pairs of config.sweep')
  flags.DEFINE_string('picks', None, 'picks.json of '
                      'lvtp_jax.evaluation.selection, instead of --pairs')
  flags.DEFINE_string('reference', 'dtop', 'with --picks: the policy every '
                      'other policy is compared with (A)')
  flags.DEFINE_integer('resamples', 10000, 'bootstrap resamples')
  flags.DEFINE_integer('seed', 0, 'bootstrap seed')
  flags.DEFINE_float('level', 0.95, 'of the percentile interval')
  flags.DEFINE_string('out', None, 'also write the rows to this JSON file')
  flags.mark_flags_as_required(['config', 'workdir'])


if __name__ == '__main__':
  # Defined here, not at import: eval.py defines flags of the same names.
  _define_flags()
  app.run(main)
