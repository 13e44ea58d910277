"""The Triton backend: fused lm-head losses on CUDA (and on the CPU under ``TRITON_INTERPRET=1``).

Importing this package fails with ImportError where Triton is missing; the backend registry
(:mod:`psft_kernels.backends`) turns that into a clear "unavailable" reason, so
``import psft_kernels`` never fails. Design notes: docs/triton.md.

Files: ``tiles.py`` (shared device functions), ``forward.py`` (streaming statistics kernel),
``epilogue.py`` (split merge + per-token objective), ``backward.py`` (dz and gradient GEMMs),
``rows.py`` (sync-free row compaction), ``config.py`` (launch configurations), ``ops.py``
(``torch.library`` registration), ``backend.py`` (the backend object).
"""

import triton  # noqa: F401  (ImportError here means "no Triton": the registry reports it)

from .backend import TritonBackend

__all__ = ["TritonBackend"]
