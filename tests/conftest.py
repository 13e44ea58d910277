import os
import sys

import torch

# The test helpers live beside the tests; make them importable however pytest is invoked.
sys.path.insert(0, os.path.dirname(__file__))

# Small problems: one thread per test keeps CPU timings steady and avoids oversubscription.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
