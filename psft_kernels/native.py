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
* the logit blocks are kept between calls (:class:`_Workspace`): a fresh 128 MiB block costs its
  page faults on every call, which a training loop calling the loss every step need not pay.

The library is compiled on first use (:mod:`psft_kernels._native_build`); if that fails the
backend warns once and runs the chunked backend instead. PyTorch equivalent: ``ChunkedBackend``.
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Dict, Iterator, Optional, Tuple

import torch
from torch import Tensor

from . import _native_build
from ._types import Coefficients, GradNeeds, Grads, HeadInputs, HeadSpec, TokenStats
from .chunked import ChunkedBackend, _scatter_stats, _scatter_terms
from .objectives import Objective

# Rows per block: at most 2^25 / V (a 128 MiB fp32 logit block at any V; 1048 rows at V = 32000)
# and 2^20 / D. Large blocks matter: every block re-packs the lm-head inside the two GEMMs that
# read it and re-reads grad_weight, and measured at D = 1024 the whole step costs 1.13x the GEMM
# floor with 512-row blocks against 1.06x with 1024. The D bound keeps the (rows x D) GEMM
# operands small, where MKL's scratch memory grows with them (about +100 MB at D = 4096, 512 rows).
# Blocks are then evened out, so that no small last block runs at low GEMM efficiency.
NATIVE_CHUNK_ELEMENTS = 1 << 25
NATIVE_CHUNK_HIDDEN_ELEMENTS = 1 << 20

# Dropping a block's inactive (PSFT-clipped) rows before the GEMMs: the active rows behind the
# first n_active fill the holes the inactive ones leave there, one row copy (~8 V bytes of memory
# traffic) per hole; each dropped row saves two GEMM rows (~4 V D flops). With ~10 GB/s and ~130
# GFLOP/s (the dev machine) it pays when copies * 26 < dropped rows * D; 32 leaves a margin (and
# since there are never more copies than dropped rows, it always pays for D >= 32).
COMPACT_RATIO = 32.0

_KL_MODES = {None: 0, "forward": 1, "reverse": 2}
_LSE, _LOGP, _ENTROPY, _ROWMAX, _REF_LSE, _KL = range(6)


class _Workspace:
    """The logit blocks, kept between calls: one buffer per role and dtype, grown when a call needs
    more. A fresh block of 128 MiB is ~32k first-touch page faults the kernel must zero: ~25 ms per
    call on the 2-core benchmark machine, 6 % of a D = 256 step; a training loop that calls the loss
    every step would pay it every step. Held between calls: the largest blocks used so far (at most
    128 MiB per role: ``z``; ``z'`` for ASFT; the softcap's slope; the raw GEMM output for half
    inputs). :func:`release_workspace` (``psft_kernels.empty_cache()``) frees them;
    ``PSFT_KERNELS_NATIVE_WORKSPACE=0`` allocates per call instead. A call that finds the workspace
    in use by another thread allocates its own blocks.
    """

    def __init__(self) -> None:
        self._buffers: Dict[Tuple[str, torch.dtype], Tensor] = {}
        self._lock = threading.Lock()

    def take(self, role: str, rows: int, V: int, dtype: torch.dtype) -> Tensor:
        key = (role, dtype)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < rows * V:
            self._buffers.pop(key, None)  # free the smaller one before allocating the larger
            buf = self._buffers[key] = torch.empty(rows * V, dtype=dtype)
        return buf[:rows * V].view(rows, V)

    def release(self) -> None:
        with self._lock:
            self._buffers.clear()

    @contextlib.contextmanager
    def lease(self) -> Iterator["_Workspace"]:
        """This workspace for the duration of one call, or a private one if it is busy or disabled."""
        if os.environ.get("PSFT_KERNELS_NATIVE_WORKSPACE", "1") == "0" or not self._lock.acquire(blocking=False):
            yield _Workspace()
            return
        try:
            yield self
        finally:
            self._lock.release()


_WORKSPACE = _Workspace()


def release_workspace() -> None:
    """Free the logit blocks the native backend keeps between calls (see :class:`_Workspace`)."""
    _WORKSPACE.release()


class _Blocks:
    """The logit buffers of one call, from the workspace: ``z`` (and ``zq``) in the compute dtype,
    and with ``with_slope`` one for the softcap's slope ``dz/dx``, which the kernel takes from the
    raw logits."""

    def __init__(self, inputs: HeadInputs, rows: int, with_ref: bool, ws: _Workspace, with_slope: bool = False):
        cd, V = inputs.compute_dtype, inputs.vocab_size
        h = inputs.hidden
        self.z = ws.take("z", rows, V, cd)
        self._slope = ws.take("slope", rows, V, cd) if with_slope else None
        self.raw = ws.take("raw", rows, V, h.dtype) if h.dtype != cd else None
        self.zq = self.raw_q = None
        if with_ref:
            rh = inputs.ref_hidden
            self.zq = ws.take("zq", rows, V, cd)
            self.raw_q = ws.take("raw_q", rows, V, rh.dtype) if rh.dtype != cd else None

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

    def slope(self, z: Tensor) -> Optional[Tensor]:
        """The slope buffer for the rows of ``z`` (None without one)."""
        return None if self._slope is None else self._slope[:z.shape[0]]


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
    # The backward may recompute the statistics instead of reading the saved ones (see _factored);
    # a vocabulary shard, whose saved statistics are the full vocabulary's, turns that off.
    factored_gradient = True

    def __init__(self):
        self._fallback = ChunkedBackend()  # with its own (smaller) chunks, if the kernel can't load

    def unavailable_reason(self, device: torch.device) -> Optional[str]:
        if torch.device(device).type != "cpu":
            return f"the native kernel runs on the CPU only, not on {torch.device(device).type}"
        return _native_build.unavailable_reason()

    def _chunk_size(self, inputs: HeadInputs, spec: HeadSpec) -> int:
        if spec.chunk_size is not None:
            return spec.chunk_size
        return max(1, min(NATIVE_CHUNK_ELEMENTS // inputs.vocab_size,
                          NATIVE_CHUNK_HIDDEN_ELEMENTS // inputs.hidden.shape[1]))

    def _block_rows(self, inputs: HeadInputs, spec: HeadSpec, n: int) -> int:
        """Rows per block for ``n`` rows: the same number of blocks, all of (nearly) one size."""
        step = self._chunk_size(inputs, spec)
        if spec.chunk_size is None and n > step:
            step = -(-n // -(-n // step))
        return max(1, min(step, n))

    def _row_chunks(self, inputs: HeadInputs, spec: HeadSpec, rows: Optional[Tensor]):
        n = inputs.num_rows if rows is None else rows.numel()
        step = self._block_rows(inputs, spec, n)
        for start in range(0, n, step):
            yield slice(start, min(n, start + step)) if rows is None else rows[start:start + step]

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
        with _WORKSPACE.lease() as ws:
            if n:
                blocks = _Blocks(inputs, block_rows, with_ref, ws, with_slope=with_grads and spec.softcap is not None)
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
                    self._block_grads(ops, inputs, spec, rows_c, z, y, zq, slope, s6, coefs, keep_exp, acc)

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
        factored = self.factored_gradient and _factored(spec, coefs)
        with_ref = coefs.kl is not None
        inv_t, cap, kl_mode = _options(spec)
        with _WORKSPACE.lease() as ws:
            blocks = _Blocks(inputs, block_rows, with_ref, ws, with_slope=spec.softcap is not None)
            zeros = torch.zeros_like(stats.lse)
            for rows_c in self._row_chunks(inputs, spec, rows):
                z, zq = blocks.logits(inputs, rows_c, with_ref)
                y = inputs.targets[rows_c].contiguous()  # the kernel reads targets as a plain array
                slope = blocks.slope(z)
                if factored:  # recomputing the statistics is one exp pass, like recomputing p
                    s6 = ops.stats(z, y, None, inv_t, 0.0, 0, True)
                else:
                    ops.transform_(z, inv_t, cap, slope)
                    if zq is not None:
                        ops.transform_(zq, inv_t, cap)
                    s6 = torch.stack([f[rows_c] for f in (stats.lse, stats.logp, stats.entropy, stats.lse,
                                                          stats.ref_lse if with_ref else zeros,
                                                          stats.kl if with_ref else zeros)])
                self._block_grads(ops, inputs, spec, rows_c, z, y, zq, slope, s6, coefs.take(rows_c), factored, acc,
                                  all_active=True)
        return acc.finish(inputs)

    # ------------------------------------------------------------------------------------------
    # gradient of one block
    # ------------------------------------------------------------------------------------------
    def _block_grads(self, ops, inputs: HeadInputs, spec: HeadSpec, rows_c, z: Tensor, y: Tensor,
                     zq: Optional[Tensor], slope: Optional[Tensor], s6: Tensor, coefs: Coefficients,
                     keep_exp: bool, acc: "_Accumulator", all_active: bool = False) -> None:
        """Accumulate the gradients of the rows of ``z`` (``slope``: the softcap's ``dz/dx``).

        ``keep_exp``: ``z`` holds ``E' = exp(z - rowmax) - S onehot(y)`` (``stats(keep_exp=True)``)
        and ``dx = a E'`` with ``a = -g exp(rowmax - lse) / T``; else ``dlogits`` writes ``dx``.
        """
        inv_t, cap, kl_mode = _options(spec)
        n, cd = z.shape[0], z.dtype
        g = _vec(coefs.logp, cd) if coefs.logp is not None else torch.zeros_like(s6[_LSE])
        scale = None
        if keep_exp:
            scale = -g * torch.exp(s6[_ROWMAX] - s6[_LSE]) * inv_t
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
        acc.add(inputs, rows_c, z, scale)


class _Accumulator:
    """``grad_hidden`` rows, and ``grad_weight`` / ``grad_bias`` summed over blocks in fp32 (fp64
    for fp64 inputs). The first block overwrites them (``beta=0``): no zero-fill pass over V x D.
    One ``(rows, D)`` scratch block is reused for the per-block temporaries."""

    def __init__(self, inputs: HeadInputs, needs: GradNeeds, rows: int):
        h, w = inputs.hidden, inputs.weight
        acc = torch.promote_types(h.dtype, torch.float32)
        self.hidden = torch.zeros(h.shape, dtype=h.dtype, device=h.device) if needs.hidden else None
        self.weight = torch.empty(w.shape, dtype=acc, device=w.device) if needs.weight else None
        self.bias = torch.empty(w.shape[0], dtype=acc, device=w.device) if needs.bias else None
        self.beta = 0
        self._rows, self._scratch = rows, None

    def _buffer(self, n: int, like: Tensor) -> Tensor:
        if self._scratch is None:
            self._scratch = like.new_empty(self._rows, like.shape[1])
        return self._scratch[:n]

    def add(self, inputs: HeadInputs, rows, dx: Tensor, scale: Optional[Tensor]) -> None:
        """Add the block's contribution; its logit gradient is ``dx``, times ``scale[:, None]`` if given."""
        h, w, n = inputs.hidden, inputs.weight, dx.shape[0]
        plain = w.dtype == dx.dtype  # fp32 / fp64 inputs: no casts, so no temporaries
        index = not isinstance(rows, slice)
        if self.hidden is not None:
            if not plain:  # half inputs: the GEMM runs in their dtype, as in the chunked backend
                gh = (dx.to(w.dtype) @ w).to(dx.dtype)
            else:
                gh = torch.mm(dx, w, out=self._buffer(n, h) if index else self.hidden[rows])
            if scale is not None:
                gh.mul_(scale[:, None])
            if index or not plain:
                self.hidden[rows] = gh.to(self.hidden.dtype)
        if self.weight is not None:
            if not plain:
                hs = h[rows].to(dx.dtype)
                hs = hs if scale is None else hs * scale[:, None]
            elif index:
                hs = torch.index_select(h, 0, rows, out=self._buffer(n, h))
                hs = hs if scale is None else hs.mul_(scale[:, None])
            else:
                hs = h[rows] if scale is None else torch.mul(h[rows], scale[:, None], out=self._buffer(n, h))
            self.weight.addmm_(dx.T, hs, beta=self.beta)
        if self.bias is not None:
            self.bias.addmv_(dx.T, scale if scale is not None else torch.ones_like(dx[:, 0]), beta=self.beta)
        self.beta = 1

    def finish(self, inputs: HeadInputs) -> Grads:
        if self.beta == 0:  # no block contributed
            for t in (self.weight, self.bias):
                if t is not None:
                    t.zero_()
        return Grads(hidden=self.hidden,
                     weight=None if self.weight is None else self.weight.to(inputs.weight.dtype),
                     bias=None if self.bias is None else self.bias.to(inputs.bias.dtype))
