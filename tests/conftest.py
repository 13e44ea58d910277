import os
import sys

import torch

# The test helpers live beside the tests; make them importable however pytest is invoked.
sys.path.insert(0, os.path.dirname(__file__))

# Triton reads TRITON_INTERPRET when its kernels are defined (at import), so it is set here,
# before anything imports psft_kernels.triton: on a machine without CUDA, backend="triton" then
# runs the same kernels in Triton's interpreter (tests/test_triton.py). An explicit setting wins.
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

# Small problems: one thread per test keeps CPU timings steady and avoids oversubscription.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
