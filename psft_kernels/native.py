"""The native CPU backend: the chunked algorithm with a compiled, multi-threaded epilogue.

Same contract and same chunk loop as :class:`psft_kernels.chunked.ChunkedBackend`; what changes
is the work per ``(rows x V)`` logit block between the GEMMs (which stay in ATen):

* forward: one kernel call (``csrc/psft_native.cpp``, ``stats``) applies softcap / temperature in
  place and reduces each row to ``lse``, ``logp``, ``H`` (and ``lse'``, ``KL``) in two passes
  that stay in the core's cache, instead of about ten PyTorch ops over the whole block;
* gradient: for the plain case (no softcap, entropy or KL term) the ``stats`` pass leaves
  ``E = exp(z - rowmax)`` in the block, and ``dx = a E + onehot(y) g / T`` with a per-row ``a``
  is never formed: ``dx W = a (E W) + g / T W[y]`` and ``dx^T h = E^T (a h) + scatter(y, g h / T)``,
  so the gradient costs the two GEMMs and O(rows x D) extra work. Otherwise one ``dlogits`` pass
  writes ``dx`` over the block;
* the logit blocks are preallocated once per call and reused across chunks (no page faults).

The library is compiled on first use (:mod:`psft_kernels._native_build`); if that fails the
backend warns once and runs the chunked code. PyTorch equivalent: ``ChunkedBackend``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _native_build
from ._types import Coefficients, GradNeeds, Grads, HeadInputs, HeadSpec, TokenStats
from .chunked import ChunkedBackend, _scatter_stats, _scatter_terms
from .objectives import Objective

# Elements of one logit block: 2^24 fp32 is 64 MiB, 524 rows at V = 32000. Larger blocks make
# the weight-gradient GEMM (K = rows) efficient; the memory stays a small multiple of it.
NATIVE_CHUNK_ELEMENTS = 1 << 24

# Compacting the active rows of a block costs about one copy of them; skipping a row saves
# two GEMM rows. Per row that is ~8 V bytes of memory traffic against ~4 V D flops, so it pays
# once the inactive rows exceed about 32 / D of the active ones (measured break-even ~26 / D).
COMPACT_RATIO = 32.0

_KL_MODES = {None: 0, "forward": 1, "reverse": 2}
_LSE, _LOGP, _ENTROPY, _ROWMAX, _REF_LSE, _KL = range(6)


class _Blocks:
    """Reusable logit buffers of one call: ``z`` (and ``zq``) in the compute dtype."""

    def __init__(self, inputs: HeadInputs, rows: int, with_ref: bool):
        cd, V = inputs.compute_dtype, inputs.vocab_size
        h = inputs.hidden
        self.z = torch.empty(rows, V, dtype=cd, device=h.device)
        self.raw = torch.empty(rows, V, dtype=h.dtype, device=h.device) if h.dtype != cd else None
        self.zq = self.raw_q = None
        if with_ref:
            rh = inputs.ref_hidden
            self.zq = torch.empty(rows, V, dtype=cd, device=h.device)
            self.raw_q = torch.empty(rows, V, dtype=rh.dtype, device=h.device) if rh.dtype != cd else None

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


def _options(spec: HeadSpec):
    return 1.0 / spec.temperature, spec.softcap or 0.0, _KL_MODES[spec.kl_direction]


def _factored(spec: HeadSpec, coefs: Coefficients) -> bool:
    """True when dz needs only p: no softcap, no entropy term, no KL term (see the module doc)."""
    return spec.softcap is None and coefs.entropy is None and coefs.kl is None


def _vec(x: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """A per-row coefficient as the kernel wants it (incoming gradients may be expanded views)."""
    return None if x is None else x.to(dtype).contiguous()


def _arange_rows(rows_c, device) -> Tensor:
    return torch.arange(rows_c.start, rows_c.stop, device=device) if isinstance(rows_c, slice) else rows_c


class NativeBackend(ChunkedBackend):
    name = "native"

    def unavailable_reason(self, device: torch.device) -> Optional[str]:
        if torch.device(device).type != "cpu":
            return f"the native kernel runs on the CPU only, not on {torch.device(device).type}"
        return _native_build.unavailable_reason()

    def _chunk_size(self, inputs: HeadInputs, spec: HeadSpec) -> int:
        if spec.chunk_size is not None:
            return spec.chunk_size
        return max(1, NATIVE_CHUNK_ELEMENTS // inputs.vocab_size)

    # ------------------------------------------------------------------------------------------
    # forward
    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, inputs: HeadInputs, spec: HeadSpec, objective: Optional[Objective] = None,
                coef_scale=None, needs: GradNeeds = GradNeeds()):
        ops = _native_build.load_ops()
        if ops is None:
            return super().forward(inputs, spec, objective, coef_scale, needs)
        valid = inputs.targets != spec.ignore_index
        rows = None if bool(valid.all()) else valid.nonzero().squeeze(1)
        n = inputs.num_rows if rows is None else rows.numel()
        with_grads = objective is not None and needs.any()
        if with_grads:
            grads, gw, gb = self._new_grads(inputs, needs)
        with_ref = spec.kl_direction is not None
        # Without softcap, entropy or KL the gradient needs p only: keep exp(z - max) in place.
        keep_exp = with_grads and spec.softcap is None and not with_ref and not objective.entropy_coef
        inv_t, cap, kl_mode = _options(spec)
        stats_parts, term_parts = [], []
        if n:
            blocks = _Blocks(inputs, min(n, self._chunk_size(inputs, spec)), with_ref)
        for rows_c in self._row_chunks(inputs, spec, rows):
            z, zq = blocks.logits(inputs, rows_c, with_ref)
            y = inputs.targets[rows_c]
            s6 = ops.stats(z, y, zq, inv_t, cap, kl_mode, keep_exp)
            st = TokenStats(s6[_LSE], s6[_LOGP], s6[_ENTROPY], s6[_REF_LSE] if with_ref else None,
                            s6[_KL] if with_ref else None)
            stats_parts.append(st)
            if objective is None:
                continue
            terms = objective.terms(st, torch.ones_like(y, dtype=torch.bool), rows_c)
            term_parts.append(terms)
            if with_grads:
                c = terms.coefs
                coefs = Coefficients(*(None if x is None else x * coef_scale for x in (c.logp, c.entropy, c.kl)))
                self._block_grads(ops, inputs, spec, rows_c, z, y, zq, s6, coefs, keep_exp, grads, gw, gb)

        stats = _scatter_stats(stats_parts, rows, inputs, spec)
        terms = None
        if objective is not None:
            terms = _scatter_terms(term_parts, rows, inputs.num_rows) if term_parts else objective.terms(stats, valid)
        grads = self._finish_grads(inputs, grads, gw, gb) if with_grads else None
        return stats, terms, grads

    # ------------------------------------------------------------------------------------------
    # backward (per-token coefficients: reduction="none", linear_logprobs)
    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def backward(self, inputs: HeadInputs, spec: HeadSpec, stats: TokenStats, coefs: Coefficients,
                 needs: GradNeeds) -> Grads:
        ops = _native_build.load_ops()
        if ops is None:
            return super().backward(inputs, spec, stats, coefs, needs)
        grads, gw, gb = self._new_grads(inputs, needs)
        active = coefs.any_nonzero() & (inputs.targets != spec.ignore_index)
        rows = active.nonzero().squeeze(1)
        if not rows.numel():
            return self._finish_grads(inputs, grads, gw, gb)
        factored = _factored(spec, coefs)
        with_ref = coefs.kl is not None
        inv_t, cap, kl_mode = _options(spec)
        blocks = _Blocks(inputs, min(rows.numel(), self._chunk_size(inputs, spec)), with_ref)
        zeros = torch.zeros_like(stats.lse)
        for rows_c in self._row_chunks(inputs, spec, rows):
            z, zq = blocks.logits(inputs, rows_c, with_ref)
            y = inputs.targets[rows_c]
            if factored:  # recomputing the statistics is one exp pass, like recomputing p
                s6 = ops.stats(z, y, None, inv_t, 0.0, 0, True)
            else:
                ops.transform_(z, inv_t, cap)
                if zq is not None:
                    ops.transform_(zq, inv_t, cap)
                s6 = torch.stack([f[rows_c] for f in (stats.lse, stats.logp, stats.entropy, stats.lse,
                                                      stats.ref_lse if with_ref else zeros,
                                                      stats.kl if with_ref else zeros)])
            self._block_grads(ops, inputs, spec, rows_c, z, y, zq, s6, coefs.take(rows_c), factored,
                              grads, gw, gb, all_active=True)
        return self._finish_grads(inputs, grads, gw, gb)

    # ------------------------------------------------------------------------------------------
    # gradient of one block
    # ------------------------------------------------------------------------------------------
    def _block_grads(self, ops, inputs: HeadInputs, spec: HeadSpec, rows_c, z: Tensor, y: Tensor,
                     zq: Optional[Tensor], s6: Tensor, coefs: Coefficients, keep_exp: bool,
                     grads: Grads, gw, gb, all_active: bool = False) -> None:
        """Accumulate the gradients of the rows of ``z``; ``keep_exp``: ``z`` holds exp(z - rowmax)."""
        inv_t, cap, kl_mode = _options(spec)
        n, cd = z.shape[0], z.dtype
        g = _vec(coefs.logp, cd) if coefs.logp is not None else torch.zeros_like(s6[_LSE])
        if not keep_exp:
            ops.dlogits(z, y, zq, s6, g, _vec(coefs.entropy, cd), _vec(coefs.kl, cd), inv_t, cap, kl_mode, False)
        if keep_exp:  # dx = a E + onehot(y) b
            a = -g * torch.exp(s6[_ROWMAX] - s6[_LSE]) * inv_t
            b = g * inv_t
        if not all_active:  # PSFT-clipped rows have no gradient: drop them if that saves work
            active = coefs.any_nonzero()
            n_active = int(active.sum())
            if n_active == 0:
                return
            if n_active < n and (n - n_active) * inputs.hidden.shape[1] >= COMPACT_RATIO * n_active:
                keep = active.nonzero().squeeze(1)
                ops.compact(z, keep)
                z, y, rows_c = z[:n_active], y[keep], _arange_rows(rows_c, keep.device)[keep]
                if keep_exp:
                    a, b = a[keep], b[keep]
        h = inputs.hidden[rows_c]
        w = inputs.weight
        if not keep_exp:
            self._accumulate(inputs, rows_c, z, grads, gw, gb)
            return
        if grads.hidden is not None:
            gh = (z.to(w.dtype) @ w).to(cd).mul_(a[:, None]).add_(w[y].to(cd) * b[:, None])
            grads.hidden[rows_c] = gh.to(grads.hidden.dtype)
        if gw is not None:  # fp32 accumulation, as in the chunked backend
            hc = h.to(cd)
            gw.addmm_(z.T, hc * a[:, None])
            gw.index_add_(0, y, hc * b[:, None])
        if gb is not None:
            gb.addmv_(z.T, a)
            gb.index_add_(0, y, b)
