"""Test-session setup shared by every test file.

timm (and with it torchvision, torch._dynamo and triton) is imported before
anything imports TensorFlow: with TensorFlow's libraries loaded first,
importing triton segfaults (seen with torch 2.14.1, timm 1.0.31 and
tensorflow-cpu 2.21.0: `import tensorflow; import timm` crashes, also after
`import torch`; the other order works). The full suite happens to collect a
timm-importing file first; a subset such as
`pytest tests/test_eval_segmentation.py tests/test_bench_suite.py` did not.
"""

try:
  import timm  # pylint: disable=unused-import
except ImportError:  # the core tests run without the parity extras
  pass
