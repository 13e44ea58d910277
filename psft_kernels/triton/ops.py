"""``torch.library`` registration of the two fused operations, so ``torch.compile`` can trace them.

* ``psft_kernels::triton_head_forward``: statistics, the objective's per-token terms and, when
  asked, the gradients (scalar reductions form them in the forward pass; see backend.py).
* ``psft_kernels::triton_head_backward``: gradients from per-token coefficients.

They are registered with ``torch.library.custom_op`` (opaque to the compiler) rather than
``torch.library.triton_op``: the kernels are already fused, so Inductor has nothing to gain by
tracing into them, and an opaque op keeps data-dependent work (compaction, split choice, the
vocabulary-slice loop) out of the graph and behaves the same on torch 2.11 and 2.13. Each op has
a fake (meta) implementation giving output shapes, which is all Dynamo / AOTAutograd need.

Optional outputs are returned as empty placeholders (a schema needs a fixed arity); which ones
are real is a pure function of the arguments (:func:`forward_outputs`), shared by the real and
the fake implementation. Encodings: ``softcap <= 0`` and ``filter_eps <= 0`` mean None;
``kl_direction`` 0 / 1 / 2 = none / forward / reverse; ``kind`` as in :data:`epilogue.KINDS`.
"""

from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from . import backward, epilogue, forward
from .rows import compact_rows

FORWARD_OUTPUTS = ("lse", "logp", "entropy", "ref_lse", "kl", "loss", "g", "e", "k", "ratio",
                   "blocked_high", "blocked_low", "grad_hidden", "grad_weight", "grad_bias")

_FORWARD_SCHEMA = (
    "(Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, Tensor? ref_hidden, Tensor? ref_weight, "
    "Tensor? ref_bias, Tensor? old_logprobs, Tensor? advantages, Tensor? grad_scale, float temperature, "
    "float softcap, int ignore_index, int kl_direction, int kind, float entropy_coef, float kl_coef, "
    "float eps_low, float eps_high, float advantage, bool grad_hidden, bool grad_weight, bool grad_bias, "
    "float filter_eps, bool deterministic, float clip_ratio_c=0.) -> ("
    + ", ".join(["Tensor"] * len(FORWARD_OUTPUTS)) + ")"
)
_BACKWARD_SCHEMA = (
    "(Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, Tensor? ref_hidden, Tensor? ref_weight, "
    "Tensor? ref_bias, Tensor lse, Tensor? entropy, Tensor? ref_lse, Tensor? kl, Tensor? coef_logp, "
    "Tensor? coef_entropy, Tensor? coef_kl, Tensor? grad_scale, float temperature, float softcap, "
    "int ignore_index, int kl_direction, bool grad_hidden, bool grad_weight, bool grad_bias, float filter_eps, "
    "bool deterministic) -> (Tensor, Tensor, Tensor)"
)


def forward_outputs(kind: int, kl_direction: int, entropy_coef: float, kl_coef: float,
                    grads: bool) -> List[bool]:
    """Which of :data:`FORWARD_OUTPUTS` are real tensors (the others are empty placeholders)."""
    has_obj = kind != epilogue.KIND_NONE
    psft = kind == epilogue.KIND_PSFT
    return [True, True, True, kl_direction != 0, kl_direction != 0, has_obj, has_obj,
            has_obj and entropy_coef != 0.0, kind == epilogue.KIND_ASFT and kl_coef != 0.0,
            psft, psft, psft, grads, grads, grads]


def _forward_meta(hidden, weight, bias, present, need):
    """Empty outputs of the right shapes and dtypes (also the placeholders of the real op)."""
    n = hidden.shape[0]
    out = []
    for name, real in zip(FORWARD_OUTPUTS, present):
        if name in ("blocked_high", "blocked_low"):
            like = hidden.new_empty(n if real else 0, dtype=torch.bool)
        elif name == "grad_hidden":
            like = hidden.new_empty(hidden.shape if real and need[0] else (0,))
        elif name == "grad_weight":
            like = weight.new_empty(weight.shape if real and need[1] else (0,))
        elif name == "grad_bias":
            like = weight.new_empty(bias.shape if real and need[2] and bias is not None else (0,))
        else:  # lse in fp64: the epilogue's max + log S, exact (backward.py forms p from it)
            like = hidden.new_empty(n if real else 0, dtype=torch.float64 if name == "lse" else torch.float32)
        out.append(like)
    return out


def _opt(x: float) -> Optional[float]:
    return x if x > 0 else None


@torch.library.custom_op("psft_kernels::triton_head_forward", mutates_args=(), schema=_FORWARD_SCHEMA)
def head_forward(hidden, weight, bias, targets, ref_hidden, ref_weight, ref_bias, old_logprobs, advantages,
                 grad_scale, temperature, softcap, ignore_index, kl_direction, kind, entropy_coef, kl_coef, eps_low,
                 eps_high, advantage, grad_hidden, grad_weight, grad_bias, filter_eps, deterministic,
                 clip_ratio_c=0.0):
    need = (grad_hidden, grad_weight, grad_bias)
    present = forward_outputs(kind, kl_direction, entropy_coef, kl_coef, any(need))
    out = dict(zip(FORWARD_OUTPUTS, _forward_meta(hidden, weight, bias, present, need)))
    n = hidden.shape[0]
    if n == 0:
        for name in ("grad_weight", "grad_bias"):
            out[name].zero_()
        return tuple(out.values())
    has_ref = kl_direction != 0
    valid = targets != ignore_index
    order, count = compact_rows(valid)
    part = forward.head_stats(hidden, weight, bias, targets, order, count, ref_hidden if has_ref else None,
                              ref_weight if has_ref else None, ref_bias if has_ref else None,
                              temperature=temperature, softcap=_opt(softcap), kl_forward=kl_direction == 1)
    terms = epilogue.head_epilogue(
        part, targets, vocab_size=weight.shape[0], ignore_index=ignore_index, has_ref=has_ref,
        kl_forward=kl_direction == 1, kind=[k for k, c in epilogue.KINDS.items() if c == kind][0],
        old_logprobs=old_logprobs, advantages=advantages, adv_scalar=advantage, entropy_coef=entropy_coef,
        kl_coef=kl_coef, eps_low=eps_low, eps_high=eps_high, clip_ratio_c=clip_ratio_c)
    for name, value in terms.items():
        if value is not None:
            out[name] = value
    if any(need):
        gh, gw, gb = backward.head_grads(
            hidden, weight, bias, targets, ref_hidden, ref_weight, ref_bias, terms["lse"], terms["entropy"],
            terms["ref_lse"], terms["kl"], terms["g"], terms["e"], terms["k"], grad_scale,
            temperature=temperature, softcap=_opt(softcap), ignore_index=ignore_index,
            kl_forward=kl_direction == 1, need_hidden=grad_hidden, need_weight=grad_weight, need_bias=grad_bias,
            filter_eps=_opt(filter_eps), deterministic=deterministic)
        for name, value in (("grad_hidden", gh), ("grad_weight", gw), ("grad_bias", gb)):
            if value is not None:
                out[name] = value
    return tuple(out.values())


@head_forward.register_fake
def _(hidden, weight, bias, targets, ref_hidden, ref_weight, ref_bias, old_logprobs, advantages, grad_scale,
      temperature, softcap, ignore_index, kl_direction, kind, entropy_coef, kl_coef, eps_low, eps_high, advantage,
      grad_hidden, grad_weight, grad_bias, filter_eps, deterministic, clip_ratio_c=0.0):
    need = (grad_hidden, grad_weight, grad_bias)
    present = forward_outputs(kind, kl_direction, entropy_coef, kl_coef, any(need))
    return tuple(_forward_meta(hidden, weight, bias, present, need))


def _backward_meta(hidden, weight, bias, grad_hidden, grad_weight, grad_bias):
    return (hidden.new_empty(hidden.shape if grad_hidden else (0,)),
            weight.new_empty(weight.shape if grad_weight else (0,)),
            weight.new_empty(bias.shape if grad_bias and bias is not None else (0,)))


@torch.library.custom_op("psft_kernels::triton_head_backward", mutates_args=(), schema=_BACKWARD_SCHEMA)
def head_backward(hidden, weight, bias, targets, ref_hidden, ref_weight, ref_bias, lse, entropy, ref_lse, kl,
                  coef_logp, coef_entropy, coef_kl, grad_scale, temperature, softcap, ignore_index, kl_direction,
                  grad_hidden, grad_weight, grad_bias, filter_eps, deterministic):
    placeholders = _backward_meta(hidden, weight, bias, False, False, False)
    grads = backward.head_grads(
        hidden, weight, bias, targets, ref_hidden, ref_weight, ref_bias, lse, entropy, ref_lse, kl, coef_logp,
        coef_entropy, coef_kl, grad_scale, temperature=temperature, softcap=_opt(softcap),
        ignore_index=ignore_index, kl_forward=kl_direction == 1, need_hidden=grad_hidden, need_weight=grad_weight,
        need_bias=grad_bias and bias is not None, filter_eps=_opt(filter_eps), deterministic=deterministic)
    return tuple(g if g is not None else p for g, p in zip(grads, placeholders))


@head_backward.register_fake
def _(hidden, weight, bias, targets, ref_hidden, ref_weight, ref_bias, lse, entropy, ref_lse, kl, coef_logp,
      coef_entropy, coef_kl, grad_scale, temperature, softcap, ignore_index, kl_direction, grad_hidden, grad_weight,
      grad_bias, filter_eps, deterministic):
    return _backward_meta(hidden, weight, bias, grad_hidden, grad_weight, grad_bias and bias is not None)
