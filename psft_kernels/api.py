"""The public functions: validate, pick a backend, run, reduce, report stats.

Each function is the fused equivalent of materializing ``logits = hidden @ weight.T + bias`` and
applying the loss; :mod:`psft_kernels.reference` is that equivalent, written out.

Two options concern only how gradients are computed, and only the Triton backend acts on them
(the other backends compute exact gradients deterministically and ignore them; docs/triton.md):

* ``filter_eps``: None (default, exact) or a threshold such as ``2**-12``: skip gradient tiles
  in which every probability is below it (Cut Cross-Entropy's gradient filtering).
* ``deterministic``: True forbids float atomics (bitwise-reproducible gradients).

``vocab_parallel=pk.VocabParallel(group, start)`` (or ``(group, start)``, or a ``Shard(0)`` DTensor
weight) says that ``weight`` / ``bias`` (and ``ref_weight`` / ``ref_bias``) hold rows
``[start, start + V_local)`` of a head sharded across ``group``; targets stay global ids and every
rank gets the unsharded results (:mod:`psft_kernels.vocab_parallel`, docs/vocab_parallel.md).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _validation as V
from . import backends, reference
from . import vocab_parallel as _vp
from ._types import HeadSpec
from .autograd import Plan, run_logprobs, run_loss
from .objectives import Objective, build_stats


def _spec(temperature, softcap, ignore_index, chunk_size, kl_direction=None, filter_eps=None,
          deterministic=False) -> HeadSpec:
    return HeadSpec(
        temperature=V.check_positive("temperature", temperature),
        softcap=V.check_positive("softcap", softcap, allow_none=True),
        ignore_index=ignore_index,
        kl_direction=kl_direction,
        chunk_size=V.check_chunk_size(chunk_size),
        filter_eps=V.check_filter_eps(filter_eps),
        deterministic=V.check_bool("deterministic", deterministic),
    )


def _resolve(backend, hidden, weight, targets, bias, ignore_index, vocab_parallel=None, **ref):
    """Validate the head, pick the backend, then check target ranges unless the backend does.

    The range check reads a flag back to the host; a backend whose kernels handle bad targets
    without reading out of bounds (Triton on CUDA) skips it, keeping the forward sync-free.
    Returns ``(backend, inputs, batch_shape, host_checks)``: whether value checks that sync
    (targets, old_logprobs) run on this call.
    """
    inputs, batch_shape = V.check_head(hidden, weight, targets, bias, ignore_index, check_range=False, **ref)
    if vocab_parallel is not None:  # targets are global ids: the merge checks them against the shards
        # The old_logprobs check reads back to the host like the merge's target check does.
        return _vp.resolve(backend, inputs, int(ignore_index), vocab_parallel), inputs, batch_shape, True
    be = backends.resolve(backend, inputs.hidden.device)
    skips = getattr(be, "skips_host_target_check", None)
    host_checks = skips is None or not skips(inputs.hidden.device)
    if host_checks:
        V.check_targets_range(inputs.targets, inputs.vocab_size, int(ignore_index))
    return be, inputs, batch_shape, host_checks


def linear_logprobs(
    hidden: Tensor,  # (..., D)
    weight: Tensor,  # (V, D)
    targets: Tensor,  # (...) int64
    *,
    bias: Optional[Tensor] = None,  # (V,)
    temperature: float = 1.0,
    softcap: Optional[float] = None,
    ignore_index: int = -100,
    backend: str = "auto",
    chunk_size: Optional[int] = None,
    filter_eps: Optional[float] = None,
    deterministic: bool = False,
    vocab_parallel=None,  # pk.VocabParallel(group, start) or (group, start): weight is a vocabulary shard
):
    """Per-token log-probability of the target and full-vocabulary entropy, both differentiable.

    PyTorch equivalent: ``lp = log_softmax(softcap(hidden @ weight.T + bias) / temperature, -1)``;
    ``(lp.gather(-1, targets[..., None])[..., 0], -(lp.exp() * lp).sum(-1))``, without the
    ``(..., V)`` tensor. Both outputs are shaped like ``targets``, fp32 (fp64 for fp64 inputs),
    and 0 where ``targets == ignore_index``. Without gradients this is the forward-only pass
    (the pi_old pass of PSFT): it saves nothing.
    """
    V.check_choice("backend", backend, V.BACKENDS)
    V.check_filter_eps(filter_eps)
    V.check_bool("deterministic", deterministic)
    V.check_chunk_size(chunk_size)  # every backend refuses a bad one, even those that ignore it
    vp, hidden, weight, bias, _, _, _ = _vp.localize(vocab_parallel, hidden, weight, bias)
    if backend == "reference":
        if vp is not None:
            return _vp.reference("logprobs", vp, hidden, weight, targets, bias=bias, temperature=temperature,
                                 softcap=softcap, ignore_index=ignore_index)
        return reference.linear_logprobs(hidden, weight, targets, bias=bias, temperature=temperature,
                                         softcap=softcap, ignore_index=ignore_index)
    spec = _spec(temperature, softcap, ignore_index, chunk_size, filter_eps=filter_eps, deterministic=deterministic)
    be, inputs, batch_shape, _ = _resolve(backend, hidden, weight, targets, bias, ignore_index, vp)
    plan = Plan(be, spec, inputs)
    logp, entropy = run_logprobs(plan)
    return logp.reshape(batch_shape), entropy.reshape(batch_shape)


def _loss(kind, hidden, weight, targets, *, bias, entropy_coef, temperature, softcap, ignore_index, reduction,
          num_items_in_batch, backend, return_stats, chunk_size, filter_eps, deterministic, ref=None,
          kl_direction=None, vocab_parallel=None, **objective):
    be, inputs, batch_shape, host_checks = _resolve(backend, hidden, weight, targets, bias, ignore_index,
                                                    vocab_parallel, need_ref=ref is not None, **(ref or {}))
    spec = _spec(temperature, softcap, ignore_index, chunk_size, kl_direction, filter_eps, deterministic)
    device = inputs.hidden.device
    old = V.check_per_token("old_logprobs", objective.pop("old_logprobs", None), batch_shape, device, broadcast=False)
    adv = V.check_per_token("advantages", objective.pop("advantages", None), batch_shape, device, broadcast=True)
    dtype = inputs.compute_dtype
    if old is not None:
        old = old.reshape(-1).to(dtype)
        if host_checks:  # sync-free on CUDA with Triton unless PSFT_KERNELS_CHECK_TARGETS=1, like targets
            V.check_old_logprobs(old, inputs.targets, int(ignore_index))
    if isinstance(adv, Tensor):
        adv = adv.to(dtype).expand(batch_shape).reshape(-1)
    obj = Objective(kind, entropy_coef=entropy_coef, old_logprobs=old, advantages=1.0 if adv is None else adv,
                    **objective)
    plan = Plan(be, spec, inputs, obj, reduction, num_items_in_batch)
    loss, stats, terms = run_loss(plan)
    if reduction == "none":
        loss = loss.reshape(batch_shape)
    if not return_stats:
        return loss
    valid = inputs.targets != ignore_index
    return loss, build_stats(kind, batch_shape, valid, stats, terms, old, obj)


def _common(reduction, num_items_in_batch, backend, entropy_coef, filter_eps=None, deterministic=False,
            chunk_size=None, return_stats=False):
    """The options every loss shares, checked before any backend is chosen (all backends agree)."""
    V.check_choice("reduction", reduction, V.REDUCTIONS)
    V.check_choice("backend", backend, V.BACKENDS)
    V.check_filter_eps(filter_eps)
    V.check_bool("deterministic", deterministic)
    V.check_bool("return_stats", return_stats)
    V.check_chunk_size(chunk_size)
    return V.check_num_items(num_items_in_batch, reduction), V.check_real("entropy_coef", entropy_coef)


def linear_sft_loss(
    hidden: Tensor,  # (..., D)
    weight: Tensor,  # (V, D)
    targets: Tensor,  # (...) int64
    *,
    bias: Optional[Tensor] = None,  # (V,)
    entropy_coef: float = 0.0,
    temperature: float = 1.0,
    softcap: Optional[float] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch=None,
    backend: str = "auto",
    return_stats: bool = False,
    chunk_size: Optional[int] = None,
    filter_eps: Optional[float] = None,
    deterministic: bool = False,
    vocab_parallel=None,  # pk.VocabParallel(group, start) or (group, start): weight is a vocabulary shard
):
    """Cross-entropy of the lm-head, fused.

    PyTorch equivalent: ``F.cross_entropy((hidden @ weight.T + bias).float().flatten(0, -2),
    targets.flatten(), ignore_index=ignore_index, reduction=reduction)`` (plus softcap,
    temperature, ``- entropy_coef * H``; ``num_items_in_batch`` divides the sum instead).
    """
    num_items_in_batch, entropy_coef = _common(reduction, num_items_in_batch, backend, entropy_coef, filter_eps,
                                               deterministic, chunk_size, return_stats)
    kw = dict(bias=bias, entropy_coef=entropy_coef, temperature=temperature, softcap=softcap,
              ignore_index=ignore_index, reduction=reduction, num_items_in_batch=num_items_in_batch,
              return_stats=return_stats)
    vp, hidden, weight, bias, _, _, _ = _vp.localize(vocab_parallel, hidden, weight, bias)
    kw["bias"] = bias
    if backend == "reference":
        if vp is not None:
            return _vp.reference("sft", vp, hidden, weight, targets, **kw)
        return reference.linear_sft_loss(hidden, weight, targets, **kw)
    return _loss("sft", hidden, weight, targets, backend=backend, chunk_size=chunk_size, filter_eps=filter_eps,
                 deterministic=deterministic, vocab_parallel=vp, **kw)


def linear_dft_loss(
    hidden: Tensor,  # (..., D)
    weight: Tensor,  # (V, D)
    targets: Tensor,  # (...) int64
    *,
    bias: Optional[Tensor] = None,  # (V,)
    entropy_coef: float = 0.0,
    temperature: float = 1.0,
    softcap: Optional[float] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch=None,
    backend: str = "auto",
    return_stats: bool = False,
    chunk_size: Optional[int] = None,
    filter_eps: Optional[float] = None,
    deterministic: bool = False,
    vocab_parallel=None,  # pk.VocabParallel(group, start) or (group, start): weight is a vocabulary shard
):
    """Dynamic Fine-Tuning: per token ``-p.detach() * logp`` with ``p = exp(logp)``.

    PyTorch equivalent: ``ce = F.cross_entropy(logits, targets, reduction="none")``;
    ``(ce * exp(-ce).detach())`` reduced over non-ignored tokens.
    """
    num_items_in_batch, entropy_coef = _common(reduction, num_items_in_batch, backend, entropy_coef, filter_eps,
                                               deterministic, chunk_size, return_stats)
    kw = dict(bias=bias, entropy_coef=entropy_coef, temperature=temperature, softcap=softcap,
              ignore_index=ignore_index, reduction=reduction, num_items_in_batch=num_items_in_batch,
              return_stats=return_stats)
    vp, hidden, weight, bias, _, _, _ = _vp.localize(vocab_parallel, hidden, weight, bias)
    kw["bias"] = bias
    if backend == "reference":
        if vp is not None:
            return _vp.reference("dft", vp, hidden, weight, targets, **kw)
        return reference.linear_dft_loss(hidden, weight, targets, **kw)
    return _loss("dft", hidden, weight, targets, backend=backend, chunk_size=chunk_size, filter_eps=filter_eps,
                 deterministic=deterministic, vocab_parallel=vp, **kw)


def linear_psft_loss(
    hidden: Tensor,  # (..., D)
    weight: Tensor,  # (V, D)
    targets: Tensor,  # (...) int64
    old_logprobs: Optional[Tensor] = None,  # (...) log pi_old(target), like targets
    *,
    advantages=None,  # float, or a tensor broadcastable to targets; default 1
    bias: Optional[Tensor] = None,  # (V,)
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    clip_ratio_c: Optional[float] = None,
    entropy_coef: float = 0.0,
    temperature: float = 1.0,
    softcap: Optional[float] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch=None,
    backend: str = "auto",
    return_stats: bool = False,
    chunk_size: Optional[int] = None,
    filter_eps: Optional[float] = None,
    deterministic: bool = False,
    vocab_parallel=None,  # pk.VocabParallel(group, start) or (group, start): weight is a vocabulary shard
):
    """Proximal SFT: the PPO clipped surrogate with ``r = exp(logp - old_logprobs)``, advantage A.

    PyTorch equivalent (verl's policy loss): ``r = exp(clamp(logp - old, -20, 20))``;
    ``max(-A r, -A clamp(r, 1 - eps_low, 1 + eps_high))`` reduced over non-ignored tokens, where
    ``logp`` is :func:`linear_logprobs`. ``old_logprobs=None`` means r = 1 (an SFT gradient).
    With ``return_stats=True`` the stats hold ``logprobs`` (the next pi_old), ``entropy``,
    ``clip_fraction`` (``_high`` / ``_low``), ``ratio_mean``, ``approx_kl``, ``num_tokens``, ``nll``.

    ``clip_ratio_c`` (None = off; verl's dual clip, where 3.0 is its default): for tokens with
    ``A < 0`` the loss is further bounded by ``-A * clip_ratio_c``, i.e.
    ``min(max(-A r, -A clip(r)), -A c)``, with no gradient where the bound holds (``r > c``);
    the stats then add ``clip_fraction_dual``. ``old_logprobs`` must be log-probabilities
    (<= 0 on unmasked tokens; docs/method.md, "Input checks").
    """
    num_items_in_batch, entropy_coef = _common(reduction, num_items_in_batch, backend, entropy_coef, filter_eps,
                                               deterministic, chunk_size, return_stats)
    eps_low = V.check_eps_low(eps_low)
    eps_high = V.check_nonnegative("eps_high", eps_high)
    clip_ratio_c = V.check_clip_ratio_c(clip_ratio_c)
    kw = dict(bias=bias, entropy_coef=entropy_coef, temperature=temperature, softcap=softcap,
              ignore_index=ignore_index, reduction=reduction, num_items_in_batch=num_items_in_batch,
              return_stats=return_stats, advantages=advantages, eps_low=eps_low, eps_high=eps_high,
              clip_ratio_c=clip_ratio_c)
    vp, hidden, weight, bias, _, _, _ = _vp.localize(vocab_parallel, hidden, weight, bias)
    kw["bias"] = bias
    if backend == "reference":
        if vp is not None:
            return _vp.reference("psft", vp, hidden, weight, targets, old_logprobs=old_logprobs, **kw)
        return reference.linear_psft_loss(hidden, weight, targets, old_logprobs, **kw)
    return _loss("psft", hidden, weight, targets, backend=backend, chunk_size=chunk_size, filter_eps=filter_eps,
                 deterministic=deterministic, old_logprobs=old_logprobs, vocab_parallel=vp, **kw)


def linear_asft_loss(
    hidden: Tensor,  # (..., D)
    weight: Tensor,  # (V, D)
    targets: Tensor,  # (...) int64
    ref_hidden: Tensor,  # (..., D_ref) the frozen reference model's last hidden states
    ref_weight: Tensor,  # (V, D_ref) its lm-head
    *,
    ref_bias: Optional[Tensor] = None,  # (V,)
    bias: Optional[Tensor] = None,  # (V,)
    kl_coef: float = 0.05,
    kl_direction: str = "forward",
    entropy_coef: float = 0.0,
    temperature: float = 1.0,
    softcap: Optional[float] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch=None,
    backend: str = "auto",
    return_stats: bool = False,
    chunk_size: Optional[int] = None,
    filter_eps: Optional[float] = None,
    deterministic: bool = False,
    vocab_parallel=None,  # pk.VocabParallel(group, start) or (group, start): weight is a vocabulary shard
):
    """Anchored SFT: DFT plus ``kl_coef * KL`` to a frozen reference model, over the full vocabulary.

    PyTorch equivalent: ``dft + kl_coef * F.kl_div(log_softmax(z), softmax(z_ref),
    reduction="none").sum(-1)`` for ``kl_direction="forward"`` (KL(q||p), the official code);
    ``"reverse"`` is KL(p||q) (the paper's text). No gradient flows into the reference tensors.
    """
    num_items_in_batch, entropy_coef = _common(reduction, num_items_in_batch, backend, entropy_coef, filter_eps,
                                               deterministic, chunk_size, return_stats)
    V.check_choice("kl_direction", kl_direction, V.KL_DIRECTIONS)
    kl_coef = V.check_nonnegative("kl_coef", kl_coef)
    kw = dict(bias=bias, entropy_coef=entropy_coef, temperature=temperature, softcap=softcap,
              ignore_index=ignore_index, reduction=reduction, num_items_in_batch=num_items_in_batch,
              return_stats=return_stats, kl_coef=kl_coef, kl_direction=kl_direction)
    vp, hidden, weight, bias, ref_hidden, ref_weight, ref_bias = _vp.localize(
        vocab_parallel, hidden, weight, bias, ref_hidden, ref_weight, ref_bias)
    kw["bias"] = bias
    if backend == "reference":
        if vp is not None:
            return _vp.reference("asft", vp, hidden, weight, targets, ref_hidden=ref_hidden, ref_weight=ref_weight,
                                 ref_bias=ref_bias, **kw)
        return reference.linear_asft_loss(hidden, weight, targets, ref_hidden, ref_weight, ref_bias=ref_bias, **kw)
    return _loss("asft", hidden, weight, targets, backend=backend, chunk_size=chunk_size, filter_eps=filter_eps,
                 deterministic=deterministic, ref=dict(ref_hidden=ref_hidden, ref_weight=ref_weight,
                                                       ref_bias=ref_bias), vocab_parallel=vp, **kw)
