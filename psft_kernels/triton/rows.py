"""Active-row compaction without a host sync.

The kernels take a permutation ``order`` of the ``N`` rows with the active ones first (in their
original order) and a one-element device tensor ``count``. Grids are sized for all ``N`` rows;
a program whose first row is at or past ``count`` returns at once. So ignored and PSFT-clipped
rows cost no tile work, and nothing is read back to the host to find out how many there are.

PyTorch equivalent: ``order = torch.cat([active.nonzero(), (~active).nonzero()]).squeeze(1)``,
``count = active.sum()`` (which would sync on ``nonzero``).
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor


def compact_rows(active: Tensor) -> Tuple[Tensor, Tensor]:
    """``(order, count)``: int64 ``(N,)`` permutation, active rows first; int32 ``(1,)`` count."""
    n = active.numel()
    idx = torch.arange(n, device=active.device, dtype=torch.int64)
    pos = torch.cumsum(active.to(torch.int64), 0)  # active rows up to and including i
    count = pos[-1:] if n else torch.zeros(1, dtype=torch.int64, device=active.device)
    # active row i goes to pos[i] - 1; an inactive one after all active rows, keeping its order
    dest = torch.where(active, pos - 1, count + idx - pos)
    order = torch.empty_like(idx).scatter_(0, dest, idx)
    return order, count.to(torch.int32)
