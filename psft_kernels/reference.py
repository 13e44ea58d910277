"""The oracle: every loss computed the plain way, from materialized ``(N, V)`` logits.

Eager PyTorch and autograd, no chunking, no hand-written gradients: this is what the test
suite and the benchmarks measure the fast backends against, and what ``backend="reference"``
runs. The logits are upcast to fp32 (fp64 for fp64 inputs) before the softmax, as Hugging Face
models do. The formulas follow the official code of each method (METHOD.md, "Sources"):

* PSFT: verl's ``compute_policy_loss`` with advantage 1 (clamped log-ratio, ``max`` of the
  negated unclipped and clipped surrogates).
* DFT: cross-entropy times the detached probability of the target.
* ASFT: DFT plus ``kl_coef`` times the per-token KL to a frozen reference model, over the full
  vocabulary.

It costs ``O(N V)`` memory; use it to check, not to train.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _validation as V
from .objectives import LOG_RATIO_CLAMP, masked_mean, reduce


def logits(hidden: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *, temperature: float = 1.0,
           softcap: Optional[float] = None) -> Tensor:
    """``softcap * tanh((h W^T + b) / softcap) / temperature``, upcast to at least fp32."""
    x = F.linear(hidden, weight, bias)
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    return x / temperature


def _head(hidden, weight, targets, bias, temperature, softcap, ignore_index, **ref):
    temperature = V.check_positive("temperature", temperature)
    softcap = V.check_positive("softcap", softcap, allow_none=True)
    inputs, batch_shape = V.check_head(hidden, weight, targets, bias, ignore_index, **ref)
    log_probs = torch.log_softmax(
        logits(inputs.hidden, inputs.weight, inputs.bias, temperature=temperature, softcap=softcap), dim=-1
    )
    valid = inputs.targets != ignore_index
    safe_targets = torch.where(valid, inputs.targets, 0)
    zero = torch.zeros((), dtype=log_probs.dtype, device=log_probs.device)
    logp = torch.where(valid, log_probs.gather(-1, safe_targets[:, None]).squeeze(-1), zero)
    entropy = torch.where(valid, -(log_probs.exp() * log_probs).sum(-1), zero)
    return inputs, batch_shape, log_probs, valid, logp, entropy


def _finish(per_token, valid, batch_shape, reduction, num_items_in_batch, return_stats, stats):
    per_token = torch.where(valid, per_token, torch.zeros((), dtype=per_token.dtype, device=per_token.device))
    loss = reduce(per_token, reduction, valid.sum(), num_items_in_batch)
    if reduction == "none":
        loss = loss.reshape(batch_shape)
    return (loss, stats) if return_stats else loss


def _base_stats(batch_shape, valid, logp, entropy):
    return {
        "logprobs": logp.detach().reshape(batch_shape),
        "entropy": entropy.detach().reshape(batch_shape),
        "num_tokens": valid.sum(),
        "nll": masked_mean(-logp.detach(), valid),
        "entropy_mean": masked_mean(entropy.detach(), valid),
    }


def _check_loss_options(reduction, num_items_in_batch, entropy_coef, return_stats):
    V.check_choice("reduction", reduction, V.REDUCTIONS)
    V.check_real("entropy_coef", entropy_coef)
    V.check_bool("return_stats", return_stats)
    return V.check_num_items(num_items_in_batch, reduction)


def linear_logprobs(hidden, weight, targets, *, bias=None, temperature=1.0, softcap=None, ignore_index=-100):
    """Per-token ``log softmax(z)[target]`` and full-vocabulary entropy, both shaped like targets."""
    _, batch_shape, _, _, logp, entropy = _head(hidden, weight, targets, bias, temperature, softcap, ignore_index)
    return logp.reshape(batch_shape), entropy.reshape(batch_shape)


def linear_sft_loss(hidden, weight, targets, *, bias=None, entropy_coef=0.0, temperature=1.0, softcap=None,
                    ignore_index=-100, reduction="mean", num_items_in_batch=None, return_stats=False):
    """Cross-entropy ``-logp`` (minus ``entropy_coef * H``)."""
    num_items_in_batch = _check_loss_options(reduction, num_items_in_batch, entropy_coef, return_stats)
    _, batch_shape, _, valid, logp, entropy = _head(hidden, weight, targets, bias, temperature, softcap, ignore_index)
    per_token = -logp - entropy_coef * entropy
    stats = _base_stats(batch_shape, valid, logp, entropy)
    return _finish(per_token, valid, batch_shape, reduction, num_items_in_batch, return_stats, stats)


def linear_dft_loss(hidden, weight, targets, *, bias=None, entropy_coef=0.0, temperature=1.0, softcap=None,
                    ignore_index=-100, reduction="mean", num_items_in_batch=None, return_stats=False):
    """Dynamic fine-tuning: ``-sg(p) logp`` with ``p = exp(logp)``."""
    num_items_in_batch = _check_loss_options(reduction, num_items_in_batch, entropy_coef, return_stats)
    _, batch_shape, _, valid, logp, entropy = _head(hidden, weight, targets, bias, temperature, softcap, ignore_index)
    per_token = -logp.exp().detach() * logp - entropy_coef * entropy
    stats = _base_stats(batch_shape, valid, logp, entropy)
    return _finish(per_token, valid, batch_shape, reduction, num_items_in_batch, return_stats, stats)


def linear_psft_loss(hidden, weight, targets, old_logprobs=None, *, advantages=None, bias=None, eps_low=0.2,
                     eps_high=0.28, clip_ratio_c=None, entropy_coef=0.0, temperature=1.0, softcap=None,
                     ignore_index=-100, reduction="mean", num_items_in_batch=None, return_stats=False):
    """Proximal SFT: the PPO clipped surrogate with ``r = pi / pi_old`` and advantage ``A`` (default 1).

    ``clip_ratio_c``: verl's dual clip, ``min(surrogate, -A c)`` for tokens with ``A < 0``.
    """
    num_items_in_batch = _check_loss_options(reduction, num_items_in_batch, entropy_coef, return_stats)
    eps_low = V.check_eps_low(eps_low)
    eps_high = V.check_nonnegative("eps_high", eps_high)
    clip_ratio_c = V.check_clip_ratio_c(clip_ratio_c)
    inputs, batch_shape, _, valid, logp, entropy = _head(hidden, weight, targets, bias, temperature, softcap,
                                                         ignore_index)
    old = V.check_per_token("old_logprobs", old_logprobs, batch_shape, logp.device, broadcast=False)
    adv = V.check_per_token("advantages", advantages, batch_shape, logp.device, broadcast=True)
    if old is not None:
        V.check_old_logprobs(old.reshape(-1), inputs.targets, int(ignore_index))
    old = logp.detach() if old is None else old.reshape(-1).to(logp.dtype)
    adv = torch.as_tensor(1.0 if adv is None else adv, dtype=logp.dtype, device=logp.device)
    adv = adv.expand(batch_shape).reshape(-1)

    log_ratio = logp - old
    ratio = torch.exp(torch.clamp(log_ratio, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    pg_unclipped = -adv * ratio
    pg_clipped = -adv * torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    surrogate = torch.maximum(pg_unclipped, pg_clipped)
    dual = torch.zeros_like(valid)
    if clip_ratio_c is not None:  # verl's dual clip: negative advantages lose at most -A c
        pg_bound = -adv * clip_ratio_c
        dual = (adv < 0) & (surrogate > pg_bound)
        surrogate = torch.where(adv < 0, torch.minimum(surrogate, pg_bound), surrogate)
    per_token = surrogate - entropy_coef * entropy

    stats = _base_stats(batch_shape, valid, logp, entropy)
    # A token's gradient is blocked when the clipped branch wins, the dual clip's bound holds or
    # the log-ratio clamp saturates.
    blocked = valid & (adv != 0) & ((pg_clipped > pg_unclipped) | dual | (log_ratio.abs() > LOG_RATIO_CLAMP))
    high = masked_mean((blocked & (ratio > 1)).to(logp.dtype), valid)
    low = masked_mean((blocked & (ratio < 1)).to(logp.dtype), valid)
    stats.update(clip_fraction=high + low, clip_fraction_high=high, clip_fraction_low=low,
                 ratio_mean=masked_mean(ratio.detach(), valid),
                 approx_kl=masked_mean((old - logp).detach(), valid))
    if clip_ratio_c is not None:
        stats["clip_fraction_dual"] = masked_mean(dual.to(logp.dtype), valid)
    return _finish(per_token, valid, batch_shape, reduction, num_items_in_batch, return_stats, stats)


def linear_asft_loss(hidden, weight, targets, ref_hidden, ref_weight, *, ref_bias=None, bias=None, kl_coef=0.05,
                     kl_direction="forward", entropy_coef=0.0, temperature=1.0, softcap=None, ignore_index=-100,
                     reduction="mean", num_items_in_batch=None, return_stats=False):
    """Anchored SFT: DFT plus ``kl_coef * KL`` to a frozen reference model over the full vocabulary.

    ``kl_direction="forward"`` is ``KL(q || p)`` (the official code's ``F.kl_div(log p, q)``);
    ``"reverse"`` is ``KL(p || q)`` (the paper's text). ``q`` comes from ``ref_hidden @ ref_weight.T``.
    """
    num_items_in_batch = _check_loss_options(reduction, num_items_in_batch, entropy_coef, return_stats)
    V.check_choice("kl_direction", kl_direction, V.KL_DIRECTIONS)
    V.check_nonnegative("kl_coef", kl_coef)
    inputs, batch_shape, log_p, valid, logp, entropy = _head(
        hidden, weight, targets, bias, temperature, softcap, ignore_index,
        ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=ref_bias, need_ref=True,
    )
    with torch.no_grad():
        log_q = torch.log_softmax(logits(inputs.ref_hidden, inputs.ref_weight, inputs.ref_bias,
                                         temperature=temperature, softcap=softcap), dim=-1).to(log_p.dtype)
    if kl_direction == "forward":
        kl = (log_q.exp() * (log_q - log_p)).sum(-1)
    else:
        kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    kl = torch.where(valid, kl, torch.zeros((), dtype=kl.dtype, device=kl.device))
    per_token = -logp.exp().detach() * logp + kl_coef * kl - entropy_coef * entropy
    stats = _base_stats(batch_shape, valid, logp, entropy)
    stats["kl"] = masked_mean(kl.detach(), valid)
    return _finish(per_token, valid, batch_shape, reduction, num_items_in_batch, return_stats, stats)
