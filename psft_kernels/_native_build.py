"""Compile, cache and load the native CPU kernel (``csrc/psft_native.cpp``), on first use.

Why at first use rather than at ``pip install``: pip builds in an isolated environment without
torch, and the library must match the torch it is loaded into (headers, C++ ABI). So the first
forward of ``backend="native"`` (or ``"auto"`` on the CPU) compiles the one source file with the
system compiler (10-30 s), into a cache directory keyed by everything the binary depends on
(source, torch version, compiler, flags, instruction set). Later processes load the cached
library at once. Concurrent processes (pytest workers) serialize on a file lock, so one builds
and the others wait for it. A failed build warns once, leaves its log and a marker in the cache
(later processes then skip the kernel without retrying), and the backend falls back to the
chunked PyTorch code.

:func:`unavailable_reason` never compiles: it only says whether loading could work.

Environment:
  PSFT_KERNELS_NO_NATIVE=1       never build or load the kernel
  PSFT_KERNELS_REBUILD_NATIVE=1  rebuild even if cached (also retries after a failed build)
  PSFT_KERNELS_CACHE_DIR         cache root (default: $XDG_CACHE_HOME/psft_kernels or ~/.cache/psft_kernels)
  PSFT_KERNELS_NATIVE_ISA        generic | avx2 | avx512: x86 vector flags instead of torch's choice (tests)
  CXX                            the C++ compiler (default: c++, g++ or clang++ on PATH)
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import torch

from .backends import BackendFallbackWarning, mark_warned

ENV_DISABLE = "PSFT_KERNELS_NO_NATIVE"
ENV_REBUILD = "PSFT_KERNELS_REBUILD_NATIVE"
ENV_CACHE = "PSFT_KERNELS_CACHE_DIR"
ENV_ISA = "PSFT_KERNELS_NATIVE_ISA"

def _find_source() -> Path:
    """The C++ source: inside the package for a wheel install, at the repository's csrc/ otherwise."""
    name = "psft_native.cpp"
    candidates = (Path(__file__).with_name("csrc") / name, Path(__file__).resolve().parent.parent / "csrc" / name)
    return next((c for c in candidates if c.is_file()), candidates[0])


SOURCE = _find_source()
LIBRARY_NAME = "psft_native.so"
FAILED_MARKER = "build-failed.log"
BUILD_TIMEOUT_S = 900

log = logging.getLogger("psft_kernels")
_STARTED = time.time()  # a forced rebuild is skipped if another process rebuilt after this


class NativeBuildWarning(BackendFallbackWarning):
    """The native CPU kernel could not be built or loaded; the chunked backend is used instead."""


@dataclass(frozen=True)
class BuildConfig:
    compiler: str
    command: List[str]  # without the output path
    directory: Path  # cache directory of this configuration


@dataclass
class _State:
    ops: object = None  # torch.ops.psft_native once loaded
    error: Optional[str] = None  # why loading failed in this process
    config: Optional[BuildConfig] = None
    config_error: Optional[str] = None
    configured: bool = False


_state = _State()
_lock = threading.Lock()


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


def disabled_by_env() -> bool:
    """``PSFT_KERNELS_NO_NATIVE`` is set: the user chose not to use the kernel."""
    return _flag(ENV_DISABLE)


def cache_root() -> Path:
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "psft_kernels"


def _find_compiler() -> Optional[str]:
    cxx = os.environ.get("CXX")
    if cxx:
        return shutil.which(cxx) or (cxx if os.path.isfile(cxx) else None)
    for name in ("c++", "g++", "clang++"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _compiler_version(compiler: str) -> Optional[str]:
    try:
        out = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip().splitlines()[0] if out.stdout.strip() else "unknown"


_ISA_FLAGS = {
    "generic": [],
    "avx2": ["-mavx2", "-mfma"],
    # the extensions ATen requires for its own AVX-512 kernels
    "avx512": ["-mavx2", "-mfma", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"],
}


def _isa_flags() -> List[str]:
    """Vector flags for the CPU we run on, as torch dispatches its own kernels here. The cache
    key includes them, so a library built here is never loaded on a CPU without these
    instructions (no -march=native). ``PSFT_KERNELS_NATIVE_ISA`` overrides, for tests."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return []  # aarch64: NEON is baseline
    forced = os.environ.get(ENV_ISA, "").strip().lower()
    if forced:
        if forced not in _ISA_FLAGS:
            raise RuntimeError(f"{ENV_ISA} must be one of {', '.join(_ISA_FLAGS)}; got {forced!r}")
        return _ISA_FLAGS[forced]
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except Exception:  # pragma: no cover - very old torch
        capability = "DEFAULT"
    return _ISA_FLAGS.get(capability.lower(), [])


def _cxx_standard() -> str:
    major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    return "-std=c++20" if (major, minor) >= (2, 12) else "-std=c++17"


def _make_config() -> BuildConfig:
    """The build command and cache directory; raises RuntimeError with the reason it can't be built."""
    if sys.platform not in ("linux", "darwin"):
        raise RuntimeError(f"the native kernel is built on Linux and macOS only, not {sys.platform}")
    if not SOURCE.is_file():
        raise RuntimeError(f"its source {SOURCE} is missing from this installation")
    compiler = _find_compiler()
    if compiler is None:
        raise RuntimeError("no C++ compiler found (install g++ or clang++, or set CXX)")
    version = _compiler_version(compiler)
    if version is None:
        raise RuntimeError(f"the C++ compiler {compiler} does not run")
    torch_dir = Path(torch.__file__).parent
    include, lib = torch_dir / "include", torch_dir / "lib"
    cmd = [compiler, "-O3", _cxx_standard(), "-shared", "-fPIC", "-fno-math-errno", "-fno-trapping-math",
           "-Wno-psabi", *_isa_flags(), f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
           "-isystem", str(include)]
    if sys.platform == "linux":
        # at::parallel_for is inline OpenMP code; torch's own libgomp is already loaded and is
        # reused by soname, so there is one OpenMP runtime in the process.
        cmd += ["-fopenmp"]
    cmd += [str(SOURCE), f"-L{lib}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{lib}"]
    if sys.platform == "darwin":
        cmd += ["-undefined", "dynamic_lookup"]
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), torch.__version__, str(torch.version.git_version), version,
                 platform.machine(), " ".join(cmd)):
        key.update(part if isinstance(part, bytes) else part.encode())
        key.update(b"\0")
    return BuildConfig(compiler, cmd, cache_root() / "native" / key.hexdigest()[:24])


def _config() -> BuildConfig:
    if not _state.configured:
        try:
            _state.config = _make_config()
        except RuntimeError as exc:
            _state.config_error = str(exc)
        _state.configured = True
    if _state.config is None:
        raise RuntimeError(_state.config_error)
    return _state.config


def unavailable_reason() -> Optional[str]:
    """None when the kernel is loaded or can be built / loaded here, else why not. Never compiles."""
    if _flag(ENV_DISABLE):
        return f"disabled by {ENV_DISABLE}"
    if _state.ops is not None:
        return None
    if _state.error is not None:
        return _state.error
    try:
        cfg = _config()
    except RuntimeError as exc:
        return str(exc)
    failed = cfg.directory / FAILED_MARKER
    if failed.is_file() and not (cfg.directory / LIBRARY_NAME).is_file() and not _flag(ENV_REBUILD):
        return f"an earlier build failed (log: {failed}); set {ENV_REBUILD}=1 to retry"
    return None


def is_built() -> bool:
    """The kernel is loaded or its library is in the cache (loading it will not compile)."""
    if _state.ops is not None:
        return True
    try:
        return (_config().directory / LIBRARY_NAME).is_file()
    except RuntimeError:
        return False


class _FileLock:
    """An exclusive lock held by this process (released by the OS if the process dies)."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        import fcntl

        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        import fcntl

        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def build(force: bool = False) -> Path:
    """Compile the kernel unless a cached build exists; returns the library path.

    Raises RuntimeError (with the compiler's first error lines) when the build fails.
    """
    cfg = _config()
    target = cfg.directory / LIBRARY_NAME
    if target.is_file() and not force:
        return target
    cfg.directory.mkdir(parents=True, exist_ok=True)
    with _FileLock(cfg.directory / "lock"):
        if target.is_file() and (not force or target.stat().st_mtime >= _STARTED):
            return target  # another process built it while we waited
        log.warning("psft_kernels: compiling the native CPU kernel (once, 10-30 s) into %s", cfg.directory)
        tmp = cfg.directory / f"{LIBRARY_NAME}.{os.getpid()}.tmp"
        cmd = cfg.command + ["-o", str(tmp)]
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
            ok, output = proc.returncode == 0, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as exc:
            ok, output = False, f"timed out after {BUILD_TIMEOUT_S} s\n{exc.stdout or ''}{exc.stderr or ''}"
        except OSError as exc:
            ok, output = False, f"could not run the compiler: {exc}"
        seconds = time.perf_counter() - start
        record = f"$ {' '.join(cmd)}\n{output}\n[{seconds:.1f} s, {'ok' if ok else 'FAILED'}]\n"
        if not ok:
            tmp.unlink(missing_ok=True)
            (cfg.directory / FAILED_MARKER).write_text(record)
            errors = [line for line in output.splitlines() if "error" in line.lower()] or output.splitlines()
            raise RuntimeError(f"the compiler failed ({cfg.compiler}): {' | '.join(errors[:3])[:600]} "
                               f"(full log: {cfg.directory / FAILED_MARKER})")
        os.replace(tmp, target)  # atomic: readers never see a half-written library
        (cfg.directory / "build.log").write_text(record)
        (cfg.directory / FAILED_MARKER).unlink(missing_ok=True)
        log.info("psft_kernels: native CPU kernel built in %.1f s", seconds)
    return target


def load_ops():
    """``torch.ops.psft_native``, building it first if needed; None (after one warning) if that fails."""
    if _state.ops is not None:
        return _state.ops
    with _lock:
        if _state.ops is not None or _state.error is not None:
            return _state.ops
        reason = unavailable_reason()
        if reason is None:
            try:
                path = build(force=_flag(ENV_REBUILD))
                torch.ops.load_library(str(path))
                _state.ops = torch.ops.psft_native
                return _state.ops
            except Exception as exc:  # a broken toolchain must never crash the caller
                reason = str(exc)
        _state.error = reason
        mark_warned("native")  # one warning per process for this fallback, from here or from "auto"
        warnings.warn(f"psft_kernels: the native CPU kernel is unavailable ({reason}); the slower chunked PyTorch "
                      f"backend computes the loss instead. To use the kernel: install a C++ compiler (g++ or "
                      f"clang++) or point CXX at a working one. To choose chunked and silence this warning: set "
                      f"{ENV_DISABLE}=1 or pass backend='chunked'.", NativeBuildWarning, stacklevel=3)
        return None




def main() -> int:
    """``python -m psft_kernels._native_build``: build (or find) the kernel now, say where, and load it."""
    reason = unavailable_reason()
    if reason is not None:
        print(f"native CPU kernel unavailable: {reason}", file=sys.stderr)
        return 1
    start = time.perf_counter()
    try:
        path = build(force=_flag(ENV_REBUILD))
    except RuntimeError as exc:
        print(f"native CPU kernel: build failed: {exc}", file=sys.stderr)
        return 1
    torch.ops.load_library(str(path))
    print(f"native CPU kernel: {path} ({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
