"""``TritonBackend``: the backend contract of :mod:`psft_kernels.backends` on the fused kernels.

Forward: one streaming kernel over the vocabulary (:mod:`.forward`) and one per-token epilogue
kernel (:mod:`.epilogue`); with an objective and ``needs.any()`` (scalar reductions) the
backward kernels (:mod:`.backward`) run right after, in the same op, and the gradients come back
with the loss. Nothing of size ``N x V`` is ever allocated, and nothing is read back to the host.

Why the gradients are formed in the forward pass for scalar reductions: the work is the same
(the logits must be recomputed once the full-row ``lse`` is known, forward or backward), and
the autograd Function then saves nothing but the gradients. With ``reduction="none"`` the
Function saves the per-token coefficients and calls :meth:`TritonBackend.backward` with the
real ``grad_output``.

fp64 inputs run on the chunked PyTorch backend (Triton's fp64 ``tl.dot`` is not available on
every GPU, and nobody trains a head in fp64); results are identical in meaning, only slower.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from .._types import Coefficients, GradNeeds, Grads, HeadInputs, HeadSpec, TokenStats
from ..objectives import Objective, Terms
from . import epilogue, forward, ops

_KL = {None: 0, "forward": 1, "reverse": 2}
# Set to 1 to keep the host-side ValueError for out-of-range targets on CUDA (one sync per call).
CHECK_TARGETS_ENV = "PSFT_KERNELS_CHECK_TARGETS"


def _interpreted() -> bool:
    """The kernels were decorated under TRITON_INTERPRET=1 (it is read at decoration time)."""
    return type(forward._head_stats_kernel).__name__ == "InterpretedFunction"


def _scale_tensor(scale, device) -> Optional[Tensor]:
    if scale is None:
        return None
    if isinstance(scale, Tensor):
        return scale.detach().to(device=device, dtype=torch.float32).reshape(1)
    return torch.full((1,), float(scale), dtype=torch.float32, device=device)


def _f32(x: Optional[Tensor]) -> Optional[Tensor]:
    return None if x is None else x.detach().to(torch.float32).contiguous()


class TritonBackend:
    name = "triton"

    def __init__(self):
        self._fallback = None

    def unavailable_reason(self, device: torch.device) -> Optional[str]:
        if device.type == "cuda":
            return None if torch.cuda.is_available() else "CUDA is not available"
        if device.type == "cpu":
            if _interpreted():
                return None
            if os.environ.get("TRITON_INTERPRET") == "1":
                return ("TRITON_INTERPRET=1 was set after psft_kernels.triton was imported; set it before the "
                        "first import (Triton reads it when the kernels are defined)")
            return ("the Triton kernels run on CUDA GPUs; to run them on the CPU (slowly, for tests) set "
                    "TRITON_INTERPRET=1 before importing psft_kernels")
        return f"the Triton backend runs on CUDA (or on the CPU with TRITON_INTERPRET=1); got device {device.type!r}"

    def skips_host_target_check(self, device: torch.device) -> bool:
        """True where out-of-range targets are handled in the kernels instead of by a host sync.

        On CUDA they give NaN log-probs / losses and no gradient (docs/triton.md, "Target
        validation"); ``PSFT_KERNELS_CHECK_TARGETS=1`` restores the eager ValueError.
        """
        return device.type == "cuda" and os.environ.get(CHECK_TARGETS_ENV, "0") != "1"

    def _chunked(self):
        if self._fallback is None:
            from ..chunked import ChunkedBackend

            self._fallback = ChunkedBackend()
        return self._fallback

    @staticmethod
    def _needs_fallback(inputs: HeadInputs) -> bool:
        dtypes = {inputs.hidden.dtype} | ({inputs.ref_hidden.dtype} if inputs.ref_hidden is not None else set())
        return torch.float64 in dtypes

    @staticmethod
    def _common(inputs: HeadInputs, spec: HeadSpec):
        has_ref = spec.kl_direction is not None
        return dict(
            hidden=inputs.hidden, weight=inputs.weight, bias=inputs.bias, targets=inputs.targets,
            ref_hidden=inputs.ref_hidden if has_ref else None, ref_weight=inputs.ref_weight if has_ref else None,
            ref_bias=inputs.ref_bias if has_ref else None, temperature=float(spec.temperature),
            softcap=float(spec.softcap) if spec.softcap is not None else 0.0, ignore_index=int(spec.ignore_index),
            kl_direction=_KL[spec.kl_direction],
            filter_eps=float(spec.filter_eps) if spec.filter_eps is not None else 0.0,
            deterministic=bool(spec.deterministic),
        )

    def forward(self, inputs: HeadInputs, spec: HeadSpec, objective: Optional[Objective] = None,
                coef_scale=None, needs: GradNeeds = GradNeeds()):
        """Stats, terms and (for scalar reductions) gradients of all N rows; see the module doc."""
        if self._needs_fallback(inputs):
            return self._chunked().forward(inputs, spec, objective, coef_scale, needs)
        with_grads = objective is not None and needs.any()
        obj = objective if objective is not None else Objective("sft")
        adv = obj.advantages
        kind = epilogue.KINDS[objective.kind if objective is not None else None]
        kl_coef = float(obj.kl_coef) if obj.uses_kl else 0.0
        outs = torch.ops.psft_kernels.triton_head_forward(
            old_logprobs=_f32(obj.old_logprobs), advantages=_f32(adv) if isinstance(adv, Tensor) else None,
            grad_scale=_scale_tensor(coef_scale, inputs.hidden.device) if with_grads else None,
            kind=kind, entropy_coef=float(obj.entropy_coef), kl_coef=kl_coef, eps_low=float(obj.eps_low),
            eps_high=float(obj.eps_high), advantage=float(adv) if not isinstance(adv, Tensor) else 0.0,
            clip_ratio_c=float(obj.clip_ratio_c or 0.0),
            grad_hidden=with_grads and needs.hidden, grad_weight=with_grads and needs.weight,
            grad_bias=with_grads and needs.bias and inputs.bias is not None, **self._common(inputs, spec))
        present = ops.forward_outputs(kind, _KL[spec.kl_direction], float(obj.entropy_coef), kl_coef, with_grads)
        o = {name: (t if real else None) for name, t, real in zip(ops.FORWARD_OUTPUTS, outs, present)}
        stats = TokenStats(o["lse"], o["logp"], o["entropy"], o["ref_lse"], o["kl"])
        terms = None
        if objective is not None:
            terms = Terms(o["loss"], Coefficients(o["g"], o["e"], o["k"]), o["ratio"], o["blocked_high"],
                          o["blocked_low"])
        grads = None
        if with_grads:
            grads = Grads(o["grad_hidden"] if needs.hidden else None, o["grad_weight"] if needs.weight else None,
                          o["grad_bias"] if needs.bias and inputs.bias is not None else None)
        return stats, terms, grads

    def backward(self, inputs: HeadInputs, spec: HeadSpec, stats: TokenStats, coefs: Coefficients,
                 needs: GradNeeds) -> Grads:
        """Gradients for per-token coefficients over all N rows (zero-coefficient rows skipped)."""
        if self._needs_fallback(inputs):
            return self._chunked().backward(inputs, spec, stats, coefs, needs)
        has_kl = coefs.kl is not None
        gh, gw, gb = torch.ops.psft_kernels.triton_head_backward(
            lse=stats.lse, entropy=_f32(stats.entropy) if coefs.entropy is not None else None,
            ref_lse=_f32(stats.ref_lse) if has_kl else None, kl=_f32(stats.kl) if has_kl else None,
            coef_logp=_f32(coefs.logp), coef_entropy=_f32(coefs.entropy), coef_kl=_f32(coefs.kl), grad_scale=None,
            grad_hidden=needs.hidden, grad_weight=needs.weight, grad_bias=needs.bias and inputs.bias is not None,
            **self._common(inputs, spec))
        return Grads(gh if needs.hidden else None, gw if needs.weight else None,
                     gb if needs.bias and inputs.bias is not None else None)
