"""verl's dual clip (``clip_ratio_c``) for negative advantages, in every backend.

For a token with ``A < 0`` the PPO surrogate ``max(-A r, -A clip(r))`` grows without bound in r;
verl bounds it by ``-A c``. Checked here: the reference against verl's formula written out
independently (value, gradient, its clip fraction), then every fused backend against the
float64 reference (loss, gradients, stats) and, at fp32, by the suite's accuracy rule.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import psft_kernels as pk
from helpers import assert_close, assert_matches_truth, cpu_backends, make_problem, run
from psft_kernels import reference as ref

C = 3.0  # verl's default clip_ratio_c
BACKENDS = cpu_backends(include_slow=True)  # Triton (interpreter) where it runs: small shapes only


def _problem(batch=(6, 9), **kw):
    """Mixed-sign per-token advantages and a wide pi_old spread, so that some tokens have A < 0
    and r > 3 (the dual clip's bound active) and others sit on every other branch."""
    g = torch.Generator().manual_seed(7)
    adv = torch.randn(batch, generator=g, dtype=torch.float64)
    return make_problem(batch=batch, old_noise=1.5, advantages=adv, bias=True, **kw)


def _verl_dual_clip(logp, old, adv, mask, eps_low, eps_high, c):
    """verl core_algos.compute_policy_loss (vanilla, dual-clip), token-mean, from its definition."""
    ratio = torch.exp(torch.clamp(logp - old, min=-20.0, max=20.0))
    pg_losses1 = -adv * ratio
    pg_losses2 = -adv * torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    clip_pg_losses1 = torch.maximum(pg_losses1, pg_losses2)
    pg_losses3 = -adv * c
    clip_pg_losses2 = torch.min(pg_losses3, clip_pg_losses1)
    pg_clipfrac_lower = (torch.gt(clip_pg_losses1, pg_losses3) * (adv < 0)).double()
    pg_losses = torch.where(adv < 0, clip_pg_losses2, clip_pg_losses1)
    return (pg_losses * mask).sum() / mask.sum(), (pg_clipfrac_lower * mask).sum() / mask.sum()


def test_reference_matches_verl_dual_clip():
    p = _problem()
    h = p.hidden.clone().requires_grad_()
    loss, stats = ref.linear_psft_loss(h, p.weight, p.targets, p.old_logprobs, advantages=p.advantages,
                                       bias=p.bias, clip_ratio_c=C, return_stats=True)
    logits = F.linear(p.hidden, p.weight, p.bias).requires_grad_()
    valid = p.targets != -100
    logp = torch.log_softmax(logits, -1).gather(-1, p.targets.clamp(min=0)[..., None])[..., 0]
    expected, dual_fraction = _verl_dual_clip(logp, p.old_logprobs, p.advantages, valid.double(), 0.2, 0.28, C)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    expected.backward()
    torch.testing.assert_close(h.grad, logits.grad @ p.weight)
    torch.testing.assert_close(stats["clip_fraction_dual"], dual_fraction)
    assert 0 < dual_fraction < 0.5, "the problem must put some tokens under the bound, not all"
    # The bound changes the loss: without it, the same tokens lose more.
    plain = ref.linear_psft_loss(p.hidden, p.weight, p.targets, p.old_logprobs, advantages=p.advantages,
                                 bias=p.bias)
    assert plain > loss + 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_backends_match_float64_reference(backend, reduction):
    p = _problem()
    want = run("psft", "reference", p, reduction=reduction, clip_ratio_c=C)
    got = run("psft", backend, p, reduction=reduction, clip_ratio_c=C)
    assert want.stats["clip_fraction_dual"] > 0
    # fp64 in, fp64 out (Triton runs fp64 on its chunked path): tight.
    assert_close(got, want, rtol=1e-9, atol=1e-12, what=f"{backend}/{reduction}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backends_low_precision_accuracy_rule(backend, dtype):
    """fp32 / bf16 inputs (Triton's own kernels run here, not its fp64 fallback): error against
    the float64 truth within the suite's rule relative to plain PyTorch at the same dtype."""
    p = _problem(batch=(4, 7))
    truth = run("psft", "reference", p, clip_ratio_c=C)
    plain = run("psft", "reference", p.to(dtype), clip_ratio_c=C)
    got = run("psft", backend, p.to(dtype), clip_ratio_c=C)
    assert truth.stats["clip_fraction_dual"] > 0
    assert_matches_truth(got, plain, truth, slack=1e-5 if dtype == torch.float32 else 1e-2, what=backend)
    # The dual-clip flags agree exactly where the ratio is not within rounding of the bound.
    ratio = truth.stats["clip_fraction_dual"]
    torch.testing.assert_close(got.stats["clip_fraction_dual"].double(), ratio, atol=1.0 / 28 + 1e-9, rtol=0)


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
def test_off_by_default_and_positive_advantages_unaffected(backend):
    p = _problem(batch=(3, 8))
    off = run("psft", backend, p)
    assert "clip_fraction_dual" not in off.stats
    p.advantages = p.advantages.abs()  # A >= 0: the dual clip never binds
    assert_close(run("psft", backend, p, clip_ratio_c=C), run("psft", backend, p), rtol=0, atol=0,
                 what="A >= 0")


def test_module_passes_the_option():
    p = _problem(batch=(2, 5))
    m = pk.LinearPSFTLoss(clip_ratio_c=C, backend="chunked")
    got = m(p.hidden, p.weight, p.targets, p.old_logprobs, advantages=p.advantages, bias=p.bias)
    want = ref.linear_psft_loss(p.hidden, p.weight, p.targets, p.old_logprobs, advantages=p.advantages,
                                bias=p.bias, clip_ratio_c=C)
    torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="clip_ratio_c must be None"):
        pk.LinearPSFTLoss(clip_ratio_c=0.5)
