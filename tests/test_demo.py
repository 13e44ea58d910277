"""``python -m psft_kernels`` (the README's quickstart command 1) end to end, on a small head."""

from __future__ import annotations

import os
import re
import subprocess
import sys

SMALL = ["--tokens", "64", "--dim", "16", "--vocab", "300"]


def _demo(*args, env=None):
    cmd = [sys.executable, "-m", "psft_kernels", *SMALL, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_demo_runs_and_reports_agreement():
    out = _demo("--losses", "psft,asft", "--backends", "chunked")
    rows = [line.split() for line in out.splitlines() if line.split()[:1] in (["psft"], ["asft"])]
    assert [r[:2] for r in rows] == [["psft", "reference"], ["psft", "chunked"], ["asft", "reference"],
                                     ["asft", "chunked"]]
    for r in rows:
        milliseconds, peak = float(r[2]), float(r[3])
        assert milliseconds > 0 and peak >= 0
    assert "all fused backends agree with the reference" in out
    # It says what it does, shows progress per backend, and ends with a one-line summary.
    assert "[1/2] eager PyTorch (reference):" in out and "[2/2] chunked:" in out
    summary = out.strip().splitlines()[-1]
    assert re.match(r"summary: chunked is \d+\.\dx (faster|slower) than eager PyTorch with \d+\.\dx less extra "
                    r"memory \(geometric mean over 2 losses; results agree; \d+ s in all\)$", summary), summary
    # The inputs' entropy is what the docstring promises (about 3 nats).
    entropy = float(re.search(r"mean token entropy (\d+\.\d+) nats", out).group(1))
    assert 2.5 <= entropy <= 3.5


def test_demo_says_it_compiles_the_native_kernel(tmp_path):
    """First run: the compile is announced (here a compiler that answers --version but fails, so
    that the test is quick; the native process then falls back to chunked and the demo finishes)."""
    cxx = tmp_path / "cxx"
    cxx.write_text('#!/bin/sh\nif [ "$1" = "--version" ]; then echo "fake 1.0"; exit 0; fi\nexit 1\n')
    cxx.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PSFT_KERNELS_")}
    env.update(CXX=str(cxx), PSFT_KERNELS_CACHE_DIR=str(tmp_path / "cache"))
    out = _demo("--losses", "sft", "--backends", "native", env=env)
    assert "compiling the native kernel (first run only, ~20 s)... failed" in out
    assert "running the chunked backend in its place" in out and "[2/2] chunked:" in out
    assert "all fused backends agree with the reference" in out
