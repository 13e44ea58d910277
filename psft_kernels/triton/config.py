"""Launch configurations: one fixed, reasonable default per GPU architecture, autotuning on request.

Defaults are chosen, not tuned: no GPU was available when they were written (see docs/triton.md,
"Launch configurations"). ``PSFT_KERNELS_AUTOTUNE=1`` (read when ``psft_kernels.triton`` is
imported) wraps each kernel in ``triton.autotune`` over a small candidate list; its cache key
uses the problem's ``D``, ``V`` and the row count rounded up to a power of two (``N_BUCKET``), so a
new batch size within the same bucket never re-tunes. The interpreter never autotunes.

Other knobs (module attributes, so tests can shrink them):

* ``DZ_SLICE_BYTES``: the backward materializes ``dz`` for one vocabulary slice of all active
  rows at a time; this caps that buffer (64 MiB), which also keeps the slice of ``W`` hot in L2.
* ``TARGET_PROGRAMS``: how many programs a launch should have to fill the device; below it the
  forward splits the vocabulary and the weight-gradient GEMM splits its row loop (split-K,
  only when ``deterministic=False``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import triton

AUTOTUNE = os.environ.get("PSFT_KERNELS_AUTOTUNE", "0") == "1"
DZ_SLICE_BYTES = 64 << 20
# Under the interpreter programs run one after another: more of them only costs time.
INTERPRETER_TARGET_PROGRAMS = 1


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass(frozen=True)
class Tiles:
    """Tile sizes of the three kernel families.

    forward: ``fwd_m`` rows x ``fwd_v`` vocabulary columns per tile, ``fwd_k`` of D per ``tl.dot``.
    backward: ``bwd_m`` x ``bwd_v`` tiles of dz (the unit of gradient filtering); the gradient
    GEMMs produce ``bwd_d``-wide column blocks of D.
    """

    fwd_m: int
    fwd_v: int
    fwd_k: int
    fwd_warps: int
    fwd_stages: int
    bwd_m: int
    bwd_v: int
    bwd_k: int
    bwd_d: int
    bwd_warps: int
    bwd_stages: int

    def forward_meta(self) -> Dict[str, int]:
        return dict(BLOCK_M=self.fwd_m, BLOCK_V=self.fwd_v, BLOCK_K=self.fwd_k, num_warps=self.fwd_warps,
                    num_stages=self.fwd_stages)

    def dz_meta(self) -> Dict[str, int]:
        return dict(BLOCK_K=self.bwd_k, num_warps=self.bwd_warps, num_stages=self.bwd_stages)

    def gemm_meta(self) -> Dict[str, int]:
        return dict(BLOCK_D=self.bwd_d, num_warps=self.bwd_warps, num_stages=self.bwd_stages)


# Shared memory per stage of the forward tile loop: (fwd_m + fwd_v) * fwd_k * 2 bytes for half
# inputs. Hopper / A100 (>= 164 KiB) take 128x128x64 with 3 stages; consumer parts (~100 KiB) less.
_TILES = {
    "hopper": Tiles(128, 128, 64, 8, 3, 128, 128, 64, 128, 8, 3),
    "ampere": Tiles(128, 128, 32, 8, 3, 128, 128, 32, 128, 8, 3),
    "consumer": Tiles(64, 128, 32, 4, 3, 64, 128, 32, 64, 4, 2),
    "generic": Tiles(64, 64, 32, 4, 2, 64, 64, 32, 64, 4, 2),
    # The interpreter pays per program and per op, not per flop: big tiles, few programs.
    "interpreter": Tiles(64, 128, 64, 4, 1, 64, 128, 64, 64, 4, 1),
}


def arch(device: torch.device) -> str:
    if device.type != "cuda" or interpreting():
        return "interpreter" if interpreting() else "generic"
    major, minor = torch.cuda.get_device_capability(device)
    if major >= 9:
        return "hopper"
    if (major, minor) == (8, 0):
        return "ampere"
    if major >= 8:
        return "consumer"
    return "generic"


def tiles(device: torch.device) -> Tiles:
    return _TILES[arch(device)]


_SM_COUNT: Dict[int, int] = {}


def target_programs(device: torch.device) -> int:
    """About two waves of programs: enough to fill every SM with some slack."""
    if device.type != "cuda" or interpreting():
        return INTERPRETER_TARGET_PROGRAMS
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return 2 * _SM_COUNT[idx]


def n_bucket(n: int) -> int:
    """Autotune key for the row count: the next power of two (>= 256)."""
    return max(256, triton.next_power_of_2(max(1, n)))


def dot_precision(dtype: torch.dtype) -> str:
    """The ``DOT_PRECISION`` constexpr of the kernels (see :func:`tiles.mma`).

    fp32 inputs follow torch's matmul setting: full fp32 unless the user allowed TF32. Under the
    interpreter bf16 operands are upcast (its bf16 ``tl.dot`` is broken, triton issue #11584).
    """
    if dtype == torch.bfloat16 and interpreting():
        return "upcast"
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


def candidates(kind: str) -> List["triton.Config"]:
    """Autotune candidates for ``kind`` in ("forward", "dz", "gemm").

    The backward's (BLOCK_M, BLOCK_V) is the unit of gradient filtering, shared by the dz kernel
    and both gradient GEMMs (they read its per-tile flags), so it stays at the arch default; only
    the reduction step, the output width and the pipelining are tuned there.
    """
    out = []
    pipelining = ((4, 3), (8, 3), (8, 4))
    if kind == "forward":
        for m, v, k in ((64, 128, 64), (128, 128, 64), (128, 256, 64), (128, 64, 64), (64, 256, 32)):
            out += [triton.Config(dict(BLOCK_M=m, BLOCK_V=v, BLOCK_K=k), num_warps=w, num_stages=s)
                    for w, s in pipelining]
    elif kind == "dz":
        out += [triton.Config(dict(BLOCK_K=k), num_warps=w, num_stages=s) for k in (32, 64, 128)
                for w, s in pipelining]
    else:
        out += [triton.Config(dict(BLOCK_D=d), num_warps=w, num_stages=s) for d in (64, 128, 256)
                for w, s in pipelining]
    return out


def autotuned(kernel, kind: str, key: List[str], restore: Optional[List[str]] = None):
    """``kernel`` wrapped in ``triton.autotune`` when autotuning was asked for, else None."""
    if not AUTOTUNE or interpreting():
        return None
    return triton.autotune(configs=candidates(kind), key=key, restore_value=restore or [])(kernel)
