"""The thin autograd layer between the public functions and a backend.

Two Functions, both backend-agnostic:

* :class:`LinearLogprobsFunction`: ``(hidden, weight, bias) -> (logp, H)`` per token. Its
  backward turns ``grad_logp`` / ``grad_H`` into gradient coefficients and asks the backend to
  recompute the logit tiles.
* :class:`LinearLossFunction`: ``(hidden, weight, bias) -> loss`` for one objective. When the
  loss is reduced to a scalar, the backend forms the gradients in the forward pass, chunk by
  chunk, and the backward only scales them by ``grad_output`` (exact: the loss is linear in
  it). With ``reduction="none"`` the per-token coefficients are saved and the backward scales
  each by its own ``grad_output`` entry before recomputing, so any ``grad_output`` is honoured.

Both return per-token statistics as extra, non-differentiable outputs. Under ``torch.no_grad``
(or when nothing requires a gradient) the public API calls the backend directly and nothing is
saved.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from ._types import Coefficients, GradNeeds, HeadInputs, HeadSpec, TokenStats
from .objectives import Objective, Terms, reduce, token_weight


@dataclass
class Plan:
    """Everything a Function needs besides the differentiable tensors."""

    backend: Any
    spec: HeadSpec
    inputs: HeadInputs  # hidden / weight / bias are replaced by the Function's own arguments
    objective: Optional[Objective] = None
    reduction: str = "mean"
    num_items_in_batch: Any = None

    def with_tensors(self, hidden: Tensor, weight: Tensor, bias: Optional[Tensor]) -> HeadInputs:
        i = self.inputs
        return HeadInputs(hidden, weight, bias, i.targets, i.ref_hidden, i.ref_weight, i.ref_bias)


def needs_of(inputs: HeadInputs) -> GradNeeds:
    if not torch.is_grad_enabled():
        return GradNeeds()
    return GradNeeds(inputs.hidden.requires_grad, inputs.weight.requires_grad,
                     inputs.bias is not None and inputs.bias.requires_grad)


DOUBLE_BACKWARD_MESSAGE = (
    "psft_kernels: double backward (differentiating the gradients again: create_graph=True, e.g. a "
    "gradient penalty or a Hessian-vector product) is not supported through a fused backend: its "
    "gradients come from hand-written kernels, not differentiable ops. Use backend='reference' "
    "(materialized logits, autograd) for higher-order gradients."
)


class _NoDoubleBackward(torch.autograd.Function):
    """Passes gradients through; differentiating them raises :data:`DOUBLE_BACKWARD_MESSAGE`."""

    @staticmethod
    def forward(ctx, *grads):
        return tuple(g.view_as(g) for g in grads)

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError(DOUBLE_BACKWARD_MESSAGE)


def _once_differentiable(backward):
    """Run a Function's backward without building a graph; under ``create_graph=True`` mark its
    gradients so that differentiating them again raises a clear error (instead of PyTorch's
    "element 0 of tensors does not require grad", or a silently wrong second derivative)."""

    def wrapper(ctx, *grad_outputs):
        if not torch.is_grad_enabled():  # the usual case: a plain .backward()
            return backward(ctx, *grad_outputs)
        with torch.no_grad():
            grads = backward(ctx, *grad_outputs)
        present = [i for i, g in enumerate(grads) if isinstance(g, Tensor)]
        if not present:
            return grads
        marked = _NoDoubleBackward.apply(*(grads[i].detach().requires_grad_() for i in present))
        out = list(grads)
        for i, g in zip(present, marked):
            out[i] = g
        return tuple(out)

    return wrapper


def _save_stats(ctx, stats: TokenStats) -> None:
    ctx.stats_fields = [f for f in ("lse", "logp", "entropy", "ref_lse", "kl") if getattr(stats, f) is not None]
    ctx.stats = [getattr(stats, f) for f in ctx.stats_fields]


def _load_stats(ctx) -> TokenStats:
    return TokenStats(**dict(zip(ctx.stats_fields, ctx.stats)))


class LinearLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], plan: Plan):
        inputs = plan.with_tensors(hidden, weight, bias)
        stats, _, _ = plan.backend.forward(inputs, plan.spec)
        ctx.plan = plan
        ctx.save_for_backward(hidden, weight, bias)
        _save_stats(ctx, stats)
        return stats.logp, stats.entropy

    @staticmethod
    @_once_differentiable
    def backward(ctx, grad_logp: Optional[Tensor], grad_entropy: Optional[Tensor]):
        hidden, weight, bias = ctx.saved_tensors
        needs = GradNeeds(*ctx.needs_input_grad[:3])
        if grad_logp is None and grad_entropy is None:
            return None, None, None, None
        coefs = Coefficients(grad_logp, grad_entropy)
        grads = ctx.plan.backend.backward(ctx.plan.with_tensors(hidden, weight, bias), ctx.plan.spec,
                                          _load_stats(ctx), coefs, needs)
        return grads.hidden, grads.weight, grads.bias, None


class LinearLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], plan: Plan):
        inputs = plan.with_tensors(hidden, weight, bias)
        needs = GradNeeds(*ctx.needs_input_grad[:3])
        valid = inputs.targets != plan.spec.ignore_index
        num_valid = valid.sum()
        ctx.plan = plan
        # A backend that needs merged statistics first (vocab_parallel) forms its gradients in backward.
        ctx.precomputed = (plan.reduction != "none" and needs.any()
                           and not getattr(plan.backend, "grads_in_backward", False))
        if ctx.precomputed:
            scale = token_weight(plan.reduction, num_valid, plan.num_items_in_batch)
            stats, terms, grads = plan.backend.forward(inputs, plan.spec, plan.objective, scale, needs)
            # Held as attributes, not saved tensors: backward hands them over without a copy.
            ctx.grads = [grads.hidden, grads.weight, grads.bias]
        else:
            stats, terms, _ = plan.backend.forward(inputs, plan.spec, plan.objective)
            ctx.num_valid = num_valid
            ctx.coefs = terms.coefs
            ctx.save_for_backward(hidden, weight, bias)
            _save_stats(ctx, stats)
        loss = reduce(terms.loss, plan.reduction, num_valid, plan.num_items_in_batch)
        extras = token_outputs(stats, terms)
        ctx.mark_non_differentiable(*extras)
        return (loss, *extras)

    @staticmethod
    @_once_differentiable
    def backward(ctx, grad_loss: Tensor, *_unused):
        if ctx.precomputed:
            return (*_scaled_precomputed(ctx, grad_loss), None)
        hidden, weight, bias = ctx.saved_tensors
        plan = ctx.plan
        if plan.reduction == "none":
            w = grad_loss.reshape(-1)
        else:
            scale = token_weight(plan.reduction, ctx.num_valid, plan.num_items_in_batch)
            w = grad_loss * (scale.to(grad_loss.dtype) if isinstance(scale, Tensor) else scale)
        c = ctx.coefs
        coefs = Coefficients(*(None if x is None else x * w for x in (c.logp, c.entropy, c.kl)))
        grads = plan.backend.backward(plan.with_tensors(hidden, weight, bias), plan.spec, _load_stats(ctx), coefs,
                                      GradNeeds(*ctx.needs_input_grad[:3]))
        return grads.hidden, grads.weight, grads.bias, None


def _scaled_precomputed(ctx, grad_loss: Tensor):
    """The gradients formed in the forward, times the scalar ``grad_loss``, released from ctx.

    Dropping ctx's reference lets autograd adopt the tensors as ``.grad`` without cloning them
    (a V x D copy saved). The price: this graph can be backpropagated once only.
    """
    grads = getattr(ctx, "grads", None)
    if grads is None:
        raise RuntimeError(
            "psft_kernels: backward through a scalar-reduced fused loss ran a second time "
            "(retain_graph=True). Its gradients are formed in the forward and handed over once; "
            "use reduction='none' and reduce the per-token losses yourself to backpropagate twice."
        )
    if torch.compiler.is_compiling():
        # Dynamo cannot trace `del ctx.x` nor `.item()`; a compiled graph owns its buffers anyway.
        return [None if g is None else g * grad_loss.to(g.dtype) for g in grads]
    del ctx.grads
    skip = grad_loss.device.type == "cpu" and grad_loss.item() == 1.0  # no sync on CPU
    return [g if g is None or skip else g.mul_(grad_loss.to(g.dtype)) for g in grads]


_TOKEN_OUTPUTS = ("logp", "entropy", "kl", "ratio", "blocked_high", "blocked_low")


def token_outputs(stats: TokenStats, terms: Terms):
    """The per-token values the stats are built from, as a tuple of tensors (empty when absent)."""
    values = (stats.logp, stats.entropy, stats.kl, terms.ratio, terms.blocked_high, terms.blocked_low)
    return tuple(v if v is not None else stats.logp.new_empty(0) for v in values)


def from_token_outputs(outputs) -> "tuple[TokenStats, Terms]":
    d = {k: (v if v.numel() or k in ("logp", "entropy") else None) for k, v in zip(_TOKEN_OUTPUTS, outputs)}
    stats = TokenStats(lse=None, logp=d["logp"], entropy=d["entropy"], kl=d["kl"])
    terms = Terms(loss=None, coefs=None, ratio=d["ratio"], blocked_high=d["blocked_high"], blocked_low=d["blocked_low"])
    return stats, terms


def run_loss(plan: Plan):
    """``(loss, stats, terms)`` through the Function when a gradient is needed, else directly."""
    inputs = plan.inputs
    if needs_of(inputs).any():
        loss, *extras = LinearLossFunction.apply(inputs.hidden, inputs.weight, inputs.bias, plan)
        stats, terms = from_token_outputs(extras)
        return loss, stats, terms
    stats, terms, _ = plan.backend.forward(inputs, plan.spec, plan.objective)
    valid = inputs.targets != plan.spec.ignore_index
    return reduce(terms.loss, plan.reduction, valid.sum(), plan.num_items_in_batch), stats, terms


def run_logprobs(plan: Plan):
    inputs = plan.inputs
    if needs_of(inputs).any():
        return LinearLogprobsFunction.apply(inputs.hidden, inputs.weight, inputs.bias, plan)
    stats, _, _ = plan.backend.forward(inputs, plan.spec)
    return stats.logp, stats.entropy
