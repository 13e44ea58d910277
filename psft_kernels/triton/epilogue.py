"""Per-token epilogue kernel: merge the vocabulary splits, then apply the objective.

One program per ``BLOCK`` rows, in row order. It merges the partial states of the splits (with
the same :func:`tiles.combine` the forward uses per tile), turns them into the statistics, and
then computes, exactly as :meth:`psft_kernels.objectives.Objective.terms` does in PyTorch:

    stats:   lse, logp, entropy H, ref_lse, KL (0 where the target is ignored)
    loss:    l_i (sft / dft / psft / asft, minus entropy_coef * H)
    coefs:   g_i = dl/dlogp, e_i = dl/dH, k_i = dl/dKL (per unit of l_i)
    PSFT:    ratio r_i, blocked_high, blocked_low (the clip flags of the stats)

A valid row whose target lies outside ``[0, V)`` never indexes memory (targets are only compared
with column ids); it gets ``logp = loss = NaN`` and zero coefficients, so a bad batch shows up in
the loss instead of silently training on garbage (docs/triton.md, "Target validation").
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .tiles import NEG_BIG, combine

KIND_NONE, KIND_SFT, KIND_DFT, KIND_PSFT, KIND_ASFT = range(5)
KINDS = {None: KIND_NONE, "sft": KIND_SFT, "dft": KIND_DFT, "psft": KIND_PSFT, "asft": KIND_ASFT}
LOG_RATIO_CLAMP = 20.0  # objectives.LOG_RATIO_CLAMP (verl)
BLOCK = 256


@triton.jit
def _head_epilogue_kernel(
    # pointers: inputs
    part_ptr, targets_ptr, old_ptr, adv_ptr,
    # pointers: outputs
    lse_ptr, logp_ptr, ent_ptr, ref_lse_ptr, kl_ptr,
    loss_ptr, g_ptr, e_ptr, k_ptr, ratio_ptr, high_ptr, low_ptr,
    # shapes and strides
    N, V, num_splits, stride_pf, stride_ps, stride_t, ignore_index,
    # objective parameters
    entropy_coef, kl_coef, ratio_low, ratio_high, adv_scalar, log_ratio_clamp, clip_ratio_c,
    # meta-parameters
    KIND: tl.constexpr, HAS_REF: tl.constexpr, KL_FORWARD: tl.constexpr,
    HAS_OLD: tl.constexpr, HAS_ADV: tl.constexpr, HAS_ENTROPY_COEF: tl.constexpr, HAS_KL_COEF: tl.constexpr,
    BLOCK: tl.constexpr, DUAL_CLIP: tl.constexpr = False,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = offs < N
    y = tl.load(targets_ptr + offs * stride_t, mask=in_range, other=ignore_index)
    valid = in_range & (y != ignore_index)
    bad = valid & ((y < 0) | (y >= V))

    m = tl.full((BLOCK,), NEG_BIG, tl.float32)
    s = tl.zeros((BLOCK,), tl.float32)
    t = tl.zeros((BLOCK,), tl.float32)
    zt = tl.zeros((BLOCK,), tl.float32)
    mq = tl.full((BLOCK,), NEG_BIG, tl.float32)
    sq = tl.zeros((BLOCK,), tl.float32)
    a = tl.zeros((BLOCK,), tl.float32)
    for j in range(0, num_splits):
        base = part_ptr + j * stride_ps + offs
        # Rows the forward skipped (ignored) were never written: read a harmless state instead.
        m2 = tl.load(base, mask=valid, other=0.0)
        s2 = tl.load(base + stride_pf, mask=valid, other=1.0)
        t2 = tl.load(base + 2 * stride_pf, mask=valid, other=0.0)
        zt += tl.load(base + 3 * stride_pf, mask=valid, other=0.0)
        mq2 = m2
        sq2 = s2
        a2 = t2
        if HAS_REF:
            mq2 = tl.load(base + 4 * stride_pf, mask=valid, other=0.0)
            sq2 = tl.load(base + 5 * stride_pf, mask=valid, other=1.0)
            a2 = tl.load(base + 6 * stride_pf, mask=valid, other=0.0)
        m, s, t, mq, sq, a = combine(m, s, t, mq, sq, a, m2, s2, t2, mq2, sq2, a2, HAS_REF, KL_FORWARD)

    log_s = tl.log(s)
    # lse in fp64 (exact: the sum of two fp32 numbers), so that the backward forms p from the max and
    # log S, not from an lse rounded to half an ulp of the logits (3e-5 at |z| ~ 1e3).
    lse = tl.where(valid, m.to(tl.float64) + log_s.to(tl.float64), 0.0)
    logp = tl.where(valid, (zt - m) - log_s, 0.0)
    logp = tl.where(bad, float("nan"), logp)
    entropy = tl.where(valid, log_s - t / s, 0.0)
    tl.store(lse_ptr + offs, lse, mask=in_range)
    tl.store(logp_ptr + offs, logp, mask=in_range)
    tl.store(ent_ptr + offs, entropy, mask=in_range)
    kl = tl.zeros((BLOCK,), tl.float32)
    if HAS_REF:
        log_sq = tl.log(sq)
        tl.store(ref_lse_ptr + offs, tl.where(valid, mq + log_sq, 0.0), mask=in_range)
        if KL_FORWARD:
            kl = a / sq - log_sq + log_s
        else:
            kl = a / s - log_s + log_sq
        kl = tl.where(valid, kl, 0.0)
        tl.store(kl_ptr + offs, kl, mask=in_range)

    if KIND != 0:
        # --- objectives.Objective.terms, line for line ---
        if KIND == 1:  # sft
            loss = -logp
            g = tl.full((BLOCK,), -1.0, tl.float32)
        elif KIND == 3:  # psft
            if HAS_OLD:
                old = tl.load(old_ptr + offs, mask=in_range, other=0.0)
                log_ratio = logp - old
            else:  # old = sg(logp): r = 1
                log_ratio = tl.zeros((BLOCK,), tl.float32)
            if HAS_ADV:
                adv = tl.load(adv_ptr + offs, mask=in_range, other=0.0)
            else:
                adv = tl.full((BLOCK,), 0.0, tl.float32) + adv_scalar
            ratio = tl.exp(tl.minimum(tl.maximum(log_ratio, -log_ratio_clamp), log_ratio_clamp))
            clipped = tl.minimum(tl.maximum(ratio, ratio_low), ratio_high)
            loss = tl.maximum(-adv * ratio, -adv * clipped)
            unclipped = tl.where(adv >= 0, ratio <= ratio_high, ratio >= ratio_low)
            flows = unclipped & (tl.abs(log_ratio) <= log_ratio_clamp)
            if DUAL_CLIP:  # verl's clip_ratio_c: A < 0 loses at most -A c; constant (no gradient) for r > c
                dual = (adv < 0) & (ratio > clip_ratio_c)
                loss = tl.where(dual, -adv * clip_ratio_c, loss)
                flows = flows & (dual == 0)
            g = tl.where(flows, -adv * ratio, 0.0)
            blocked = valid & (adv != 0) & (flows == 0)
            tl.store(ratio_ptr + offs, ratio, mask=in_range)
            tl.store(high_ptr + offs, blocked & (ratio > 1.0), mask=in_range)
            tl.store(low_ptr + offs, blocked & (ratio < 1.0), mask=in_range)
        else:  # dft, asft: -sg(p) logp
            p = tl.exp(logp)
            loss = -p * logp
            g = -p
            if KIND == 4:
                loss = loss + kl_coef * kl
                if HAS_KL_COEF:
                    tl.store(k_ptr + offs, tl.where(valid & (bad == 0), kl_coef, 0.0), mask=in_range)
        if HAS_ENTROPY_COEF:
            loss = loss - entropy_coef * entropy
            tl.store(e_ptr + offs, tl.where(valid & (bad == 0), -entropy_coef, 0.0), mask=in_range)
        loss = tl.where(valid, loss, 0.0)
        loss = tl.where(bad, float("nan"), loss)
        g = tl.where(valid & (bad == 0), g, 0.0)
        tl.store(loss_ptr + offs, loss, mask=in_range)
        tl.store(g_ptr + offs, g, mask=in_range)


def head_epilogue(
    part: Tensor,  # (7, S, N) from forward.head_stats
    targets: Tensor,  # (N,)
    *,
    vocab_size: int,
    ignore_index: int,
    has_ref: bool,
    kl_forward: bool,
    kind: Optional[str] = None,
    old_logprobs: Optional[Tensor] = None,  # (N,) fp32
    advantages: Optional[Tensor] = None,  # (N,) fp32; else adv_scalar
    adv_scalar: float = 1.0,
    entropy_coef: float = 0.0,
    kl_coef: float = 0.0,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    clip_ratio_c: float = 0.0,  # > 1: dual clip of negative advantages; 0: off
) -> Dict[str, Optional[Tensor]]:
    """Stats (and, with ``kind``, the objective's per-token terms) of every row, fp32."""
    n = targets.shape[0]
    dev = targets.device
    f32 = lambda: torch.empty(n, dtype=torch.float32, device=dev)  # noqa: E731
    code = KINDS[kind]
    lse = torch.empty(n, dtype=torch.float64, device=dev)  # fp64: see the kernel
    out: Dict[str, Optional[Tensor]] = dict(lse=lse, logp=f32(), entropy=f32(),
                                            ref_lse=f32() if has_ref else None, kl=f32() if has_ref else None)
    has_e = code != KIND_NONE and entropy_coef != 0.0
    has_k = code == KIND_ASFT and kl_coef != 0.0
    is_psft = code == KIND_PSFT
    out.update(
        loss=f32() if code else None, g=f32() if code else None, e=f32() if has_e else None,
        k=f32() if has_k else None, ratio=f32() if is_psft else None,
        blocked_high=torch.empty(n, dtype=torch.bool, device=dev) if is_psft else None,
        blocked_low=torch.empty(n, dtype=torch.bool, device=dev) if is_psft else None,
    )
    dummy = out["logp"]
    ptr = lambda key: out[key] if out[key] is not None else dummy  # noqa: E731
    _head_epilogue_kernel[(triton.cdiv(n, BLOCK),)](
        part, targets, old_logprobs, advantages,
        out["lse"], out["logp"], out["entropy"], ptr("ref_lse"), ptr("kl"),
        ptr("loss"), ptr("g"), ptr("e"), ptr("k"), ptr("ratio"), ptr("blocked_high"), ptr("blocked_low"),
        n, vocab_size, part.shape[1], part.stride(0), part.stride(1), targets.stride(0), ignore_index,
        float(entropy_coef), float(kl_coef), 1.0 - eps_low, 1.0 + eps_high, float(adv_scalar), LOG_RATIO_CLAMP,
        float(clip_ratio_c), DUAL_CLIP=clip_ratio_c > 0,
        KIND=code, HAS_REF=has_ref, KL_FORWARD=kl_forward, HAS_OLD=old_logprobs is not None,
        HAS_ADV=advantages is not None, HAS_ENTROPY_COEF=has_e, HAS_KL_COEF=has_k, BLOCK=BLOCK,
    )
    return out
