"""Token-weighted training metrics, accumulated on the device between two logging steps.

Each micro-batch adds token-means (``nll``, ``entropy``, ``clip_fraction``, ...) weighted by its
number of target tokens; :meth:`TokenWeightedMeans.pop` returns the token-weighted means since the
last pop. Everything stays a tensor until ``pop``, which reads all values back in one transfer,
so logging costs one host sync per logging step, not one per micro-batch.
"""

from __future__ import annotations

from typing import Callable, Dict, Mapping, Optional

import torch
from torch import Tensor

# loss stats key (psft_kernels' return_stats) -> logged metric name
STAT_NAMES = {
    "nll": "nll",
    "entropy_mean": "entropy",
    "clip_fraction": "clip_fraction",
    "clip_fraction_high": "clip_fraction_high",
    "clip_fraction_low": "clip_fraction_low",
    "ratio_mean": "ratio_mean",
    "approx_kl": "approx_kl",
    "kl": "kl",
    "aux_loss": "aux_loss",  # a MoE router's loss (one value per micro-batch, token-weighted here like the rest)
}


class TokenWeightedMeans:
    def __init__(self):
        self._sums: Dict[str, Tensor] = {}
        self._weights: Dict[str, Tensor] = {}
        self._tokens: Optional[Tensor] = None

    def add(self, stats: Mapping[str, Tensor]) -> None:
        """``stats``: a loss's ``return_stats`` dict (token-means over ``stats["num_tokens"]`` tokens)."""
        n = stats["num_tokens"].detach()
        # float64 keeps token counts exact past 2^24; MPS has no float64.
        dtype = torch.float32 if n.device.type == "mps" else torch.float64
        w = n.to(dtype)
        self._tokens = w if self._tokens is None else self._tokens + w
        for key, name in STAT_NAMES.items():
            value = stats.get(key)
            if value is None:
                continue
            s = value.detach().to(dtype) * w
            self._sums[name] = s if name not in self._sums else self._sums[name] + s
            self._weights[name] = w if name not in self._weights else self._weights[name] + w

    def __bool__(self) -> bool:
        return self._tokens is not None

    def pop(self, all_reduce: Optional[Callable[[Tensor], Tensor]] = None) -> Dict[str, float]:
        """Token-weighted means since the last pop, plus ``tokens`` (their total count); then reset.

        ``all_reduce`` sums a tensor over processes (distributed training), so that every process
        logs the means over all of them.
        """
        if self._tokens is None:
            return {}
        names = sorted(self._sums)
        packed = torch.stack([self._tokens] + [self._sums[k] for k in names] + [self._weights[k] for k in names])
        if all_reduce is not None:
            packed = all_reduce(packed)
        values = packed.tolist()
        tokens, sums, weights = values[0], values[1:1 + len(names)], values[1 + len(names):]
        out = {name: s / max(w, 1.0) for name, s, w in zip(names, sums, weights)}
        out["tokens"] = int(round(tokens))
        self.__init__()
        return out
