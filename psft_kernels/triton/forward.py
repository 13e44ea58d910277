"""Forward streaming kernel: per-row log-softmax statistics without the (N, V) logits.

A program owns ``BLOCK_M`` active rows and one contiguous range of vocabulary tiles (a
*split*; one split covers all of V unless there are too few row blocks to fill the device).
For each tile it forms ``z = softcap(h W^T + b) / T`` in fp32 registers (``tl.dot`` over D),
and for ASFT the reference model's tile ``z'`` in the same iteration, then folds the tile into
its running state with :func:`tiles.combine` (running max, sum of exp, centred sum of exp*z,
the target's logit, and what the KL needs). Each split writes its state to a ``(7, S, N)``
partial buffer; :mod:`.epilogue` merges the splits and applies the objective.

PyTorch equivalent of the result (per active row): ``z = logits(h, W, b)``;
``m = z.max(-1)``, ``s = exp(z - m).sum(-1)``, ``t = (exp(z - m) * (z - m)).sum(-1)``,
``zt = z.gather(-1, y)`` (0 if ``y`` is outside the split).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import config
from .tiles import NEG_BIG, combine, logit_tile

NUM_FIELDS = 7  # m, s, t, zt, mq, sq, a
F_M, F_S, F_T, F_ZT, F_MQ, F_SQ, F_A = range(NUM_FIELDS)


@triton.jit
def _head_stats_kernel(
    # pointers
    h_ptr, w_ptr, b_ptr, hq_ptr, wq_ptr, bq_ptr, targets_ptr, order_ptr, count_ptr, part_ptr,
    # shapes
    V, D, DQ, num_splits, N_BUCKET,
    # strides
    stride_hn, stride_hd, stride_wv, stride_wd,
    stride_qn, stride_qd, stride_qv, stride_qdd,
    stride_t, stride_pf, stride_ps,
    # transform
    softcap, inv_temperature,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_REF: tl.constexpr, HAS_REF_BIAS: tl.constexpr, KL_FORWARD: tl.constexpr,
    DOT_PRECISION: tl.constexpr, REF_DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_m = pid // num_splits
    split = pid % num_splits
    count = tl.load(count_ptr)
    start = pid_m * BLOCK_M
    if start >= count:  # only inactive (ignored) rows left: no work
        return
    idx = start + tl.arange(0, BLOCK_M)
    row_mask = idx < count
    rows = tl.load(order_ptr + idx, mask=row_mask, other=0)  # int64 row ids
    y = tl.load(targets_ptr + rows * stride_t, mask=row_mask, other=-1)

    m = tl.full((BLOCK_M,), NEG_BIG, tl.float32)
    s = tl.zeros((BLOCK_M,), tl.float32)
    t = tl.zeros((BLOCK_M,), tl.float32)
    zt = tl.zeros((BLOCK_M,), tl.float32)
    mq = tl.full((BLOCK_M,), NEG_BIG, tl.float32)
    sq = tl.zeros((BLOCK_M,), tl.float32)
    a = tl.zeros((BLOCK_M,), tl.float32)

    n_tiles = tl.cdiv(V, BLOCK_V)
    # Balanced ranges: split j covers tiles [j T / S, (j + 1) T / S), never an empty one.
    first = (split * n_tiles) // num_splits
    last = ((split + 1) * n_tiles) // num_splits
    for tile in range(first, last):
        cols = (tile * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
        col_mask = cols < V
        z = logit_tile(h_ptr, w_ptr, b_ptr, rows, row_mask, cols, col_mask, D, stride_hn, stride_hd, stride_wv,
                       stride_wd, softcap, inv_temperature, BLOCK_M, BLOCK_V, BLOCK_K, HAS_BIAS, HAS_SOFTCAP,
                       DOT_PRECISION)
        # Finite filler, not -inf, for padding columns and -inf logits (a -inf bias): exp(filler -
        # max) is 0 and 0 * (filler - max) is 0, not NaN; a tile of nothing but filler gets
        # m2 = NEG_BIG, which every finite tile's merge then wipes out (combine).
        z = tl.where(col_mask[None, :], tl.maximum(z, NEG_BIG), NEG_BIG)
        zt += tl.sum(tl.where(cols[None, :] == y[:, None], z, 0.0), 1)
        m2 = tl.max(z, 1)
        zc = z - m2[:, None]
        e = tl.exp(zc)
        s2 = tl.sum(e, 1)
        t2 = tl.sum(e * zc, 1)
        mq2 = m2
        sq2 = s2
        a2 = t2
        if HAS_REF:
            zq = logit_tile(hq_ptr, wq_ptr, bq_ptr, rows, row_mask, cols, col_mask, DQ, stride_qn, stride_qd,
                            stride_qv, stride_qdd, softcap, inv_temperature, BLOCK_M, BLOCK_V, BLOCK_K,
                            HAS_REF_BIAS, HAS_SOFTCAP, REF_DOT_PRECISION)
            zq = tl.where(col_mask[None, :], tl.maximum(zq, NEG_BIG), NEG_BIG)
            mq2 = tl.max(zq, 1)
            zqc = zq - mq2[:, None]
            eq = tl.exp(zqc)
            sq2 = tl.sum(eq, 1)
            if KL_FORWARD:
                a2 = tl.sum(eq * (zqc - zc), 1)
            else:
                a2 = tl.sum(e * (zc - zqc), 1)
        m, s, t, mq, sq, a = combine(m, s, t, mq, sq, a, m2, s2, t2, mq2, sq2, a2, HAS_REF, KL_FORWARD)

    base = part_ptr + split.to(tl.int64) * stride_ps + rows
    tl.store(base + 0 * stride_pf, m, mask=row_mask)
    tl.store(base + 1 * stride_pf, s, mask=row_mask)
    tl.store(base + 2 * stride_pf, t, mask=row_mask)
    tl.store(base + 3 * stride_pf, zt, mask=row_mask)
    if HAS_REF:
        tl.store(base + 4 * stride_pf, mq, mask=row_mask)
        tl.store(base + 5 * stride_pf, sq, mask=row_mask)
        tl.store(base + 6 * stride_pf, a, mask=row_mask)


_head_stats_tuned = config.autotuned(_head_stats_kernel, "forward", key=["D", "DQ", "V", "N_BUCKET"])


def num_splits(n_rows: int, vocab: int, device: torch.device, t: Optional[config.Tiles] = None) -> int:
    """Vocabulary splits S for whole waves: the grid (row blocks x S programs, each over about
    1/S of the vocabulary tiles) should keep the device's program slots (SMs x programs per SM)
    busy to the end. The fewest splits within 95% of a perfect fill, else the best fill."""
    t = t or config.tiles(device)
    return _best_splits(triton.cdiv(max(n_rows, 1), t.fwd_m), triton.cdiv(max(vocab, 1), t.fwd_v),
                        config.sm_count(device) * t.fwd_occ)


@functools.lru_cache(maxsize=256)
def _best_splits(row_blocks: int, vtiles: int, slots: int) -> int:
    best, best_eff = 1, 0.0
    for s in range(1, min(vtiles, 16 * slots) + 1):
        eff = config.wave_efficiency(row_blocks * s, slots, row_blocks * vtiles, triton.cdiv(vtiles, s))
        if eff >= 0.95:
            return s
        if eff > best_eff + 1e-9:
            best, best_eff = s, eff
    return best


def head_stats(
    hidden: Tensor,  # (N, D)
    weight: Tensor,  # (V, D)
    bias: Optional[Tensor],  # (V,)
    targets: Tensor,  # (N,) int64
    order: Tensor,  # (N,) int64, active rows first
    count: Tensor,  # (1,) int32
    ref_hidden: Optional[Tensor],  # (N, DQ)
    ref_weight: Optional[Tensor],  # (V, DQ)
    ref_bias: Optional[Tensor],  # (V,)
    *,
    temperature: float,
    softcap: Optional[float],
    kl_forward: bool,
) -> Tensor:
    """Launch the streaming kernel; returns the ``(7, S, N)`` fp32 partial states (S splits).

    Rows not in ``order[:count]`` are left unwritten (the epilogue masks them).
    """
    n, d = hidden.shape
    v = weight.shape[0]
    has_ref = ref_weight is not None
    t = config.tiles(hidden.device, hidden.dtype, ref_hidden.dtype if has_ref else None, ref=has_ref)
    splits = num_splits(n, v, hidden.device, t)
    part = torch.empty((NUM_FIELDS, splits, n), dtype=torch.float32, device=hidden.device)
    dq = ref_weight.shape[1] if has_ref else 1
    ref = (ref_hidden, ref_weight, ref_bias) if has_ref else (hidden, weight, None)
    args = (
        hidden, weight, bias, ref[0], ref[1], ref[2], targets, order, count, part,
        v, d, dq, splits, config.n_bucket(n),
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
        ref[0].stride(0), ref[0].stride(1), ref[1].stride(0), ref[1].stride(1),
        targets.stride(0), part.stride(0), part.stride(1),
        float(softcap or 1.0), 1.0 / temperature,
    )
    flags = dict(
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, HAS_REF=has_ref,
        HAS_REF_BIAS=has_ref and ref_bias is not None, KL_FORWARD=kl_forward,
        DOT_PRECISION=config.dot_precision(hidden.dtype), REF_DOT_PRECISION=config.dot_precision(ref[0].dtype),
    )
    if _head_stats_tuned is not None:
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_M"]) * splits,)  # noqa: E731
        _head_stats_tuned[grid](*args, **flags)
    else:
        meta = t.forward_meta()
        grid = (triton.cdiv(n, meta["BLOCK_M"]) * splits,)
        _head_stats_kernel[grid](*args, **flags, **meta)
    return part
