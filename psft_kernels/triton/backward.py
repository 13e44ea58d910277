"""Backward kernels: recompute logit tiles, form dz, and the gradient GEMMs, without atomics.

For each vocabulary slice ``[v0, v0 + Vs)`` (``Vs`` about ``config.DZ_SLICE_COLUMNS``, rounded
so the dz launches are whole waves; :func:`slice_width`):

1. ``_head_dz_kernel`` (grid: row blocks x vocabulary tiles of the slice) recomputes the tile
   ``z`` (and ``z'`` for the KL term), forms

       dz = g (onehot - p) + e (-p (log p + H)) + k dKL/dz,   then * (1/T) * (1 - tanh^2) (softcap)

   (METHOD.md, "The gradient, in one line") and stores it, in the input dtype, into an
   ``(N, Vs)`` buffer at the row's *compacted* position, plus one flag per tile saying whether
   the tile carries any gradient. With ``filter_eps`` a tile whose every ``|p - onehot|`` (plus
   ``q`` for the forward-KL term) is below ``filter_eps`` is flagged empty and not stored (Cut
   Cross-Entropy's gradient filtering).
2. ``_grad_hidden_kernel`` (grid: row blocks x D blocks): ``grad_h[rows] (+)= dz @ W[slice]``,
   skipping empty tiles. A program owns its output block and accumulates in fp32 registers; the
   running sum across slices lives in an fp32 ``(N, D)`` buffer, and the last slice writes the
   result, cast, to the rows' original positions.
3. ``_grad_weight_kernel`` (grid: vocabulary tiles x D blocks): ``grad_W[slice] = dz^T @ h`` and
   ``grad_b[slice] = dz.sum(0)``, the loop over all active rows inside one program, in fp32,
   written once, cast. When there are too few output blocks to fill the device and
   ``deterministic=False``, that row loop is split over programs which ``atomic_add`` into an
   fp32 buffer (split-K): the only float atomics anywhere, and ``deterministic=True`` turns them
   off.

With ``config.GRAD_GEMM`` resolving to "torch" (:func:`grad_gemm_backend`), steps 2 and 3 are
``torch.mm`` / ``addmm`` on the dz slice instead (the dz kernel's ``DENSE`` mode writes rows at
their original positions). With filtering, the Triton GEMMs loop over compacted lists of kept
tiles (:func:`kept_lists`), so their loads are unconditional and software-pipelined.

So, without split-K, every output element is written by one program in a fixed order and the
results are bitwise reproducible. Rows whose coefficients are all zero (ignored, PSFT-clipped)
cost nothing: they are compacted away first (:mod:`.rows`).
"""

from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import config
from .rows import compact_rows
from .tiles import NEG_BIG, logit_tile, mma, softcap_with_slope


@triton.jit
def _head_dz_kernel(
    # pointers: model
    h_ptr, w_ptr, b_ptr, hq_ptr, wq_ptr, bq_ptr, targets_ptr,
    # pointers: compaction, per-row statistics and coefficients
    order_ptr, count_ptr, lse_ptr, ent_ptr, ref_lse_ptr, kl_ptr, g_ptr, e_ptr, k_ptr, scale_ptr,
    # pointers: outputs
    dz_ptr, flag_ptr,
    # shapes
    D, DQ, v_start, v_len, n_vtiles, N_BUCKET,
    # strides
    stride_hn, stride_hd, stride_wv, stride_wd,
    stride_qn, stride_qd, stride_qv, stride_qdd,
    stride_t, stride_dz, stride_flag,
    # transform and filtering
    softcap, inv_temperature, filter_eps,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_REF_BIAS: tl.constexpr,
    KL_FORWARD: tl.constexpr, HAS_G: tl.constexpr, HAS_E: tl.constexpr, HAS_K: tl.constexpr,
    HAS_SCALE: tl.constexpr, FILTER: tl.constexpr, DENSE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, REF_DOT_PRECISION: tl.constexpr,
):
    # DENSE: the dz buffer feeds dense GEMMs (torch.mm): rows at their original positions, and a
    # filtered tile is stored as zeros instead of being skipped.
    pid = tl.program_id(0)
    pid_m = pid // n_vtiles
    pid_v = pid % n_vtiles
    count = tl.load(count_ptr)
    start = pid_m * BLOCK_M
    if start >= count:
        return
    idx = (start + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_mask = idx < count
    rows = tl.load(order_ptr + idx, mask=row_mask, other=0)
    y = tl.load(targets_ptr + rows * stride_t, mask=row_mask, other=-1)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)  # fp64 (epilogue): max + log S exactly
    lse_hi = lse.to(tl.float32)
    lse_lo = (lse - lse_hi.to(tl.float64)).to(tl.float32)
    scale = 1.0
    if HAS_SCALE:
        scale = tl.load(scale_ptr)

    local = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    col_mask = local < v_len
    cols = v_start + local.to(tl.int64)
    if HAS_SOFTCAP:  # the raw tile, for the slope of the softcap (tiles.softcap_with_slope)
        x = logit_tile(h_ptr, w_ptr, b_ptr, rows, row_mask, cols, col_mask, D, stride_hn, stride_hd, stride_wv,
                       stride_wd, softcap, 1.0, BLOCK_M, BLOCK_V, BLOCK_K, HAS_BIAS, False, DOT_PRECISION)
        z, dzdx = softcap_with_slope(x, softcap, inv_temperature)
    else:
        z = logit_tile(h_ptr, w_ptr, b_ptr, rows, row_mask, cols, col_mask, D, stride_hn, stride_hd, stride_wv,
                       stride_wd, softcap, inv_temperature, BLOCK_M, BLOCK_V, BLOCK_K, HAS_BIAS, False,
                       DOT_PRECISION)
    # -inf logits (a -inf bias masks tokens out): a finite floor keeps p = 0 and p * log p = 0
    # below, where -inf would give 0 * -inf = NaN.
    z = tl.maximum(z, NEG_BIG)
    log_p = (z - lse_hi[:, None]) - lse_lo[:, None]  # exact first step near the max, unlike z - fp32(lse)
    p = tl.exp(log_p)
    onehot = tl.where(cols[None, :] == y[:, None], 1.0, 0.0)
    dz = tl.zeros((BLOCK_M, BLOCK_V), tl.float32)
    if HAS_G:
        g = tl.load(g_ptr + rows, mask=row_mask, other=0.0) * scale
        dz += g[:, None] * (onehot - p)
    if HAS_E:  # e * dH/dz = e * (-p (log p + H))
        e = tl.load(e_ptr + rows, mask=row_mask, other=0.0) * scale
        entropy = tl.load(ent_ptr + rows, mask=row_mask, other=0.0)
        dz -= e[:, None] * p * (log_p + entropy[:, None])
    magnitude = tl.abs(p - onehot)
    if HAS_K:
        k = tl.load(k_ptr + rows, mask=row_mask, other=0.0) * scale
        zq = logit_tile(hq_ptr, wq_ptr, bq_ptr, rows, row_mask, cols, col_mask, DQ, stride_qn, stride_qd,
                        stride_qv, stride_qdd, softcap, inv_temperature, BLOCK_M, BLOCK_V, BLOCK_K,
                        HAS_REF_BIAS, HAS_SOFTCAP, REF_DOT_PRECISION)
        log_q = tl.maximum(zq, NEG_BIG) - tl.load(ref_lse_ptr + rows, mask=row_mask, other=0.0)[:, None]
        if KL_FORWARD:  # d KL(q||p) / dz = p - q
            q = tl.exp(log_q)
            dz += k[:, None] * (p - q)
            magnitude += q
        else:  # d KL(p||q) / dz = p (log p - log q - KL)
            kl = tl.load(kl_ptr + rows, mask=row_mask, other=0.0)
            dz += k[:, None] * p * (log_p - log_q - kl[:, None])
    tile_mask = row_mask[:, None] & col_mask[None, :]
    dz = tl.where(tile_mask, dz, 0.0)
    if HAS_SOFTCAP:  # z = s tanh(x / s) / T  =>  dz/dx = (1 - tanh^2(x / s)) / T
        dz = dz * dzdx
    else:
        dz = dz * inv_temperature

    if DENSE:
        dz_ptrs = dz_ptr + rows[:, None] * stride_dz + local[None, :]
    else:
        dz_ptrs = dz_ptr + idx[:, None] * stride_dz + local[None, :]
    flag_at = flag_ptr + pid_m * stride_flag + pid_v
    if DENSE:
        if FILTER:
            peak = tl.max(tl.max(tl.where(tile_mask, magnitude, 0.0), 1), 0)
            dz = tl.where(peak >= filter_eps, dz, 0.0)
        tl.store(dz_ptrs, dz.to(dz_ptr.dtype.element_ty), mask=tile_mask)
    elif FILTER:
        peak = tl.max(tl.max(tl.where(tile_mask, magnitude, 0.0), 1), 0)
        keep = peak >= filter_eps
        tl.store(flag_at, keep.to(tl.int8))
        if keep:
            tl.store(dz_ptrs, dz.to(dz_ptr.dtype.element_ty), mask=tile_mask)
    else:
        tl.store(flag_at, 1)
        tl.store(dz_ptrs, dz.to(dz_ptr.dtype.element_ty), mask=tile_mask)


@triton.jit
def _grad_hidden_step(acc, dz_ptr, w_ptr, idx, row_mask, offs_d, d_mask, vt, v_start, v_len, stride_dz, stride_wv,
                      stride_wd, BLOCK_V: tl.constexpr, DOT_PRECISION: tl.constexpr):
    local = vt * BLOCK_V + tl.arange(0, BLOCK_V)
    col_mask = local < v_len
    dz = tl.load(dz_ptr + idx[:, None] * stride_dz + local[None, :], mask=row_mask[:, None] & col_mask[None, :],
                 other=0.0)
    cols = v_start + local.to(tl.int64)
    w = tl.load(w_ptr + cols[:, None] * stride_wv + offs_d[None, :] * stride_wd,
                mask=col_mask[:, None] & d_mask[None, :], other=0.0)
    return mma(dz, w, acc, DOT_PRECISION)


@triton.jit
def _grad_hidden_kernel(
    # pointers
    dz_ptr, kept_ptr, nkept_ptr, w_ptr, order_ptr, count_ptr, acc_ptr, gh_ptr,
    # shapes
    D, v_start, v_len, n_vtiles, N_BUCKET,
    # strides
    stride_dz, stride_kept, stride_wv, stride_wd, stride_acc, stride_ghn, stride_ghd,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    FIRST: tl.constexpr, LAST: tl.constexpr, FILTER: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    n_dblocks = tl.cdiv(D, BLOCK_D)
    pid_m = pid // n_dblocks
    pid_d = pid % n_dblocks
    count = tl.load(count_ptr)
    start = pid_m * BLOCK_M
    if start >= count:
        return
    idx = (start + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_mask = idx < count
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    out_mask = row_mask[:, None] & d_mask[None, :]
    acc_ptrs = acc_ptr + idx[:, None] * stride_acc + offs_d[None, :]
    # The carry of the previous slices, issued before the loop so its latency hides behind it.
    if FIRST:
        acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    else:
        acc = tl.load(acc_ptrs, mask=out_mask, other=0.0)
    if FILTER:
        # Only the kept tiles of this row block, from a compacted list: the loads are
        # unconditional, so the loop is software-pipelined like the exact one.
        n_kept = tl.load(nkept_ptr + pid_m)
        for j in range(0, n_kept):
            vt = tl.load(kept_ptr + pid_m * stride_kept + j)
            acc = _grad_hidden_step(acc, dz_ptr, w_ptr, idx, row_mask, offs_d, d_mask, vt, v_start, v_len,
                                    stride_dz, stride_wv, stride_wd, BLOCK_V, DOT_PRECISION)
    else:
        for vt in range(0, n_vtiles):
            acc = _grad_hidden_step(acc, dz_ptr, w_ptr, idx, row_mask, offs_d, d_mask, vt, v_start, v_len,
                                    stride_dz, stride_wv, stride_wd, BLOCK_V, DOT_PRECISION)
    if LAST:
        rows = tl.load(order_ptr + idx, mask=row_mask, other=0)
        tl.store(gh_ptr + rows[:, None] * stride_ghn + offs_d[None, :] * stride_ghd,
                 acc.to(gh_ptr.dtype.element_ty), mask=out_mask)
    else:
        tl.store(acc_ptrs, acc, mask=out_mask)


@triton.jit
def _grad_weight_step(acc, bias_acc, dz_ptr, h_ptr, order_ptr, count, local, col_mask, offs_d, d_mask, mt,
                      stride_dz, stride_hn, stride_hd, BLOCK_M: tl.constexpr, NEED_W: tl.constexpr,
                      NEED_B: tl.constexpr, DOT_PRECISION: tl.constexpr):
    idx = (mt * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_mask = idx < count
    dz = tl.load(dz_ptr + idx[:, None] * stride_dz + local[None, :], mask=row_mask[:, None] & col_mask[None, :],
                 other=0.0)
    if NEED_W:
        rows = tl.load(order_ptr + idx, mask=row_mask, other=0)
        h = tl.load(h_ptr + rows[:, None] * stride_hn + offs_d[None, :] * stride_hd,
                    mask=row_mask[:, None] & d_mask[None, :], other=0.0)
        acc = mma(tl.trans(dz), h, acc, DOT_PRECISION)
    if NEED_B:
        bias_acc += tl.sum(dz.to(tl.float32), 0)
    return acc, bias_acc


@triton.jit
def _grad_weight_kernel(
    # pointers
    dz_ptr, kept_ptr, nkept_ptr, h_ptr, order_ptr, count_ptr, gw_ptr, gb_ptr,
    # shapes
    D, v_start, v_len, n_vtiles, split_k, N_BUCKET,
    # strides
    stride_dz, stride_kept, stride_hn, stride_hd, stride_gwv, stride_gwd,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    NEED_W: tl.constexpr, NEED_B: tl.constexpr, ATOMIC: tl.constexpr, FILTER: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # With ATOMIC, gw_ptr / gb_ptr are zeroed fp32 buffers of the slice (row 0 = column v_start);
    # otherwise the output tensors themselves.
    pid = tl.program_id(0)
    if NEED_W:
        n_dblocks = tl.cdiv(D, BLOCK_D)
    else:
        n_dblocks = 1
    pid_k = pid % split_k
    pid_vd = pid // split_k
    pid_v = pid_vd // n_dblocks
    pid_d = pid_vd % n_dblocks
    count = tl.load(count_ptr)
    # The row tiles this program reduces over: all active ones, or (FILTER) the kept ones of this
    # vocabulary tile from a compacted list (unconditional, pipelined loads); split-K divides it.
    if FILTER:
        row_tiles = tl.load(nkept_ptr + pid_v)
    else:
        row_tiles = tl.cdiv(count, BLOCK_M)
    per_split = tl.cdiv(row_tiles, split_k)
    first = pid_k * per_split
    last = tl.minimum(first + per_split, row_tiles)

    local = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    col_mask = local < v_len
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    acc = tl.zeros((BLOCK_V, BLOCK_D), tl.float32)
    bias_acc = tl.zeros((BLOCK_V,), tl.float32)
    if FILTER:
        for j in range(first, last):
            mt = tl.load(kept_ptr + pid_v * stride_kept + j)
            acc, bias_acc = _grad_weight_step(acc, bias_acc, dz_ptr, h_ptr, order_ptr, count, local, col_mask,
                                              offs_d, d_mask, mt, stride_dz, stride_hn, stride_hd, BLOCK_M, NEED_W,
                                              NEED_B, DOT_PRECISION)
    else:
        for mt in range(first, last):
            acc, bias_acc = _grad_weight_step(acc, bias_acc, dz_ptr, h_ptr, order_ptr, count, local, col_mask,
                                              offs_d, d_mask, mt, stride_dz, stride_hn, stride_hd, BLOCK_M, NEED_W,
                                              NEED_B, DOT_PRECISION)

    if ATOMIC:
        cols = local.to(tl.int64)
    else:
        cols = v_start + local.to(tl.int64)
    if NEED_W:
        out_ptrs = gw_ptr + cols[:, None] * stride_gwv + offs_d[None, :] * stride_gwd
        out_mask = col_mask[:, None] & d_mask[None, :]
        if ATOMIC:
            tl.atomic_add(out_ptrs, acc, mask=out_mask)
        else:
            tl.store(out_ptrs, acc.to(gw_ptr.dtype.element_ty), mask=out_mask)
    if NEED_B:
        if pid_d == 0:
            if ATOMIC:
                tl.atomic_add(gb_ptr + cols, bias_acc, mask=col_mask)
            else:
                tl.store(gb_ptr + cols, bias_acc.to(gb_ptr.dtype.element_ty), mask=col_mask)


_dz_tuned = config.autotuned(_head_dz_kernel, "dz", key=["D", "DQ", "n_vtiles", "N_BUCKET"])
_grad_hidden_tuned = config.autotuned(_grad_hidden_kernel, "gemm", key=["D", "n_vtiles", "N_BUCKET"],
                                      restore=["acc_ptr", "gh_ptr"])
_grad_weight_tuned = config.autotuned(_grad_weight_kernel, "gemm", key=["D", "n_vtiles", "split_k", "N_BUCKET"],
                                      restore=["gw_ptr", "gb_ptr"])


def _launch(plain, tuned, grid, args, flags, meta):
    """Launch with the arch's fixed meta-parameters, or the autotuned kernel.

    ``grid`` maps the meta-parameters to the program count (a tuned ``BLOCK_D`` changes it).
    """
    if tuned is not None:
        tuned[lambda m: (grid(m),)](*args, **flags)
    else:
        plain[(grid(meta),)](*args, **flags, **meta)


def slice_width(n_rows: int, vocab: int, t: config.Tiles, device: torch.device) -> int:
    """Vocabulary columns per backward slice: about ``config.DZ_SLICE_COLUMNS`` (a width in
    columns, so the slice count does not grow with N), adjusted so the dz launches (row blocks x
    vocabulary tiles of a slice) are whole waves of the device's SMs."""
    return _best_width(triton.cdiv(max(n_rows, 1), t.bwd_m), triton.cdiv(max(vocab, 1), t.bwd_v),
                       max(1, config.DZ_SLICE_COLUMNS // t.bwd_v), config.sm_count(device)) * t.bwd_v


@functools.lru_cache(maxsize=256)
def _best_width(row_blocks: int, vtiles: int, target: int, slots: int) -> int:
    """Tiles per slice in [target / 2, target] filling the most of every dz launch's waves."""
    if vtiles <= target:
        return vtiles
    best, best_eff = target, -1.0
    for w in range(target, max(1, target // 2) - 1, -1):
        full, rest = divmod(vtiles, w)
        launches = [w] * full + ([rest] if rest else [])
        waves = sum(triton.cdiv(row_blocks * x, slots) for x in launches)
        eff = row_blocks * vtiles / (waves * slots)
        if eff > best_eff + 1e-9:
            best, best_eff = w, eff
    return best


def weight_split_k(n_rows: int, vocab: int, dim: int, need_weight: bool, deterministic: bool,
                   device: torch.device, t: Optional[config.Tiles] = None) -> int:
    """Programs sharing one weight-gradient block's row loop (1 = no split-K, no atomics).

    Split only when allowed and the (vocabulary tiles x D blocks) grid of a slice is too small to
    fill the device: small vocabularies (classifier / reward heads) with many rows.
    """
    if deterministic:
        return 1
    t = t or config.tiles(device)
    width = slice_width(n_rows, vocab, t, device)
    programs = triton.cdiv(width, t.bwd_v) * (triton.cdiv(dim, t.bwd_d) if need_weight else 1)
    target = config.target_programs(device)
    if programs >= target:
        return 1
    return max(1, min(triton.cdiv(target, programs), triton.cdiv(n_rows, t.bwd_m)))


def grad_gemm_backend(filter_eps: Optional[float]) -> str:
    """"triton" or "torch" for the two gradient GEMMs (``config.GRAD_GEMM``)."""
    choice = config.GRAD_GEMM
    if choice not in ("auto", "triton", "torch"):
        raise ValueError(f"PSFT_KERNELS_GRAD_GEMM / config.GRAD_GEMM: expected 'auto', 'triton' or 'torch', "
                         f"got {choice!r}")
    if choice == "auto":
        return "torch" if filter_eps is None else "triton"
    return choice


_MM_OUT_DTYPE: Optional[bool] = None


def _addmm_f32(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """``acc += a @ b`` with fp32 accumulation, ``acc`` fp32 and ``a``, ``b`` in the input dtype.

    Half inputs: torch.mm with ``out_dtype=float32`` (cuBLAS, torch >= 2.8) where it exists; else
    upcast (CPU, the interpreter's tests) or, on a GPU without it, one rounding to the input dtype
    per slice. fp32 inputs: addmm in place.
    """
    global _MM_OUT_DTYPE
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
        return
    if a.device.type != "cuda":
        acc.addmm_(a.float(), b.float())
        return
    if _MM_OUT_DTYPE is not False:
        try:
            acc.add_(torch.mm(a, b, out_dtype=torch.float32))
            _MM_OUT_DTYPE = True
            return
        except (TypeError, RuntimeError, NotImplementedError):
            _MM_OUT_DTYPE = False
    acc.add_(torch.mm(a, b))


def kept_lists(flags: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Compacted lists of the kept tiles of a slice, without a host sync: per row block the kept
    vocabulary tiles in ascending order and their count, and per vocabulary tile the kept row
    blocks and their count. The filtered GEMM loops walk these lists with unconditional loads."""
    skipped = (flags == 0).to(torch.int8)
    by_rows = torch.sort(skipped, dim=1, stable=True).indices.to(torch.int32)
    by_cols = torch.sort(skipped.t(), dim=1, stable=True).indices.to(torch.int32)
    return (by_rows, flags.sum(1, dtype=torch.int32), by_cols.contiguous(), flags.sum(0, dtype=torch.int32))


def head_grads(
    hidden: Tensor,  # (N, D)
    weight: Tensor,  # (V, D)
    bias: Optional[Tensor],  # (V,)
    targets: Tensor,  # (N,) int64
    ref_hidden: Optional[Tensor],  # (N, DQ)
    ref_weight: Optional[Tensor],  # (V, DQ)
    ref_bias: Optional[Tensor],  # (V,)
    lse: Tensor,  # (N,) fp32
    entropy: Optional[Tensor],  # (N,) fp32, needed with coef_entropy
    ref_lse: Optional[Tensor],  # (N,) fp32, needed with coef_kl
    kl: Optional[Tensor],  # (N,) fp32, needed with coef_kl (reverse direction)
    coef_logp: Optional[Tensor],  # (N,) fp32
    coef_entropy: Optional[Tensor],  # (N,) fp32
    coef_kl: Optional[Tensor],  # (N,) fp32
    scale: Optional[Tensor],  # (1,) fp32, multiplies every coefficient
    *,
    temperature: float,
    softcap: Optional[float],
    ignore_index: int,
    kl_forward: bool,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
    filter_eps: Optional[float],
    deterministic: bool,
) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """Gradients of ``sum_i scale * (g_i logp_i + e_i H_i + k_i KL_i)`` w.r.t. hidden, weight, bias.

    PyTorch equivalent: ``torch.autograd.grad`` of that sum through materialized logits.
    """
    n, d = hidden.shape
    v = weight.shape[0]
    dev = hidden.device
    has_k = coef_kl is not None
    t = config.tiles(dev, hidden.dtype, ref_hidden.dtype if has_k and ref_hidden is not None else None,
                     heavy=int(has_k) + int(softcap is not None))
    bm, bv = t.bwd_m, t.bwd_v

    # Out-of-range targets never reach a kernel's one-hot (and get no gradient).
    active = (targets != ignore_index) & (targets >= 0) & (targets < v)
    nonzero = None
    for c in (coef_logp, coef_entropy, coef_kl):
        if c is not None:
            nonzero = (c != 0) if nonzero is None else nonzero | (c != 0)
    if nonzero is not None:
        active = active & nonzero
    order, count = compact_rows(active)

    grad_h = torch.zeros_like(hidden) if need_hidden else None
    grad_w = torch.empty_like(weight) if need_weight else None
    grad_b = torch.empty_like(bias) if need_bias else None
    if n == 0 or nonzero is None:
        for g in (grad_w, grad_b):
            if g is not None:
                g.zero_()
        return grad_h, grad_w, grad_b

    dense = grad_gemm_backend(filter_eps) == "torch"
    width = slice_width(n, v, t, dev)
    row_blocks = triton.cdiv(n, bm)
    # dense: rows at their original positions, never-written rows (inactive) must read as 0.
    dz = (torch.zeros if dense else torch.empty)((n, width), dtype=hidden.dtype, device=dev)
    # Zeros: row blocks past the active count are never written and must read as "skipped".
    flags = torch.zeros((row_blocks, triton.cdiv(width, bv)), dtype=torch.int8, device=dev)
    carry = need_hidden and width < v
    acc = torch.zeros((n, d), dtype=torch.float32, device=dev) if carry and dense else \
        torch.empty((n, d), dtype=torch.float32, device=dev) if carry else None

    split_k = 1 if dense else weight_split_k(n, v, d, need_weight, deterministic, dev, t)
    atomic = split_k > 1
    gw_acc = torch.empty((width, d), dtype=torch.float32, device=dev) if atomic and need_weight else None
    gb_acc = torch.empty((width,), dtype=torch.float32, device=dev) if atomic and need_bias else None

    ref = (ref_hidden, ref_weight, ref_bias) if has_k else (hidden, weight, None)
    orz = lambda x: x if x is not None else lse  # noqa: E731  (placeholder pointer, never read)
    precision = config.dot_precision(hidden.dtype)
    filt = filter_eps is not None
    bucket = config.n_bucket(n)

    for v0 in range(0, v, width):
        v_len = min(width, v - v0)
        n_vt = triton.cdiv(v_len, bv)
        _launch(_head_dz_kernel, _dz_tuned, lambda m: row_blocks * n_vt, (
            hidden, weight, bias, ref[0], ref[1], ref[2], targets,
            order, count, lse, orz(entropy), orz(ref_lse), orz(kl), orz(coef_logp), orz(coef_entropy),
            orz(coef_kl), orz(scale),
            dz, flags,
            d, ref[1].shape[1], v0, v_len, n_vt, bucket,
            hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
            ref[0].stride(0), ref[0].stride(1), ref[1].stride(0), ref[1].stride(1),
            targets.stride(0), dz.stride(0), flags.stride(0),
            float(softcap or 1.0), 1.0 / temperature,
            float(filter_eps) if filt else 0.0,
        ), dict(
            BLOCK_M=bm, BLOCK_V=bv, HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None,
            HAS_REF_BIAS=has_k and ref_bias is not None, KL_FORWARD=kl_forward,
            HAS_G=coef_logp is not None, HAS_E=coef_entropy is not None, HAS_K=has_k,
            HAS_SCALE=scale is not None, FILTER=filt, DENSE=dense, DOT_PRECISION=precision,
            REF_DOT_PRECISION=config.dot_precision(ref[0].dtype),
        ), t.dz_meta())

        if dense:
            # The vendor GEMMs on the slice: grad_W[slice] = dz^T h in one GEMM over all rows
            # (fp32 accumulation inside it, written once in the input dtype: no V x D fp32
            # buffer), grad_h (+)= dz W[slice] with an fp32 carry across slices.
            dzs = dz[:, :v_len]
            if need_weight:
                torch.mm(dzs.t(), hidden, out=grad_w[v0:v0 + v_len])
            if need_bias:
                grad_b[v0:v0 + v_len] = dzs.sum(0, dtype=torch.float32)
            if need_hidden:
                if acc is None:
                    torch.mm(dzs, weight[v0:v0 + v_len], out=grad_h)
                else:
                    _addmm_f32(acc, dzs, weight[v0:v0 + v_len])
            continue

        kept_h, nkept_h, kept_w, nkept_w = kept_lists(flags) if filt else (flags, flags, flags, flags)
        if need_hidden:
            _launch(_grad_hidden_kernel, _grad_hidden_tuned, lambda m: row_blocks * triton.cdiv(d, m["BLOCK_D"]), (
                dz, kept_h, nkept_h, weight, order, count, acc if acc is not None else dz, grad_h,
                d, v0, v_len, n_vt, bucket,
                dz.stride(0), kept_h.stride(0), weight.stride(0), weight.stride(1),
                acc.stride(0) if acc is not None else 0, grad_h.stride(0), grad_h.stride(1),
            ), dict(BLOCK_M=bm, BLOCK_V=bv, FIRST=v0 == 0, LAST=v0 + width >= v, FILTER=filt,
                    DOT_PRECISION=precision), t.gemm_meta())

        if need_weight or need_bias:
            out_w, out_b = (gw_acc, gb_acc) if atomic else (grad_w, grad_b)
            for buf in (out_w, out_b) if atomic else ():
                if buf is not None:
                    buf.zero_()
            w_out = out_w if out_w is not None else dz  # placeholder pointer when NEED_W is off
            d_blocks = (lambda m: triton.cdiv(d, m["BLOCK_D"])) if need_weight else (lambda m: 1)
            _launch(_grad_weight_kernel, _grad_weight_tuned, lambda m: n_vt * d_blocks(m) * split_k, (
                dz, kept_w, nkept_w, hidden, order, count, w_out, out_b if out_b is not None else dz,
                d, v0, v_len, n_vt, split_k, bucket,
                dz.stride(0), kept_w.stride(0), hidden.stride(0), hidden.stride(1), w_out.stride(0), w_out.stride(1),
            ), dict(BLOCK_M=bm, BLOCK_V=bv, NEED_W=need_weight, NEED_B=need_bias, ATOMIC=atomic, FILTER=filt,
                    DOT_PRECISION=precision), t.gemm_meta())
            if atomic:
                if need_weight:
                    grad_w[v0:v0 + v_len].copy_(gw_acc[:v_len])
                if need_bias:
                    grad_b[v0:v0 + v_len].copy_(gb_acc[:v_len])
    if dense and acc is not None:
        grad_h.copy_(acc)
    return grad_h, grad_w, grad_b
