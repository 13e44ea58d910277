"""Benchmarks of the fused lm-head losses against eager PyTorch, torch.compile, Liger-Kernel, Cut
Cross-Entropy, ``torch.nn.functional.linear_cross_entropy`` and the dense-GEMM floor.

Run ``python -m bench --help`` from the repository root; see ``bench/README.md``.
"""
