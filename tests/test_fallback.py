"""``backend="auto"`` never falls back silently: one BackendFallbackWarning per process naming
the cause and the fix, except where the user turned the faster backend off on purpose."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import torch

import psft_kernels as pk
from psft_kernels import backends

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = textwrap.dedent("""\
    import json, sys, warnings
    sys.path.insert(0, {root!r})
    import torch
    import psft_kernels as pk
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(6, 8, generator=g), torch.randn(11, 8, generator=g)
    y = torch.randint(0, 11, (6,), generator=g)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        auto = [pk.linear_sft_loss(h, w, y).item(), pk.linear_psft_loss(h, w, y).item()]
        chunked = [pk.linear_sft_loss(h, w, y, backend="chunked").item(),
                   pk.linear_psft_loss(h, w, y, backend="chunked").item()]
    print(json.dumps(dict(auto=auto, chunked=chunked, name=pk.auto_backend_name("cpu"),
                          warnings=[[w.category.__name__, str(w.message)] for w in caught
                                    if issubclass(w.category, pk.BackendFallbackWarning)])))
""").format(root=str(ROOT))


def _run(tmp_path, **env):
    base = {k: v for k, v in os.environ.items() if not k.startswith("PSFT_KERNELS_")}
    base.update(CXX="/bin/false", PSFT_KERNELS_CACHE_DIR=str(tmp_path / "cache"), **env)
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=base, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_no_working_compiler_warns_once_with_the_fix(tmp_path):
    out = _run(tmp_path)
    assert out["name"] == "chunked" and out["auto"] == out["chunked"]
    assert len(out["warnings"]) == 1, out["warnings"]
    category, message = out["warnings"][0]
    assert category == "BackendFallbackWarning"
    for part in ("native CPU kernel", "/bin/false", "chunked", "install a C++ compiler", "CXX",
                 "PSFT_KERNELS_NO_NATIVE=1"):
        assert part in message, (part, message)


def test_disabled_on_purpose_is_silent(tmp_path):
    out = _run(tmp_path, PSFT_KERNELS_NO_NATIVE="1")
    assert out["name"] == "chunked" and out["auto"] == out["chunked"] and out["warnings"] == []


def test_triton_unavailable_on_cuda_warns_once(monkeypatch):
    """No CUDA here: the decision itself is exercised with Triton reported unavailable."""
    monkeypatch.setattr(backends, "_WARNED", set())
    monkeypatch.setattr(backends, "unavailable_reason",
                        lambda name, device: "the Triton backend cannot be imported: No module named 'triton'")
    cuda = torch.device("cuda")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert backends.auto_backend_name(cuda) == "chunked"  # a query: silent
        assert caught == []
        assert backends.auto_backend_name(cuda, warn=True) == "chunked"
        assert backends.auto_backend_name(cuda, warn=True) == "chunked"
    assert len(caught) == 1 and issubclass(caught[0].category, pk.BackendFallbackWarning)
    message = str(caught[0].message)
    assert "No module named 'triton'" in message and "psft-kernels[triton]" in message
    assert "backend='chunked'" in message


def test_explicit_backend_and_other_devices_do_not_warn(monkeypatch):
    monkeypatch.setattr(backends, "_WARNED", set())
    with warnings.catch_warnings():
        warnings.simplefilter("error", pk.BackendFallbackWarning)
        assert backends.auto_backend_name(torch.device("mps"), warn=True) == "chunked"  # no faster backend there
        pk.linear_sft_loss(torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 2]), backend="chunked")
