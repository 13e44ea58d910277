"""The logit blocks the chunked and native backends work in, kept between chunks and calls.

Both backends process rows in blocks of ``rows x V`` logits. Allocating those blocks afresh for
every chunk is what made the chunked backend's resident memory grow to gigabytes in an ordinary
process: glibc's default malloc raises its mmap threshold (up to 32 MiB) once a large block is
freed, later blocks of that size then come from the heap, and the small per-chunk results
(statistics, coefficients) carved out of the freed blocks keep them from being reused or
returned, so the heap grew by about a block per chunk. Blocks taken from one :class:`Workspace`
are allocated once and reused; nothing large is freed during a call.

On the CPU they are also kept between calls: a fresh 128 MiB block is ~32k first-touch page
faults the kernel must zero (~25 ms on the 2-core benchmark machine), which a training loop
calling the loss every step would otherwise pay every step. Held between calls: the largest
block used so far per role (logits, probabilities, a scratch block, the reference model's
logits, the softcap's slope, the raw GEMM output of half inputs): see the backends for which
roles they use. ``psft_kernels.empty_cache()`` frees them; ``PSFT_KERNELS_WORKSPACE=0`` (or the
older ``PSFT_KERNELS_NATIVE_WORKSPACE=0``) keeps blocks for one call only. On other devices the
blocks live for one call (their caching allocators reuse memory without this problem). A call
that finds the workspace in use by another thread allocates its own blocks.
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Dict, Iterator, Optional, Tuple

import torch
from torch import Tensor

from ._types import HeadInputs


def _disabled() -> bool:
    return os.environ.get("PSFT_KERNELS_WORKSPACE", os.environ.get("PSFT_KERNELS_NATIVE_WORKSPACE", "1")) == "0"


class Workspace:
    """One buffer per (role, dtype), grown when a call needs more (see the module doc)."""

    def __init__(self, device: Optional[torch.device] = None) -> None:
        self._buffers: Dict[Tuple[str, torch.dtype], Tensor] = {}
        self._lock = threading.Lock()
        self.device = torch.device("cpu") if device is None else torch.device(device)

    def take(self, role: str, rows: int, V: int, dtype: torch.dtype) -> Tensor:
        key = (role, dtype)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < rows * V:
            self._buffers.pop(key, None)  # free the smaller one before allocating the larger
            buf = self._buffers[key] = torch.empty(rows * V, dtype=dtype, device=self.device)
        return buf[:rows * V].view(rows, V)

    def release(self) -> None:
        with self._lock:
            self._buffers.clear()

    @contextlib.contextmanager
    def lease(self, device=None) -> Iterator["Workspace"]:
        """This workspace for one call on the CPU, else a private one (another device, busy, disabled)."""
        device = torch.device("cpu") if device is None else torch.device(device)
        if device.type != "cpu" or _disabled() or not self._lock.acquire(blocking=False):
            yield Workspace(device)
            return
        try:
            yield self
        finally:
            self._lock.release()


WORKSPACE = Workspace()


def release_workspace() -> None:
    """Free the logit blocks the chunked and native backends keep between calls."""
    WORKSPACE.release()


class LogitBlocks:
    """The logit buffers of one call: ``z`` (and ``zq``) in the compute dtype, with ``with_slope``
    one for the softcap's slope ``dz/dx`` (taken from the raw logits), and for half inputs the raw
    GEMM output in the input dtype."""

    def __init__(self, inputs: HeadInputs, rows: int, with_ref: bool, ws: Workspace, with_slope: bool = False):
        cd, V = inputs.compute_dtype, inputs.vocab_size
        self.ws, self.rows, self.V, self.dtype = ws, rows, V, cd
        h = inputs.hidden
        self.z = ws.take("z", rows, V, cd)
        self._slope = ws.take("slope", rows, V, cd) if with_slope else None
        self.raw = ws.take("raw", rows, V, h.dtype) if h.dtype != cd else None
        self.zq = self.raw_q = None
        if with_ref:
            rh = inputs.ref_hidden
            self.zq = ws.take("zq", rows, V, cd)
            self.raw_q = ws.take("raw_q", rows, V, rh.dtype) if rh.dtype != cd else None

    def extra(self, role: str) -> Tensor:
        """Another block of the same shape and dtype (the chunked backend's probabilities, scratch)."""
        return self.ws.take(role, self.rows, self.V, self.dtype)

    @staticmethod
    def _gemm(out: Tensor, raw: Optional[Tensor], h: Tensor, w: Tensor, b: Optional[Tensor]) -> Tensor:
        n = h.shape[0]
        dst = out[:n] if raw is None else raw[:n]
        if b is None:
            torch.mm(h, w.T, out=dst)
        else:
            torch.addmm(b, h, w.T, out=dst)
        if raw is not None:  # half inputs: the GEMM runs in their dtype, the epilogue in fp32
            out[:n].copy_(dst)
        return out[:n]

    def logits(self, inputs: HeadInputs, rows_c, with_ref: bool):
        z = self._gemm(self.z, self.raw, inputs.hidden[rows_c], inputs.weight, inputs.bias)
        zq = None
        if with_ref:
            zq = self._gemm(self.zq, self.raw_q, inputs.ref_hidden[rows_c], inputs.ref_weight, inputs.ref_bias)
        return z, zq

    def half(self, n: int) -> Optional[Tensor]:
        """The raw block in the input dtype, free once the logits are copied out (half inputs only):
        where the gradient GEMMs take ``dx`` cast to that dtype."""
        return None if self.raw is None else self.raw[:n]

    def slope(self, z: Tensor) -> Optional[Tensor]:
        """The slope buffer for the rows of ``z`` (None without one)."""
        return None if self._slope is None else self._slope[:z.shape[0]]
