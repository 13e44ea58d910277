"""The explicit per-token coefficients of objectives.py against autograd of the plain formulas.

The fast backends never differentiate the loss: they use g_i, e_i, k_i from objectives.py. Here
those are held against torch.autograd on the reference formulas, including the corner cases of
PSFT (ratio exactly on the clip boundary, |log-ratio| beyond the clamp, negative and zero
advantages, old log-probs of -inf).
"""

from __future__ import annotations

import pytest
import torch

from psft_kernels._types import TokenStats
from psft_kernels.objectives import Objective, masked_mean, reduce

EPS_LOW, EPS_HIGH = 0.2, 0.28


def _psft_autograd(logp, old, adv):
    logp = logp.clone().requires_grad_()
    r = torch.exp(torch.clamp(logp - old, -20, 20))
    loss = torch.maximum(-adv * r, -adv * torch.clamp(r, 1 - EPS_LOW, 1 + EPS_HIGH))
    loss.sum().backward()
    return loss.detach(), logp.grad


def _cases():
    g = torch.Generator().manual_seed(0)
    n = 64
    logp = -torch.rand(n, generator=g, dtype=torch.float64) * 5
    old = logp + torch.randn(n, generator=g, dtype=torch.float64) * 0.4
    # Exact boundaries: r == 1 + eps_high and r == 1 - eps_low, computed the way the code does.
    old[0] = logp[0] - torch.log(torch.tensor(1 + EPS_HIGH, dtype=torch.float64))
    old[1] = logp[1] - torch.log(torch.tensor(1 - EPS_LOW, dtype=torch.float64))
    old[2] = logp[2] - 20.0  # exactly at the clamp: gradient still flows
    old[3] = logp[3] + 25.0  # beyond the clamp on the low side
    old[4] = float("-inf")
    old[5] = -1e30
    old[6] = logp[6]  # r = 1
    return logp, old


@pytest.mark.parametrize("adv", [1.0, 2.5, -1.0, -0.3, 0.0, "mixed"])
def test_psft_coefficients_match_autograd(adv):
    logp, old = _cases()
    if adv == "mixed":
        adv = torch.randn(logp.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    a = adv if isinstance(adv, torch.Tensor) else torch.full_like(logp, adv)
    valid = torch.ones_like(logp, dtype=torch.bool)
    terms = Objective("psft", eps_low=EPS_LOW, eps_high=EPS_HIGH, old_logprobs=old, advantages=a).terms(
        TokenStats(lse=None, logp=logp, entropy=torch.zeros_like(logp)), valid)
    loss, grad = _psft_autograd(logp, old, a)
    torch.testing.assert_close(terms.loss, loss)
    torch.testing.assert_close(terms.coefs.logp, grad)
    assert torch.isfinite(terms.loss).all(), "old log-probs of -inf / -1e30 must give a finite loss"
    # Blocked = the gradient is zero while the advantage is not: exactly where autograd says 0.
    blocked = terms.blocked_high | terms.blocked_low
    torch.testing.assert_close(blocked, (grad == 0) & (a != 0))


def test_psft_clip_sides():
    logp = torch.zeros(4, dtype=torch.float64)
    old = torch.log(torch.tensor([0.5, 2.0, 0.5, 2.0], dtype=torch.float64))  # r = 2, 0.5, 2, 0.5
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0], dtype=torch.float64)
    t = Objective("psft", old_logprobs=old, advantages=adv).terms(
        TokenStats(None, logp, torch.zeros_like(logp)), torch.ones(4, dtype=torch.bool))
    # A > 0 clips above 1 + eps_high; A < 0 clips below 1 - eps_low.
    assert t.blocked_high.tolist() == [True, False, False, False]
    assert t.blocked_low.tolist() == [False, False, False, True]


@pytest.mark.parametrize("kind", ["sft", "dft", "asft"])
@pytest.mark.parametrize("entropy_coef", [0.0, 0.4])
def test_other_coefficients_match_autograd(kind, entropy_coef):
    g = torch.Generator().manual_seed(2)
    logp = (-torch.rand(20, generator=g, dtype=torch.float64) * 4).requires_grad_()
    ent = (torch.rand(20, generator=g, dtype=torch.float64) * 3).requires_grad_()
    kl = torch.rand(20, generator=g, dtype=torch.float64).requires_grad_()
    valid = torch.rand(20, generator=g) > 0.3
    plain = {"sft": -logp, "dft": -logp.exp().detach() * logp,
             "asft": -logp.exp().detach() * logp + 0.3 * kl}[kind] - entropy_coef * ent
    plain = torch.where(valid, plain, torch.zeros(()))
    plain.sum().backward()
    t = Objective(kind, entropy_coef=entropy_coef, kl_coef=0.3).terms(
        TokenStats(None, logp.detach(), ent.detach(), kl=kl.detach()), valid)
    torch.testing.assert_close(t.loss, plain.detach())
    torch.testing.assert_close(t.coefs.logp, logp.grad)
    zeros = torch.zeros_like(logp)
    for coef, leaf in ((t.coefs.entropy, ent), (t.coefs.kl, kl)):  # None means "zero for every row"
        torch.testing.assert_close(zeros if coef is None else coef, zeros if leaf.grad is None else leaf.grad)


def test_reductions_and_empty_batch():
    per_token = torch.tensor([1.0, 2.0, 0.0, 4.0])
    n = torch.tensor(3)
    assert reduce(per_token, "sum", n, None) == 7.0
    torch.testing.assert_close(reduce(per_token, "mean", n, None), torch.tensor(7.0 / 3))
    torch.testing.assert_close(reduce(per_token, "mean", n, 14), torch.tensor(0.5))
    assert reduce(torch.zeros(4), "mean", torch.tensor(0), None) == 0.0
    assert masked_mean(torch.ones(3), torch.zeros(3, dtype=torch.bool)) == 0.0


@pytest.mark.parametrize("c", [3.0, 1.5])
def test_dual_clip_coefficients_match_autograd(c):
    """clip_ratio_c: min(max(-A r, -A clip(r)), -A c) for A < 0, as verl writes it, through autograd."""
    logp, old = _cases()
    adv = torch.randn(logp.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    old[7], adv[7] = logp[7] - 2.0, -0.5  # r = e^2 > c, A < 0: the bound holds, no gradient
    old[8], adv[8] = logp[8] - 2.0, 0.5  # r = e^2, A > 0: the ordinary upper clip
    valid = torch.ones_like(logp, dtype=torch.bool)
    terms = Objective("psft", eps_low=EPS_LOW, eps_high=EPS_HIGH, clip_ratio_c=c, old_logprobs=old,
                      advantages=adv).terms(TokenStats(None, logp, torch.zeros_like(logp)), valid)
    x = logp.clone().requires_grad_()
    r = torch.exp(torch.clamp(x - old, -20, 20))
    surrogate = torch.maximum(-adv * r, -adv * torch.clamp(r, 1 - EPS_LOW, 1 + EPS_HIGH))
    loss = torch.where(adv < 0, torch.minimum(surrogate, -adv * c), surrogate)
    loss.sum().backward()
    torch.testing.assert_close(terms.loss, loss.detach())
    torch.testing.assert_close(terms.coefs.logp, x.grad)
    assert terms.loss[7] == 0.5 * c and terms.coefs.logp[7] == 0 and terms.blocked_high[7]
    bound = (adv < 0) & (r.detach() > c)
    assert bound.sum() >= 2, "the cases must put several tokens under the bound"
