"""Which backend computes the fused head, and why another one cannot.

A backend object implements two methods (see :class:`psft_kernels.chunked.ChunkedBackend` for
the contract in full):

* ``forward(inputs, spec, objective=None, coef_scale=None, needs=GradNeeds())`` ->
  ``(TokenStats, Terms | None, Grads | None)``, per-token values over all ``N`` rows;
* ``backward(inputs, spec, stats, coefs, needs)`` -> ``Grads``;

plus ``unavailable_reason(device) -> str | None``. ``"reference"`` is not a backend object: the
public API hands it to :mod:`psft_kernels.reference` directly.
"""

from __future__ import annotations

import importlib
import os
import sys
import warnings
from typing import Callable, Dict, Optional

import torch


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run here; the message says why."""


class BackendFallbackWarning(UserWarning):
    """``backend="auto"`` (or a backend whose kernel failed to load) runs a slower backend than
    this machine should have; the message says why and how to fix or silence it."""


def _chunked():
    from .chunked import ChunkedBackend

    return ChunkedBackend()


def _optional(module: str, attr: str, what: str) -> Callable[[], object]:
    """A factory for a backend that lives in an optional module (it may be absent from a build)."""

    def factory():
        try:
            mod = importlib.import_module(module, __package__)
        except ImportError as exc:
            raise BackendUnavailableError(f"the {what} backend cannot be imported: {exc}") from exc
        return getattr(mod, attr)()

    return factory


_FACTORIES: Dict[str, Callable[[], object]] = {
    "chunked": _chunked,
    "triton": _optional(".triton", "TritonBackend", "Triton"),
    "native": _optional(".native", "NativeBackend", "native CPU"),
}
_INSTANCES: Dict[str, object] = {}


def _instance(name: str):
    if name not in _INSTANCES:
        _INSTANCES[name] = _FACTORIES[name]()
    return _INSTANCES[name]


def unavailable_reason(name: str, device: torch.device) -> Optional[str]:
    """None when backend ``name`` can run on ``device``, else a sentence saying why not."""
    if name == "reference":
        return None
    try:
        return _instance(name).unavailable_reason(torch.device(device))
    except BackendUnavailableError as exc:
        return str(exc)


def available_backends(device="cpu"):
    """The backend names that can run on ``device`` (``"auto"`` excluded)."""
    return [n for n in ("reference", "chunked", "triton", "native") if unavailable_reason(n, device) is None]


# What to do about each fallback "auto" can make: (how to get the faster backend, how to choose
# the chunked one on purpose and silence the warning).
_FIXES = {
    "triton": ("install Triton (pip install 'psft-kernels[triton]'; a CUDA build of torch normally "
               "brings it)", "pass backend='chunked'"),
    "native": ("install a C++ compiler (g++ or clang++) or point CXX at a working one",
               "set PSFT_KERNELS_NO_NATIVE=1 or pass backend='chunked'"),
}
_WARNED = set()


def _deliberately_disabled(name: str) -> bool:
    """The user turned the backend off by environment variable: no warning for that choice."""
    if name == "native":
        from . import _native_build

        return _native_build.disabled_by_env()
    return False


def mark_warned(name: str) -> None:
    """Record that the fallback from ``name`` was already announced (by its own loader)."""
    _WARNED.add(name)


def _caller_stacklevel() -> int:
    """The ``stacklevel`` that points a warning issued by our caller at the first frame outside
    this package and torch (the user's call), however deep the call came through them."""
    # torch's frames too: an nn.Module wrapper is called through torch.nn.Module.__call__
    skip = tuple(os.path.dirname(os.path.abspath(m.__file__)) + os.sep for m in (sys.modules[__package__], torch))
    frame, level = sys._getframe(1), 1  # level 1 is our caller, the frame that calls warnings.warn
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(skip):
        frame, level = frame.f_back, level + 1
    return level


def warn_fallback(name: str, device: torch.device, reason: str) -> None:
    """Warn once per process and backend that ``name`` cannot run on ``device`` and chunked
    PyTorch runs instead, naming the cause and the fix; silent when it was disabled on purpose."""
    if name in _WARNED or _deliberately_disabled(name):
        return
    _WARNED.add(name)
    fix, silence = _FIXES[name]
    what = "Triton kernels" if name == "triton" else "native CPU kernel"
    warnings.warn(
        f"psft_kernels: the {what} cannot run on {device.type} ({reason}), so the slower chunked PyTorch "
        f"backend computes the loss instead. To use the {what}: {fix}. To choose chunked and silence this "
        f"warning: {silence}.",
        BackendFallbackWarning, stacklevel=_caller_stacklevel())


def auto_backend_name(device: torch.device, *, warn: bool = False) -> str:
    """Triton on CUDA when importable, else the native CPU kernel when built, else chunked.

    With ``warn``, a fallback from Triton (CUDA) or native (CPU) to chunked warns once
    (:class:`BackendFallbackWarning`) unless that backend was disabled by environment variable.
    """
    device = torch.device(device)
    preferred = {"cuda": "triton", "cpu": "native"}.get(device.type)
    if preferred is None:  # no faster backend exists there: chunked is the choice, not a fallback
        return "chunked"
    reason = unavailable_reason(preferred, device)
    if reason is None:
        return preferred
    if warn:
        warn_fallback(preferred, device, reason)
    return "chunked"


def resolve(name: str, device: torch.device):
    """The backend object for ``name`` on ``device``; raises BackendUnavailableError if it can't run."""
    if name == "auto":
        name = auto_backend_name(device, warn=True)
    reason = unavailable_reason(name, device)
    if reason is not None:
        raise BackendUnavailableError(f'backend="{name}" cannot run on {device}: {reason}')
    return _instance(name)
