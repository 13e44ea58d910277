"""The native CPU backend: the chunked algorithm with a compiled, multi-threaded epilogue.

Same contract and same chunk loop as :class:`psft_kernels.chunked.ChunkedBackend`; what changes
is the work per ``(rows x V)`` logit block between the GEMMs (which stay in ATen):

* forward: one kernel call (``csrc/psft_native.cpp``, ``stats``) applies softcap / temperature in
  place and reduces each row to ``lse``, ``logp``, ``H`` (and ``lse'``, ``KL``) in two passes
  that stay in the core's cache, instead of about ten PyTorch ops over the whole block;
* gradient: for the plain case (no softcap, entropy or KL term) the ``stats`` pass leaves
  ``E' = exp(z - rowmax) - S onehot(y)`` in the block (``S`` the row's sum of exps), and
  ``dx = g (onehot(y) - p) / T = a E'`` with ``a = -g / (S T)`` per row is never formed:
  ``dx W = a (E' W)`` and ``dx^T h = E'^T (a h)``, so the gradient costs the two GEMMs and
  O(rows x D) extra work. Otherwise one ``dlogits`` pass writes ``dx`` over the block;
* the logit block comes from the workspace the chunked backend also uses
  (:mod:`psft_kernels._workspace`), kept between calls: a fresh 128 MiB block costs its page
  faults on every call, which a training loop calling the loss every step need not pay. Blocks
  of rows, their sizing and the gradient accumulation are the chunked backend's too.

Probabilities are formed from each row's max ``m`` and ``log S`` separately,
``exp((z - m) - log S)``, never from the rounded ``lse = m + log S`` (see the chunked module);
the backward recomputes them with the logits rather than reading a saved ``lse``.

The library is compiled on first use (:mod:`psft_kernels._native_build`); if that fails the
backend warns once and runs the chunked backend instead. PyTorch equivalent: ``ChunkedBackend``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _native_build
from ._types import Coefficients, GradNeeds, Grads, HeadInputs, HeadSpec, TokenStats
from ._workspace import WORKSPACE as _WORKSPACE
from ._workspace import LogitBlocks, release_workspace  # noqa: F401 - psft_kernels.empty_cache() frees it
from .chunked import COMPACT_RATIO, ChunkedBackend, _Accumulator, _arange_rows, _scatter_stats, _scatter_terms
from .objectives import Objective

_KL_MODES = {None: 0, "forward": 1, "reverse": 2}
# Rows of the kernel's per-row statistics (csrc/psft_native.cpp, StatRow).
_LSE, _LOGP, _ENTROPY, _ROWMAX, _REF_LSE, _KL, _LOG_S, _REF_MAX, _REF_LOG_S = range(9)


def _options(spec: HeadSpec):
    return 1.0 / spec.temperature, spec.softcap or 0.0, _KL_MODES[spec.kl_direction]


def _factored(spec: HeadSpec, coefs: Coefficients) -> bool:
    """True when dz needs only p: no softcap, no entropy term, no KL term (see the module doc)."""
    return spec.softcap is None and coefs.entropy is None and coefs.kl is None


def _vec(x: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """A per-row coefficient as the kernel wants it (incoming gradients may be expanded views)."""
    return None if x is None else x.to(dtype).contiguous()



def _use_saved_stats(s6: Tensor, stats: TokenStats, rows, with_ref: bool) -> None:
    """Overwrite a block's statistics with the saved ones, in the form ``dlogits`` reads:
    ``log p = (z - max) - log S`` with ``max = lse`` and ``log S = 0``."""
    s6[_ROWMAX] = stats.lse[rows]
    s6[_LOG_S] = 0
    s6[_ENTROPY] = stats.entropy[rows]
    if with_ref:
        s6[_REF_MAX] = stats.ref_lse[rows]
        s6[_REF_LOG_S] = 0
        s6[_KL] = stats.kl[rows]


class NativeBackend(ChunkedBackend):
    name = "native"
    def __init__(self):
        self._fallback = ChunkedBackend()  # with its own (smaller) chunks, if the kernel can't load

    def unavailable_reason(self, device: torch.device) -> Optional[str]:
        if torch.device(device).type != "cpu":
            return f"the native kernel runs on the CPU only, not on {torch.device(device).type}"
        return _native_build.unavailable_reason()

    # ------------------------------------------------------------------------------------------
    # forward
    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, inputs: HeadInputs, spec: HeadSpec, objective: Optional[Objective] = None,
                coef_scale=None, needs: GradNeeds = GradNeeds()):
        ops = _native_build.load_ops()
        if ops is None:
            return self._fallback.forward(inputs, spec, objective, coef_scale, needs)
        valid = inputs.targets != spec.ignore_index
        rows = None if bool(valid.all()) else valid.nonzero().squeeze(1)
        n = inputs.num_rows if rows is None else rows.numel()
        with_grads = objective is not None and needs.any()
        with_ref = spec.kl_direction is not None
        # Without softcap, entropy or KL the gradient needs p only: keep exp(z - max) in place.
        keep_exp = with_grads and spec.softcap is None and not with_ref and not objective.entropy_coef
        inv_t, cap, kl_mode = _options(spec)
        stats_parts, term_parts = [], []
        block_rows = self._block_rows(inputs, spec, n)
        acc = _Accumulator(inputs, needs, block_rows) if with_grads else None
        with _WORKSPACE.lease(inputs.hidden.device) as ws:
            if n:
                with_slope = with_grads and spec.softcap is not None
                blocks = LogitBlocks(inputs, block_rows, with_ref, ws, with_slope=with_slope)
            for rows_c in self._row_chunks(inputs, spec, rows):
                z, zq = blocks.logits(inputs, rows_c, with_ref)
                y = inputs.targets[rows_c].contiguous()  # the kernel reads targets as a plain array
                slope = blocks.slope(z)
                s6 = ops.stats(z, y, zq, inv_t, cap, kl_mode, keep_exp, slope)
                st = TokenStats(s6[_LSE], s6[_LOGP], s6[_ENTROPY], s6[_REF_LSE] if with_ref else None,
                                s6[_KL] if with_ref else None)
                terms = self._collect(objective, st, y, rows_c, stats_parts, term_parts)
                if terms is not None and with_grads:
                    c = terms.coefs
                    coefs = Coefficients(*(None if x is None else x * coef_scale for x in (c.logp, c.entropy, c.kl)))
                    self._block_grads(ops, inputs, spec, rows_c, z, y, zq, slope, s6, coefs, keep_exp, acc,
                                      half=blocks.half(z.shape[0]))

        stats = _scatter_stats(stats_parts, rows, inputs, spec)
        terms = None
        if objective is not None:
            terms = _scatter_terms(term_parts, rows, inputs.num_rows) if term_parts else objective.terms(stats, valid)
        return stats, terms, acc.finish(inputs) if with_grads else None

    # ------------------------------------------------------------------------------------------
    # backward (per-token coefficients: reduction="none", linear_logprobs)
    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def backward(self, inputs: HeadInputs, spec: HeadSpec, stats: TokenStats, coefs: Coefficients,
                 needs: GradNeeds) -> Grads:
        ops = _native_build.load_ops()
        if ops is None:
            return self._fallback.backward(inputs, spec, stats, coefs, needs)
        active = coefs.any_nonzero() & (inputs.targets != spec.ignore_index)
        rows = active.nonzero().squeeze(1)
        block_rows = self._block_rows(inputs, spec, rows.numel())
        acc = _Accumulator(inputs, needs, block_rows)
        if not rows.numel():
            return acc.finish(inputs)
        # A vocabulary shard's saved statistics are the merged ones: no factored gradient, whose
        # scale comes from the block's own sum.
        factored = not self.backward_reads_saved_stats and _factored(spec, coefs)
        with_ref = coefs.kl is not None
        inv_t, cap, kl_mode = _options(spec)
        with _WORKSPACE.lease(inputs.hidden.device) as ws:
            blocks = LogitBlocks(inputs, block_rows, with_ref, ws, with_slope=spec.softcap is not None)
            for rows_c in self._row_chunks(inputs, spec, rows):
                z, zq = blocks.logits(inputs, rows_c, with_ref)
                y = inputs.targets[rows_c].contiguous()  # the kernel reads targets as a plain array
                slope = blocks.slope(z)
                # The statistics are recomputed with the logits (one exp pass, like recomputing p):
                # p then comes from the block's own max and log-sum, never from a rounded lse.
                if self.backward_reads_saved_stats:
                    # Here stats() only applies the transform (its own statistics are replaced); a
                    # shard's target -1 (held by another shard) would be out of its range.
                    s6 = ops.stats(z, y.clamp(min=0), zq, inv_t, cap, kl_mode if with_ref else 0, False, slope)
                    _use_saved_stats(s6, stats, rows_c, with_ref)
                else:
                    s6 = ops.stats(z, y, zq, inv_t, cap, kl_mode if with_ref else 0, factored, slope)
                self._block_grads(ops, inputs, spec, rows_c, z, y, zq, slope, s6, coefs.take(rows_c), factored, acc,
                                  all_active=True, half=blocks.half(z.shape[0]))
        return acc.finish(inputs)

    # ------------------------------------------------------------------------------------------
    # gradient of one block
    # ------------------------------------------------------------------------------------------
    def _block_grads(self, ops, inputs: HeadInputs, spec: HeadSpec, rows_c, z: Tensor, y: Tensor,
                     zq: Optional[Tensor], slope: Optional[Tensor], s6: Tensor, coefs: Coefficients,
                     keep_exp: bool, acc: _Accumulator, all_active: bool = False,
                     half: Optional[Tensor] = None) -> None:
        """Accumulate the gradients of the rows of ``z`` (``slope``: the softcap's ``dz/dx``).

        ``keep_exp``: ``z`` holds ``E' = exp(z - rowmax) - S onehot(y)`` (``stats(keep_exp=True)``)
        and ``dx = a E'`` with ``a = -g exp(-log S) / T``; else ``dlogits`` writes ``dx``.
        ``half``: the raw block of half inputs, reused for their cast of ``dx``.
        """
        inv_t, cap, kl_mode = _options(spec)
        n, cd = z.shape[0], z.dtype
        g = _vec(coefs.logp, cd) if coefs.logp is not None else torch.zeros_like(s6[_LSE])
        scale = None
        if keep_exp:
            scale = -g * torch.exp(-s6[_LOG_S]) * inv_t  # 1 / S, not exp(max - lse): lse is rounded
        else:
            ops.dlogits(z, y, zq, s6, g, _vec(coefs.entropy, cd), _vec(coefs.kl, cd), inv_t, cap, kl_mode, slope)
        if not all_active:  # PSFT-clipped rows have no gradient: drop them if that saves work
            active = coefs.any_nonzero()
            n_active = int(active.sum())
            if n_active == 0:
                return
            holes = (~active[:n_active]).nonzero().squeeze(1) if n_active < n else None
            if holes is not None and holes.numel() * COMPACT_RATIO <= (n - n_active) * inputs.hidden.shape[1]:
                order = torch.arange(n_active, device=z.device)
                if holes.numel():
                    src = active[n_active:].nonzero().squeeze(1) + n_active
                    ops.move_rows(z, holes, src)
                    order[holes] = src
                z, rows_c = z[:n_active], _arange_rows(rows_c, z.device)[order]
                scale = None if scale is None else scale[order]
        if scale is not None and inputs.weight.dtype != cd:
            # Half inputs cast dx for their GEMM: E'[y] = -S (1 - p_y) could overflow fp16 (S grows
            # with V), so form dx = a E' first, as the chunked backend does.
            z.mul_(scale[:, None])
            scale = None
        acc.add(inputs, rows_c, z, scale, half)

