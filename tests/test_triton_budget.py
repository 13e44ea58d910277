"""Static resource budget of the Triton kernels, from Triton's real compiler, without a GPU.

Every kernel variant the backend launches (recorded by calling the public functions with the
kernels swapped for recorders, tests/triton_aot.py) is compiled for sm_90, sm_80 and sm_89 with the
launch configuration a GPU of that kind gets (config.py), at sizes that divide by 16 like a real
model's. Each must: fit the architecture's per-block shared memory; be launchable; software-pipeline
its main loop (cp.async or TMA, >= 2 stages), filtered loops included; use wgmma on sm_90 and mma on
sm_8x for half / TF32 operands; and, for the default bf16 configurations on sm_90, spill no register
(cuobjdump --dump-resource-usage on the cubin), and spill at most 512 B in the other dtypes there. A configuration that breaks the budget fails here,
not on a user's first GPU run.

The compilation runs in a subprocess (the suite sets TRITON_INTERPRET=1, and the kernels must be
real JIT functions), once per group, each variant compiled once per process. Fast group (bf16, every
sm_90 variant and the heaviest variant of each kernel and loop kind on sm_80 / sm_89): ~1-2 min on
2 cores with a cold Triton cache. Slow group: fp16, fp32 (IEEE FMA) and fp32 with TF32 on the three
targets. Under Triton 3.6 (the GPU machine's): `bash tests/triton36_budget.sh` (a second Triton in a
--target directory; see the script).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCHS = (90, 80, 89)


def _has_nvidia_compiler():
    try:
        import triton.backends.nvidia.compiler  # noqa: F401
    except ImportError:
        return False
    return True


pytestmark = pytest.mark.skipif(not _has_nvidia_compiler(), reason="this Triton build has no NVIDIA backend")


def budget(dtypes, every="90:bf16"):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, os.path.join(ROOT, "tests", "triton_aot.py"), "--budget", ",".join(map(str, ARCHS)),
           "--dtypes", ",".join(dtypes), "--every-variant", every]
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=1500)
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert rows, f"no variant measured:\n{out.stderr[-3000:]}"
    return rows, out


def check(rows, dtypes):
    failures = [f"sm_{r['arch']} {r['dtype']} {r['kernel']} {sorted(r['flags'])}: {'; '.join(r['failures'])}"
                for r in rows if r["failures"]]
    assert not failures, "\n".join(failures)
    # The matrix is complete: every kernel on every target in every dtype.
    kernels = {"_head_stats_kernel", "_head_epilogue_kernel", "_head_dz_kernel", "_grad_hidden_kernel",
               "_grad_weight_kernel"}
    for arch in ARCHS:
        for dt in dtypes:
            seen = {r["kernel"] for r in rows if r["arch"] == arch and r["dtype"] == dt}
            assert seen == kernels, (arch, dt, kernels - seen)
    # Filtered and exact main loops of both gradient GEMMs, and both dz modes, were compiled.
    for kernel in ("_grad_hidden_kernel", "_grad_weight_kernel"):
        assert {bool(r["flags"].get("FILTER")) for r in rows if r["kernel"] == kernel} == {True, False}
    assert {bool(r["flags"].get("DENSE")) for r in rows if r["kernel"] == "_head_dz_kernel"} == {True, False}


@pytest.fixture(scope="module")
def bf16_rows():
    return budget(["bf16"])[0]


def test_bf16_budget_on_sm90_sm80_sm89(bf16_rows):
    check(bf16_rows, ["bf16"])
    sm90 = [r for r in bf16_rows if r["arch"] == 90]
    # Every bf16 variant on sm_90, not a sample: the flags of the dz kernel alone give a dozen.
    assert len({(r["kernel"], tuple(sorted(r["flags"].items()))) for r in sm90}) >= 25
    assert all(r["stack"] == 0 for r in sm90)


def test_declared_forward_occupancy_is_what_the_compiler_gives(bf16_rows):
    """config.Tiles.fwd_occ sizes the vocabulary splits (whole waves); it must not promise more
    programs per SM than the compiled forward kernel allows."""
    from psft_kernels.triton import config, resources

    for r in bf16_rows:
        if r["kernel"] == "_head_stats_kernel":
            t = config._TILES[(resources.ARCH_TILES[r["arch"]], "half")]
            assert r["programs_per_sm"] >= t.fwd_occ, r


def test_a_config_over_budget_fails(tmp_path):
    """The check has teeth: the pre-issue-16 configuration (one 128x128x128, 3-stage backward for
    every dtype) puts fp32 grad_hidden over sm_90's shared memory, and the budget says so."""
    from psft_kernels.triton import resources

    row = dict(arch=90, kernel="_grad_hidden_kernel", dtype="fp32", shared=262_144, regs=32, stack=15_688,
               programs_per_sm=resources.occupancy(90, 8, 32, 262_144), cp_async=True, tma=False,
               num_stages=3, wgmma=False, mma=False)
    import triton_aot

    bad = triton_aot.budget_failures(row)
    assert any("shared memory" in b for b in bad) and any("cannot launch" in b for b in bad), bad


@pytest.mark.slow
def test_fp16_fp32_tf32_budget_on_sm90_sm80_sm89():
    dtypes = ["fp16", "fp32", "tf32"]
    rows, _ = budget(dtypes, every="")
    check(rows, dtypes)
    # TF32 runs on tensor cores; IEEE fp32 does not (FMA), by design (torch's "highest").
    assert all(r["wgmma"] for r in rows if r["arch"] == 90 and r["dtype"] == "tf32"
               and r["kernel"] not in ("_head_epilogue_kernel",))


@pytest.mark.parametrize("n", [4096, 8192, 16384, 32768])
def test_grids_fill_whole_waves_on_an_h100(n, monkeypatch):
    """At D=4096, V=131072 on 132 SMs (the compiled occupancy: one forward / dz / GEMM program
    per SM in bf16, see the budget), the forward's vocabulary splits and the backward's slice
    width give >= 95% wave efficiency in every launch family, and the slice count (hence the
    fp32 grad_h carry traffic per row) does not grow with N."""
    import torch
    import triton
    from psft_kernels.triton import backward, config, forward

    monkeypatch.setattr(config, "arch", lambda device: "hopper")
    monkeypatch.setattr(config, "sm_count", lambda device: 132)
    dev, d, v, slots = torch.device("cuda"), 4096, 131072, 132
    t = config.tiles(dev, torch.bfloat16)
    splits = forward.num_splits(n, v, dev, t)
    rows, vt = triton.cdiv(n, t.fwd_m), triton.cdiv(v, t.fwd_v)
    assert config.wave_efficiency(rows * splits, slots * t.fwd_occ, rows * vt, triton.cdiv(vt, splits)) >= 0.95

    width = backward.slice_width(n, v, t, dev)
    per = width // t.bwd_v
    total = triton.cdiv(v, t.bwd_v)
    launches = [per] * (total // per) + ([total % per] if total % per else [])
    rb, nd = triton.cdiv(n, t.bwd_m), triton.cdiv(d, t.bwd_d)
    fill = lambda work, progs: sum(work) / sum(triton.cdiv(p, slots) * slots * w // p for w, p in progs)  # noqa: E731
    assert fill([rb * x for x in launches], [(rb * x, rb * x) for x in launches]) >= 0.95  # dz
    assert fill([rb * nd * x for x in launches], [(rb * nd * x, rb * nd) for x in launches]) >= 0.95  # grad_h
    assert fill([x * nd for x in launches], [(x * nd, x * nd) for x in launches]) >= 0.95  # grad_W
    assert len(launches) <= 12 and width >= config.DZ_SLICE_COLUMNS // 2
