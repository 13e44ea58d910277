"""``nn.Module`` wrappers: hold the options, take the tensors at call time."""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from . import _validation as V
from . import api


class _LinearLoss(nn.Module):
    def __init__(self, *, entropy_coef=0.0, temperature=1.0, softcap=None, ignore_index=-100, reduction="mean",
                 backend="auto", return_stats=False, chunk_size=None, filter_eps=None, deterministic=False,
                 vocab_parallel=None):
        super().__init__()
        # Fail at construction, not at the first training step.
        V.check_real("entropy_coef", entropy_coef)
        V.check_positive("temperature", temperature)
        V.check_positive("softcap", softcap, allow_none=True)
        V.check_choice("reduction", reduction, V.REDUCTIONS)
        V.check_choice("backend", backend, V.BACKENDS)
        V.check_chunk_size(chunk_size)
        V.check_filter_eps(filter_eps)
        V.check_bool("deterministic", deterministic)
        V.check_bool("return_stats", return_stats)
        self.options = dict(entropy_coef=entropy_coef, temperature=temperature, softcap=softcap,
                            ignore_index=ignore_index, reduction=reduction, backend=backend,
                            return_stats=return_stats, chunk_size=chunk_size, filter_eps=filter_eps,
                            deterministic=deterministic, vocab_parallel=vocab_parallel)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


class LinearSFTLoss(_LinearLoss):
    """Module form of :func:`psft_kernels.linear_sft_loss`."""

    def forward(self, hidden: Tensor, weight: Tensor, targets: Tensor, bias: Optional[Tensor] = None,
                num_items_in_batch=None):
        return api.linear_sft_loss(hidden, weight, targets, bias=bias, num_items_in_batch=num_items_in_batch,
                                   **self.options)


class LinearDFTLoss(_LinearLoss):
    """Module form of :func:`psft_kernels.linear_dft_loss`."""

    def forward(self, hidden: Tensor, weight: Tensor, targets: Tensor, bias: Optional[Tensor] = None,
                num_items_in_batch=None):
        return api.linear_dft_loss(hidden, weight, targets, bias=bias, num_items_in_batch=num_items_in_batch,
                                   **self.options)


class LinearPSFTLoss(_LinearLoss):
    """Module form of :func:`psft_kernels.linear_psft_loss`."""

    def __init__(self, *, eps_low=0.2, eps_high=0.28, clip_ratio_c=None, **options):
        super().__init__(**options)
        self.options.update(eps_low=V.check_eps_low(eps_low), eps_high=V.check_nonnegative("eps_high", eps_high),
                            clip_ratio_c=V.check_clip_ratio_c(clip_ratio_c))

    def forward(self, hidden: Tensor, weight: Tensor, targets: Tensor, old_logprobs: Optional[Tensor] = None,
                advantages=None, bias: Optional[Tensor] = None, num_items_in_batch=None):
        return api.linear_psft_loss(hidden, weight, targets, old_logprobs, advantages=advantages, bias=bias,
                                    num_items_in_batch=num_items_in_batch, **self.options)


class LinearASFTLoss(_LinearLoss):
    """Module form of :func:`psft_kernels.linear_asft_loss`."""

    def __init__(self, *, kl_coef=0.05, kl_direction="forward", **options):
        super().__init__(**options)
        self.options.update(kl_coef=V.check_nonnegative("kl_coef", kl_coef),
                            kl_direction=V.check_choice("kl_direction", kl_direction, V.KL_DIRECTIONS))

    def forward(self, hidden: Tensor, weight: Tensor, targets: Tensor, ref_hidden: Tensor, ref_weight: Tensor,
                bias: Optional[Tensor] = None, ref_bias: Optional[Tensor] = None, num_items_in_batch=None):
        return api.linear_asft_loss(hidden, weight, targets, ref_hidden, ref_weight, bias=bias, ref_bias=ref_bias,
                                    num_items_in_batch=num_items_in_batch, **self.options)
