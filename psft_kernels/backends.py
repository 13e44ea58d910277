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
from typing import Callable, Dict, Optional

import torch


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run here; the message says why."""


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


def auto_backend_name(device: torch.device) -> str:
    """Triton on CUDA when importable, else the native CPU kernel when built, else chunked."""
    device = torch.device(device)
    if device.type == "cuda" and unavailable_reason("triton", device) is None:
        return "triton"
    if device.type == "cpu" and unavailable_reason("native", device) is None:
        return "native"
    return "chunked"


def resolve(name: str, device: torch.device):
    """The backend object for ``name`` on ``device``; raises BackendUnavailableError if it can't run."""
    if name == "auto":
        name = auto_backend_name(device)
    reason = unavailable_reason(name, device)
    if reason is not None:
        raise BackendUnavailableError(f'backend="{name}" cannot run on {device}: {reason}')
    return _instance(name)
