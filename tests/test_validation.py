"""Bad input gets a clear error naming the argument; edge inputs give finite, correct results."""

from __future__ import annotations

import pytest
import torch

import psft_kernels as pk
from helpers import FUNCTIONS, LOSSES, assert_matches_truth, cpu_backends, make_problem, run

ALL = ["reference"] + cpu_backends()


def _call(loss, backend="chunked", problem=None, **overrides):
    p = problem or make_problem(ref=True, bias=True)
    args = dict(hidden=p.hidden, weight=p.weight, targets=p.targets)
    kw = dict(bias=p.bias, backend=backend)
    if loss == "psft":
        kw.update(old_logprobs=p.old_logprobs)
    if loss == "asft":
        kw.update(ref_hidden=p.ref_hidden, ref_weight=p.ref_weight)
    for k, v in overrides.items():
        (args if k in args else kw)[k] = v
    fn = FUNCTIONS[loss]
    if loss == "asft":
        return fn(args["hidden"], args["weight"], args["targets"], kw.pop("ref_hidden"), kw.pop("ref_weight"), **kw)
    return fn(args["hidden"], args["weight"], args["targets"], **kw)


def _raises(exc, match, loss, backend, **overrides):
    with pytest.raises(exc, match=match):
        _call(loss, backend, **overrides)


p0 = make_problem(ref=True, bias=True)
N_SHAPE = tuple(p0.targets.shape)

BAD_COMMON = [
    # (exception, message pattern, overrides)
    (ValueError, r"targets must be in \[0, V=53\).*got 53", dict(targets=p0.targets.clamp(min=0).fill_(53))),
    (ValueError, r"targets must be in \[0, V=53\).*got -5", dict(targets=p0.targets.clamp(min=0) - 5)),
    (TypeError, r"targets must be an integer tensor.*float", dict(targets=p0.targets.double())),
    (TypeError, r"targets must be an integer tensor.*bool", dict(targets=p0.targets > 0)),
    (ValueError, r"hidden.shape\[-1\] must equal weight.shape\[1\] \(D=16\)", dict(hidden=p0.hidden[..., :5])),
    (ValueError, r"targets.shape must equal hidden.shape\[:-1\]", dict(targets=p0.targets[:, :4])),
    (ValueError, r"bias must have shape \(V,\) = \(53,\); got \(52,\)", dict(bias=p0.bias[:52])),
    (ValueError, r"weight must be 2-D", dict(weight=p0.weight[None])),
    (TypeError, r"hidden must be a torch.Tensor", dict(hidden=[[1.0]])),
    (TypeError, r"weight must have hidden's dtype", dict(weight=p0.weight.float())),
    (ValueError, r"temperature must be > 0; got 0.0", dict(temperature=0.0)),
    (ValueError, r"temperature must be > 0; got -1.0", dict(temperature=-1.0)),
    (ValueError, r"softcap must be > 0 or None; got 0.0", dict(softcap=0)),
    (ValueError, r"reduction must be one of 'mean', 'sum', 'none'; got 'avg'", dict(reduction="avg")),
    (ValueError, r"backend must be one of .*; got 'cuda'", dict(backend="cuda")),
    (ValueError, r"num_items_in_batch must be > 0; got 0", dict(num_items_in_batch=0)),
    (ValueError, r"chunk_size must be a positive int", dict(chunk_size=0)),
    (ValueError, r"temperature must be finite", dict(temperature=float("nan"))),
]


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("exc,match,overrides", BAD_COMMON, ids=[m for _, m, _ in BAD_COMMON])
def test_bad_common_inputs(loss, exc, match, overrides):
    if "backend" in overrides:
        overrides = dict(overrides)
        _raises(exc, match, loss, overrides.pop("backend", "chunked"), **overrides)
        return
    for backend in ALL:
        _raises(exc, match, loss, backend, **overrides)


BAD_SPECIFIC = [
    ("psft", ValueError, r"old_logprobs must have targets' shape", dict(old_logprobs=p0.old_logprobs[:, :3])),
    ("psft", TypeError, r"old_logprobs must be a floating-point tensor", dict(old_logprobs=p0.targets)),
    ("psft", ValueError, r"advantages must be broadcastable to targets.shape",
     dict(advantages=torch.ones(N_SHAPE[0] + 1, 1, dtype=torch.float64))),
    ("psft", TypeError, r"advantages must be a float or a tensor", dict(advantages="1")),
    ("psft", ValueError, r"eps_low must be >= 0; got -0.1", dict(eps_low=-0.1)),
    ("psft", ValueError, r"eps_high must be >= 0; got -1.0", dict(eps_high=-1)),
    ("asft", ValueError, r"kl_direction must be one of 'forward', 'reverse'; got 'both'", dict(kl_direction="both")),
    ("asft", ValueError, r"ref_hidden must have shape", dict(ref_hidden=p0.ref_hidden[:, :2])),
    ("asft", ValueError, r"ref_weight must be 2-D \(V, D_ref\) with V=53", dict(ref_weight=p0.ref_weight[:50])),
    ("asft", ValueError, r"ref_bias must have shape \(V,\)", dict(ref_bias=torch.zeros(3, dtype=torch.float64))),
    ("sft", TypeError, r"entropy_coef must be a real number", dict(entropy_coef="0.1")),
    # eps_low >= 1 would put the ratio floor 1 - eps_low at or below 0.
    ("psft", ValueError, r"eps_low must be < 1 \(the ratio floor 1 - eps_low must be > 0\); got 1.0",
     dict(eps_low=1.0)),
    ("psft", ValueError, r"eps_low must be < 1 .*; got 1.5", dict(eps_low=1.5)),
    ("psft", ValueError, r"clip_ratio_c must be None \(off\) or > 1 .*; got 1.0", dict(clip_ratio_c=1.0)),
    ("psft", TypeError, r"clip_ratio_c must be a real number", dict(clip_ratio_c="3")),
    ("asft", ValueError, r"kl_coef must be >= 0; got -0.1", dict(kl_coef=-0.1)),
    ("sft", TypeError, r"return_stats must be a bool; got int", dict(return_stats=1)),
    ("dft", TypeError, r"return_stats must be a bool; got str", dict(return_stats="yes")),
    ("sft", ValueError, r"num_items_in_batch must be None with reduction='none' .*; got num_items_in_batch=8",
     dict(reduction="none", num_items_in_batch=8)),
]


@pytest.mark.parametrize("loss,exc,match,overrides", BAD_SPECIFIC, ids=[m for _, _, m, _ in BAD_SPECIFIC])
def test_bad_specific_inputs(loss, exc, match, overrides):
    for backend in ALL:
        _raises(exc, match, loss, backend, **overrides)


def test_bad_logprobs_inputs_and_unavailable_backend():
    p = make_problem()
    with pytest.raises(ValueError, match="targets must be in"):
        pk.linear_logprobs(p.hidden, p.weight, p.targets.clamp(min=0) + 100)
    with pytest.raises(ValueError, match="softcap must be > 0"):
        pk.linear_logprobs(p.hidden, p.weight, p.targets, softcap=-1.0)
    if "triton" not in pk.available_backends("cpu"):
        with pytest.raises(pk.BackendUnavailableError, match='backend="triton" cannot run on cpu'):
            pk.linear_logprobs(p.hidden, p.weight, p.targets, backend="triton")


def test_module_options_fail_at_construction():
    with pytest.raises(ValueError, match="reduction"):
        pk.LinearSFTLoss(reduction="avg")
    with pytest.raises(ValueError, match="eps_high"):
        pk.LinearPSFTLoss(eps_high=-1)
    with pytest.raises(ValueError, match="kl_direction"):
        pk.LinearASFTLoss(kl_direction="sideways")


# ------------------------------------------------------------------------------------------------
# Edge inputs
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_gives_zero_loss_and_zero_grads(backend, loss, reduction):
    p = make_problem(ref=loss == "asft", bias=True)
    p.targets = torch.full_like(p.targets, -100)
    r = run(loss, backend, p, reduction=reduction, num_items_in_batch=None)
    assert torch.all(r.loss == 0) and torch.isfinite(r.loss).all()
    for name, g in r.grads.items():
        assert torch.all(g == 0), f"grad_{name} must be zero when every token is ignored"
    for name, s in r.stats.items():
        assert torch.isfinite(s.double()).all(), f"stats[{name}] must be finite"
    assert r.stats["num_tokens"] == 0


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("loss", LOSSES)
def test_huge_logits_fp32(backend, loss):
    """Logits of magnitude ~1e4 in fp32: finite, and as close to the float64 truth as plain fp32.

    (At |z| ~ 1e4 an fp32 logit carries ~1e-3 of rounding, so log-probs do too: the bar is
    eager PyTorch's own fp32 error, not zero.)"""
    p = make_problem(ref=loss == "asft", logit_scale=1e4, batch=(12,), old="equal")
    truth = run(loss, "reference", p)
    plain = run(loss, "reference", p.to(torch.float32))
    got = run(loss, backend, p.to(torch.float32))
    assert torch.isfinite(got.loss).all() and all(torch.isfinite(g).all() for g in got.grads.values())
    assert_matches_truth(got, plain, truth, slack=1e-5)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("old_value", [-1e30, float("-inf")])
def test_extreme_old_logprobs(backend, old_value):
    p = make_problem(batch=(10,), ignore_frac=0.0)
    p.old_logprobs = p.old_logprobs.clone()
    p.old_logprobs[::2] = old_value
    r = run("psft", backend, p)
    assert torch.isfinite(r.loss) and all(torch.isfinite(g).all() for g in r.grads.values())
    # Half the tokens: log-ratio beyond the clamp, loss -min(r, 1.28) with r = e^20, no gradient.
    r_extreme = torch.exp(torch.tensor(20.0, dtype=torch.float64))
    half = run("psft", backend, p, reduction="none")
    torch.testing.assert_close(half.loss[::2], torch.full((5,), -min(r_extreme.item(), 1.28), dtype=torch.float64))
    # The extreme tokens pass no gradient: the gradient of the sum equals the other half's alone.
    rest = make_problem(batch=(10,), ignore_frac=0.0)
    rest.hidden, rest.targets, rest.old_logprobs = p.hidden[1::2], p.targets[1::2], p.old_logprobs[1::2]
    only_rest = run("psft", backend, rest, reduction="sum")
    full = run("psft", backend, p, reduction="sum")
    torch.testing.assert_close(full.grads["weight"], only_rest.grads["weight"])
    assert full.grads["weight"].abs().sum() > 0


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("where", ["hidden", "weight"])
def test_nan_propagates(backend, where):
    p = make_problem(batch=(8,), ignore_frac=0.0)
    t = getattr(p, where).clone()
    t.view(-1)[3] = float("nan")
    setattr(p, where, t)
    r = run("psft", backend, p)
    assert torch.isnan(r.loss), f"NaN in {where} must show up in the loss"


# ------------------------------------------------------------------------------------------------
# old_logprobs are log-probabilities; meta tensors; double backward
# ------------------------------------------------------------------------------------------------


def _old_with(value, pos=0, problem=None):
    p = problem or make_problem(batch=(10,), ignore_frac=0.0)
    old = p.old_logprobs.clone()
    old[pos] = value
    return p, old


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), 0.5, 1e30, 2e-3])
def test_old_logprobs_must_be_logprobs(backend, value):
    p, old = _old_with(value, pos=3)
    with pytest.raises(ValueError, match=r"old_logprobs must be log-probabilities .* at flat position 3"):
        pk.linear_psft_loss(p.hidden, p.weight, p.targets, old, backend=backend)


@pytest.mark.parametrize("backend", ALL)
def test_old_logprobs_rounding_and_masked_tokens_are_accepted(backend):
    """Up to 1e-3 above 0 is rounding of log(1) (used as given); masked tokens may hold anything."""
    p, old = _old_with(1e-3, pos=3)
    old[5] = float("nan")
    targets = p.targets.clone()
    targets[5] = -100
    loss = pk.linear_psft_loss(p.hidden, p.weight, targets, old, backend=backend, reduction="none")
    expected = pk.linear_psft_loss(p.hidden, p.weight, targets, old, backend="reference", reduction="none")
    assert torch.isfinite(loss).all()
    torch.testing.assert_close(loss, expected)


def test_old_logprobs_check_follows_the_target_check(monkeypatch):
    """Where a backend skips the host-side target check (Triton on CUDA, to stay sync-free), the
    old_logprobs check is skipped too: a NaN then shows up in the loss instead of an error."""
    from psft_kernels.chunked import ChunkedBackend

    p, old = _old_with(float("nan"), pos=3)
    monkeypatch.setattr(ChunkedBackend, "skips_host_target_check", lambda self, device: True, raising=False)
    loss = pk.linear_psft_loss(p.hidden, p.weight, p.targets, old, backend="chunked")
    assert torch.isnan(loss)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("where", ["hidden", "weight", "bias"])
def test_meta_tensors_are_refused(backend, where):
    p = make_problem(bias=True)
    kw = dict(hidden=p.hidden, weight=p.weight, bias=p.bias)
    kw[where] = kw[where].to("meta")
    if where != "hidden":  # all on meta, so that the device check does not answer first
        kw = {k: v.to("meta") for k, v in kw.items()}
    targets = p.targets.to("meta") if where != "hidden" else p.targets
    match = rf"{'hidden' if where != 'hidden' else where} is on the meta device"
    with pytest.raises(ValueError, match=match):
        pk.linear_sft_loss(kw["hidden"], kw["weight"], targets, bias=kw["bias"], backend=backend)
    with pytest.raises(ValueError, match=match):
        pk.linear_logprobs(kw["hidden"], kw["weight"], targets, bias=kw["bias"], backend=backend)


def test_meta_weight_names_weight():
    p = make_problem()
    with pytest.raises(ValueError, match=r"weight is on the meta device \(shape \(53, 16\)"):
        pk.linear_sft_loss(p.hidden, p.weight.to("meta"), p.targets, backend="chunked")


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("what", ["mean", "none", "logprobs"])
def test_double_backward_is_a_clear_error(backend, what):
    """create_graph=True gives the right first-order gradients; differentiating them again raises."""
    p = make_problem()

    def value(h, w, be):
        if what == "logprobs":
            logp, ent = pk.linear_logprobs(h, w, p.targets, backend=be)
            return logp.sum() + 0.3 * ent.sum()
        out = pk.linear_psft_loss(h, w, p.targets, p.old_logprobs, backend=be, reduction=what)
        return out.sum()

    grads = {}
    for be in (backend, "reference"):
        h, w = p.hidden.clone().requires_grad_(), p.weight.clone().requires_grad_()
        grads[be] = torch.autograd.grad(value(h, w, be), (h, w), create_graph=True)
    for got, want in zip(grads[backend], grads["reference"]):
        torch.testing.assert_close(got.detach(), want.detach())
    with pytest.raises(RuntimeError, match=r"double backward .* is not supported through a fused backend"):
        grads[backend][0].square().sum().backward()
    grads["reference"][0].square().sum().backward()  # the oracle does support it
