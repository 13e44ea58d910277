"""bench/rss.py (resident memory as users see it) runs end to end and writes its rows."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_rss_bench_writes_paired_rows(tmp_path):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")  # the child must drop it
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, "-m", "bench.rss", "--N", "48", "--D", "8", "--V", "300", "--pairs", "2",
                           "--calls", "2", "--providers", "reference,chunked", "--results-dir", str(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ratio to reference: median" in proc.stdout
    (path,) = [p for p in tmp_path.iterdir() if p.name.startswith("rss-") and p.suffix == ".csv"]
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["round"], r["provider"]) for r in rows] == [("0", "reference"), ("0", "chunked"),
                                                           ("1", "chunked"), ("1", "reference")]
    for r in rows:
        assert float(r["peak_mem_mib"]) >= float(r["first_peak_mib"]) - 0.2  # the peak over both calls
        assert float(r["ms_last"]) > 0 and float(r["cpu_ms_last"]) > 0


def test_child_environment_is_the_default_allocator(monkeypatch):
    from bench import rss

    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=1")
    env = rss._default_env()
    assert not any(k.startswith("MALLOC_") for k in env) and "GLIBC_TUNABLES" not in env
