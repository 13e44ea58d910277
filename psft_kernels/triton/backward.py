"""Backward kernels: recompute logit tiles, form dz, and the gradient GEMMs, without atomics.

For each vocabulary slice ``[v0, v0 + Vs)`` (``Vs`` chosen so that the slice's dz buffer stays
within ``config.DZ_SLICE_BYTES``):

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

So, without split-K, every output element is written by one program in a fixed order and the
results are bitwise reproducible. Rows whose coefficients are all zero (ignored, PSFT-clipped)
cost nothing: they are compacted away first (:mod:`.rows`).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import config
from .rows import compact_rows
from .tiles import logit_tile, mma, softcap_with_slope


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
    HAS_SCALE: tl.constexpr, FILTER: tl.constexpr,
    DOT_PRECISION: tl.constexpr, REF_DOT_PRECISION: tl.constexpr,
):
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
        log_q = zq - tl.load(ref_lse_ptr + rows, mask=row_mask, other=0.0)[:, None]
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

    dz_ptrs = dz_ptr + idx[:, None] * stride_dz + local[None, :]
    flag_at = flag_ptr + pid_m * stride_flag + pid_v
    if FILTER:
        peak = tl.max(tl.max(tl.where(tile_mask, magnitude, 0.0), 1), 0)
        keep = peak >= filter_eps
        tl.store(flag_at, keep.to(tl.int8))
        if keep:
            tl.store(dz_ptrs, dz.to(dz_ptr.dtype.element_ty), mask=tile_mask)
    else:
        tl.store(flag_at, 1)
        tl.store(dz_ptrs, dz.to(dz_ptr.dtype.element_ty), mask=tile_mask)


@triton.jit
def _grad_hidden_kernel(
    # pointers
    dz_ptr, flag_ptr, w_ptr, order_ptr, count_ptr, acc_ptr, gh_ptr,
    # shapes
    D, v_start, v_len, n_vtiles, N_BUCKET,
    # strides
    stride_dz, stride_flag, stride_wv, stride_wd, stride_acc, stride_ghn, stride_ghd,
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
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for vt in range(0, n_vtiles):
        if FILTER:
            keep = tl.load(flag_ptr + pid_m * stride_flag + vt) != 0
        else:
            keep = True
        if keep:
            local = vt * BLOCK_V + tl.arange(0, BLOCK_V)
            col_mask = local < v_len
            dz = tl.load(dz_ptr + idx[:, None] * stride_dz + local[None, :],
                         mask=row_mask[:, None] & col_mask[None, :], other=0.0)
            cols = v_start + local.to(tl.int64)
            w = tl.load(w_ptr + cols[:, None] * stride_wv + offs_d[None, :] * stride_wd,
                        mask=col_mask[:, None] & d_mask[None, :], other=0.0)
            acc = mma(dz, w, acc, DOT_PRECISION)
    out_mask = row_mask[:, None] & d_mask[None, :]
    acc_ptrs = acc_ptr + idx[:, None] * stride_acc + offs_d[None, :]
    if not FIRST:
        acc += tl.load(acc_ptrs, mask=out_mask, other=0.0)
    if LAST:
        rows = tl.load(order_ptr + idx, mask=row_mask, other=0)
        tl.store(gh_ptr + rows[:, None] * stride_ghn + offs_d[None, :] * stride_ghd,
                 acc.to(gh_ptr.dtype.element_ty), mask=out_mask)
    else:
        tl.store(acc_ptrs, acc, mask=out_mask)


@triton.jit
def _grad_weight_kernel(
    # pointers
    dz_ptr, flag_ptr, h_ptr, order_ptr, count_ptr, gw_ptr, gb_ptr,
    # shapes
    D, v_start, v_len, n_vtiles, split_k, N_BUCKET,
    # strides
    stride_dz, stride_flag, stride_hn, stride_hd, stride_gwv, stride_gwd,
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
    for mt in range(first, last):
        if FILTER:
            keep = tl.load(flag_ptr + mt * stride_flag + pid_v) != 0
        else:
            keep = True
        if keep:
            idx = (mt * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
            row_mask = idx < count
            dz = tl.load(dz_ptr + idx[:, None] * stride_dz + local[None, :],
                         mask=row_mask[:, None] & col_mask[None, :], other=0.0)
            if NEED_W:
                rows = tl.load(order_ptr + idx, mask=row_mask, other=0)
                h = tl.load(h_ptr + rows[:, None] * stride_hn + offs_d[None, :] * stride_hd,
                            mask=row_mask[:, None] & d_mask[None, :], other=0.0)
                acc = mma(tl.trans(dz), h, acc, DOT_PRECISION)
            if NEED_B:
                bias_acc += tl.sum(dz.to(tl.float32), 0)

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


def slice_width(n_rows: int, vocab: int, elem_bytes: int, block_v: int) -> int:
    """Vocabulary columns per backward slice: the ``(N, Vs)`` dz buffer within DZ_SLICE_BYTES."""
    cols = config.DZ_SLICE_BYTES // max(1, n_rows * elem_bytes)
    cols = max(block_v, cols // block_v * block_v)
    return min(cols, triton.cdiv(vocab, block_v) * block_v)


def weight_split_k(n_rows: int, vocab: int, dim: int, elem_bytes: int, need_weight: bool, deterministic: bool,
                   device: torch.device) -> int:
    """Programs sharing one weight-gradient block's row loop (1 = no split-K, no atomics).

    Split only when allowed and the (vocabulary tiles x D blocks) grid of a slice is too small to
    fill the device: small vocabularies (classifier / reward heads) with many rows.
    """
    if deterministic:
        return 1
    t = config.tiles(device)
    width = slice_width(n_rows, vocab, elem_bytes, t.bwd_v)
    programs = triton.cdiv(width, t.bwd_v) * (triton.cdiv(dim, t.bwd_d) if need_weight else 1)
    target = config.target_programs(device)
    if programs >= target:
        return 1
    return max(1, min(triton.cdiv(target, programs), triton.cdiv(n_rows, t.bwd_m)))


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
    t = config.tiles(dev)
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

    width = slice_width(n, v, hidden.element_size(), bv)
    row_blocks = triton.cdiv(n, bm)
    dz = torch.empty((n, width), dtype=hidden.dtype, device=dev)
    flags = torch.empty((row_blocks, triton.cdiv(width, bv)), dtype=torch.int8, device=dev)
    acc = torch.empty((n, d), dtype=torch.float32, device=dev) if need_hidden and width < v else None

    split_k = weight_split_k(n, v, d, hidden.element_size(), need_weight, deterministic, dev)
    atomic = split_k > 1
    gw_acc = torch.empty((width, d), dtype=torch.float32, device=dev) if atomic and need_weight else None
    gb_acc = torch.empty((width,), dtype=torch.float32, device=dev) if atomic and need_bias else None

    has_k = coef_kl is not None
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
            HAS_SCALE=scale is not None, FILTER=filt, DOT_PRECISION=precision,
            REF_DOT_PRECISION=config.dot_precision(ref[0].dtype),
        ), t.dz_meta())

        if need_hidden:
            _launch(_grad_hidden_kernel, _grad_hidden_tuned, lambda m: row_blocks * triton.cdiv(d, m["BLOCK_D"]), (
                dz, flags, weight, order, count, acc if acc is not None else dz, grad_h,
                d, v0, v_len, n_vt, bucket,
                dz.stride(0), flags.stride(0), weight.stride(0), weight.stride(1),
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
                dz, flags, hidden, order, count, w_out, out_b if out_b is not None else dz,
                d, v0, v_len, n_vt, split_k, bucket,
                dz.stride(0), flags.stride(0), hidden.stride(0), hidden.stride(1), w_out.stride(0), w_out.stride(1),
            ), dict(BLOCK_M=bm, BLOCK_V=bv, NEED_W=need_weight, NEED_B=need_bias, ATOMIC=atomic, FILTER=filt,
                    DOT_PRECISION=precision), t.gemm_meta())
            if atomic:
                if need_weight:
                    grad_w[v0:v0 + v_len].copy_(gw_acc[:v_len])
                if need_bias:
                    grad_b[v0:v0 + v_len].copy_(gb_acc[:v_len])
    return grad_h, grad_w, grad_b
