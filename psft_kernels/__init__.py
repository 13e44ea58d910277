"""Fused lm-head losses for LLM post-training: PSFT, DFT, ASFT and SFT without the N x V logits.

    import psft_kernels as pk
    loss = pk.linear_psft_loss(hidden, lm_head.weight, targets, old_logprobs)

See README.md and docs/method.md.
"""

from .api import linear_asft_loss, linear_dft_loss, linear_logprobs, linear_psft_loss, linear_sft_loss
from .backends import BackendFallbackWarning, BackendUnavailableError, auto_backend_name, available_backends
from .modules import LinearASFTLoss, LinearDFTLoss, LinearPSFTLoss, LinearSFTLoss
from .vocab_parallel import VocabParallel

__version__ = "0.1.0"


def empty_cache() -> None:
    """Free the memory the backends keep between calls: the logit blocks of the chunked and native
    backends on the CPU (up to 128 MiB each; see ``psft_kernels._workspace``). The next call
    allocates them again."""
    from ._workspace import release_workspace

    release_workspace()


__all__ = [
    "linear_logprobs",
    "linear_sft_loss",
    "linear_dft_loss",
    "linear_psft_loss",
    "linear_asft_loss",
    "LinearSFTLoss",
    "LinearDFTLoss",
    "LinearPSFTLoss",
    "LinearASFTLoss",
    "VocabParallel",
    "BackendUnavailableError",
    "BackendFallbackWarning",
    "available_backends",
    "auto_backend_name",
    "empty_cache",
]
