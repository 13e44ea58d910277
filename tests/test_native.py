"""The native CPU backend: how it is built, cached and skipped, and its kernels on their own.

Its numerics across every loss and option are covered by the backend-parametrized suite
(test_backends.py, via ``cpu_backends()``); here are the build / fallback behaviour, the kernel
ops against plain PyTorch in float64, and the paths only this backend has (row compaction,
the factored gradient with half inputs, balanced blocks).

Build scenarios run in subprocesses with a private cache directory and a fake compiler (a
script that records each call), so they neither compile for real nor touch the user's cache.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import psft_kernels as pk
from psft_kernels import _native_build
from psft_kernels._types import HeadInputs, HeadSpec
from psft_kernels.native import NativeBackend
from helpers import assert_close, assert_matches_truth, cpu_backends, make_problem, run

ROOT = Path(__file__).resolve().parents[1]


def _native_ops():
    """The loaded kernel ops, or skip (saying why) where this machine cannot build them."""
    reason = _native_build.unavailable_reason()
    if reason is not None:
        pytest.skip(f"native kernel unavailable here: {reason}")
    ops = _native_build.load_ops()
    assert ops is not None, f"a compiler is present but the kernel did not build: {_native_build._state.error}"
    return ops


def test_kernel_builds_and_joins_the_suite():
    """Where a compiler exists the kernel must really load, so the suite never tests a silent fallback."""
    _native_ops()
    assert "native" in cpu_backends()
    assert pk.auto_backend_name(torch.device("cpu")) == "native"


def test_not_offered_off_the_cpu():
    reason = NativeBackend().unavailable_reason(torch.device("cuda"))
    assert reason is not None and "CPU" in reason


# ----------------------------------------------------------------------------------------------
# build scenarios, in subprocesses
# ----------------------------------------------------------------------------------------------

FAKE_CXX = """\
#!{python}
# A stand-in C++ compiler: answers --version, logs every other call, then fails or copies a
# prebuilt library to the -o path (FAKE_CXX_MODE = fail | copy).
import os, shutil, sys, time
if "--version" in sys.argv:
    print("fakecxx 1.0")
    sys.exit(0)
with open(os.environ["FAKE_CXX_LOG"], "a") as f:
    f.write("compile\\n")
if os.environ.get("FAKE_CXX_MODE") == "copy":
    time.sleep(1.0)  # long enough for concurrent callers to pile up on the lock
    shutil.copy(os.environ["FAKE_CXX_LIB"], sys.argv[sys.argv.index("-o") + 1])
    sys.exit(0)
print("psft_native.cpp:1:1: error: this compiler is broken on purpose", file=sys.stderr)
sys.exit(1)
"""

SCENARIO = """\
import json, sys, warnings
sys.path.insert(0, {root!r})
import torch
import psft_kernels as pk
from psft_kernels import backends, _native_build
out = {{"reason": backends.unavailable_reason("native", "cpu"),
        "available": pk.available_backends("cpu"), "auto": pk.auto_backend_name("cpu")}}
{body}
print(json.dumps(out))
"""

RUN_LOSS = """\
g = torch.Generator().manual_seed(0)
h, w = torch.randn(6, 8, generator=g), torch.randn(11, 8, generator=g)
y = torch.randint(0, 11, (6,), generator=g)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    losses = []
    for b in {backends}:
        try:
            losses.append(pk.linear_psft_loss(h, w, y, backend=b).item())
        except pk.BackendUnavailableError as exc:
            losses.append("unavailable: " + str(exc))
out["losses"] = losses
out["chunked"] = pk.linear_psft_loss(h, w, y, backend="chunked").item()
out["warnings"] = [str(x.message) for x in caught if issubclass(x.category, _native_build.NativeBuildWarning)]
out["reason_after"] = backends.unavailable_reason("native", "cpu")
"""


@pytest.fixture
def sandbox(tmp_path):
    """Environment for a scenario: private cache, the fake compiler, its call log."""
    cxx = tmp_path / "fake-c++"
    cxx.write_text(FAKE_CXX.format(python=sys.executable))
    cxx.chmod(cxx.stat().st_mode | stat.S_IXUSR)
    log = tmp_path / "compiler-calls.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PSFT_KERNELS_")}
    env.update(CXX=str(cxx), FAKE_CXX_LOG=str(log), FAKE_CXX_MODE="fail",
               PSFT_KERNELS_CACHE_DIR=str(tmp_path / "cache"))
    return env, log


def _scenario(env, body="", extra_env=None, background=False):
    code = SCENARIO.format(root=str(ROOT), body=textwrap.indent(body, ""))
    env = dict(env, **(extra_env or {}))
    cmd = [sys.executable, "-c", code]
    if background:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _compiles(log: Path) -> int:
    return len(log.read_text().splitlines()) if log.exists() else 0


def test_availability_queries_never_compile(sandbox):
    env, log = sandbox
    out = _scenario(env)
    assert out["reason"] is None and "native" in out["available"] and out["auto"] == "native"
    assert _compiles(log) == 0, "unavailable_reason / available_backends / auto_backend_name compiled"


def test_broken_compiler_falls_back_with_one_warning(sandbox):
    env, log = sandbox
    body = RUN_LOSS.format(backends=["native", "native", "auto"])
    out = _scenario(env, body)
    assert _compiles(log) == 1
    assert len(out["warnings"]) == 1, out["warnings"]
    assert "broken on purpose" in out["warnings"][0] and "chunked" in out["warnings"][0]
    # the first call had already chosen "native": it runs the chunked code instead of failing;
    # after that "native" is unavailable (saying why) and "auto" picks chunked
    first, second, auto = out["losses"]
    assert first == out["chunked"] and auto == out["chunked"]
    assert second.startswith("unavailable") and "broken on purpose" in second
    assert "broken on purpose" in out["reason_after"]

    # A later process does not retry the failed build: it says why and "auto" stays chunked.
    out = _scenario(env, RUN_LOSS.format(backends=["native", "auto"]))
    assert _compiles(log) == 1
    assert "earlier build failed" in out["reason"] and out["auto"] == "chunked"
    native, auto = out["losses"]
    assert native.startswith("unavailable") and out["warnings"] == []
    assert auto == out["chunked"]

    # ... unless asked to.
    _scenario(env, RUN_LOSS.format(backends=["native"]), {"PSFT_KERNELS_REBUILD_NATIVE": "1"})
    assert _compiles(log) == 2


def test_no_compiler(sandbox):
    env, log = sandbox
    out = _scenario(env, RUN_LOSS.format(backends=["native", "auto"]), {"CXX": "/nonexistent/c++"})
    assert "no C++ compiler" in out["reason"] and out["auto"] == "chunked"
    assert "native" not in out["available"]
    native, auto = out["losses"]
    assert native.startswith("unavailable") and "no C++ compiler" in native
    assert auto == out["chunked"] and out["warnings"] == []


def test_disabled_by_environment(sandbox):
    env, log = sandbox
    out = _scenario(env, RUN_LOSS.format(backends=["auto"]), {"PSFT_KERNELS_NO_NATIVE": "1"})
    assert "PSFT_KERNELS_NO_NATIVE" in out["reason"] and out["auto"] == "chunked"
    assert out["losses"] == [out["chunked"]] and _compiles(log) == 0


def test_bad_isa_override(sandbox):
    env, log = sandbox
    out = _scenario(env, "", {"PSFT_KERNELS_NATIVE_ISA": "avx9000"})
    assert "PSFT_KERNELS_NATIVE_ISA" in out["reason"] and "avx9000" in out["reason"] and out["auto"] == "chunked"


def test_concurrent_processes_build_once(sandbox):
    _native_ops()
    env, log = sandbox
    extra = {"FAKE_CXX_MODE": "copy", "FAKE_CXX_LIB": str(_native_build.build())}
    body = RUN_LOSS.format(backends=["native"]) + "out['loaded'] = _native_build._state.ops is not None\n"
    procs = [_scenario(env, body, extra, background=True) for _ in range(3)]
    outs = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=300)
        assert p.returncode == 0, stderr
        outs.append(json.loads(stdout.strip().splitlines()[-1]))
    assert _compiles(log) == 1, "the file lock should let one process build and the others load it"
    for out in outs:
        assert out["loaded"] and out["warnings"] == []
        assert abs(out["losses"][0] - out["chunked"]) <= 1e-5 * abs(out["chunked"])


# ----------------------------------------------------------------------------------------------
# the kernel ops against float64 PyTorch
# ----------------------------------------------------------------------------------------------


def _transform(x, temperature, softcap):
    if softcap:
        x = torch.tanh(x / softcap) * softcap
    return x / temperature


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("V", [5, 37, 1000])
@pytest.mark.parametrize("kl_mode", [0, 1, 2], ids=["no_kl", "forward", "reverse"])
@pytest.mark.parametrize("softcap,temperature", [(0.0, 1.0), (0.0, 0.8), (4.0, 1.3)], ids=["plain", "T", "cap+T"])
def test_kernel_ops_match_float64(dtype, V, kl_mode, softcap, temperature):
    ops = _native_ops()
    g = torch.Generator().manual_seed(V + kl_mode)
    n = 9
    x = torch.randn(n, V, generator=g, dtype=torch.float64) * 4
    xq = torch.randn(n, V, generator=g, dtype=torch.float64) * 4
    y = torch.randint(0, V, (n,), generator=g)
    cg, ce, ck = (torch.randn(n, generator=g, dtype=torch.float64) for _ in range(3))

    # float64 truth through autograd
    z = _transform(x, temperature, softcap).requires_grad_(True)
    zq = _transform(xq, temperature, softcap)
    lp, lq = torch.log_softmax(z, -1), torch.log_softmax(zq, -1)
    H = -(lp.exp() * lp).sum(-1)
    kl = {1: (lq.exp() * (lq - lp)).sum(-1), 2: (lp.exp() * (lp - lq)).sum(-1)}.get(kl_mode)
    loss = (cg * lp.gather(1, y[:, None])[:, 0]).sum() + (ce * H).sum() + ((ck * kl).sum() if kl_mode else 0)
    (dz,) = torch.autograd.grad(loss, z)
    xr = x.clone().requires_grad_(True)
    (dx,) = torch.autograd.grad(_transform(xr, temperature, softcap), xr, dz)

    a, aq = x.to(dtype, copy=True), (xq.to(dtype, copy=True) if kl_mode else None)
    slope = torch.empty_like(a) if softcap else None
    st = ops.stats(a, y, aq, 1.0 / temperature, softcap, kl_mode, False, slope)
    if softcap:  # dz/dx from the raw logits: a few ulps relative, even where tanh saturates
        want = torch.cosh(x / softcap).pow(-2) / temperature
        assert ((slope.double() - want).abs() / want).max().item() <= (1e-14 if dtype == torch.float64 else 1e-6)
        again = x.to(dtype, copy=True)
        slope2 = torch.empty_like(a)
        ops.transform_(again, 1.0 / temperature, softcap, slope2)
        assert torch.equal(again, a) and torch.equal(slope2, slope)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    scale = lambda t: tol * max(1.0, t.abs().max().item())  # noqa: E731
    for got, want in [(st[0], torch.logsumexp(z, -1)), (st[1], lp.gather(1, y[:, None])[:, 0]), (st[2], H),
                      (a, z)] + ([(st[5], kl), (st[4], torch.logsumexp(zq, -1))] if kl_mode else []):
        assert (got.double() - want.detach()).abs().max().item() <= scale(want)
    ops.dlogits(a, y, aq, st, cg.to(dtype), ce.to(dtype), ck.to(dtype) if kl_mode else None,
                1.0 / temperature, softcap, kl_mode, slope)
    assert (a.double() - dx).abs().max().item() <= 4 * scale(dx)


def test_kernel_softcap_slope_saturated():
    """Where tanh is within an ulp of +-1, dz/dx still carries a relative, not an absolute, error.

    Its relative condition number in x is 2|x / s| (through exp(-2|x| / s)), so the bound grows
    with it; 1 - tanh^2 taken from the capped logits would be off by ~100% out there instead.
    """
    ops = _native_ops()
    a = torch.linspace(-60.0, 60.0, 1001)[None, :]  # x / s up to 20 with s = 3
    x = a.double()  # the exact values the kernel sees
    slope = torch.empty_like(a)
    ops.transform_(a, 1.0, 3.0, slope)
    want = torch.cosh(x / 3.0).pow(-2)
    bound = 2 * torch.finfo(torch.float32).eps * (x.abs() / 3.0 + 2)
    assert ((slope.double() - want).abs() / want <= bound).all()
    assert (a.double() - 3.0 * torch.tanh(x / 3.0)).abs().max().item() < 1e-6


def test_kernel_factored_gradient():
    """stats(keep_exp) leaves E' = exp(z - max) - S onehot(y), so that a E' is the SFT gradient."""
    ops = _native_ops()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 29, generator=g, dtype=torch.float64) * 5
    y = torch.tensor([0, 28, 3, 3])
    p = torch.softmax(x, -1)
    st = ops.stats(x, y, None, 1.0, 0.0, 0, True)
    a = -torch.exp(st[3] - st[0])
    want = torch.nn.functional.one_hot(y, 29) - p  # d logp_y / dz
    assert torch.allclose(x * a[:, None], want, atol=1e-14)


def test_kernel_move_rows_and_checks():
    ops = _native_ops()
    x = torch.arange(6 * 7, dtype=torch.float32).reshape(6, 7)
    expected = x.clone()
    expected[[0, 2]] = x[[3, 5]]
    ops.move_rows(x, torch.tensor([0, 2]), torch.tensor([3, 5]))
    assert torch.equal(x, expected)
    with pytest.raises(RuntimeError, match="every dst row before every src row"):
        ops.move_rows(x, torch.tensor([1, 4]), torch.tensor([3, 5]))  # row 4 would be read after written
    with pytest.raises(RuntimeError, match="ascending"):
        ops.move_rows(x, torch.tensor([0, 1]), torch.tensor([5, 3]))
    with pytest.raises(RuntimeError, match="every dst row"):
        ops.move_rows(x, torch.tensor([0]), torch.tensor([6]))  # out of range
    with pytest.raises(RuntimeError, match="out of range"):
        ops.stats(torch.zeros(2, 7), torch.tensor([0, 7]), None, 1.0, 0.0, 0, False)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        ops.stats(torch.zeros(2, 7, dtype=torch.float16), torch.tensor([0, 1]), None, 1.0, 0.0, 0, False)
    with pytest.raises(RuntimeError, match="slope must match z"):
        ops.stats(torch.zeros(2, 7), torch.tensor([0, 1]), None, 1.0, 3.0, 0, False, torch.zeros(2, 6))
    st = ops.stats(torch.zeros(2, 7), torch.tensor([0, 1]), None, 1.0, 3.0, 0, False)
    with pytest.raises(RuntimeError, match="needs its slope"):
        ops.dlogits(torch.zeros(2, 7), torch.tensor([0, 1]), None, st, None, None, None, 1.0, 3.0, 0)


def test_kernel_results_do_not_depend_on_threads():
    ops = _native_ops()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 3001, generator=g)
    y = torch.randint(0, 3001, (64,), generator=g)
    before = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, max(2, before)):
            torch.set_num_threads(threads)
            a = x.clone()
            outs.append((ops.stats(a, y, None, 1.0, 3.0, 0, False), a))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


# ----------------------------------------------------------------------------------------------
# paths of the backend that the shared suite does not reach
# ----------------------------------------------------------------------------------------------


class _CountingOps:
    def __init__(self, ops):
        self.ops, self.calls = ops, []

    def __getattr__(self, name):
        self.calls.append(name)
        return getattr(self.ops, name)


@pytest.mark.parametrize("loss", ["psft", "sft"])
def test_clipped_rows_are_compacted(monkeypatch, loss):
    ops = _native_ops()
    spy = _CountingOps(ops)
    monkeypatch.setattr(_native_build, "load_ops", lambda: spy)
    problem = make_problem(batch=(4, 16), D=64, V=97, old_noise=2.0, advantages=1.0, ignore_frac=0.1, bias=True)
    kw = dict(eps_low=0.1, eps_high=0.1) if loss == "psft" else {}
    expected = run(loss, "reference", problem, **kw)
    actual = run(loss, "native", problem, chunk_size=13, **kw)
    assert_close(actual, expected, rtol=1e-10, atol=1e-12, what=loss)
    if loss == "psft":
        assert 0.3 < expected.stats["clip_fraction"] < 0.9
        assert "move_rows" in spy.calls, "most rows clip: the backend should drop them before the GEMMs"
    else:
        assert "move_rows" not in spy.calls


def test_half_inputs_with_a_large_vocabulary():
    """The factored gradient must not put S = sum(exp) (up to V) into fp16, where V > 65504 overflows."""
    _native_ops()
    g = torch.Generator().manual_seed(0)
    V, D = 70_000, 8
    h = torch.randn(2, 3, D, generator=g, dtype=torch.float64)
    w = torch.randn(V, D, generator=g, dtype=torch.float64) * 1e-3  # near-uniform p: S close to V
    y = torch.randint(0, V, (2, 3), generator=g)
    truth = run("sft", "reference", _Problem(h, w, y))
    for dtype in (torch.float16, torch.bfloat16):
        got = run("sft", "native", _Problem(h.to(dtype), w.to(dtype), y))
        for k, t in truth.grads.items():
            assert torch.isfinite(got.grads[k]).all(), (dtype, k)
            err = (got.grads[k].double() - t).abs().max().item()
            assert err <= 2e-2 * t.abs().max().item(), (dtype, k, err)


def _Problem(h, w, y):
    from helpers import Problem

    return Problem(h, w, y, old_logprobs=None)


def test_large_logits_stay_accurate():
    _native_ops()
    problem = make_problem(batch=(3, 7), D=16, V=211, logit_scale=60.0, dtype=torch.float64)
    truth = run("psft", "reference", problem, entropy_coef=0.05)
    plain = run("psft", "reference", problem.to(torch.float32), entropy_coef=0.05)
    native = run("psft", "native", problem.to(torch.float32), entropy_coef=0.05)
    assert_matches_truth(native, plain, truth, slack=1e-5, what="logit scale 60")


def test_blocks_are_balanced_and_bounded():
    b = NativeBackend()

    def sizes(N, V, D, chunk_size=None):
        inputs = HeadInputs(torch.empty(N, D), torch.empty(V, D), None, torch.zeros(N, dtype=torch.long))
        return [c.stop - c.start for c in b._row_chunks(inputs, HeadSpec(chunk_size=chunk_size), None)]

    assert sizes(2048, 32000, 1024) == [1024, 1024]
    assert sizes(2100, 32000, 1024) == [700, 700, 700]
    assert sizes(2048, 32000, 4096) == [256] * 8  # the D bound
    assert sizes(10, 50, 8, chunk_size=4) == [4, 4, 2]  # an explicit chunk_size is taken as given
    assert sizes(1, 50, 8) == [1]


def test_workspace_is_reused_released_and_never_shared(monkeypatch):
    """The logit blocks live between calls (no page faults per call), give the same results as fresh
    ones, are freed by pk.empty_cache(), and a call that finds them busy allocates its own."""
    from psft_kernels import native

    _native_ops()
    problem = make_problem(batch=(4, 16), D=32, V=97, bias=True)
    pk.empty_cache()
    first = run("psft", "native", problem, softcap=5.0)
    held = {k: v.data_ptr() for k, v in native._WORKSPACE._buffers.items()}
    assert {role for role, _ in held} == {"z", "slope"}
    second = run("psft", "native", problem, softcap=5.0)
    assert {k: v.data_ptr() for k, v in native._WORKSPACE._buffers.items()} == held, "reused, not reallocated"
    assert_close(second, first, rtol=0, atol=0, what="warm workspace")

    # busy (another thread's call): a private workspace, the shared one untouched
    before = {k: v.clone() for k, v in native._WORKSPACE._buffers.items()}
    with native._WORKSPACE._lock:
        busy = run("psft", "native", problem, softcap=5.0)
    assert all(torch.equal(native._WORKSPACE._buffers[k], v) for k, v in before.items())
    assert_close(busy, first, rtol=0, atol=0, what="busy workspace")

    monkeypatch.setenv("PSFT_KERNELS_NATIVE_WORKSPACE", "0")
    pk.empty_cache()
    assert_close(run("psft", "native", problem, softcap=5.0), first, rtol=0, atol=0, what="disabled")
    assert not native._WORKSPACE._buffers, "disabled: nothing kept"

    monkeypatch.delenv("PSFT_KERNELS_NATIVE_WORKSPACE")
    run("sft", "native", problem)
    small = native._WORKSPACE._buffers[("z", torch.float64)].numel()
    run("sft", "native", make_problem(batch=(4, 16), D=16, V=500))  # a larger vocabulary grows the block
    assert native._WORKSPACE._buffers[("z", torch.float64)].numel() > small
    pk.empty_cache()
    assert not native._WORKSPACE._buffers
