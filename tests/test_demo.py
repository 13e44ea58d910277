"""``python -m psft_kernels`` (the README's quickstart command 1) end to end, on a small head."""

from __future__ import annotations

import subprocess
import sys


def test_demo_runs_and_reports_agreement():
    cmd = [sys.executable, "-m", "psft_kernels", "--tokens", "64", "--dim", "16", "--vocab", "300",
           "--losses", "psft,asft", "--backends", "chunked"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = [line.split() for line in proc.stdout.splitlines() if line.split()[:1] in (["psft"], ["asft"])]
    assert [r[:2] for r in rows] == [["psft", "reference"], ["psft", "chunked"], ["asft", "reference"],
                                     ["asft", "chunked"]]
    for r in rows:
        seconds, peak = float(r[2]), float(r[3])
        assert seconds >= 0 and peak >= 0
    assert "all fused backends agree with the reference" in proc.stdout
