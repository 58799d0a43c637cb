"""The optax optimizer and learning-rate schedule that config.train describes.

  gradient -> [clip by global norm] -> SGD (momentum) or AdamW, with the
  schedule -> x lr_mult on parameters whose path matches lr_mult_regex.

Schedule (Segmenter/mmseg 'poly' with linear warm-up), for step t, peak lr,
warm-up W, total T, end lr e and power q:
  t < W:  lr * t / W
  t >= W: (lr - e) * (1 - (t - W) / (T - W)) ** q + e   (e after T)

Weight decay skips biases, LayerNorm scales, position embeddings, the class
/ distillation tokens and the mask transformer's class embeddings (the
official Segmenter `no_weight_decay` set plus the usual 1-d rule). For SGD
it is PyTorch's L2 term added to the gradient before momentum; for AdamW
it is decoupled (optax.adamw).

The multiplier scales the final update of matching parameters, which is
what a PyTorch parameter group with lr x mult does for both optimizers
(including AdamW's decoupled decay, which PyTorch also multiplies by lr).
"""

import re
from typing import Any, Callable

import jax
import ml_collections
import optax

OPTIMIZERS = ('sgd', 'adamw')
# Leaf names (last path component) that never get weight decay.
_NO_DECAY_NAMES = frozenset(
    {'bias', 'scale', 'pos_embed', 'cls_token', 'dist_token', 'cls_emb'})


def config_defaults() -> ml_collections.ConfigDict:
  """config.train optimizer fields with documented defaults."""
  return ml_collections.ConfigDict(dict(
      optimizer='sgd',      # 'sgd' (momentum) or 'adamw'
      lr=1e-3,              # peak learning rate (after warm-up)
      end_lr=0.0,           # learning rate reached at num_steps
      power=0.9,            # polynomial decay power
      warmup_steps=0,       # linear warm-up from 0
      num_steps=1000,       # total training steps
      momentum=0.9,         # SGD momentum
      b1=0.9,               # AdamW betas
      b2=0.999,
      weight_decay=0.0,     # SGD: L2 on the gradient; AdamW: decoupled
      grad_clip_norm=0.0,   # global-norm clipping (0 = off)
      lr_mult=1.0,          # learning-rate multiplier ...
      lr_mult_regex='',     # ... for parameter paths matching this regex
  ))


def path_str(path) -> str:
  """A tree_util key path -> 'encoder/blocks_0/attn/qkv/kernel'."""
  return '/'.join(str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path)


def decay_mask(params: Any) -> Any:
  """Pytree of bools: True where weight decay applies."""
  return jax.tree_util.tree_map_with_path(
      lambda p, x: x.ndim > 1 and path_str(p).split('/')[-1]
      not in _NO_DECAY_NAMES, params)


def regex_mask(regex: str) -> Callable[[Any], Any]:
  """Mask function: True for leaves whose path matches `regex` (re.search)."""
  pattern = re.compile(regex)
  return lambda params: jax.tree_util.tree_map_with_path(
      lambda p, _: bool(pattern.search(path_str(p))), params)


def make_schedule(cfg: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warm-up to cfg.lr, then polynomial decay to cfg.end_lr."""
  decay = optax.polynomial_schedule(
      init_value=cfg.lr, end_value=cfg.end_lr, power=cfg.power,
      transition_steps=max(cfg.num_steps - cfg.warmup_steps, 1))
  if not cfg.warmup_steps:
    return decay
  warmup = optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps)
  return optax.join_schedules([warmup, decay], [cfg.warmup_steps])


def validate(cfg: ml_collections.ConfigDict) -> None:
  """Raises a ValueError naming the first out-of-range optimizer field."""
  checks = [
      (cfg.optimizer in OPTIMIZERS,
       f'train.optimizer={cfg.optimizer!r}; expected one of {OPTIMIZERS}.'),
      (cfg.lr > 0, f'train.lr={cfg.lr} must be > 0.'),
      (0 <= cfg.end_lr <= cfg.lr,
       f'train.end_lr={cfg.end_lr} must be in [0, train.lr={cfg.lr}].'),
      (cfg.power > 0, f'train.power={cfg.power} must be > 0.'),
      (cfg.num_steps > 0, f'train.num_steps={cfg.num_steps} must be > 0.'),
      (0 <= cfg.warmup_steps < cfg.num_steps,
       f'train.warmup_steps={cfg.warmup_steps} must be in '
       f'[0, train.num_steps={cfg.num_steps}).'),
      (0 <= cfg.momentum < 1, f'train.momentum={cfg.momentum} not in [0, 1).'),
      (cfg.weight_decay >= 0,
       f'train.weight_decay={cfg.weight_decay} must be >= 0.'),
      (cfg.grad_clip_norm >= 0,
       f'train.grad_clip_norm={cfg.grad_clip_norm} must be >= 0 (0 = off).'),
      (cfg.lr_mult > 0, f'train.lr_mult={cfg.lr_mult} must be > 0.'),
  ]
  for ok, message in checks:
    if not ok:
      raise ValueError(message)
  try:
    re.compile(cfg.lr_mult_regex)
  except re.error as e:
    raise ValueError(f'train.lr_mult_regex={cfg.lr_mult_regex!r} is not a '
                     f'valid regex: {e}.') from None


def make_optimizer(cfg: ml_collections.ConfigDict
                   ) -> optax.GradientTransformation:
  """The optimizer of config.train (see the module docstring)."""
  validate(cfg)
  schedule = make_schedule(cfg)
  parts = []
  if cfg.grad_clip_norm:
    parts.append(optax.clip_by_global_norm(cfg.grad_clip_norm))
  if cfg.optimizer == 'sgd':
    if cfg.weight_decay:
      parts.append(optax.add_decayed_weights(cfg.weight_decay, decay_mask))
    if cfg.momentum:
      parts.append(optax.trace(decay=cfg.momentum))
    parts.append(optax.scale_by_learning_rate(schedule))
  else:
    parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2,
                             weight_decay=cfg.weight_decay, mask=decay_mask))
  if cfg.lr_mult_regex and cfg.lr_mult != 1.0:
    parts.append(optax.masked(optax.scale(cfg.lr_mult),
                              regex_mask(cfg.lr_mult_regex)))
  return optax.chain(*parts)
