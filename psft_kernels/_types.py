"""Plain data passed between the public API, the autograd Function and the backends.

A backend sees a *flattened* problem: ``N`` rows (tokens), a ``(V, D)`` lm-head, and the static
options that shape the logits. Everything that depends on the loss (PSFT clipping, DFT weights,
the reduction) is applied by :mod:`psft_kernels.objectives` on per-token values, so a backend only
has to (1) stream logit tiles to per-token statistics and (2) turn per-token gradient
coefficients back into ``grad_hidden``, ``grad_weight`` and ``grad_bias``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor


@dataclass(frozen=True)
class HeadSpec:
    """Static options of the logit transform ``z = softcap(h W^T + b) / T``."""

    temperature: float = 1.0
    softcap: Optional[float] = None
    ignore_index: int = -100
    # None: no reference model. "forward": KL(q || p). "reverse": KL(p || q).
    kl_direction: Optional[str] = None
    # Rows per chunk for the chunked / native backends; None picks one from V.
    chunk_size: Optional[int] = None
    # Gradient filtering (Triton backend): skip gradient tiles whose probabilities are all below
    # this; None = exact. Other backends always compute exact gradients and ignore it.
    filter_eps: Optional[float] = None
    # Bitwise-reproducible gradients: no float atomics (the Triton backend's split-K is turned off).
    # The other backends are deterministic anyway.
    deterministic: bool = False


@dataclass
class HeadInputs:
    """The flattened tensors. ``ref_*`` are constants (no gradient flows into them)."""

    hidden: Tensor  # (N, D)
    weight: Tensor  # (V, D)
    bias: Optional[Tensor]  # (V,)
    targets: Tensor  # (N,) int64, ignore_index where masked
    ref_hidden: Optional[Tensor] = None  # (N, D_ref)
    ref_weight: Optional[Tensor] = None  # (V, D_ref)
    ref_bias: Optional[Tensor] = None  # (V,)

    @property
    def num_rows(self) -> int:
        return self.hidden.shape[0]

    @property
    def vocab_size(self) -> int:
        return self.weight.shape[0]

    @property
    def compute_dtype(self) -> torch.dtype:
        """fp32 for half inputs, fp64 for fp64 inputs: the dtype of every per-token value."""
        return torch.promote_types(self.hidden.dtype, torch.float32)

    @property
    def has_ref(self) -> bool:
        return self.ref_weight is not None


@dataclass
class TokenStats:
    """Per-row statistics of the processed rows, all ``(n,)`` in the compute dtype."""

    lse: Tensor  # logsumexp_v z_v
    logp: Tensor  # z_y - lse (0 where the target is ignored)
    entropy: Tensor  # lse - sum_v p_v z_v (0 where ignored)
    ref_lse: Optional[Tensor] = None  # logsumexp_v z'_v (ASFT only)
    kl: Optional[Tensor] = None  # KL in the configured direction (0 where ignored)


@dataclass
class Coefficients:
    """Per-row gradient coefficients: ``d loss / d logp``, ``d loss / d H``, ``d loss / d KL``.

    A ``None`` field means "zero for every row", so a backend can skip that term entirely.
    """

    logp: Optional[Tensor] = None  # (n,)
    entropy: Optional[Tensor] = None  # (n,)
    kl: Optional[Tensor] = None  # (n,)

    def any_nonzero(self) -> Tensor:
        """Boolean ``(n,)``: rows that need backward work."""
        active = None
        for c in (self.logp, self.entropy, self.kl):
            if c is not None:
                nz = c != 0
                active = nz if active is None else active | nz
        if active is None:
            raise ValueError("Coefficients has no field set")
        return active

    def take(self, rows: Tensor) -> "Coefficients":
        return Coefficients(*(None if c is None else c[rows] for c in (self.logp, self.entropy, self.kl)))


@dataclass
class GradNeeds:
    hidden: bool = False
    weight: bool = False
    bias: bool = False

    def any(self) -> bool:
        return self.hidden or self.weight or self.bias


@dataclass
class Grads:
    hidden: Optional[Tensor] = None  # (N, D), input dtype
    weight: Optional[Tensor] = None  # (V, D), input dtype (accumulated in fp32)
    bias: Optional[Tensor] = None  # (V,), input dtype (accumulated in fp32)


# An epilogue maps the statistics of a block of rows to their per-token loss and gradient
# coefficients (already scaled by the reduction's weight). Called as epilogue(rows, stats),
# where ``rows`` indexes the flattened problem. It lets a backend form gradients in the same
# pass as the forward when the reduction is a scalar (see autograd.py).
Epilogue = Callable[[Tensor, TokenStats], "tuple[Tensor, Coefficients]"]
