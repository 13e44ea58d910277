"""Launch configurations: one fixed, reasonable default per GPU architecture, autotuning on request.

Defaults are chosen, not tuned: no GPU was available when they were written (see docs/triton.md,
"Launch configurations"). ``PSFT_KERNELS_AUTOTUNE=1`` (read when ``psft_kernels.triton`` is
imported) wraps each kernel in ``triton.autotune`` over a small candidate list; its cache key
uses the problem's ``D``, ``V`` and the row count rounded up to a power of two (``N_BUCKET``), so a
new batch size within the same bucket never re-tunes. The interpreter never autotunes.

Other knobs (module attributes, so tests can shrink them):

* ``DZ_SLICE_COLUMNS``: the backward materializes ``dz`` for one vocabulary slice of all active
  rows at a time, about this many columns wide (rounded so its launches are whole waves).
* ``GRAD_GEMM``: Triton kernels or torch.mm for the two gradient GEMMs.
* ``sm_count`` / ``Tiles.fwd_occ``: the program slots a launch fills; the forward's vocabulary
  splits and the backward's slice width are chosen for whole waves of them, and the weight-
  gradient GEMM splits its row loop (split-K, only when ``deterministic=False``) when its grid
  is below ``target_programs``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Dict, List, Optional

import torch
import triton

AUTOTUNE = os.environ.get("PSFT_KERNELS_AUTOTUNE", "0") == "1"
# Vocabulary columns per backward slice (before rounding to whole waves): a fixed width, so the
# number of slices and with it the fp32 grad_h carry traffic (8 N D bytes per slice) grow with V,
# not with N; the dz buffer is N x width in the input dtype (256 MiB at N=8192 in bf16).
DZ_SLICE_COLUMNS = 16384
# Who computes the two gradient GEMMs from the dz slice: "triton" (the kernels of backward.py,
# which skip filtered tiles), "torch" (torch.mm / addmm: cuBLAS on a GPU), or "auto": torch in
# the exact mode, Triton with filtering (the only mode where its tile skipping saves work).
# PSFT_KERNELS_GRAD_GEMM overrides; the benchmark on a GPU decides the default.
GRAD_GEMM = os.environ.get("PSFT_KERNELS_GRAD_GEMM", "auto")
# Under the interpreter programs run one after another: more of them only costs time.
INTERPRETER_TARGET_PROGRAMS = 1


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass(frozen=True)
class Tiles:
    """Tile sizes of the three kernel families.

    forward: ``fwd_m`` rows x ``fwd_v`` vocabulary columns per tile, ``fwd_k`` of D per ``tl.dot``.
    backward: ``bwd_m`` x ``bwd_v`` tiles of dz (the unit of gradient filtering); the gradient
    GEMMs produce ``bwd_d``-wide column blocks of D. ``gemm_stages`` is their pipeline depth (a
    stage holds a dz tile and a ``bwd_v x bwd_d`` / ``bwd_m x bwd_d`` operand tile).
    ``fwd_occ``: programs of the forward kernel one SM holds (from the compiled registers and
    shared memory; tests/test_triton_budget.py checks it), which sizes the vocabulary splits.
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
    gemm_stages: int = 0  # 0: bwd_stages
    fwd_occ: int = 1

    def forward_meta(self) -> Dict[str, int]:
        return dict(BLOCK_M=self.fwd_m, BLOCK_V=self.fwd_v, BLOCK_K=self.fwd_k, num_warps=self.fwd_warps,
                    num_stages=self.fwd_stages)

    def dz_meta(self) -> Dict[str, int]:
        return dict(BLOCK_K=self.bwd_k, num_warps=self.bwd_warps, num_stages=self.bwd_stages)

    def gemm_meta(self) -> Dict[str, int]:
        return dict(BLOCK_D=self.bwd_d, num_warps=self.bwd_warps, num_stages=self.gemm_stages or self.bwd_stages)


# Configurations per (architecture, operand precision). Shared memory per pipeline stage is
# (rows + cols) * K * element bytes for the logit tiles and (bwd_m + bwd_d) * bwd_v * bytes for
# grad_hidden (its reduction step is a whole dz tile); the per-block limits are 232,448 B (sm_90),
# 166,912 B (sm_80) and 101,376 B (sm_86 / sm_89). Three operand precisions:
#   "half": bf16 / fp16 on tensor cores (wgmma on sm_90, mma.sync on sm_8x);
#   "tf32": fp32 operands (4 bytes) on tensor cores: half the K per stage or fewer stages;
#   "ieee": fp32 FMA (no tensor cores, torch's default "highest" precision): the accumulator and
#           the operand fragments live in registers, so only small tiles avoid spilling.
# Not tuned on a GPU (none was available); each fits its budget by construction and by
# tests/test_triton_budget.py, which compiles every variant for sm_80 / sm_89 / sm_90.
_TILES = {
    ("hopper", "half"): Tiles(128, 128, 64, 8, 3, 128, 128, 64, 128, 8, 3),
    ("hopper", "tf32"): Tiles(128, 128, 32, 8, 3, 128, 64, 32, 128, 8, 3, gemm_stages=2),
    ("hopper", "ieee"): Tiles(64, 64, 32, 4, 3, 64, 64, 32, 64, 4, 3, fwd_occ=2),
    ("ampere", "half"): Tiles(128, 128, 32, 8, 3, 128, 128, 32, 128, 8, 3),
    ("ampere", "tf32"): Tiles(128, 128, 16, 8, 3, 128, 64, 16, 64, 8, 3),
    ("ampere", "ieee"): Tiles(64, 64, 32, 4, 3, 64, 64, 32, 64, 4, 3, fwd_occ=2),
    ("consumer", "half"): Tiles(64, 128, 32, 4, 3, 64, 128, 32, 64, 4, 3, fwd_occ=2),
    ("consumer", "tf32"): Tiles(64, 128, 16, 4, 3, 64, 64, 16, 64, 4, 3, fwd_occ=2),
    ("consumer", "ieee"): Tiles(64, 64, 32, 4, 3, 64, 64, 32, 64, 4, 3, fwd_occ=2),
    ("generic", "half"): Tiles(64, 64, 32, 4, 2, 64, 64, 32, 64, 4, 2),
    # The interpreter pays per program and per op, not per flop: big tiles, few programs.
    ("interpreter", "half"): Tiles(64, 128, 64, 4, 1, 64, 128, 64, 64, 4, 1),
}


def arch(device: torch.device) -> str:
    if device.type != "cuda" or interpreting():
        return "interpreter" if interpreting() else "generic"
    major, minor = torch.cuda.get_device_capability(device)
    return arch_of_capability(major, minor)


def arch_of_capability(major: int, minor: int) -> str:
    """The tile table of a compute capability: Hopper / datacenter Blackwell have ~227 KiB of
    shared memory per block, A100 ~163 KiB, consumer parts (sm_86, sm_89, sm_120) ~99 KiB."""
    if major in (9, 10, 11):
        return "hopper"
    if (major, minor) in ((8, 0), (8, 7)):
        return "ampere"
    if major >= 8:
        return "consumer"
    return "generic"


def precision_class(dtype: Optional[torch.dtype]) -> str:
    """"half", "tf32" or "ieee": which operand width and unit a dot of this input dtype uses."""
    if dtype is None or dtype in (torch.bfloat16, torch.float16):
        return "half"
    return "tf32" if dot_precision(dtype) == "tf32" else "ieee"


_WIDTH = {"half": 0, "tf32": 1, "ieee": 2}


def tiles(device: torch.device, *dtypes: Optional[torch.dtype], ref: bool = False, heavy: int = 0) -> Tiles:
    """The launch configuration for ``device`` and operands of ``dtypes`` (the policy's and, for
    ASFT, the reference's): the widest precision decides. No dtype: half precision.

    ``ref``: the forward also forms the reference model's tile (two fp32 accumulators live at
    once): half the rows. ``heavy``: how many extra tiles the dz kernel keeps live (a KL term's
    reference tile, the softcap's slope): 1 halves the vocabulary columns, 2 also the rows. They
    keep the tiles from spilling at 255 registers (tests/test_triton_budget.py checks it; with
    both a KL term and a softcap, 128 x 64 still spilled 24 B under Triton 3.6).
    """
    a = arch(device)
    prec = max((precision_class(d) for d in dtypes if d is not None), key=_WIDTH.__getitem__, default="half")
    t = _TILES.get((a, prec), _TILES[(a, "half")])
    if a == "interpreter":
        return t
    if ref and t.fwd_m >= 128:
        t = replace(t, fwd_m=t.fwd_m // 2)
    if heavy >= 1 and t.bwd_v >= 128:
        t = replace(t, bwd_v=t.bwd_v // 2)
    if heavy >= 2 and t.bwd_m >= 128:
        t = replace(t, bwd_m=t.bwd_m // 2)
    return t


_SM_COUNT: Dict[int, int] = {}


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of the device (1 under the interpreter, which runs programs one
    after another: more of them only costs time)."""
    if device.type != "cuda" or interpreting():
        return INTERPRETER_TARGET_PROGRAMS
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def target_programs(device: torch.device) -> int:
    """About two waves of programs: enough to fill every SM with some slack (split-K's target)."""
    return 2 * sm_count(device)


def wave_efficiency(programs: int, slots: int, work: int = 1, longest: int = 1) -> float:
    """Share of the device's program slots doing useful work when ``programs`` programs, the
    longest of which runs ``longest`` units and all together ``work`` units (default: all equal),
    run ``slots`` at a time: whole waves only, each as long as its longest program."""
    if programs <= 0:
        return 1.0
    waves = -(-programs // max(1, slots))
    return (work if work > 1 else programs) / (waves * max(1, slots) * max(1, longest))


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
