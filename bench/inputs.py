"""Seeded benchmark inputs: hidden states and an lm-head whose logits look like a trained LM's.

The providers take ``hidden (N, D)`` and ``weight (V, D)``, not logits, so the logit structure has
to be built into those two tensors. Two kinds:

``zipf`` (realistic). Every row's logits are a shared Zipf-like prior over the vocabulary plus a
contextual Gaussian term, all scaled by one factor ``a`` tuned to a target mean entropy::

    z_iv = a * (-log(rank_v) + c * g_iv),    rank_v = v + 1 (frequent ids first), g_iv ~ N(0, 1)

It is realized without a bias: coordinate 0 of every hidden state is the constant 1 and column 0
of the weight carries the prior ``-a log(rank_v)``; the other ``D - 1`` coordinates are Gaussian,
scaled so that their dot product is ``a c g_iv``. A trained LM puts most of its mass on a head
of frequent ids shared by all positions plus a few context-specific ones; i.i.d. Gaussian logits
at the same entropy scatter their mass over the whole vocabulary instead, which hides any gain
from skipping negligible tiles (docs/GPU.md, "Realistic inputs").

``flat`` (worst case). i.i.d. Gaussian logits of standard deviation 1: the softmax is nearly
uniform (entropy close to ``log V``), so no tile is negligible and nothing can be skipped.

Targets are sampled from each row's own softmax, as a model's training data would look to it
(so the mean NLL is close to the mean entropy). PSFT's old log-probs are the current ones plus
Gaussian noise, so some tokens clip; log-ratios within ``margin`` of the clip threshold are
pushed out of that band, so that rounding differences between providers (a bf16 logit's last
bit moves a log-prob by up to ~0.06) cannot flip a token between clipped and not clipped, which
would make correct providers look like they disagree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, Optional

import torch
from torch import Tensor

EPS_LOW, EPS_HIGH = 0.2, 0.28  # PSFT's clip range (verl's clip-higher recipe), used by every provider
IGNORE_INDEX = -100
FILTER_EPS = 2.0 ** -12  # CCE's gradient-filtering threshold for bf16
TILE_ROWS, TILE_COLS = 64, 128  # the tile used to report the share of negligible tiles
KINDS = ("zipf", "flat")


@dataclass
class Problem:
    """One benchmark input: everything any provider needs, plus what was measured about it."""

    hidden: Tensor  # (N, D), the benchmark dtype
    weight: Tensor  # (V, D)
    targets: Tensor  # (N,) int64, IGNORE_INDEX where masked
    old_logprobs: Tensor  # (N,) fp32, log pi_old(target)
    ref_hidden: Tensor  # (N, D): ASFT's frozen reference model (it shares the lm-head)
    softcap: Optional[float] = None
    info: Dict[str, float] = field(default_factory=dict)  # kind, entropy, clip_fraction, ...

    @property
    def shape(self):
        return self.hidden.shape[0], self.hidden.shape[1], self.weight.shape[0]

    def state(self) -> dict:
        return {k: getattr(self, k) for k in ("hidden", "weight", "targets", "old_logprobs", "ref_hidden",
                                              "softcap", "info")}


def off_clip_edges(log_ratio: Tensor, margin: float, edges=(math.log1p(EPS_HIGH),)) -> Tensor:
    """``log pi - log pi_old`` with every value within ``margin`` of an edge moved out to
    ``edge +- margin`` (its side kept). PSFT's gradient jumps where the ratio crosses an edge, so
    a token within rounding of one may clip under one provider or precision and not another: an
    O(1) difference in its gradient that says nothing about accuracy. With advantage 1 only the
    upper edge, ``log(1 + eps_high)``, clips."""
    for edge in edges:
        near = (log_ratio - edge).abs() < margin
        log_ratio = torch.where(near, torch.where(log_ratio < edge, edge - margin, edge + margin), log_ratio)
    return log_ratio


def _softcap(z: Tensor, softcap: Optional[float]) -> Tensor:
    return z if softcap is None else softcap * torch.tanh(z / softcap)


def _log_rank(V: int, device) -> Tensor:
    return torch.log(torch.arange(1, V + 1, device=device, dtype=torch.float32))


def _mean_entropy(z: Tensor) -> float:
    lp = torch.log_softmax(z, dim=-1)
    return float(-(lp.exp() * lp).sum(-1).mean())


def tune_scale(V: int, context: float, entropy: float, softcap: Optional[float], device, generator,
               probe_rows: int = 256, iters: int = 30) -> float:
    """The factor ``a`` for which ``softmax(a (-log rank + c g))`` has mean entropy ``entropy``.

    The entropy falls as ``a`` grows (``a`` is an inverse temperature), so bisection on a probe of
    ``probe_rows`` rows finds it; the entropy of the real inputs is measured afterwards.
    """
    base = -_log_rank(V, device) + context * torch.randn(probe_rows, V, device=device, generator=generator)
    lo, hi = 0.0, 64.0
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if _mean_entropy(_softcap(mid * base, softcap)) > entropy:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def make_weight(kind: str, V: int, D: int, dtype: torch.dtype, device, *, seed: int = 0, entropy: float = 2.0,
                context: float = 2.0, softcap: Optional[float] = None) -> "tuple[Tensor, dict]":
    """The lm-head ``(V, D)`` for ``kind`` and a dict describing it (shared by every token count)."""
    if kind not in KINDS:
        raise ValueError(f"inputs kind must be one of {KINDS}, got {kind!r}")
    if D < 2:
        raise ValueError(f"D must be >= 2 (coordinate 0 carries the prior), got {D}")
    gen = torch.Generator(device=device).manual_seed(seed)
    if kind == "flat":
        w = torch.randn(V, D, device=device, generator=gen) / math.sqrt(D)
        return w.to(dtype), {"kind": kind, "scale": 0.0, "sigma": 1.0}
    a = tune_scale(V, context, entropy, softcap, device, gen)
    w = torch.empty(V, D, device=device)
    w[:, 0] = -a * _log_rank(V, device)
    w[:, 1:] = torch.randn(V, D - 1, device=device, generator=gen) * (a * context / math.sqrt(D - 1))
    return w.to(dtype), {"kind": kind, "scale": a, "sigma": a * context}


def _hidden(kind: str, N: int, D: int, device, gen) -> Tensor:
    h = torch.randn(N, D, device=device, generator=gen)
    if kind == "zipf":
        h[:, 0] = 1.0  # the constant coordinate that reads the prior out of the weight's column 0
    return h


def _filterable_tiles(p: Tensor) -> "tuple[int, int]":
    """(negligible tiles, tiles) of a (rows <= TILE_ROWS * k, V) block of probabilities."""
    rows, V = p.shape
    pad_r, pad_c = -rows % TILE_ROWS, -V % TILE_COLS
    p = torch.nn.functional.pad(p, (0, pad_c, 0, pad_r))
    tmax = p.view(-1, TILE_ROWS, p.shape[1]).amax(1).view(-1, p.shape[1] // TILE_COLS, TILE_COLS).amax(-1)
    return int((tmax < FILTER_EPS).sum()), tmax.numel()


@torch.no_grad()
def make_problem(weight: Tensor, weight_info: dict, N: int, *, seed: int = 0, softcap: Optional[float] = None,
                 old_noise: float = 0.2, ignore_frac: float = 0.0, ref_noise: float = 0.2) -> Problem:
    """Hidden states, sampled targets, old log-probs and reference hidden states for ``N`` tokens."""
    V, D = weight.shape
    device, dtype, kind = weight.device, weight.dtype, weight_info["kind"]
    gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + N)
    hidden = _hidden(kind, N, D, device, gen).to(dtype)

    targets = torch.empty(N, dtype=torch.long, device=device)
    logp = torch.empty(N, device=device)
    entropy = torch.empty(N, device=device)
    valid = torch.rand(N, device=device, generator=gen) >= ignore_frac
    negligible = tiles = 0
    rows = max(TILE_ROWS, (1 << 24) // V // TILE_ROWS * TILE_ROWS)
    for i in range(0, N, rows):
        j = min(N, i + rows)
        # The GEMM runs in the benchmark dtype, as every provider's does; the rest in fp32.
        z = _softcap((hidden[i:j] @ weight.T).float(), softcap)
        log_p = torch.log_softmax(z, dim=-1)
        del z
        p = log_p.exp()
        entropy[i:j] = -(p * log_p).sum(-1)
        gumbel = -torch.log(-torch.log(torch.rand(log_p.shape, device=device, generator=gen).clamp_(1e-20, 1.0)))
        y = (log_p + gumbel).argmax(-1)
        del gumbel
        targets[i:j] = y
        logp[i:j] = log_p.gather(1, y[:, None]).squeeze(1)
        p[~valid[i:j]] = 0.0
        a, b = _filterable_tiles(p)
        negligible, tiles = negligible + a, tiles + b
        del p, log_p

    margin = 0.15 if dtype == torch.bfloat16 else 0.05
    threshold = math.log1p(EPS_HIGH)
    log_ratio = off_clip_edges(-old_noise * torch.randn(N, device=device, generator=gen), margin)  # logp - old
    old = torch.where(valid, logp - log_ratio, torch.zeros((), device=device)).clamp(max=0.0)  # log-probs: <= 0
    log_ratio = logp - old  # A = 1 clips above 1 + eps_high only: a ratio cut down to pi never lands there
    clipped = (log_ratio > threshold) & valid  # advantage 1: only the upper side clips

    ref_hidden = hidden.float()
    noise = torch.randn(N, D, device=device, generator=gen) * ref_noise
    if kind == "zipf":
        noise[:, 0] = 0.0
    ref_hidden = (ref_hidden + noise).to(dtype)
    targets = torch.where(valid, targets, torch.full((), IGNORE_INDEX, device=device))

    n_valid = max(1, int(valid.sum()))
    info = dict(weight_info)
    info.update(
        entropy=float(entropy[valid].sum()) / n_valid,
        nll=float(-logp[valid].sum()) / n_valid,
        clip_fraction=float(clipped.sum()) / n_valid,
        filterable_tiles=negligible / max(1, tiles),
        ignore_frac=1.0 - float(valid.float().mean()),
    )
    return Problem(hidden, weight, targets, old, ref_hidden, softcap, info)
