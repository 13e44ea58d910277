"""The portable backend: pure PyTorch, any device, never more than ``chunk x V`` logits alive.

Rows (tokens) are processed in chunks. For each chunk the logits are formed by one GEMM against
the whole lm-head, reduced to per-token statistics, and dropped. The backward pass recomputes a
chunk's logits from the saved per-token ``lse`` (and ``H``, ``lse'``, ``KL``), forms ``dz`` for
the rows that have a non-zero coefficient only, and accumulates ``grad_weight`` in fp32.

When the loss is reduced to a scalar the per-token coefficients are known as soon as a chunk's
statistics are, so :meth:`ChunkedBackend.forward` can form the gradients in the same pass (the
``objective`` argument); the autograd Function then only scales them by ``grad_output``. That
saves the recomputation GEMM: three GEMMs in all, the dense floor.

Subclasses (the native CPU backend) override the three per-chunk hooks ``_chunk_stats``,
``_chunk_dlogits`` and ``_chunk_size``; the driver loops stay here.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from ._types import Coefficients, GradNeeds, Grads, HeadInputs, HeadSpec, TokenStats
from .objectives import Objective, Terms

# Elements of one (chunk x V) logit block. Several such blocks exist at once (logits, softmax,
# gradient, the reference model's logits for ASFT): 2^22 fp32 elements is 16 MiB a block.
DEFAULT_CHUNK_ELEMENTS = 1 << 22


def _logits(h: Tensor, w: Tensor, b: Optional[Tensor], spec: HeadSpec, dtype: torch.dtype,
            slope: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
    """``z = softcap(h W^T + b) / T`` in ``dtype`` (the GEMM runs in the input dtype).

    With ``slope`` and a softcap, also ``dz/dx * T = 1 - tanh^2(x / s) = 1 / cosh^2(x / s)``, from
    the raw logits: recovered from ``z`` it would carry an absolute error of a few ulps of 1,
    which near saturation (``z`` close to +-s) is most of its value. ``cosh`` overflowing to inf
    gives 0, which is right to within fp32's smallest normal.
    """
    x = h @ w.T if b is None else torch.addmm(b, h, w.T)
    x = x.to(dtype)
    dzdx = None
    if spec.softcap is not None:
        x = x.div_(spec.softcap)
        if slope:
            dzdx = torch.cosh(x).square_().reciprocal_()
        x = x.tanh_().mul_(spec.softcap)
    if spec.temperature != 1.0:
        x = x.div_(spec.temperature)
    return x, dzdx


def _take(x: Optional[Tensor], rows) -> Optional[Tensor]:
    return None if x is None else x[rows]


class ChunkedBackend:
    name = "chunked"

    def unavailable_reason(self, device: torch.device) -> Optional[str]:
        return None  # runs wherever PyTorch does

    # ------------------------------------------------------------------------------------------
    # per-chunk hooks
    # ------------------------------------------------------------------------------------------
    def _chunk_size(self, inputs: HeadInputs, spec: HeadSpec) -> int:
        if spec.chunk_size is not None:
            return spec.chunk_size
        return max(1, DEFAULT_CHUNK_ELEMENTS // inputs.vocab_size)

    def _chunk_stats(self, z: Tensor, y: Tensor, zq: Optional[Tensor], spec: HeadSpec) -> TokenStats:
        """Statistics of one chunk of valid rows: ``z`` (c, V) logits, ``y`` (c,) targets."""
        # Sums of p * log p, not lse - sum p z: no cancellation when the logits are large.
        lse = torch.logsumexp(z, dim=-1)
        log_p = z - lse[:, None]
        logp = log_p.gather(1, y[:, None]).squeeze(1)
        p = torch.exp(log_p)
        entropy = -(p * log_p).sum(-1)
        if zq is None:
            return TokenStats(lse, logp, entropy)
        ref_lse = torch.logsumexp(zq, dim=-1)
        log_q = zq - ref_lse[:, None]
        if spec.kl_direction == "forward":  # sum_v q_v (log q_v - log p_v)
            kl = (torch.exp(log_q) * (log_q - log_p)).sum(-1)
        else:  # sum_v p_v (log p_v - log q_v)
            kl = (p * (log_p - log_q)).sum(-1)
        return TokenStats(lse, logp, entropy, ref_lse, kl)

    def _chunk_dlogits(self, z: Tensor, y: Tensor, zq: Optional[Tensor], stats: TokenStats, coefs: Coefficients,
                       spec: HeadSpec, dzdx: Optional[Tensor] = None) -> Tensor:
        """``d loss / d x`` for one chunk (x: raw logits), overwriting ``z`` (METHOD.md, "The gradient").

        ``dzdx``: the softcap's slope (``_logits(slope=True)``), needed exactly when there is a softcap.
        """
        lse = stats.lse[:, None]
        log_p = z.sub_(lse)  # z is not needed any more: reuse its memory for log p
        dz = torch.exp(log_p)
        if coefs.kl is not None:
            ck = coefs.kl[:, None]
            log_q = zq.sub_(stats.ref_lse[:, None])
            if spec.kl_direction == "forward":  # ck (p - q)
                term = torch.exp(log_q).mul_(-ck).add_(dz * ck)
            else:  # ck p (log p - log q - KL)
                term = (log_p - log_q).sub_(stats.kl[:, None]).mul_(dz).mul_(ck)
        if coefs.entropy is not None:  # e * (-p (log p + H))
            ent = (log_p + stats.entropy[:, None]).mul_(dz).mul_(-coefs.entropy[:, None])
        g = coefs.logp if coefs.logp is not None else torch.zeros_like(stats.lse)
        dz.mul_(-g[:, None])  # g (onehot - p)
        self._add_onehot(dz, y, g)
        if coefs.entropy is not None:
            dz.add_(ent)
        if coefs.kl is not None:
            dz.add_(term)
        return self._through_transform(dz, dzdx, spec)

    @staticmethod
    def _add_onehot(dz: Tensor, y: Tensor, g: Tensor) -> None:
        """``dz[i, y_i] += g_i`` (a hook: a vocabulary shard skips targets held by another shard)."""
        dz[torch.arange(dz.shape[0], device=dz.device), y] += g

    @staticmethod
    def _through_transform(dz: Tensor, dzdx: Optional[Tensor], spec: HeadSpec) -> Tensor:
        """Chain rule through ``/ T`` and the softcap (``1 - tanh^2``, given as ``dzdx``)."""
        if spec.temperature != 1.0:
            dz.div_(spec.temperature)
        if spec.softcap is not None:
            dz.mul_(dzdx)
        return dz

    # ------------------------------------------------------------------------------------------
    # drivers
    # ------------------------------------------------------------------------------------------
    def _logit_block(self, inputs: HeadInputs, spec: HeadSpec, rows_c,
                     slope: bool = False) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
        """Logits ``z``, the reference model's ``z'`` and (``slope``) the softcap's slope of ``z``."""
        dtype = inputs.compute_dtype
        z, dzdx = _logits(inputs.hidden[rows_c], inputs.weight, inputs.bias, spec, dtype, slope)
        zq = None
        if spec.kl_direction is not None:
            zq, _ = _logits(inputs.ref_hidden[rows_c], inputs.ref_weight, inputs.ref_bias, spec, dtype)
        return z, zq, dzdx

    def _row_chunks(self, inputs: HeadInputs, spec: HeadSpec, rows: Optional[Tensor]):
        """Yield the rows of each chunk: a slice of all rows, or a piece of the index ``rows``."""
        n = inputs.num_rows if rows is None else rows.numel()
        step = self._chunk_size(inputs, spec)
        for start in range(0, n, step):
            yield slice(start, min(n, start + step)) if rows is None else rows[start:start + step]

    @staticmethod
    def _new_grads(inputs: HeadInputs, needs: GradNeeds) -> Tuple[Grads, Optional[Tensor], Optional[Tensor]]:
        h, w = inputs.hidden, inputs.weight
        acc = torch.promote_types(h.dtype, torch.float32)
        grads = Grads(hidden=torch.zeros_like(h) if needs.hidden else None)
        gw = torch.zeros(w.shape, dtype=acc, device=w.device) if needs.weight else None
        gb = torch.zeros(w.shape[0], dtype=acc, device=w.device) if needs.bias else None
        return grads, gw, gb

    @staticmethod
    def _accumulate(inputs: HeadInputs, rows_c, dx: Tensor, grads: Grads, gw, gb) -> None:
        if grads.hidden is not None:
            grads.hidden[rows_c] = (dx.to(inputs.weight.dtype) @ inputs.weight).to(grads.hidden.dtype)
        if gw is not None:  # fp32 accumulation across chunks, whatever the input dtype
            gw.addmm_(dx.T, inputs.hidden[rows_c].to(dx.dtype))
        if gb is not None:
            gb.add_(dx.sum(0))

    @staticmethod
    def _finish_grads(inputs: HeadInputs, grads: Grads, gw, gb) -> Grads:
        grads.weight = None if gw is None else gw.to(inputs.weight.dtype)
        grads.bias = None if gb is None else gb.to(inputs.bias.dtype)
        return grads

    @torch.no_grad()
    def forward(self, inputs: HeadInputs, spec: HeadSpec, objective: Optional[Objective] = None,
                coef_scale=None, needs: GradNeeds = GradNeeds()):
        """Per-token statistics of all ``N`` rows (0 where the target is ignored).

        With ``objective``: also its per-token :class:`Terms`, and when ``needs.any()`` the
        gradients of ``sum_i coef_scale * l_i`` (``coef_scale``: a float or 0-d tensor), formed
        chunk by chunk in the same pass. Returns ``(stats, terms, grads)``; ``terms`` / ``grads``
        are None when not asked for. Ignored rows are never computed (one host sync to find them).
        """
        valid = inputs.targets != spec.ignore_index
        rows = None if bool(valid.all()) else valid.nonzero().squeeze(1)
        with_grads = objective is not None and needs.any()
        if with_grads:
            grads, gw, gb = self._new_grads(inputs, needs)
        stats_parts, term_parts = [], []
        for rows_c in self._row_chunks(inputs, spec, rows):
            z, zq, dzdx = self._logit_block(inputs, spec, rows_c, slope=with_grads)
            y = inputs.targets[rows_c]
            st = self._chunk_stats(z, y, zq, spec)
            terms = self._collect(objective, st, y, rows_c, stats_parts, term_parts)
            if terms is not None and with_grads:
                self._chunk_grads(inputs, spec, rows_c, z, y, zq, dzdx, st, terms.coefs, coef_scale, grads, gw, gb)

        stats = _scatter_stats(stats_parts, rows, inputs, spec)
        terms = None
        if objective is not None:  # every row ignored: the objective still says "0, no gradient"
            terms = _scatter_terms(term_parts, rows, inputs.num_rows) if term_parts else objective.terms(stats, valid)
        grads = self._finish_grads(inputs, grads, gw, gb) if with_grads else None
        return stats, terms, grads

    @staticmethod
    def _collect(objective: Optional[Objective], st: TokenStats, y: Tensor, rows_c, stats_parts: list,
                 term_parts: list) -> Optional[Terms]:
        """Keep a chunk's statistics and, given an objective, its per-token terms (returned)."""
        stats_parts.append(st)
        if objective is None:
            return None
        terms = objective.terms(st, torch.ones_like(y, dtype=torch.bool), rows_c)
        term_parts.append(terms)
        return terms

    def _chunk_grads(self, inputs, spec, rows_c, z, y, zq, dzdx, st, coefs, coef_scale, grads, gw, gb):
        """Gradient of one chunk in the forward pass; rows with zero coefficients are dropped."""
        active = coefs.any_nonzero()
        if not bool(active.all()):  # PSFT-clipped rows: no gradient work
            keep = active.nonzero().squeeze(1)
            if keep.numel() == 0:
                return
            if isinstance(rows_c, slice):
                rows_c = torch.arange(rows_c.start, rows_c.stop, device=keep.device)
            rows_c, z, y, zq, dzdx = rows_c[keep], z[keep], y[keep], _take(zq, keep), _take(dzdx, keep)
            st = _take_stats(st, keep)
            coefs = coefs.take(keep)
        coefs = Coefficients(*(None if c is None else c * coef_scale for c in (coefs.logp, coefs.entropy, coefs.kl)))
        dx = self._chunk_dlogits(z, y, zq, st, coefs, spec, dzdx)
        self._accumulate(inputs, rows_c, dx, grads, gw, gb)

    @torch.no_grad()
    def backward(self, inputs: HeadInputs, spec: HeadSpec, stats: TokenStats, coefs: Coefficients,
                 needs: GradNeeds) -> Grads:
        """Gradients for per-token coefficients over all ``N`` rows (``stats`` also over ``N``).

        Rows whose coefficients are all zero (PSFT-clipped tokens) and ignored rows are skipped:
        an ignored row's outputs are constants, whatever coefficient arrives for them.
        """
        grads, gw, gb = self._new_grads(inputs, needs)
        active = coefs.any_nonzero() & (inputs.targets != spec.ignore_index)
        rows = active.nonzero().squeeze(1)
        if rows.numel():
            for rows_c in self._row_chunks(inputs, spec, rows):
                z, zq, dzdx = self._logit_block(inputs, spec, rows_c, slope=True)
                st = _take_stats(stats, rows_c)
                dx = self._chunk_dlogits(z, inputs.targets[rows_c], zq, st, coefs.take(rows_c), spec, dzdx)
                self._accumulate(inputs, rows_c, dx, grads, gw, gb)
        return self._finish_grads(inputs, grads, gw, gb)


_STAT_FIELDS = ("lse", "logp", "entropy", "ref_lse", "kl")
_TERM_FIELDS = ("ratio", "blocked_high", "blocked_low")
_COEF_FIELDS = ("logp", "entropy", "kl")


def _take_stats(stats: TokenStats, rows) -> TokenStats:
    return TokenStats(*(_take(getattr(stats, f), rows) for f in _STAT_FIELDS))


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
