"""Triton device functions shared by the forward and backward kernels.

* :func:`logit_tile`: one ``(BLOCK_M, BLOCK_V)`` tile of ``z = softcap(h W^T + b) / T`` in fp32
  registers, ``tl.dot`` over ``D`` in ``BLOCK_K`` steps (PyTorch:
  ``(softcap * tanh((h[rows] @ w[cols].T + b[cols]) / softcap)) / T``).
* :func:`softcap_with_slope`: the softcap of raw logits and its derivative (the backward's chain
  rule takes the raw tile from :func:`logit_tile` with ``HAS_SOFTCAP=False, inv_temperature=1``).
* :func:`combine`: merge two partial streaming states of the log-softmax (and of the KL
  against a reference model). The forward kernel uses it to fold each new vocabulary tile into
  its running state, and the epilogue to merge the states of the vocabulary splits, so the two
  merges cannot drift apart.

A streaming state over a set of columns, per row, is

    m   running max of z               s   = sum exp(z - m)
    t   = sum exp(z - m) (z - m)        (entropy: H = log s - t / s)
    mq, sq: the same max / sum for the reference logits z' (ASFT only)
    a   forward KL: sum exp(z' - mq) ((z' - mq) - (z - m))   -> KL(q||p) = a / sq - log sq + log s
        reverse KL: sum exp(z - m) ((z - m) - (z' - mq))      -> KL(p||q) = a / s - log s + log sq

Every sum is kept relative to the running max, never as ``sum exp * z``: that keeps the entropy
and the KL free of the cancellation ``lse - sum p z`` suffers when logits are large.
"""

import triton
import triton.language as tl

# Start value of a running max. Finite on purpose: ``(m_old - m_new) * s`` with ``s = 0`` must be
# 0, not NaN, in the first merge. Logits below -1e30 are treated as -inf. A constexpr: compiled
# kernels may only read globals that are (the interpreter does not check this).
NEG_BIG = tl.constexpr(-1.0e30)


@triton.jit
def mma(a, b, acc, DOT_PRECISION: tl.constexpr):
    """``acc + a @ b`` in fp32. ``DOT_PRECISION="upcast"``: cast the operands to fp32 first.

    The upcast exists for the interpreter, whose bf16 ``tl.dot`` returns garbage (triton issue
    #11584). Products of bf16 numbers are exact in fp32, so it matches a tensor-core bf16 dot
    with fp32 accumulation up to summation order.
    """
    if DOT_PRECISION == "upcast":
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    return out


@triton.jit
def tanh(x):
    # tl has no tanh on every Triton version / the interpreter. exp(-2|x|) never overflows; the
    # absolute error is a few fp32 ulps of 1, i.e. a few ulps of the softcap in logit units.
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def softcap_with_slope(x, softcap, inv_temperature):
    """``z = s tanh(x / s) / T`` and its slope ``dz/dx = (1 - tanh^2(x / s)) / T`` from the raw logit
    ``x``: ``1 - tanh^2 = 4 e / (1 + e)^2`` with ``e = exp(-2|x / s|)`` is accurate to a few ulps
    relative, where ``1 - tanh^2`` from a ``tanh`` within an ulp of +-1 would keep nothing. ``z`` is
    bit-identical to :func:`logit_tile`'s."""
    u = x / softcap
    e = tl.exp(-2.0 * tl.abs(u))
    t = (1.0 - e) / (1.0 + e)
    t = tl.where(u < 0, -t, t)
    d = 1.0 + e
    return (softcap * t) * inv_temperature, (4.0 * inv_temperature) * e / (d * d)


@triton.jit
def logit_tile(
    # pointers
    h_ptr, w_ptr, b_ptr,
    # which rows / columns (int64 ids) and their masks
    rows, row_mask, cols, col_mask,
    # shapes and strides
    D, stride_hn, stride_hd, stride_wv, stride_wd,
    # transform
    softcap, inv_temperature,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    offs_k = tl.arange(0, BLOCK_K)
    # int64 row / column ids: row * stride and col * stride cannot overflow at N*D, V*D > 2^31.
    h_ptrs = h_ptr + rows[:, None] * stride_hn + offs_k[None, :] * stride_hd
    w_ptrs = w_ptr + cols[None, :] * stride_wv + offs_k[:, None] * stride_wd
    acc = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
    for k in range(0, tl.cdiv(D, BLOCK_K)):
        k_mask = offs_k < D - k * BLOCK_K
        h = tl.load(h_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        acc = mma(h, w, acc, DOT_PRECISION)
        h_ptrs += BLOCK_K * stride_hd
        w_ptrs += BLOCK_K * stride_wd
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_SOFTCAP:
        acc = softcap * tanh(acc / softcap)
    return acc * inv_temperature


@triton.jit
def combine(m, s, t, mq, sq, a, m2, s2, t2, mq2, sq2, a2, HAS_REF: tl.constexpr, KL_FORWARD: tl.constexpr):
    """Merge state 2 into state 1 (all arguments are per-row vectors); returns the merged state."""
    m_new = tl.maximum(m, m2)
    d1 = m - m_new  # <= 0
    d2 = m2 - m_new
    c1 = tl.exp(d1)
    c2 = tl.exp(d2)
    s_new = s * c1 + s2 * c2
    # sum e^{z - m_new}(z - m_new) = c (t + (m - m_new) s) for each side
    t_new = c1 * (t + d1 * s) + c2 * (t2 + d2 * s2)
    if HAS_REF:
        mq_new = tl.maximum(mq, mq2)
        dq1 = mq - mq_new
        dq2 = mq2 - mq_new
        cq1 = tl.exp(dq1)
        cq2 = tl.exp(dq2)
        sq_new = sq * cq1 + sq2 * cq2
        # Each term of a is weighted by the side's exp and holds (z' - mq) - (z - m) (forward) or
        # (z - m) - (z' - mq) (reverse); re-basing both maxes shifts it by dq - d (or d - dq).
        if KL_FORWARD:
            a_new = cq1 * (a + (dq1 - d1) * sq) + cq2 * (a2 + (dq2 - d2) * sq2)
        else:
            a_new = c1 * (a + (d1 - dq1) * s) + c2 * (a2 + (d2 - dq2) * s2)
    else:
        mq_new = mq
        sq_new = sq
        a_new = a
    return m_new, s_new, t_new, mq_new, sq_new, a_new
