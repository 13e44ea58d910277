"""The oracle itself: float64 gradcheck, and agreement with independent formulas.

The independent formulas are written the way each method's official code writes them
(METHOD.md, "Sources"): F.cross_entropy for SFT, cross-entropy times the detached target
probability for DFT (yongliang-wu/DFT, ASFT's train_v2.py), ``F.kl_div`` for ASFT's KL, and
verl's ``compute_policy_loss`` for PSFT.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import psft_kernels.reference as ref
from helpers import make_problem

D, V = 6, 11


def _logits(p, temperature=1.0, softcap=None):
    x = F.linear(p.hidden, p.weight, p.bias)
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    return x / temperature


@pytest.mark.parametrize("loss", ["sft", "psft", "kl_forward", "kl_reverse", "logprobs"])
@pytest.mark.parametrize("options", [dict(), dict(softcap=2.0, temperature=0.8, entropy_coef=0.3)])
def test_gradcheck(loss, options):
    """DFT's stop-gradient makes its gradient not the derivative of its value, so DFT is checked
    against the official formula below; ASFT's KL term is checked as ``asft - dft`` (the
    stop-gradient parts cancel exactly), which is ``kl_coef * mean KL``, a true function."""
    p = make_problem(batch=(2, 3), D=D, V=V, bias=True, ref=loss.startswith("kl"), old_noise=0.05)
    tensors = (p.hidden.requires_grad_(), p.weight.requires_grad_(), p.bias.requires_grad_())
    opts = dict(options)
    if loss == "logprobs":
        opts.pop("entropy_coef", None)
        fn = lambda h, w, b: ref.linear_logprobs(h, w, p.targets, bias=b, **opts)  # noqa: E731
    elif loss == "psft":
        fn = lambda h, w, b: ref.linear_psft_loss(h, w, p.targets, p.old_logprobs, bias=b,  # noqa: E731
                                                  eps_high=10.0, eps_low=0.999, **opts)
    elif loss.startswith("kl"):
        def fn(h, w, b):
            asft = ref.linear_asft_loss(h, w, p.targets, p.ref_hidden, p.ref_weight, bias=b,
                                        kl_direction=loss[3:], kl_coef=0.7, **opts)
            return asft - ref.linear_dft_loss(h, w, p.targets, bias=b, **opts)
    else:
        fn = lambda h, w, b: getattr(ref, f"linear_{loss}_loss")(h, w, p.targets, bias=b, **opts)  # noqa: E731
    # eps wide open for PSFT (eps_low < 1 keeps the ratio floor > 0): the clip's kinks make finite
    # differences meaningless at a boundary.
    assert torch.autograd.gradcheck(fn, tensors)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_sft_is_cross_entropy(reduction):
    p = make_problem(batch=(4, 7), bias=True)
    expected = F.cross_entropy(_logits(p).flatten(0, 1), p.targets.flatten(), ignore_index=-100,
                               reduction=reduction)
    if reduction == "none":
        expected = expected.reshape(p.targets.shape)
    got = ref.linear_sft_loss(p.hidden, p.weight, p.targets, bias=p.bias, reduction=reduction)
    torch.testing.assert_close(got, expected)


def test_sft_softcap_temperature_is_cross_entropy():
    p = make_problem(batch=(9,), logit_scale=8.0)
    expected = F.cross_entropy(_logits(p, 1.7, 5.0), p.targets)
    torch.testing.assert_close(ref.linear_sft_loss(p.hidden, p.weight, p.targets, temperature=1.7, softcap=5.0),
                               expected)


def _official_dft_token_losses(logits, targets):
    ce = F.cross_entropy(logits, targets, reduction="none", ignore_index=-100)
    probs = torch.softmax(logits, -1)
    weights = probs.gather(1, targets.clamp(min=0)[:, None]).squeeze(1).detach()
    return ce * weights


def test_dft_matches_official_formula():
    p = make_problem(batch=(20,), bias=True)
    logits = _logits(p).requires_grad_()
    valid = p.targets != -100
    expected = _official_dft_token_losses(logits, p.targets)[valid].sum() / valid.sum()
    h = p.hidden.clone().requires_grad_()
    got = ref.linear_dft_loss(h, p.weight, p.targets, bias=p.bias)
    torch.testing.assert_close(got, expected)
    # Same gradient: -p_y (onehot - softmax) for each valid row, mean over valid rows.
    expected.backward()
    got.backward()
    torch.testing.assert_close(h.grad, logits.grad @ p.weight)


@pytest.mark.parametrize("kl_coef", [0.05, 0.5])
def test_asft_matches_official_formula(kl_coef):
    p = make_problem(batch=(20,), ref=True, D_ref=9)
    logits = _logits(p)
    ref_logits = F.linear(p.ref_hidden, p.ref_weight)
    kl = F.kl_div(F.log_softmax(logits, -1), F.softmax(ref_logits, -1), reduction="none").sum(-1)
    valid = p.targets != -100
    expected = (_official_dft_token_losses(logits, p.targets) + kl_coef * kl)[valid].sum() / valid.sum()
    got = ref.linear_asft_loss(p.hidden, p.weight, p.targets, p.ref_hidden, p.ref_weight, kl_coef=kl_coef)
    torch.testing.assert_close(got, expected)
    _, stats = ref.linear_asft_loss(p.hidden, p.weight, p.targets, p.ref_hidden, p.ref_weight, return_stats=True)
    torch.testing.assert_close(stats["kl"], kl[valid].mean())


def test_asft_reverse_kl_is_kl_p_q():
    p = make_problem(batch=(12,), ref=True, ignore_frac=0.0)
    log_p = F.log_softmax(_logits(p), -1)
    log_q = F.log_softmax(F.linear(p.ref_hidden, p.ref_weight), -1)
    kl_pq = F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)  # sum p (log p - log q)
    _, stats = ref.linear_asft_loss(p.hidden, p.weight, p.targets, p.ref_hidden, p.ref_weight,
                                    kl_direction="reverse", return_stats=True)
    torch.testing.assert_close(stats["kl"], kl_pq.mean())


def _verl_policy_loss(logp, old, adv, mask, eps_low, eps_high):
    """verl core_algos.compute_policy_loss (vanilla), token-mean, written from its definition."""
    negative_approx_kl = torch.clamp(logp - old, min=-20.0, max=20.0)
    ratio = torch.exp(negative_approx_kl)
    pg_losses1 = -adv * ratio
    pg_losses2 = -adv * torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    pg_losses = torch.maximum(pg_losses1, pg_losses2)
    clipfrac = (torch.gt(pg_losses2, pg_losses1).float() * mask).sum() / mask.sum()
    return (pg_losses * mask).sum() / mask.sum(), clipfrac


@pytest.mark.parametrize("adv", [1.0, -0.7])
def test_psft_matches_verl(adv):
    p = make_problem(batch=(40,), old_noise=0.4)
    h = p.hidden.clone().requires_grad_()
    loss, stats = ref.linear_psft_loss(h, p.weight, p.targets, p.old_logprobs, advantages=adv, return_stats=True)
    logits = _logits(p).requires_grad_()
    valid = p.targets != -100
    logp = torch.log_softmax(logits, -1).gather(1, p.targets.clamp(min=0)[:, None]).squeeze(1)
    expected, clipfrac = _verl_policy_loss(logp, p.old_logprobs, adv, valid.double(), 0.2, 0.28)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(stats["clip_fraction"], clipfrac)
    assert 0 < clipfrac < 1
    loss.backward()
    expected.backward()
    torch.testing.assert_close(h.grad, logits.grad @ p.weight)


def test_psft_without_old_is_sft_gradient():
    p = make_problem(batch=(30,), bias=True)
    grads = []
    for fn in (lambda h: ref.linear_psft_loss(h, p.weight, p.targets),
               lambda h: ref.linear_sft_loss(h, p.weight, p.targets)):
        h = p.hidden.clone().requires_grad_()
        fn(h).backward()
        grads.append(h.grad)
    torch.testing.assert_close(*grads)


def test_entropy_matches_definition():
    p = make_problem(batch=(15,))
    logp, ent = ref.linear_logprobs(p.hidden, p.weight, p.targets, temperature=1.3)
    probs = torch.softmax(_logits(p, 1.3), -1)
    valid = p.targets != -100
    expected = torch.where(valid, -(probs * probs.log()).sum(-1), torch.zeros(()))
    torch.testing.assert_close(ent, expected)
