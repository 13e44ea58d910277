"""The Triton backend against the reference.

Without CUDA the kernels run in Triton's interpreter (conftest.py sets TRITON_INTERPRET=1) on
small odd shapes; with a GPU the same tests run on it. Besides every loss and option this covers
the backend's own code paths: vocabulary splits in the forward, several backward vocabulary
slices, split-K, gradient filtering, determinism, compaction of ignored / clipped rows and
out-of-range targets. Checks that only a GPU can make (bf16 at realistic shapes, indices past
2^31, Inductor) are at the end, marked ``gpu``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from typing import Tuple

import pytest
import torch
import torch.nn.functional as F

import psft_kernels as pk
from helpers import (LOSSES, OPTION_SETS, Problem, assert_close, assert_matches_truth, make_problem, run,
                     split_options)
from psft_kernels import backends

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
REASON = backends.unavailable_reason("triton", DEVICE)
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"backend='triton' unavailable: {REASON}")
ON_GPU = DEVICE.type == "cuda"
F32 = dict(rtol=2e-5, atol=1e-6)
# The interpreter's tiles are 64 rows x 128 columns: SMALL has 2 vocabulary tiles, MEDIUM 3 row
# blocks x 3 vocabulary tiles (the last ones partial).
SMALL = dict(batch=(3, 11), D=16, V=157)
MEDIUM = dict(batch=(5, 27), D=24, V=300)


def problem(loss: str = "sft", dtype=torch.float32, **kw) -> Problem:
    kw = {**SMALL, **kw}
    return make_problem(ref=loss == "asft", dtype=dtype, device=str(DEVICE), **kw)


def compare(loss, prob, tol=F32, what="", **options):
    if loss == "asft":
        options.setdefault("kl_coef", 0.3)
    expected = run(loss, "reference", prob, **options)
    actual = run(loss, "triton", prob, **options)
    assert_close(actual, expected, what=what or loss, **tol)
    return actual, expected


def triton_module():
    backends.resolve("triton", DEVICE)  # imports psft_kernels.triton
    import psft_kernels.triton as module

    return module


# ----------------------------------------------------------------------------------------------
# Every loss and option
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", list(OPTION_SETS), ids=list(OPTION_SETS))
def test_matches_reference(loss, reduction, options):
    prob_opts, loss_opts = split_options(OPTION_SETS[options])
    compare(loss, problem(loss, **prob_opts), reduction=reduction, what=f"{loss}/{reduction}/{options}",
            **loss_opts)


@pytest.mark.parametrize("loss", LOSSES)
def test_several_row_blocks_and_vocab_tiles(loss):
    prob = problem(loss, bias=True, logit_scale=5.0, **MEDIUM)
    compare(loss, prob, softcap=4.0, temperature=0.8, entropy_coef=0.05)


@pytest.mark.parametrize("kl_direction", ["forward", "reverse"])
@pytest.mark.parametrize("D_ref", [16, 9])
def test_asft_kl_directions(kl_direction, D_ref):
    prob = problem("asft", D_ref=D_ref, bias=True)
    compare("asft", prob, kl_direction=kl_direction, kl_coef=0.5, softcap=4.0, temperature=0.9, entropy_coef=0.1)


@pytest.mark.parametrize("advantages", ["scalar", "negative_scalar", "per_token", "per_sequence", "zero"])
@pytest.mark.parametrize("old", ["perturbed", "none", "equal"])
def test_psft_advantages_and_old(advantages, old):
    g = torch.Generator().manual_seed(5)
    adv = {
        "scalar": 0.7,
        "negative_scalar": -1.3,
        "per_token": torch.randn(3, 11, generator=g, dtype=torch.float64).to(DEVICE),
        "per_sequence": torch.randn(3, 1, generator=g, dtype=torch.float64).to(DEVICE),
        "zero": 0.0,
    }[advantages]
    prob = problem("psft", old=old, advantages=adv, old_noise=0.5)
    _, expected = compare("psft", prob, eps_low=0.15, eps_high=0.25)
    if old == "perturbed" and advantages in ("scalar", "per_token"):
        assert 0 < expected.stats["clip_fraction"] < 1, "the problem should clip some tokens, not all or none"


def test_clipped_rows_get_exactly_zero_gradient():
    prob = problem("psft", old_noise=0.6, ignore_frac=0.0, **MEDIUM)
    actual, _ = compare("psft", prob, reduction="sum", eps_high=0.1, eps_low=0.1)
    lp, _ = pk.linear_logprobs(prob.hidden, prob.weight, prob.targets, backend="reference")
    ratio = torch.exp(lp - prob.old_logprobs)
    clipped = ratio > 1.1 + 1e-3  # well inside the clipped region (A = 1)
    assert clipped.sum() > 3
    assert (actual.grads["hidden"][clipped] == 0).all()


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("num_items", [7, "tensor"])
def test_num_items_in_batch(loss, num_items):
    n = torch.tensor(13, device=DEVICE) if num_items == "tensor" else num_items
    compare(loss, problem(loss), num_items_in_batch=n)


@pytest.mark.parametrize("shape", [dict(batch=(1,), D=63, V=509), dict(batch=(5,), D=4, V=1),
                                   dict(batch=(2, 3, 5), D=7, V=31), dict(batch=(), D=8, V=17)],
                         ids=["N1_D63_V509", "V1", "3d_batch", "scalar_batch"])
@pytest.mark.parametrize("loss", LOSSES)
def test_odd_shapes(shape, loss):
    compare(loss, problem(loss, ignore_frac=0.0, **shape))


@pytest.mark.parametrize("loss", LOSSES)
def test_non_contiguous_inputs(loss):
    prob = problem(loss, batch=(6, 9), bias=True)
    prob.hidden = prob.hidden.transpose(0, 1).contiguous().transpose(0, 1)
    prob.weight = prob.weight.T.contiguous().T
    prob.targets = prob.targets.T.contiguous().T
    if prob.old_logprobs is not None:
        prob.old_logprobs = prob.old_logprobs.T.contiguous().T
    assert not prob.hidden.is_contiguous() and not prob.weight.is_contiguous()
    compare(loss, prob)


def test_only_needed_gradients():
    prob = problem("psft", bias=True)
    for grads in [("hidden",), ("weight",), ("bias",), ("hidden", "bias")]:
        actual = run("psft", "triton", prob, grads=grads)
        assert set(actual.grads) == set(grads)
        assert_close(actual, run("psft", "reference", prob, grads=grads), **F32)


def test_all_targets_ignored():
    prob = problem("psft", bias=True)
    prob.targets = torch.full_like(prob.targets, -100)
    actual, _ = compare("psft", prob)
    assert actual.loss == 0 and all((g == 0).all() for g in actual.grads.values())


def test_logprobs_primitive_and_forward_only_path():
    prob = problem(bias=True, **MEDIUM)
    outs = {}
    for be in ("reference", "triton"):
        h, w, b = (t.clone().requires_grad_(True) for t in (prob.hidden, prob.weight, prob.bias))
        logp, ent = pk.linear_logprobs(h, w, prob.targets, bias=b, softcap=3.0, temperature=0.8, backend=be)
        g = torch.Generator().manual_seed(3)
        # Weights on ignored positions too: those outputs are constants and must pass no gradient.
        wl, we = (torch.randn(logp.shape, generator=g, dtype=torch.float64).to(DEVICE, logp.dtype) for _ in "lh")
        (logp * wl + ent * we).sum().backward()
        outs[be] = (logp.detach(), ent.detach(), h.grad, w.grad, b.grad)
    for a, e in zip(outs["triton"], outs["reference"]):
        torch.testing.assert_close(a, e, **F32)
    # Forward-only (the pi_old pass): no graph, same values.
    h = prob.hidden.clone().requires_grad_(True)
    with torch.no_grad():
        logp, ent = pk.linear_logprobs(h, prob.weight, prob.targets, bias=prob.bias, softcap=3.0, temperature=0.8,
                                       backend="triton")
        loss = pk.linear_psft_loss(h, prob.weight, prob.targets, backend="triton")
    assert logp.grad_fn is None and loss.grad_fn is None
    torch.testing.assert_close(logp, outs["reference"][0], **F32)


@pytest.mark.parametrize("loss", LOSSES)
def test_fp64_runs_on_the_chunked_fallback(loss):
    compare(loss, problem(loss, dtype=torch.float64, bias=True), tol=dict(rtol=1e-10, atol=1e-12), softcap=3.0)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_rule(loss, dtype):
    """Error vs the float64 truth <= 2 x eager PyTorch's error at the same dtype + 1% slack.

    bf16 runs the interpreter's upcast path on the CPU (its bf16 tl.dot is broken) and the
    native tensor-core path on a GPU.
    """
    prob = make_problem(ref=loss == "asft", batch=(4, 16), D=32, V=197, bias=True, device=str(DEVICE))
    kw = dict(kl_coef=0.3) if loss == "asft" else {}
    truth = run(loss, "reference", prob, **kw)
    half = prob.to(dtype)
    plain = run(loss, "reference", half, **kw)
    actual = run(loss, "triton", half, **kw)
    assert actual.loss.dtype == torch.float32 and actual.grads["weight"].dtype == dtype
    assert_matches_truth(actual, plain, truth, slack=1e-2, what=f"{loss}/{dtype}")


@pytest.mark.parametrize("loss", ["psft", "asft"])
def test_fp32_saturated_softcap_rule(loss):
    """The backward's softcap slope comes from the raw tile: accurate where tanh saturates."""
    prob = make_problem(ref=loss == "asft", batch=(4, 32), D=64, V=257, bias=True, logit_scale=6.0, seed=7,
                        device=str(DEVICE))
    kw = dict(softcap=3.0, **(dict(kl_coef=0.3) if loss == "asft" else {}))
    truth = run(loss, "reference", prob, **kw)
    f32 = prob.to(torch.float32)
    assert_matches_truth(run(loss, "triton", f32, **kw), run(loss, "reference", f32, **kw), truth, slack=1e-6,
                         what=loss)


def test_options_are_validated():
    prob = problem()
    with pytest.raises(ValueError, match="filter_eps"):
        pk.linear_sft_loss(prob.hidden, prob.weight, prob.targets, backend="triton", filter_eps=2.0)
    with pytest.raises(TypeError, match="deterministic"):
        pk.linear_sft_loss(prob.hidden, prob.weight, prob.targets, backend="triton", deterministic="yes")
    with pytest.raises(ValueError, match="filter_eps"):
        pk.LinearPSFTLoss(filter_eps=0.0)
    module = pk.LinearPSFTLoss(backend="triton", filter_eps=2.0 ** -12, deterministic=True)
    assert "filter_eps" in repr(module) and module(prob.hidden, prob.weight, prob.targets).isfinite()


# ----------------------------------------------------------------------------------------------
# The backend's own code paths
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss", LOSSES)
def test_vocabulary_split_forward(loss, monkeypatch):
    tr = triton_module()
    monkeypatch.setattr(tr.config, "sm_count", lambda device: 1024)
    prob = problem(loss, bias=True, **MEDIUM)
    n, v = prob.targets.numel(), prob.weight.shape[0]
    assert tr.forward.num_splits(n, v, DEVICE) == 3  # one split per vocabulary tile
    compare(loss, prob, softcap=3.0, entropy_coef=0.1, kl_direction="reverse") if loss == "asft" else \
        compare(loss, prob, softcap=3.0, entropy_coef=0.1)


@pytest.mark.parametrize("loss", LOSSES)
def test_several_backward_vocabulary_slices(loss, monkeypatch):
    tr = triton_module()
    prob = problem(loss, bias=True, **MEDIUM)
    n, v = prob.targets.numel(), prob.weight.shape[0]
    t = tr.config.tiles(DEVICE)
    monkeypatch.setattr(tr.config, "DZ_SLICE_COLUMNS", t.bwd_v)
    assert tr.backward.slice_width(n, v, t, DEVICE) == t.bwd_v < v
    for gemm, reduction in (("triton", "mean"), ("torch", "none")):
        monkeypatch.setattr(tr.config, "GRAD_GEMM", gemm)
        compare(loss, prob, reduction=reduction, entropy_coef=0.1, temperature=1.2, what=f"{loss} {gemm} GEMMs")


def test_split_k_weight_gradient(monkeypatch):
    tr = triton_module()
    monkeypatch.setattr(tr.config, "target_programs", lambda device: 4096)
    prob = problem("dft", bias=True, **MEDIUM)
    n, v, d = prob.targets.numel(), prob.weight.shape[0], prob.weight.shape[1]
    monkeypatch.setattr(tr.config, "GRAD_GEMM", "triton")
    assert tr.backward.weight_split_k(n, v, d, True, False, DEVICE) > 1
    assert tr.backward.weight_split_k(n, v, d, True, True, DEVICE) == 1
    atomic, expected = compare("dft", prob)
    ordered = run("dft", "triton", prob, deterministic=True)
    assert_close(ordered, expected, **F32)
    assert_close(ordered, atomic, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("filter_eps", [None, 2.0 ** -12])
def test_deterministic_mode_is_bitwise_repeatable(filter_eps):
    prob = problem("asft", bias=True, **MEDIUM)
    kw = dict(deterministic=True, filter_eps=filter_eps, kl_coef=0.2, entropy_coef=0.1)
    first, second = (run("asft", "triton", prob, **kw) for _ in range(2))
    assert torch.equal(first.loss, second.loss)
    for name in first.grads:
        assert torch.equal(first.grads[name], second.grads[name]), name


def peaked_problem(n=150, d=24, v=520, seed=0) -> Problem:
    """Frequent ids first (a Zipf-like prior in the bias), targets among them: the tail's tiles
    hold only small probabilities, as with a trained LM and a frequency-sorted vocabulary."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g, dtype=torch.float64)
    weight = torch.randn(v, d, generator=g, dtype=torch.float64) / d ** 0.5
    bias = -2.0 * torch.log1p(torch.arange(v, dtype=torch.float64))
    targets = torch.randint(0, 64, (n,), generator=g)
    targets[torch.rand(n, generator=g) < 0.1] = -100
    prob = Problem(hidden, weight, targets, bias=bias)
    return replace(prob, **{k: getattr(prob, k).to(DEVICE) for k in ("hidden", "weight", "targets", "bias")})


@pytest.mark.parametrize("gemm", ["triton", "torch"])
def test_filtering_error_is_bounded_by_the_threshold(gemm, monkeypatch):
    """Filtered minus exact gradients are bounded, entry by entry, by the contribution of every
    logit whose |p - onehot| is below filter_eps (a superset of what a skipped tile can hold).
    Both gradient-GEMM paths: Triton kernels skipping tiles, torch.mm on a dz with zeroed tiles."""
    monkeypatch.setattr(triton_module().config, "GRAD_GEMM", gemm)
    prob64 = peaked_problem()
    prob = prob64.to(torch.float32)
    eps = 2.0 ** -12
    exact = run("sft", "triton", prob, reduction="sum")
    filtered = run("sft", "triton", prob, reduction="sum", filter_eps=eps)
    assert torch.equal(exact.loss, filtered.loss), "filtering must not touch the forward"
    assert_close(exact, run("sft", "reference", prob, reduction="sum"), **F32)

    h, w, b, y = (x.cpu() for x in (prob64.hidden, prob64.weight, prob64.bias, prob64.targets))
    valid = (y != -100)[:, None]
    dz = (torch.softmax(h @ w.T + b, -1) - F.one_hot(y.clamp(min=0), w.shape[0]).double()) * valid
    # The problem must have tiles on both sides of the threshold, some just above it (a sloppy
    # threshold test would skip those and break the bound) and some below (else nothing to skip).
    t = triton_module().config.tiles(DEVICE)
    rows = dz[valid[:, 0]].abs()
    peaks = torch.tensor([[rows[r:r + t.bwd_m, c:c + t.bwd_v].max().item() for c in range(0, w.shape[0], t.bwd_v)]
                          for r in range(0, rows.shape[0], t.bwd_m)])
    assert (peaks < eps).any() and ((peaks > eps) & (peaks < 8 * eps)).any(), peaks
    small = dz.abs().where((dz.abs() < eps) & valid, torch.zeros((), dtype=dz.dtype))
    bounds = {"hidden": small @ w.abs(), "weight": small.T @ h.abs(), "bias": small.sum(0)}
    changed = False
    for name, bound in bounds.items():
        diff = (filtered.grads[name].double() - exact.grads[name].double()).abs().cpu()
        scale = exact.grads[name].abs().max().item()
        excess = (diff - bound - 1e-6 * scale).max().item()
        assert excess <= 0, f"grad_{name}: filtered error exceeds the threshold's bound by {excess:.3e}"
        assert bound.max() < 1e-2 * scale, f"grad_{name}: the bound itself should be small"
        changed |= bool((diff > 0).any())
    assert changed, "the peaked problem should have tiles below the threshold"


@pytest.mark.parametrize("gemm", ["triton", "torch"])
@pytest.mark.parametrize("loss", LOSSES)
def test_tiny_filter_threshold_changes_nothing(loss, gemm, monkeypatch):
    monkeypatch.setattr(triton_module().config, "GRAD_GEMM", gemm)
    prob = problem(loss, bias=True, **MEDIUM)
    kw = dict(kl_coef=0.3) if loss == "asft" else {}
    exact = run(loss, "triton", prob, **kw)
    filtered = run(loss, "triton", prob, filter_eps=1e-30, **kw)
    for name in exact.grads:
        assert torch.equal(exact.grads[name], filtered.grads[name]), name


def masked_problem(loss: str, case: str) -> Tuple[Problem, Problem]:
    """(fp32 problem with -inf in the bias, float64 twin with -1e4 there). exp(-1e4) is exactly 0
    in float64, so the twin's reference is the exact answer for a -inf logit: p = 0, p log p = 0,
    no gradient. MEDIUM's vocabulary has three tiles of 128 columns (the last partial)."""
    prob = problem(loss, bias=True, **MEDIUM).to(torch.float64)
    v = prob.weight.shape[0]
    bias = prob.bias.clone()
    targets = prob.targets.clone()
    valid = targets != -100
    if case == "some columns":  # every third column masked, targets moved off them
        bias[0::3] = float("-inf")
        targets[valid & (targets % 3 == 0)] += 1
    elif case == "whole tile":  # the middle vocabulary tile entirely, targets outside it
        bias[128:256] = float("-inf")
        targets[valid & (targets >= 128) & (targets < 256)] -= 128
    else:  # "only the target": one finite column, every valid row's target
        bias[:] = float("-inf")
        bias[v - 5] = 0.0
        targets[valid] = v - 5
    targets = targets.clamp(max=v - 1).where(valid, targets)
    ref = {}
    if loss == "asft":  # the reference model masks the same columns: the KL stays finite
        ref_bias = torch.zeros(v, dtype=torch.float64).masked_fill(bias.isinf(), float("-inf"))
        ref = dict(ref_bias=ref_bias)
    inf_prob = replace(prob, bias=bias, targets=targets, **ref).to(torch.float32)
    fin = lambda b: b.masked_fill(b.isinf(), -1e4)  # noqa: E731
    twin = replace(prob, bias=fin(bias), targets=targets, **{k: fin(b) for k, b in ref.items()})
    return inf_prob, twin


@pytest.mark.parametrize("case", ["some columns", "whole tile", "only the target"])
@pytest.mark.parametrize("loss", LOSSES)
def test_minus_inf_logits_are_exact_and_finite(loss, case, monkeypatch):
    """A -inf bias (tokens masked out of the vocabulary) gives finite results equal to the exact
    ones, with the entropy term on (p log p at p = 0) and a KL term for ASFT, on both GEMM paths."""
    prob, twin = masked_problem(loss, case)
    kw = dict(entropy_coef=0.1)
    if loss == "asft":
        kw.update(kl_coef=0.3, kl_direction="reverse")
    expected = run(loss, "reference", twin, **kw)
    for gemm in ("triton", "torch"):
        monkeypatch.setattr(triton_module().config, "GRAD_GEMM", gemm)
        actual = run(loss, "triton", prob, **kw)
        for name, x in [("loss", actual.loss)] + list(actual.grads.items()) + list(actual.stats.items()):
            if x.is_floating_point():
                assert torch.isfinite(x).all(), f"{loss} / {case} / {gemm}: {name} is not finite"
        assert_close(actual, expected, what=f"{loss} / {case} / {gemm}", **F32)


def test_out_of_range_targets_never_read_out_of_bounds(monkeypatch):
    """Where the host check is off (CUDA by default), bad targets give NaN log-probs and loss,
    and no gradient; every other token is unaffected."""
    tr = triton_module()
    prob = problem("sft", bias=True, ignore_frac=0.1, **MEDIUM)
    v = prob.weight.shape[0]
    bad = prob.targets.clone()
    flat = bad.view(-1)
    flat[[3, 40, 77]] = torch.tensor([v, v + 1000, -7], device=DEVICE)
    with monkeypatch.context() as patch:  # the host check: the CPU default, opt-in on CUDA
        patch.setenv(tr.backend.CHECK_TARGETS_ENV, "1")
        with pytest.raises(ValueError, match="targets must be in"):
            run("sft", "triton", replace(prob, targets=bad))
    monkeypatch.setattr(tr.backend.TritonBackend, "skips_host_target_check", lambda self, device: True)
    actual = run("sft", "triton", replace(prob, targets=bad), reduction="sum")
    assert actual.loss.isnan()
    logp = actual.stats["logprobs"].view(-1)
    assert logp[[3, 40, 77]].isnan().all() and not logp[flat == -100].isnan().any()
    cleaned = bad.clone()
    cleaned.view(-1)[[3, 40, 77]] = -100
    expected = run("sft", "reference", replace(prob, targets=cleaned), reduction="sum")
    for name in expected.grads:  # relative to the gradient's scale: entries that cancel to ~0 differ by rounding
        scale = expected.grads[name].abs().max().item()
        err = (actual.grads[name] - expected.grads[name]).abs().max().item()
        assert err <= F32["atol"] + F32["rtol"] * scale, (name, err, scale)
    good = ~torch.isin(torch.arange(flat.numel(), device=DEVICE), torch.tensor([3, 40, 77], device=DEVICE))
    torch.testing.assert_close(logp[good], expected.stats["logprobs"].view(-1)[good], **F32)


def test_compile_fullgraph_matches_reference(monkeypatch):
    """torch.compile(fullgraph=True) traces the public function through the custom ops.

    Inductor on a GPU; on the CPU "aot_eager" (Dynamo + AOTAutograd, no C++ build). The host-side
    target check is a sync (a graph break), so it is off as it is on CUDA by default.
    """
    tr = triton_module()
    monkeypatch.setattr(tr.backend.TritonBackend, "skips_host_target_check", lambda self, device: True)
    prob = problem("asft", bias=True, **MEDIUM)
    old = prob.old_logprobs

    def fn(h, w, b):
        # reduction="none" (coefficients saved, backward kernels in backward), a scalar reduction
        # (gradients formed in the forward) and the log-prob primitive, in one graph.
        asft = pk.linear_asft_loss(h, w, prob.targets, prob.ref_hidden, prob.ref_weight, bias=b, kl_coef=0.3,
                                   entropy_coef=0.1, reduction="none", backend="triton")
        psft = pk.linear_psft_loss(h, w, prob.targets, old, bias=b, backend="triton")
        logp, ent = pk.linear_logprobs(h, w, prob.targets, bias=b, backend="triton")
        return asft.sum() + psft + 0.3 * logp.sum() + ent.sum()

    def grads(f):
        h, w, b = (t.clone().requires_grad_(True) for t in (prob.hidden, prob.weight, prob.bias))
        out = f(h, w, b)
        out.backward()
        return out.detach(), h.grad, w.grad, b.grad

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="inductor" if ON_GPU else "aot_eager")
    for a, e in zip(grads(compiled), grads(fn)):
        torch.testing.assert_close(a, e, **F32)


# Compilation for real GPU targets (sm_90 / sm_80 / sm_89) with the resource budget of every
# variant: tests/test_triton_budget.py.


# ----------------------------------------------------------------------------------------------
# Availability (subprocesses: TRITON_INTERPRET and the import of triton are process-wide)
# ----------------------------------------------------------------------------------------------
def _python(code: str, **env) -> str:
    full = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    full.update(env)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], env=full, cwd=root, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_cpu_without_interpreter_says_how_to_enable_it():
    out = _python("import torch, psft_kernels as pk\n"
                  "from psft_kernels import backends\n"
                  "print(backends.unavailable_reason('triton', torch.device('cpu')))\n"
                  "print(pk.available_backends('cpu'))")
    assert "TRITON_INTERPRET=1" in out and "'triton'" not in out


def test_package_imports_without_triton():
    out = _python("import sys; sys.modules['triton'] = None\n"
                  "import torch, psft_kernels as pk\n"
                  "from psft_kernels import backends\n"
                  "print(pk.available_backends('cpu'), pk.auto_backend_name('cpu'))\n"
                  "print(backends.unavailable_reason('triton', torch.device('cpu')))")
    assert "cannot be imported" in out and "'triton'" not in out.splitlines()[0]


# ----------------------------------------------------------------------------------------------
# GPU only
# ----------------------------------------------------------------------------------------------
gpu = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device")


def _gpu_problem(n, d, v, loss, *, logit_scale=3.0, seed=0, ignore_frac=0.1, d_ref=None, dtype=torch.float64):
    """A problem generated on the GPU (a CPU generator would take minutes at these sizes)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, device="cuda", dtype=dtype)  # noqa: E731
    hidden = rnd(n, d)
    weight = rnd(v, d) * (logit_scale / d ** 0.5)
    targets = torch.randint(0, v, (n,), generator=g, device="cuda")
    targets[torch.rand(n, generator=g, device="cuda") < ignore_frac] = -100
    prob = Problem(hidden, weight, targets)
    if loss == "asft":
        dq = d_ref or d
        prob.ref_hidden = rnd(n, dq)
        prob.ref_weight = rnd(v, dq) * (logit_scale / dq ** 0.5)
    if loss == "psft":
        with torch.no_grad():
            logp, _ = pk.linear_logprobs(hidden, weight, targets, backend="chunked")
        prob.old_logprobs = (logp + 0.3 * rnd(n)).clamp(max=0.0)  # log-probabilities: <= 0
    return prob


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("loss", ["psft", "asft"])
def test_gpu_bf16_realistic_shape(loss):
    """N=4096, D=4096, V=128256 (Llama-3's vocabulary) in bf16, by the accuracy rule."""
    prob = _gpu_problem(4096, 4096, 128256, loss)
    kw = dict(kl_coef=0.05) if loss == "asft" else {}
    truth = run(loss, "reference", prob, **kw)
    half = prob.to(torch.bfloat16)
    plain = run(loss, "reference", half, **kw)
    actual = run(loss, "triton", half, **kw)
    assert_matches_truth(actual, plain, truth, slack=1e-2, what=f"bf16 {loss}")


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("case", ["V*D>2^31", "N*V>2^31"])
def test_gpu_large_indices(case):
    """Offsets past 2^31 elements: a (V, D) weight of 2.2e9 entries, or N*V logits of 2.2e9."""
    n, d, v = (512, 8256, 262144) if case == "V*D>2^31" else (16512, 256, 131072)
    assert (v * d if case == "V*D>2^31" else n * v) > 2 ** 31
    # fp32 truth from the chunked backend: fp64 copies would not fit beside everything else.
    prob = _gpu_problem(n, d, v, "sft", logit_scale=2.0, dtype=torch.float32)
    truth = run("sft", "chunked", prob)
    half = prob.to(torch.bfloat16)
    del prob
    plain = run("sft", "chunked", half)
    actual = run("sft", "triton", half)
    assert_matches_truth(actual, plain, truth, slack=1e-2, what=case)


@gpu
@pytest.mark.gpu
def test_gpu_determinism_and_split_k():
    """Small vocabulary, many rows: split-K (float atomics) is used unless deterministic=True,
    which must be bitwise repeatable; both must agree with the reference."""
    tr = triton_module()
    prob = _gpu_problem(16384, 1024, 2000, "psft").to(torch.bfloat16)
    assert tr.backward.weight_split_k(16384, 2000, 1024, True, False, DEVICE) > 1
    runs = [run("psft", "triton", prob, deterministic=True) for _ in range(3)]
    for other in runs[1:]:
        assert torch.equal(other.loss, runs[0].loss)
        for name in other.grads:
            assert torch.equal(other.grads[name], runs[0].grads[name]), name
    fast = run("psft", "triton", prob)
    truth = run("psft", "reference", prob.to(torch.float64))
    plain = run("psft", "reference", prob)
    for res in (runs[0], fast):
        assert_matches_truth(res, plain, truth, slack=1e-2, what="determinism")


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("loss", ["psft", "asft"])
def test_gpu_no_host_sync(loss):
    """Forward and backward issue no host-device synchronisation (CUDA sync debug mode raises
    on any), including the scalar reduction whose gradients are formed in the forward op."""
    prob = _gpu_problem(1000, 256, 5000, loss, dtype=torch.bfloat16)
    h, w = (t.clone().requires_grad_(True) for t in (prob.hidden, prob.weight))
    args = (prob.ref_hidden, prob.ref_weight) if loss == "asft" else (prob.old_logprobs,)
    fn = pk.linear_asft_loss if loss == "asft" else pk.linear_psft_loss

    def step():
        fn(h, w, prob.targets, *args, backend="triton").backward()
        out, ent = pk.linear_logprobs(h, w, prob.targets, backend="triton")
        (out.sum() + ent.sum()).backward()

    step()  # compiles the kernels and imports the backend
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
