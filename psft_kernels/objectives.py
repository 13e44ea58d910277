"""Per-token objectives, their gradient coefficients, reductions and stats.

This is the one place the fast backends take the loss math from (METHOD.md, "Per-token
objectives"). A backend streams the vocabulary to per-token ``logp``, ``H`` (and ``KL``); this
module turns those into the per-token loss ``l_i`` and the coefficients

    g_i = dl_i/dlogp_i,   e_i = dl_i/dH_i,   k_i = dl_i/dKL_i

that the backward pass needs. Everything here is O(N): no vocabulary-sized tensor is touched.
:mod:`psft_kernels.reference` computes the same quantities the plain way, through autograd on
materialized logits, and the tests hold the two against each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Union

import torch
from torch import Tensor

from ._types import Coefficients, TokenStats

LOG_RATIO_CLAMP = 20.0  # verl clamps log(pi/pi_old) to +-20 before exp; the clamp passes no gradient


@dataclass
class Terms:
    """Per-token results of an objective for a block of rows."""

    loss: Tensor  # (n,) l_i, 0 where ignored
    coefs: Coefficients  # per unit of l_i
    # PSFT only: ratio r_i, and whether the token's gradient is blocked above / below r = 1.
    ratio: Optional[Tensor] = None
    blocked_high: Optional[Tensor] = None
    blocked_low: Optional[Tensor] = None


@dataclass
class Objective:
    """One member of the loss family, with its per-token data already flattened to ``(N,)``.

    ``kind`` is ``"sft"``, ``"psft"``, ``"dft"`` or ``"asft"``.
    """

    kind: str
    entropy_coef: float = 0.0
    eps_low: float = 0.2
    eps_high: float = 0.28
    kl_coef: float = 0.0
    # Dual clip (verl's clip_ratio_c): tokens with A < 0 lose at most -A c; None = off.
    clip_ratio_c: Optional[float] = None
    old_logprobs: Optional[Tensor] = None  # (N,) pi_old log-probs; None -> r = 1
    advantages: Union[float, Tensor] = 1.0  # scalar or (N,)

    @property
    def uses_kl(self) -> bool:
        return self.kind == "asft"

    def _per_row(self, x, rows: Optional[Tensor]):
        if isinstance(x, Tensor) and x.dim() > 0 and rows is not None:
            return x[rows]
        return x

    def terms(self, stats: TokenStats, valid: Tensor, rows: Optional[Tensor] = None) -> Terms:
        """Per-token loss and coefficients for the rows ``rows`` (all rows when None).

        ``stats`` and ``valid`` (the non-ignored mask) are already restricted to those rows.
        """
        logp, entropy = stats.logp, stats.entropy
        zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
        ratio = blocked_high = blocked_low = None
        coef_kl = None
        if self.kind == "sft":
            loss, g = -logp, torch.full_like(logp, -1.0)
        elif self.kind in ("dft", "asft"):
            p = logp.exp()  # sg(p_i): a weight, not differentiated
            loss, g = -p * logp, -p
            if self.kind == "asft":
                loss = loss + self.kl_coef * stats.kl
                coef_kl = torch.where(valid, torch.full_like(logp, self.kl_coef), zero) if self.kl_coef else None
        elif self.kind == "psft":
            loss, g, ratio, blocked_high, blocked_low = self._psft(logp, valid, rows)
        else:  # pragma: no cover - guarded by the public API
            raise ValueError(f"unknown objective {self.kind!r}")

        coef_entropy = None
        if self.entropy_coef:
            loss = loss - self.entropy_coef * entropy
            coef_entropy = torch.where(valid, torch.full_like(logp, -self.entropy_coef), zero)
        loss = torch.where(valid, loss, zero)
        g = torch.where(valid, g, zero)
        return Terms(loss, Coefficients(g, coef_entropy, coef_kl), ratio, blocked_high, blocked_low)

    def _psft(self, logp: Tensor, valid: Tensor, rows: Optional[Tensor]):
        old = self._per_row(self.old_logprobs, rows)
        adv = self._per_row(self.advantages, rows)
        if old is None:
            old = logp.detach()
        old = old.to(logp.dtype)
        adv = adv.to(logp.dtype) if isinstance(adv, Tensor) else torch.tensor(adv, dtype=logp.dtype, device=logp.device)
        log_ratio = logp - old
        ratio = log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP).exp()
        # -min(r A, clip(r) A) == max(-r A, -clip(r) A): the form verl writes.
        loss = torch.maximum(-adv * ratio, -adv * ratio.clamp(1.0 - self.eps_low, 1.0 + self.eps_high))
        unclipped = torch.where(adv >= 0, ratio <= 1.0 + self.eps_high, ratio >= 1.0 - self.eps_low)
        flows = unclipped & (log_ratio.abs() <= LOG_RATIO_CLAMP)
        if self.clip_ratio_c is not None:
            # Dual clip: min(loss, -A c) for A < 0. Since c > 1 >= 1 - eps_low, the bound is below
            # the clipped loss exactly when r > c; there the loss is a constant (no gradient).
            dual = (adv < 0) & (ratio > self.clip_ratio_c)
            loss = torch.where(dual, -adv * self.clip_ratio_c, loss)
            flows = flows & ~dual
        g = torch.where(flows, -adv * ratio, torch.zeros_like(ratio))
        blocked = valid & (adv != 0) & ~flows
        return loss, g, ratio, blocked & (ratio > 1), blocked & (ratio < 1)


# ----------------------------------------------------------------------------------------------
# Reductions
# ----------------------------------------------------------------------------------------------


def token_weight(reduction: str, num_valid: Tensor, num_items_in_batch) -> Union[float, Tensor]:
    """The factor every per-token loss is multiplied by before summing (docs/method.md, "Reductions").

    ``num_items_in_batch`` (Hugging Face's meaning) divides the sum for ``"mean"`` and ``"sum"``
    alike: ``F.cross_entropy(..., reduction="sum") / num_items_in_batch``.
    """
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, Tensor):
            n = num_items_in_batch.to(device=num_valid.device, dtype=torch.float64).clamp(min=1)
            return n.reciprocal().reshape(())
        return 1.0 / float(num_items_in_batch)
    if reduction == "sum":
        return 1.0
    return num_valid.clamp(min=1).to(torch.float64).reciprocal()


def reduce(per_token: Tensor, reduction: str, num_valid: Tensor, num_items_in_batch) -> Tensor:
    """``per_token`` is 0 where ignored; returns a scalar (mean / sum) or ``per_token`` (none)."""
    if reduction == "none":
        return per_token
    total = per_token.sum()
    if reduction == "sum" and num_items_in_batch is None:
        return total
    w = token_weight(reduction, num_valid, num_items_in_batch)
    return total * (w.to(total.dtype) if isinstance(w, Tensor) else w)


def masked_mean(x: Tensor, valid: Tensor) -> Tensor:
    """Mean over valid entries; 0 when there are none (never NaN from an empty batch)."""
    x = torch.where(valid, x, torch.zeros((), dtype=x.dtype, device=x.device))
    return x.sum() / valid.sum().clamp(min=1).to(x.dtype)


def build_stats(
    kind: str,
    batch_shape: torch.Size,
    valid: Tensor,
    stats: TokenStats,
    terms: Optional[Terms] = None,
    old_logprobs: Optional[Tensor] = None,
    objective: Optional[Objective] = None,
) -> Dict[str, Tensor]:
    """The ``stats`` dict of ``return_stats=True``. All entries are detached tensors (no sync)."""
    logp, entropy = stats.logp.detach(), stats.entropy.detach()
    out = {
        "logprobs": logp.reshape(batch_shape),
        "entropy": entropy.reshape(batch_shape),
        "num_tokens": valid.sum(),
        "nll": masked_mean(-logp, valid),
        "entropy_mean": masked_mean(entropy, valid),
    }
    if kind == "psft":
        high = masked_mean(terms.blocked_high.to(logp.dtype), valid)
        low = masked_mean(terms.blocked_low.to(logp.dtype), valid)
        out.update(
            clip_fraction=high + low,
            clip_fraction_high=high,
            clip_fraction_low=low,
            ratio_mean=masked_mean(terms.ratio.detach(), valid),
            approx_kl=masked_mean((old_logprobs - logp) if old_logprobs is not None else torch.zeros_like(logp), valid),
        )
        if objective is not None and objective.clip_ratio_c is not None:
            adv = objective.advantages
            negative = (adv < 0) if isinstance(adv, Tensor) else torch.full_like(valid, adv < 0)
            dual = negative & (terms.ratio.detach() > objective.clip_ratio_c)
            out["clip_fraction_dual"] = masked_mean(dual.to(logp.dtype), valid)
    if kind == "asft":
        out["kl"] = masked_mean(stats.kl.detach(), valid)
    return out
