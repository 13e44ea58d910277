"""Who computes the loss: our backends and the peers, each configured to compute the SAME loss.

A provider turns a :class:`Case` and a :class:`~bench.inputs.Problem` into a function of the two
differentiable inputs ``(hidden, weight)`` that returns the scalar loss (mode ``fwd`` /
``fwd_bwd``, token-mean reduction) or ``(logprobs, entropy)`` (mode ``logprobs``, run under
``torch.no_grad``). :func:`skip_reason` says why a provider does not apply to a case (another
loss, no softcap option, needs a GPU, package missing); the harness prints it and moves on.

What "the same loss" means for each peer (their installed source was read to configure them):

* Liger ``LigerFusedLinearGRPOLoss`` as PSFT: every advantage 1, ``beta=0`` (no KL term, no
  reference model), our old log-probs as ``old_per_token_logps``, ``loss_type="dapo"`` (the sum
  over unmasked tokens divided by their count: our token mean), the same ``epsilon_low`` /
  ``epsilon_high``. Its input is ``(B, T, D)``: the N tokens are passed as one sequence.
* Liger ``LigerFusedLinearCrossEntropyLoss``: SFT; with ``use_token_scaling=True`` it multiplies
  each token's loss and gradient by its detached target probability, which is DFT. Weight
  gradients accumulated in fp32 (``accum_dtype``), as ours are.
* Cut Cross-Entropy ``linear_cross_entropy``: SFT, its default gradient filtering (``impl="cce"``,
  GPU); ``cce_compile`` is its ``impl="torch_compile"`` fallback (materialized logits).
* ``torch.nn.functional.linear_cross_entropy`` (torch >= 2.13): SFT with chunking options.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

import psft_kernels as pk
from psft_kernels import backends, reference

from .inputs import EPS_HIGH, EPS_LOW, FILTER_EPS, IGNORE_INDEX, Problem

LOSSES = ("psft", "sft", "dft", "asft")
MODES = ("fwd", "fwd_bwd", "logprobs")
LOSS_MODES = ("fwd", "fwd_bwd")
ALL = LOSSES + ("logprobs",)


@dataclass(frozen=True)
class Case:
    """What is computed: ``loss`` is ``"logprobs"`` exactly when ``mode`` is."""

    loss: str
    mode: str
    device: str  # "cpu" / "cuda"
    softcap: Optional[float] = None


@dataclass(frozen=True)
class Provider:
    name: str
    summary: str
    build: Callable[[Case, Problem], Callable]
    losses: Tuple[str, ...] = ALL
    softcap: bool = True  # has a softcap option
    gpu_only: bool = False
    module: Optional[str] = None  # optional package it imports (pip name in `package`)
    package: Optional[str] = None
    check: Optional[Callable[[Case], Optional[str]]] = None  # any further condition


# ---------------------------------------------------------------------------------------------
# our public API (reference, chunked, triton, native) and the eager reference under torch.compile
# ---------------------------------------------------------------------------------------------
_OURS = {"psft": pk.linear_psft_loss, "sft": pk.linear_sft_loss, "dft": pk.linear_dft_loss,
         "asft": pk.linear_asft_loss}
_REFERENCE = {"psft": reference.linear_psft_loss, "sft": reference.linear_sft_loss,
              "dft": reference.linear_dft_loss, "asft": reference.linear_asft_loss,
              "logprobs": reference.linear_logprobs}


def _call(fn, case: Case, prob: Problem, **extra):
    """``fn(hidden, weight) -> loss or (logprobs, entropy)`` for one of our loss functions."""
    y, cap = prob.targets, prob.softcap
    if case.loss == "logprobs":
        return lambda h, w: fn["logprobs"](h, w, y, softcap=cap, **extra)
    f = fn[case.loss]
    if case.loss == "psft":
        old = prob.old_logprobs
        return lambda h, w: f(h, w, y, old, eps_low=EPS_LOW, eps_high=EPS_HIGH, softcap=cap, **extra)
    if case.loss == "asft":  # the frozen reference model shares the lm-head (LoRA-style): no copy
        ref = prob.ref_hidden
        return lambda h, w: f(h, w, y, ref, w.detach(), softcap=cap, **extra)
    return lambda h, w: f(h, w, y, softcap=cap, **extra)


def _ours(backend: str, **options):
    fns = dict(_OURS, logprobs=pk.linear_logprobs)
    return lambda case, prob: _call(fns, case, prob, backend=backend, **options)


def _our_check(backend: str):
    return lambda case: backends.unavailable_reason(backend, torch.device(case.device))


def _compiled(case: Case, prob: Problem):
    # Dynamic shapes: one compilation serves every N (a static one per N costs ~10-30 s each, which
    # a sweep cannot afford). Compilation happens in the untimed warm-up call. A generous
    # recompile limit, so that torch.compile never silently falls back to eager mid-sweep.
    # The reference validates its inputs with a host sync (a graph break dynamo warns about): part
    # of what compiling the reference as written costs, not worth a warning per case.
    logging.getLogger("torch._dynamo").setLevel(logging.ERROR)
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(64, getattr(torch._dynamo.config, name)))
    return torch.compile(_call(_REFERENCE, case, prob), dynamic=True)


# ---------------------------------------------------------------------------------------------
# peers
# ---------------------------------------------------------------------------------------------
def _liger_grpo(case: Case, prob: Problem):
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    N, D, _ = prob.shape
    valid = prob.targets != IGNORE_INDEX
    targets = torch.where(valid, prob.targets, 0).view(1, N)  # masked positions need a valid id
    mask = valid.view(1, N).to(torch.float32)
    advantages = torch.ones(1, device=prob.hidden.device)
    old = prob.old_logprobs.view(1, N)
    loss = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, loss_type="dapo", epsilon_low=EPS_LOW,
                                    epsilon_high=EPS_HIGH, temperature=1.0, compiled=True, chunk_size=1)
    return lambda h, w: loss(h.view(1, N, D), w, targets, mask, advantages, old_per_token_logps=old)[0]


def _liger_flce(case: Case, prob: Problem):
    from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

    loss = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="mean", softcap=prob.softcap,
                                            use_token_scaling=case.loss == "dft", accum_dtype=torch.float32)
    y = prob.targets
    return lambda h, w: loss(w, h, y)


def _cce(impl: str):
    def build(case: Case, prob: Problem):
        from cut_cross_entropy import linear_cross_entropy

        y, cap = prob.targets, prob.softcap
        return lambda h, w: linear_cross_entropy(h, w, y, ignore_index=IGNORE_INDEX, softcap=cap, reduction="mean",
                                                 impl=impl)

    return build


def _torch_lce_options():
    return getattr(torch.nn, "LinearCrossEntropyOptions", None)


def _torch_lce_check(case: Case) -> Optional[str]:
    if not hasattr(F, "linear_cross_entropy") or _torch_lce_options() is None:
        return f"torch {torch.__version__} has no F.linear_cross_entropy with chunking options (torch >= 2.13)"
    return None


def _torch_lce(**options):
    def build(case: Case, prob: Problem):
        opts = _torch_lce_options()(**options)
        y = prob.targets
        return lambda h, w: F.linear_cross_entropy(h, w, y, ignore_index=IGNORE_INDEX, reduction="mean", options=opts)

    return build


PROVIDERS: Dict[str, Provider] = {
    p.name: p
    for p in (
        Provider("reference", "ours: eager PyTorch, materialized logits (the oracle)", _ours("reference")),
        Provider("chunked", "ours: pure PyTorch, token chunks", _ours("chunked"), check=_our_check("chunked")),
        Provider("triton", "ours: Triton kernels (exact gradients)", _ours("triton"), check=_our_check("triton")),
        Provider("triton_filter", "ours: Triton kernels, gradient filtering at filter_eps=2^-12 (as CCE)",
                 _ours("triton", filter_eps=FILTER_EPS), losses=LOSSES, check=_our_check("triton")),
        Provider("native", "ours: native CPU kernel", _ours("native"), check=_our_check("native")),
        Provider("compile", "the eager reference under torch.compile", _compiled),
        Provider("liger_grpo", "Liger LigerFusedLinearGRPOLoss as PSFT (chunked_loss, torch.compile)",
                 _liger_grpo, losses=("psft",), softcap=False, module="liger_kernel.chunked_loss",
                 package="liger-kernel"),
        Provider("liger_flce", "Liger LigerFusedLinearCrossEntropyLoss (DFT: use_token_scaling=True)",
                 _liger_flce, losses=("sft", "dft"), gpu_only=True,
                 module="liger_kernel.transformers.fused_linear_cross_entropy", package="liger-kernel"),
        Provider("cce", "Cut Cross-Entropy linear_cross_entropy (Triton, gradient filtering)", _cce("cce"),
                 losses=("sft",), gpu_only=True, module="cut_cross_entropy", package="cut-cross-entropy"),
        Provider("cce_compile", "Cut Cross-Entropy linear_cross_entropy(impl='torch_compile')",
                 _cce("torch_compile"), losses=("sft",), module="cut_cross_entropy", package="cut-cross-entropy"),
        Provider("torch_lce", "F.linear_cross_entropy, LinearCrossEntropyOptions() (auto chunking)", _torch_lce(),
                 losses=("sft",), softcap=False, check=_torch_lce_check),
        Provider("torch_lce_ar4", "F.linear_cross_entropy, chunking_method='aspect_ratio:4' (smaller chunks)",
                 _torch_lce(chunking_method="aspect_ratio:4"), losses=("sft",), softcap=False,
                 check=_torch_lce_check),
    )
}


def skip_reason(provider: Provider, case: Case) -> Optional[str]:
    """None when ``provider`` can compute ``case`` here; else a sentence saying why not."""
    if case.loss not in provider.losses:
        return f"does not compute {case.loss}"
    if case.softcap is not None and not provider.softcap:
        return "has no softcap option"
    if provider.gpu_only and case.device != "cuda":
        return "needs a CUDA GPU (Triton kernels)"
    if provider.module is not None:
        try:
            importlib.import_module(provider.module)
        except Exception as exc:  # missing, or present but unusable here (e.g. no triton)
            return (f"{provider.package} cannot be imported ({type(exc).__name__}: {exc}); "
                    f"pip install {provider.package}")
    if provider.check is not None:
        return provider.check(case)
    return None
