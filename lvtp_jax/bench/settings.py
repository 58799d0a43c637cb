"""What the accelerator suite measures: models, shapes and policy settings.

A pruning policy joins the suite with one line in CLASSIFICATION (in-block
reductions on DeiT, at the setting its paper headlines) or SEGMENTATION
(on the Segmenter); a PyTorch implementation to compare against (an official
pruning code path) with one line in TORCH_ROWS. tests/test_bench_suite.py
checks that every registered policy appears in one of the tables or in
NOT_BENCHMARKED with a reason.
"""

import dataclasses
from typing import Any, Callable, Dict, Optional, Tuple


@dataclasses.dataclass(frozen=True)
class Setting:
  """One row of lvtp_jax: config.pruning overrides ({}: unpruned)."""
  name: str
  pruning: Dict[str, Any]
  source: str                    # where the setting comes from


@dataclasses.dataclass(frozen=True)
class TorchRow:
  """One PyTorch row: `patch(timm_module)` returns the module to time
  (None: timm as it is, eager)."""
  name: str
  patch: Optional[Callable[[Any], Any]]
  source: str


# DeiT at 224: the unpruned forward, then one line per in-block reduction
# (EViT, ToMe, GTP, BAT) at its paper's headline DeiT setting, in buffer
# mode (exact for these policies: their token counts are static).
CLASSIFICATION = (
    Setting('unpruned', {}, 'timm-equal forward (tests/test_convert_timm.py)'),
    Setting('evit', dict(name='evit', mode='buffer',
                         evit=dict(keep_rate=0.7, layers=(4, 7, 10))),
            'EViT README headline: keep rate 0.7 at blocks 4, 7, 10, fused '
            'token (DeiT-S 3.0 GMACs)'),
    Setting('tome', dict(name='tome', mode='buffer', tome=dict(r=13)),
            'ToMe README ViT-S/B setting: r = 13 in every block, '
            'proportional attention (DeiT-S 2.7 GMACs)'),
    Setting('bat', dict(name='bat', mode='buffer', bat=dict(keep_rate=0.7)),
            'BAT README headline: keep rate 0.7 at blocks 4, 7, 10 (DeiT-S '
            '3.0 GMACs); spec §4.2 reconstruction, c = r = ceil(0.25 M)'),
    Setting('gtp', dict(name='gtp', mode='buffer', gtp=dict(
        num_prop=8, graph_type='Spatial')),
            'GTP paper headline point: P = 8 propagated per block, '
            'MixedAttnMax, the README command\'s Spatial graph (DeiT-S 3.4 '
            'GMACs; Spatial also runs on the --tiny suite\'s 4 patches)'),
)

TORCH_ROWS = (
    TorchRow('timm eager', None, 'timm VisionTransformer, eager PyTorch'),
)

# Buffer capacities after the two exit boundaries (fractions of the patches).
# There is no trained model to calibrate them on here; (0.7, 0.5) after
# blocks 6 and 8 is an encoder cut of about 22%, DToP's reported ViT-B
# ADE20K reduction (21%, specs/dtop.md §6.1). Buffer shapes are static, so
# the timing depends on the capacities, not on which patches exit.
SEG_CAPACITIES = (0.7, 0.5)

SEGMENTATION = (
    Setting('unpruned', {}, 'the Segmenter forward (official-checkpoint '
            'parity, tests/test_segmenter.py)'),
    Setting('dtop', dict(name='dtop', mode='buffer', capacities=SEG_CAPACITIES,
                         dtop=dict(threshold=0.9, top_k=5)),
            'DToP official ViT-B setting: p0 0.9, k 5, exits after blocks '
            '6 and 8'),
    Setting('lvtp', dict(name='lvtp', mode='buffer',
                         capacities=SEG_CAPACITIES),
            'LVTP-R defaults (specs/lvtp.md), exits after blocks 6 and 8'),
    # In-block on the Segmenter (dense reassembly through src): ToMe's
    # DeiT-S rate (r 13 of 197 tokens per block) scaled to 1025 tokens.
    # EViT and BAT name fixed layers (4, 7, 10), which the --tiny suite's
    # 4 blocks do not have; ToMe stands for the in-block family here.
    Setting('tome', dict(name='tome', mode='buffer', tome=dict(r=64)),
            'ToMe, r 64 in every block (13/197 of the tokens, the README '
            'DeiT-S rate, at 1024 patches); decoder on the dense grid'),
    Setting('lvtp+tome', dict(name='lvtp+tome', mode='buffer',
                              capacities=SEG_CAPACITIES, tome=dict(r=64)),
            'composed: ToMe r 64 in the blocks before the first exit '
            'boundary, then LVTP-R exits after blocks 6 and 8'),
)

# Registered policies without a row, and why.
NOT_BENCHMARKED = {
    'none': 'the unpruned rows',
    'random_drop': 'the quality floor of in-block reduction; it runs on '
                   "EViT's token counts, so it costs what EViT costs minus "
                   'the attention score',
    'random': 'the quality floor; at given capacities it costs what every '
              'exit policy costs, plus its (cheaper) decisions',
}


@dataclasses.dataclass(frozen=True)
class Sizes:
  """The shapes and timing of one suite run."""
  deit_models: Tuple[str, ...]        # timm names
  deit_img: int
  deit_batch: int
  deit_dtypes: Tuple[str, ...]
  # name -> Segmenter shape fields (width, depth, num_heads, mlp_dim)
  seg_models: Tuple[Tuple[str, Dict[str, int]], ...]
  seg_decoders: Tuple[str, ...]
  seg_img: int
  seg_batch: int
  seg_classes: int
  seg_aux_layers: Tuple[int, ...]
  seg_dtypes: Tuple[str, ...]
  train_model: Tuple[str, Dict[str, int]]
  train_img: int
  train_batch: int
  train_dtypes: Tuple[str, ...]
  warmup: int
  iters: int
  rounds: int


_VIT_S = dict(width=384, depth=12, num_heads=6, mlp_dim=1536)
_VIT_B = dict(width=768, depth=12, num_heads=12, mlp_dim=3072)
_TINY = dict(width=64, depth=4, num_heads=2, mlp_dim=128)

# The accelerator run (issue: one H200 in at most 8 minutes with compiles).
FULL = Sizes(
    deit_models=('deit_small_patch16_224', 'deit_base_patch16_224'),
    deit_img=224, deit_batch=256, deit_dtypes=('float32', 'bfloat16'),
    # ViT-B first: under a time budget its rows matter more.
    seg_models=(('ViT-B/16', _VIT_B), ('ViT-S/16', _VIT_S)),
    seg_decoders=('linear', 'mask_transformer'),
    seg_img=512, seg_batch=32, seg_classes=150, seg_aux_layers=(6, 8),
    seg_dtypes=('bfloat16',),
    # Segmenter's official ADE20K recipe shapes: ViT-B/16, 512 crops,
    # batch 8, mask transformer (configs/segmenter_train.py).
    train_model=('ViT-B/16', _VIT_B), train_img=512, train_batch=8,
    train_dtypes=('float32', 'bfloat16'),
    warmup=3, iters=10, rounds=5)

# --tiny (CPU, CI) and the smoke test that opens every accelerator run: the
# same code paths on models that compile and run in seconds.
TINY = Sizes(
    deit_models=('deit_tiny_patch16_224',), deit_img=32, deit_batch=2,
    deit_dtypes=('float32', 'bfloat16'),
    # The linear decoder only: the mask transformer runs in the training
    # section here (and in the pruning unit tests); CI time is budgeted.
    seg_models=(('tiny', _TINY),), seg_decoders=('linear',),
    seg_img=64, seg_batch=2, seg_classes=8, seg_aux_layers=(2, 3),
    seg_dtypes=('bfloat16',),
    train_model=('tiny', _TINY), train_img=64, train_batch=2,
    train_dtypes=('float32', 'bfloat16'),
    warmup=1, iters=2, rounds=3)

# Dense peak rates (TFLOP/s) from the vendor's datasheet, by device kind and
# the math a row's matmuls use: 'bfloat16', 'tf32' (float32 rows under the
# suite's default --fp32-matmul tf32, which both frameworks are set to) or
# 'float32' (--fp32-matmul highest). MFU = model FLOPs x rate / peak.
PEAK_TFLOPS = {
    'H200': {'bfloat16': 989.4, 'tf32': 494.7, 'float32': 66.9},
}
