"""The portable backend: pure PyTorch, any device, never more than a few ``rows x V`` logit blocks.

Rows (tokens) are processed in blocks. For each block the logits are formed by one GEMM against
the whole lm-head into a buffer of the workspace, turned in place into log-probabilities, reduced
to per-token statistics, and (when a gradient is wanted) into ``dz``, which the two gradient GEMMs
read. The backward pass recomputes a block's logits and statistics (one GEMM and one
``log_softmax``) and forms ``dz`` for the rows that have a non-zero coefficient only;
``grad_weight`` is accumulated in fp32.

When the loss is reduced to a scalar the per-token coefficients are known as soon as a block's
statistics are, so :meth:`ChunkedBackend.forward` forms the gradients in the same pass (the
``objective`` argument); the autograd Function then only scales them by ``grad_output``. That
saves the recomputation GEMM: three GEMMs in all, the dense floor.

Memory. Every ``rows x V`` block comes from :mod:`psft_kernels._workspace` and every op over a
block writes into one (``out=``, in place), so no block is allocated per chunk: allocating them
afresh let glibc's heap grow by about a block per chunk (gigabytes at ``V = 152064``). Blocks
alive at once: the logits / log-probabilities, the probabilities / ``dz`` and a scratch block;
ASFT adds the reference model's logits (and for the forward KL its probabilities), a softcap its
slope, half inputs their raw GEMM output. On the CPU they are kept between calls
(``psft_kernels.empty_cache()`` frees them).

Precision. Probabilities are formed as ``exp((z - max) - log sum exp(z - max))`` (what
``log_softmax`` computes), never as ``exp(z - lse)`` with a rounded ``lse``: with logits of
~1e3 the fp32 ``lse`` is off by up to half an ulp of 1e3 (3e-5), an error every ``p`` of the row
would share. Logits of ``-inf`` (a bias masking tokens) give ``p = 0`` and add nothing to the
entropy, the KL or the gradient: where ``0 * log 0`` would make a NaN, the log-probabilities of
that block are clamped to the dtype's lowest finite value first.
"""

from __future__ import annotations

import dataclasses
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from ._types import Coefficients, GradNeeds, Grads, HeadInputs, HeadSpec, TokenStats
from ._workspace import WORKSPACE, LogitBlocks
from .objectives import Objective, Terms

# Rows per block: at most 2^25 / V (a 128 MiB fp32 block; 220 rows at V = 152064, 1048 at 32000)
# and 2^20 / D. Large blocks matter on the CPU: each block re-packs the lm-head inside the GEMMs
# that read it, and at D = 896, V = 152064 (process CPU time, 2 threads) the three GEMMs of 512
# rows cost 13.4 s in 27-row blocks, 7.9 s in 110-row and 5.7 s in 256-row blocks, 5.4 s in one.
# The D bound keeps the (rows x D) GEMM operands small, where MKL's scratch memory grows with them.
# Blocks are then evened out, so that no small last block runs at low GEMM efficiency.
CHUNK_ELEMENTS = 1 << 25
CHUNK_HIDDEN_ELEMENTS = 1 << 20

# Dropping a block's inactive (PSFT-clipped) rows before the gradient GEMMs costs a copy of the
# rows kept or moved (~8 V bytes of memory traffic each) and saves two GEMM rows (~4 V D flops)
# per row dropped. With ~10 GB/s and ~130 GFLOP/s (the dev machine) it pays when
# copies * 26 < dropped rows * D; 32 leaves a margin.
COMPACT_RATIO = 32.0


def transform_(x: Tensor, spec: HeadSpec, slope: Optional[Tensor] = None) -> Tensor:
    """``x <- softcap(x) / T`` in place; with ``slope`` and a softcap, also ``slope <- dz/dx * T``.

    The slope ``1 - tanh^2(x / s) = 1 / cosh^2(x / s)`` is taken from the raw logits: recovered
    from ``z`` it would carry an absolute error of a few ulps of 1, which near saturation (``z``
    close to +-s) is most of its value. ``cosh`` overflowing to inf gives 0, right to within
    fp32's smallest normal.
    """
    if spec.softcap is not None:
        x.div_(spec.softcap)
        if slope is not None:
            torch.cosh(x, out=slope).square_().reciprocal_()
        x.tanh_().mul_(spec.softcap)
    if spec.temperature != 1.0:
        x.div_(spec.temperature)
    return x


def through_transform_(dz: Tensor, slope: Optional[Tensor], spec: HeadSpec) -> Tensor:
    """Chain rule through ``/ T`` and the softcap (``1 - tanh^2``, given as ``slope``), in place."""
    if spec.temperature != 1.0:
        dz.div_(spec.temperature)
    if spec.softcap is not None:
        dz.mul_(slope)
    return dz


def _arange_rows(rows_c, device) -> Tensor:
    return torch.arange(rows_c.start, rows_c.stop, device=device) if isinstance(rows_c, slice) else rows_c


def _row_sum_of_products(a: Tensor, b: Tensor, scratch: Tensor) -> Tensor:
    """``(a * b).sum(-1)`` through a scratch block (no block-sized temporary)."""
    return torch.mul(a, b, out=scratch).sum(-1)


class _Block:
    """The buffers of one block of ``n`` rows after :meth:`ChunkedBackend._block_stats`:
    ``log_p`` (over the logits), ``p``, ``tmp`` (scratch), and for ASFT ``log_q`` (over the
    reference logits) and, for the forward KL, ``q``; ``slope`` with a softcap."""

    def __init__(self, blocks: LogitBlocks, z: Tensor, zq: Optional[Tensor], slope: Optional[Tensor], q: bool):
        n = z.shape[0]
        self.log_p, self.log_q, self.slope, self.half = z, zq, slope, blocks.half(n)
        self.p = blocks.extra("p")[:n]
        self.tmp = blocks.extra("tmp")[:n]
        self.q = blocks.extra("q")[:n] if q else None


class ChunkedBackend:
    name = "chunked"
    # The backward recomputes each block's statistics with its logits (the precise p above). A
    # vocabulary shard (psft_kernels.vocab_parallel) must instead use the saved statistics, which
    # are the whole vocabulary's after the merge: it sets this.
    backward_reads_saved_stats = False

    def unavailable_reason(self, device: torch.device) -> Optional[str]:
        return None  # runs wherever PyTorch does

    # ------------------------------------------------------------------------------------------
    # blocks of rows
    # ------------------------------------------------------------------------------------------
    def _chunk_size(self, inputs: HeadInputs, spec: HeadSpec) -> int:
        if spec.chunk_size is not None:
            return spec.chunk_size
        return max(1, min(CHUNK_ELEMENTS // inputs.vocab_size, CHUNK_HIDDEN_ELEMENTS // inputs.hidden.shape[1]))

    def _block_rows(self, inputs: HeadInputs, spec: HeadSpec, n: int) -> int:
        """Rows per block for ``n`` rows: the same number of blocks, all of (nearly) one size."""
        step = self._chunk_size(inputs, spec)
        if spec.chunk_size is None and n > step:
            step = -(-n // -(-n // step))
        return max(1, min(step, n))

    def _row_chunks(self, inputs: HeadInputs, spec: HeadSpec, rows: Optional[Tensor]):
        """Yield the rows of each block: a slice of all rows, or a piece of the index ``rows``."""
        n = inputs.num_rows if rows is None else rows.numel()
        step = self._block_rows(inputs, spec, n)
        for start in range(0, n, step):
            yield slice(start, min(n, start + step)) if rows is None else rows[start:start + step]

    # ------------------------------------------------------------------------------------------
    # per-block math
    # ------------------------------------------------------------------------------------------
    @staticmethod
    def _block_stats(b: _Block, y: Tensor, spec: HeadSpec) -> TokenStats:
        """Statistics of one block of valid rows; turns the (transformed) logits into ``log_p``,
        ``p`` (and ``log_q``, ``q``) in place."""
        n = y.shape[0]
        ar = torch.arange(n, device=y.device)
        log_p = b.log_p
        m, at_max = log_p.max(-1)
        torch.log_softmax(log_p, -1, out=log_p)
        # lse is kept for the stats' sake only (the backward recomputes log_p): m - log_p at the max.
        lse = m - log_p[ar, at_max]
        logp = log_p[ar, y]
        torch.exp(log_p, out=b.p)
        # Sums of p * log p, not lse - sum p z: no cancellation when the logits are large.
        entropy = _row_sum_of_products(b.p, log_p, b.tmp).neg_()
        if not bool(torch.isfinite(entropy).all()):  # -inf logits: 0 * -inf; see the module doc
            log_p.clamp_(min=torch.finfo(log_p.dtype).min)
            entropy = _row_sum_of_products(b.p, log_p, b.tmp).neg_()
        if b.log_q is None:
            return TokenStats(lse, logp, entropy)
        log_q = b.log_q
        mq, at_max_q = log_q.max(-1)
        torch.log_softmax(log_q, -1, out=log_q)
        ref_lse = mq - log_q[ar, at_max_q]
        kl = ChunkedBackend._block_kl(b, spec)
        if not bool(torch.isfinite(kl).all()):
            lowest = torch.finfo(log_q.dtype).min
            log_q.clamp_(min=lowest)
            log_p.clamp_(min=lowest)
            kl = ChunkedBackend._block_kl(b, spec)
        return TokenStats(lse, logp, entropy, ref_lse, kl)

    @staticmethod
    def _block_kl(b: _Block, spec: HeadSpec) -> Tensor:
        if spec.kl_direction == "forward":  # sum_v q_v (log q_v - log p_v)
            torch.exp(b.log_q, out=b.q)
            return _row_sum_of_products(b.q, torch.sub(b.log_q, b.log_p, out=b.tmp), b.tmp)
        # sum_v p_v (log p_v - log q_v)
        return _row_sum_of_products(b.p, torch.sub(b.log_p, b.log_q, out=b.tmp), b.tmp)

    @staticmethod
    def _block_saved_stats(b: _Block, stats: TokenStats) -> TokenStats:
        """``log_p``, ``p`` (and ``log_q``, ``q``) of a block from saved statistics (``lse``:
        the merged one of a vocabulary shard), in place of :meth:`_block_stats`."""
        lowest = torch.finfo(b.log_p.dtype).min  # -inf logits: p = 0 and no 0 * -inf below
        b.log_p.sub_(stats.lse[:, None]).clamp_(min=lowest)
        torch.exp(b.log_p, out=b.p)
        if b.log_q is not None:
            b.log_q.sub_(stats.ref_lse[:, None]).clamp_(min=lowest)
            if b.q is not None:
                torch.exp(b.log_q, out=b.q)
        return stats

    @staticmethod
    def _add_onehot(dz: Tensor, y: Tensor, g: Tensor) -> None:
        """``dz[i, y_i] += g_i`` (a hook: a vocabulary shard skips targets held by another shard)."""
        dz[torch.arange(dz.shape[0], device=dz.device), y] += g

    def _block_dlogits(self, b: _Block, y: Tensor, stats: TokenStats, coefs: Coefficients, spec: HeadSpec) -> Tensor:
        """``d loss / d x`` for one block (x: raw logits), written over ``b.p`` (METHOD.md, "The gradient").

        Uses ``b.tmp`` and overwrites ``b.q`` / ``b.log_q`` for the KL term.
        """
        dz = b.p
        ent = term = None
        if coefs.entropy is not None:  # e * (-p (log p + H))
            ent = torch.add(b.log_p, stats.entropy[:, None], out=b.tmp).mul_(dz).mul_(-coefs.entropy[:, None])
        if coefs.kl is not None:
            ck = coefs.kl[:, None]
            if spec.kl_direction == "forward":  # ck (p - q)
                term = b.q.sub_(dz).mul_(-ck)
            else:  # ck p (log p - log q - KL) = -ck p (log q - log p + KL)
                term = b.log_q.sub_(b.log_p).add_(stats.kl[:, None]).mul_(dz).mul_(-ck)
        g = coefs.logp if coefs.logp is not None else torch.zeros_like(stats.entropy)
        dz.mul_(-g[:, None])  # g (onehot - p)
        self._add_onehot(dz, y, g)
        if ent is not None:
            dz.add_(ent)
        if term is not None:
            dz.add_(term)
        return through_transform_(dz, b.slope, spec)

    # ------------------------------------------------------------------------------------------
    # drivers
    # ------------------------------------------------------------------------------------------
    @staticmethod
    def _blocks(inputs: HeadInputs, spec: HeadSpec, rows: int, ws, with_slope: bool) -> LogitBlocks:
        return LogitBlocks(inputs, rows, spec.kl_direction is not None, ws, with_slope=with_slope)

    def _block(self, inputs: HeadInputs, spec: HeadSpec, blocks: LogitBlocks, rows_c, y: Tensor,
               with_slope: bool, saved: Optional[TokenStats] = None) -> Tuple[_Block, TokenStats]:
        """Logits of the rows ``rows_c`` into the workspace, transformed, and their statistics
        (``saved``: use these rows' saved statistics instead of computing them)."""
        with_ref = spec.kl_direction is not None
        z, zq = blocks.logits(inputs, rows_c, with_ref)
        slope = blocks.slope(z) if with_slope else None
        transform_(z, spec, slope)
        if zq is not None:
            transform_(zq, spec)
        b = _Block(blocks, z, zq, slope, q=spec.kl_direction == "forward")
        return b, self._block_stats(b, y, spec) if saved is None else self._block_saved_stats(b, saved)

    @torch.no_grad()
    def forward(self, inputs: HeadInputs, spec: HeadSpec, objective: Optional[Objective] = None,
                coef_scale=None, needs: GradNeeds = GradNeeds()):
        """Per-token statistics of all ``N`` rows (0 where the target is ignored).

        With ``objective``: also its per-token :class:`Terms`, and when ``needs.any()`` the
        gradients of ``sum_i coef_scale * l_i`` (``coef_scale``: a float or 0-d tensor), formed
        block by block in the same pass. Returns ``(stats, terms, grads)``; ``terms`` / ``grads``
        are None when not asked for. Ignored rows are never computed (one host sync to find them).
        """
        valid = inputs.targets != spec.ignore_index
        rows = None if bool(valid.all()) else valid.nonzero().squeeze(1)
        n = inputs.num_rows if rows is None else rows.numel()
        with_grads = objective is not None and needs.any()
        block_rows = self._block_rows(inputs, spec, n)
        acc = _Accumulator(inputs, needs, block_rows) if with_grads else None
        stats_parts, term_parts = [], []
        with WORKSPACE.lease(inputs.hidden.device) as ws:
            if n:
                with_slope = with_grads and spec.softcap is not None
                blocks = self._blocks(inputs, spec, block_rows, ws, with_slope)
            for rows_c in self._row_chunks(inputs, spec, rows):
                y = inputs.targets[rows_c]
                b, st = self._block(inputs, spec, blocks, rows_c, y, with_slope)
                terms = self._collect(objective, st, y, rows_c, stats_parts, term_parts)
                if terms is not None and with_grads:
                    self._forward_grads(inputs, spec, rows_c, b, y, st, terms.coefs, coef_scale, acc)

        stats = _scatter_stats(stats_parts, rows, inputs, spec)
        terms = None
        if objective is not None:  # every row ignored: the objective still says "0, no gradient"
            terms = _scatter_terms(term_parts, rows, inputs.num_rows) if term_parts else objective.terms(stats, valid)
        return stats, terms, acc.finish(inputs) if with_grads else None

    @staticmethod
    def _collect(objective: Optional[Objective], st: TokenStats, y: Tensor, rows_c, stats_parts: list,
                 term_parts: list) -> Optional[Terms]:
        """Keep a block's statistics and, given an objective, its per-token terms (returned)."""
        stats_parts.append(st)
        if objective is None:
            return None
        terms = objective.terms(st, torch.ones_like(y, dtype=torch.bool), rows_c)
        term_parts.append(terms)
        return terms

    def _forward_grads(self, inputs, spec, rows_c, b: _Block, y, st, coefs, coef_scale, acc) -> None:
        """Gradient of one block in the forward pass; rows with zero coefficients are dropped
        before the GEMMs when that saves more GEMM work than the copy costs."""
        active = coefs.any_nonzero()
        n, n_active = y.shape[0], int(active.sum())
        if n_active == 0:  # every row PSFT-clipped: no gradient work
            return
        coefs = Coefficients(*(None if c is None else c * coef_scale for c in (coefs.logp, coefs.entropy, coefs.kl)))
        dx = self._block_dlogits(b, y, st, coefs, spec)
        if n_active < n and n_active * COMPACT_RATIO <= (n - n_active) * inputs.hidden.shape[1]:
            keep = active.nonzero().squeeze(1)
            dx = torch.index_select(dx, 0, keep, out=b.tmp[:n_active])
            rows_c = _arange_rows(rows_c, keep.device)[keep]
        acc.add(inputs, rows_c, dx, None, b.half)

    @torch.no_grad()
    def backward(self, inputs: HeadInputs, spec: HeadSpec, stats: TokenStats, coefs: Coefficients,
                 needs: GradNeeds) -> Grads:
        """Gradients for per-token coefficients over all ``N`` rows.

        Rows whose coefficients are all zero (PSFT-clipped tokens) and ignored rows are skipped:
        an ignored row's outputs are constants, whatever coefficient arrives for them. Each block's
        statistics are recomputed with its logits (``stats`` is not read): ``p`` then comes from
        the block's own max and log-sum, as in the forward.
        """
        active = coefs.any_nonzero() & (inputs.targets != spec.ignore_index)
        rows = active.nonzero().squeeze(1)
        block_rows = self._block_rows(inputs, spec, rows.numel())
        acc = _Accumulator(inputs, needs, block_rows)
        if not rows.numel():
            return acc.finish(inputs)
        with WORKSPACE.lease(inputs.hidden.device) as ws:
            with_slope = spec.softcap is not None
            blocks = self._blocks(inputs, spec, block_rows, ws, with_slope)
            for rows_c in self._row_chunks(inputs, spec, rows):
                y = inputs.targets[rows_c]
                saved = _take_stats(stats, rows_c) if self.backward_reads_saved_stats else None
                b, st = self._block(inputs, spec, blocks, rows_c, y, with_slope, saved)
                dx = self._block_dlogits(b, y, st, coefs.take(rows_c), spec)
                acc.add(inputs, rows_c, dx, None, b.half)
        return acc.finish(inputs)


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

    def add(self, inputs: HeadInputs, rows, dx: Tensor, scale: Optional[Tensor], half: Optional[Tensor] = None) -> None:
        """Add the block's contribution; its logit gradient is ``dx``, times ``scale[:, None]`` if given.
        With a bias gradient and ``scale``, ``dx`` is overwritten (scaled in place).

        ``half``: for half inputs, a buffer of ``dx``'s shape in their dtype to cast ``dx`` into for
        the ``grad_hidden`` GEMM (:meth:`LogitBlocks.half`), instead of a new block.
        """
        h, w, n = inputs.hidden, inputs.weight, dx.shape[0]
        plain = w.dtype == dx.dtype  # fp32 / fp64 inputs: no casts, so no temporaries
        index = not isinstance(rows, slice)
        if self.hidden is not None:
            if not plain:  # half inputs: this GEMM runs in their dtype (grad_weight's in fp32)
                dx_half = dx.to(w.dtype) if half is None else half[:n].copy_(dx)
                gh = (dx_half @ w).to(dx.dtype)
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
            # A reduction over rows, not a GEMV (dx^T scale): torch sums in a cascade, the GEMV row
            # by row, which at ~200 rows was 10x eager's error. dx is not read again: scale it in place.
            if scale is not None:
                dx.mul_(scale[:, None])
            if self.beta == 0:
                torch.sum(dx, 0, out=self.bias)
            else:
                self.bias.add_(dx.sum(0))
        self.beta = 1

    def finish(self, inputs: HeadInputs) -> Grads:
        if self.beta == 0:  # no block contributed
            for t in (self.weight, self.bias):
                if t is not None:
                    t.zero_()
        return Grads(hidden=self.hidden,
                     weight=None if self.weight is None else self.weight.to(inputs.weight.dtype),
                     bias=None if self.bias is None else self.bias.to(inputs.bias.dtype))


_STAT_FIELDS = ("lse", "logp", "entropy", "ref_lse", "kl")
_TERM_FIELDS = ("ratio", "blocked_high", "blocked_low")
_COEF_FIELDS = ("logp", "entropy", "kl")


def _take_stats(stats: TokenStats, rows) -> TokenStats:
    values = (getattr(stats, f.name) for f in dataclasses.fields(stats))
    return TokenStats(*(None if x is None else x[rows] for x in values))


def _scatter(parts: List[Optional[Tensor]], rows: Optional[Tensor], n: int, like: Tensor) -> Optional[Tensor]:
    """Concatenate per-chunk values of ``rows`` and spread them over ``n`` rows (zeros elsewhere)."""
    if not parts or parts[0] is None:
        return None
    flat = torch.cat(parts)
    if rows is None:
        return flat
    out = torch.zeros(n, dtype=flat.dtype, device=like.device)
    out[rows] = flat
    return out


def _scatter_stats(parts: List[TokenStats], rows, inputs: HeadInputs, spec: HeadSpec) -> TokenStats:
    n, h = inputs.num_rows, inputs.hidden
    if not parts:  # every row ignored
        zeros = torch.zeros(n, dtype=inputs.compute_dtype, device=h.device)
        has_ref = spec.kl_direction is not None
        return TokenStats(zeros, zeros, zeros, zeros if has_ref else None, zeros if has_ref else None)
    return TokenStats(*(_scatter([getattr(p, f) for p in parts], rows, n, h) for f in _STAT_FIELDS))


def _scatter_terms(parts: List[Terms], rows, n: int) -> Terms:
    like = parts[0].loss
    coefs = Coefficients(*(_scatter([getattr(p.coefs, f) for p in parts], rows, n, like) for f in _COEF_FIELDS))
    extra = (_scatter([getattr(p, f) for p in parts], rows, n, like) for f in _TERM_FIELDS)
    return Terms(_scatter([p.loss for p in parts], rows, n, like), coefs, *extra)
