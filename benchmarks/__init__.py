"""densenet_fast benchmark suite.

``python -m benchmarks --help`` (run from the repository root) compares torchvision,
timm, torch.compile and densenet_fast DenseNets side by side: training-step peak memory, bytes saved
for backward, step time, eval time and the largest batch under a memory budget. ``pytest benchmarks/``
runs the operator micro-benchmarks (pytest-benchmark). Methodology: benchmarks/README.md.
"""
