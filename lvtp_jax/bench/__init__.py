"""Speed measurements: lvtp_jax against timm, and the accelerator suite.

  python -m lvtp_jax.bench [--profile]     one ViT forward vs timm eager
  python -m lvtp_jax.bench.suite --out DIR the accelerator suite (--tiny on
                                           a CPU): DeiT, Segmenter, training
"""
