"""Vocabulary-parallel fused losses: the lm-head sharded over V across a process group.

Each rank holds rows ``[start, start + V_local)`` of the head (``weight``, ``bias`` and, for ASFT,
``ref_weight`` / ``ref_bias``), the same ``hidden`` and the same *global* ``targets``. Every rank
returns the loss, per-token values and stats of the unsharded head, and the gradient of its own
shard (docs/vocab_parallel.md).

How (per call, whatever the loss):

* forward: the backend (chunked or native) streams its shard to the per-token statistics it always
  produces (:class:`~psft_kernels._types.TokenStats`: ``lse``, ``logp``, ``H``, and ``lse'``, ``KL``
  for ASFT), all relative to the shard's own softmax. :func:`merge_stats` turns those into the
  statistics of the full vocabulary with one MAX all-reduce (the shards' ``lse``) and one packed SUM
  all-reduce (weights, weighted entropies and KLs, the owner's target log-prob), each ``O(N)``;
* the per-token objective (PSFT's ratio and clip, DFT's weight...) is then applied by
  :mod:`psft_kernels.objectives` to the merged statistics, unchanged;
* backward: the backend's own gradient pass over its shard with the merged statistics gives the
  shard's ``grad_weight`` / ``grad_bias`` (local, no communication) and a partial ``grad_hidden``,
  summed across the group by one all-reduce (fp32 for half inputs).

The merge is the chain rule of entropy and KL over a partition of the vocabulary: with shard
weights ``w_r = exp(lse_r - lse)`` (and ``u_r`` for the reference model),
``H = sum_r w_r H_r - sum_r w_r log w_r``, ``KL(q||p) = sum_r u_r (KL_r + log u_r - log w_r)``,
``KL(p||q) = sum_r w_r (KL_r + log w_r - log u_r)`` and ``logp = logp_owner + log w_owner``.
"""

from __future__ import annotations

import dataclasses
import numbers
import sys
from typing import Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from ._types import Coefficients, GradNeeds, Grads, HeadInputs, HeadSpec, TokenStats
from .chunked import ChunkedBackend
from .objectives import Objective

# Local target ids the shard backends see: a valid token whose target lies in another shard, and
# an ignored token (the local spec's ignore_index, so the backends skip it as usual).
_NOT_OWNED = -1
_IGNORED = -2


@dataclasses.dataclass(frozen=True)
class VocabParallel:
    """Where this rank's shard of the lm-head sits: rows ``[start, start + V_local)`` of the
    vocabulary, sharded across ``group`` (a ``torch.distributed`` process group; None is the
    default group). Pass it as ``vocab_parallel=pk.VocabParallel(group, start)`` or as the tuple
    ``(group, start)``."""

    group: object = None
    start: int = 0


def _is_dtensor(x) -> bool:
    # No DTensor can exist before its module is imported: don't import it (slow) for plain callers.
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(x, getattr(module, "DTensor", ()))


def _dtensor_shard(weight) -> VocabParallel:
    """The group and start of a DTensor lm-head sharded over its rows (``Shard(0)``) on one mesh dim."""
    from torch.distributed.tensor import Replicate, Shard

    mesh, placements = weight.device_mesh, weight.placements
    dims = [i for i, p in enumerate(placements) if isinstance(p, Shard) and p.dim == 0]
    others_ok = all(isinstance(p, Replicate) for i, p in enumerate(placements) if i not in dims)
    if len(dims) != 1 or not others_ok:
        raise ValueError(f"a DTensor weight must be Shard(0) on one mesh dimension and Replicate on the others "
                         f"(a vocabulary-sharded lm-head); got placements {placements}")
    dim = dims[0]
    size, rank = mesh.size(dim), mesh.get_local_rank(dim)
    V = weight.shape[0]
    chunk = -(-V // size)  # torch.chunk's split, which Shard(0) uses
    return VocabParallel(mesh.get_group(dim), min(V, rank * chunk))


def _to_local(name: str, x):
    """A replicated or sharded DTensor's local tensor (differentiable); plain tensors unchanged."""
    if not _is_dtensor(x):
        return x
    from torch.distributed.tensor import Replicate

    if name in ("hidden", "ref_hidden") and not all(isinstance(p, Replicate) for p in x.placements):
        raise ValueError(f"{name} must be replicated across the vocabulary-parallel group (hidden states "
                         f"sharded over tokens, sequence parallelism, are not supported: all-gather them first); "
                         f"got a DTensor with placements {x.placements}")
    return x.to_local()


def localize(vocab_parallel, hidden, weight, bias=None, ref_hidden=None, ref_weight=None, ref_bias=None):
    """``(options, hidden, weight, bias, ref_hidden, ref_weight, ref_bias)`` with plain local tensors.

    ``options`` is None for an unsharded call: ``vocab_parallel=None`` with a plain weight, or a
    group of one rank (which then runs exactly the non-parallel code).
    """
    tensors = (hidden, weight, bias, ref_hidden, ref_weight, ref_bias)
    if vocab_parallel is None and not _is_dtensor(weight):
        return (None,) + tensors
    if _is_dtensor(weight):
        if vocab_parallel is not None:
            raise ValueError("vocab_parallel must be None when weight is a DTensor: its mesh and placement "
                             f"already say how it is sharded; got vocab_parallel={vocab_parallel!r}")
        vp = _dtensor_shard(weight)
    else:
        vp = check_options(vocab_parallel)
    names = ("hidden", "weight", "bias", "ref_hidden", "ref_weight", "ref_bias")
    tensors = tuple(_to_local(n, t) for n, t in zip(names, tensors))
    if dist.get_world_size(vp.group) == 1:
        if vp.start != 0:
            raise ValueError(f"vocab_parallel: a group of one rank holds the whole vocabulary, so start must be 0; "
                             f"got {vp.start}")
        return (None,) + tensors
    return (vp,) + tensors


def check_options(vocab_parallel) -> VocabParallel:
    if isinstance(vocab_parallel, tuple) and not isinstance(vocab_parallel, VocabParallel):
        if len(vocab_parallel) != 2:
            raise TypeError(f"vocab_parallel must be pk.VocabParallel(group, start) or a (group, start) tuple; "
                            f"got a tuple of {len(vocab_parallel)} items")
        vocab_parallel = VocabParallel(*vocab_parallel)
    if not isinstance(vocab_parallel, VocabParallel):
        raise TypeError(f"vocab_parallel must be None, pk.VocabParallel(group, start) or a (group, start) tuple; "
                        f"got {type(vocab_parallel).__name__}")
    start = vocab_parallel.start
    if isinstance(start, bool) or not isinstance(start, numbers.Integral) or start < 0:
        raise ValueError(f"vocab_parallel start (this shard's first vocabulary id) must be an int >= 0; got {start!r}")
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("vocab_parallel needs an initialized torch.distributed process group "
                           "(torch.distributed.init_process_group)")
    return VocabParallel(vocab_parallel.group, int(start))


# ----------------------------------------------------------------------------------------------
# The merge: one MAX and one packed SUM all-reduce of per-token statistics
# ----------------------------------------------------------------------------------------------


def merge_stats(local: TokenStats, owned: Tensor, valid: Tensor, kl_direction: Optional[str], group) -> TokenStats:
    """The full vocabulary's per-token statistics from each shard's (all ranks call it together).

    ``local``: the shard's :class:`TokenStats` as a backend returns them (relative to the shard's
    own softmax, 0 on ignored rows); ``owned``: rows whose target lies in this shard (its
    ``local.logp`` is then the target's log-prob within the shard); ``valid``: non-ignored rows.
    Raises ValueError (on every rank) if a valid target is owned by no shard or by several.
    """
    has_ref = local.ref_lse is not None
    peaks = torch.stack([local.lse, local.ref_lse]) if has_ref else local.lse[None].clone()
    dist.all_reduce(peaks, op=dist.ReduceOp.MAX, group=group)
    rel = local.lse - peaks[0]  # log of this shard's weight times S, <= 0
    a = rel.exp()
    zero = torch.zeros((), dtype=a.dtype, device=a.device)
    parts = [a, a * local.entropy, a * rel, torch.where(owned, local.logp + rel, zero), owned.to(a.dtype)]
    if has_ref:
        rel_q = local.ref_lse - peaks[1]
        b = rel_q.exp()
        if kl_direction == "forward":
            parts += [b, b * local.kl, b * rel_q, b * rel]
        else:
            parts += [b, a * local.kl, a * rel_q]
    packed = torch.stack(parts)
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)

    bad = valid & (packed[4] != 1)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"vocab_parallel: every target must lie in exactly one rank's shard; the target at flat "
                         f"position {i} lies in {int(packed[4, i])} shards ({int(bad.sum())} such targets): a target "
                         f">= the full vocabulary size, or shards whose starts leave gaps or overlap")
    log_s = packed[0].log()
    lse = peaks[0] + log_s
    entropy = (packed[1] - packed[2]) / packed[0] + log_s
    logp = packed[3] - log_s
    ref_lse = kl = None
    if has_ref:
        log_sq = packed[5].log()
        ref_lse = peaks[1] + log_sq
        if kl_direction == "forward":  # sum_r u_r (KL_r + log u_r - log w_r)
            kl = (packed[6] + packed[7] - packed[8]) / packed[5] - log_sq + log_s
        else:  # sum_r w_r (KL_r + log w_r - log u_r)
            kl = (packed[6] + packed[2] - packed[7]) / packed[0] - log_s + log_sq
    keep = lambda x: None if x is None else torch.where(valid, x, zero)  # noqa: E731
    return TokenStats(keep(lse), keep(logp), keep(entropy), keep(ref_lse), keep(kl))


# ----------------------------------------------------------------------------------------------
# Backends
# ----------------------------------------------------------------------------------------------


class _ShardChunked(ChunkedBackend):
    """The chunked backend on one shard: the backward reads the merged statistics, and a row whose
    target is in another shard has no one-hot."""

    backward_reads_saved_stats = True

    @staticmethod
    def _add_onehot(dz: Tensor, y: Tensor, g: Tensor) -> None:
        own = (y >= 0).nonzero().squeeze(1)
        dz[own, y[own]] += g[own]


def _shard_native():
    from .native import NativeBackend

    class _ShardNative(NativeBackend):
        """The native backend on one shard. Its backward would recompute the shard's own statistics,
        which are not the full vocabulary's: it reads the merged ones, through the ``dlogits`` pass
        (the kernel skips the one-hot of a row whose target is -1, in another shard)."""

        backward_reads_saved_stats = True

        def __init__(self):
            super().__init__()
            self._fallback = _ShardChunked()

    return _ShardNative()


_SHARD_BACKENDS = {}


def _shard_backend(name: str, device: torch.device):
    from . import backends

    if name == "auto":
        name = "native" if (torch.device(device).type == "cpu"
                            and backends.unavailable_reason("native", device) is None) else "chunked"
    if name == "triton":
        raise backends.BackendUnavailableError(
            'backend="triton" is not supported with vocab_parallel yet: use backend="chunked" (any device) or '
            '"native" (CPU), or "auto", which picks one of them')
    reason = backends.unavailable_reason(name, device)
    if reason is not None:
        raise backends.BackendUnavailableError(f'backend="{name}" cannot run on {device}: {reason}')
    if name not in _SHARD_BACKENDS:
        _SHARD_BACKENDS[name] = _ShardChunked() if name == "chunked" else _shard_native()
    return _SHARD_BACKENDS[name]


class VocabParallelBackend:
    """A shard backend plus the merge: the backend contract of :mod:`psft_kernels.backends` over the
    sharded head. Gradients are formed in the autograd backward (``grads_in_backward``): the forward
    cannot form them in its one pass, since they need the merged statistics."""

    grads_in_backward = True

    def __init__(self, inner, vp: VocabParallel):
        self.inner, self.vp = inner, vp
        self.name = f"{inner.name}+vocab_parallel"

    def _local(self, inputs: HeadInputs, spec: HeadSpec, not_owned: int):
        y, start, v_local = inputs.targets, self.vp.start, inputs.vocab_size
        valid = y != spec.ignore_index
        owned = valid & (y >= start) & (y < start + v_local)
        local_y = torch.where(owned, y - start, torch.where(valid, not_owned, _IGNORED))
        local = dataclasses.replace(inputs, targets=local_y)
        return local, dataclasses.replace(spec, ignore_index=_IGNORED), owned, valid

    @torch.no_grad()
    def forward(self, inputs: HeadInputs, spec: HeadSpec, objective: Optional[Objective] = None,
                coef_scale=None, needs: GradNeeds = GradNeeds()):
        if objective is not None and needs.any():  # pragma: no cover - autograd honours grads_in_backward
            raise RuntimeError("vocab_parallel forms its gradients in the backward pass")
        # The forward stats pass gathers each row's target logit: rows owned elsewhere point at column 0.
        local, local_spec, owned, valid = self._local(inputs, spec, not_owned=0)
        stats, _, _ = self.inner.forward(local, local_spec)
        stats = merge_stats(stats, owned, valid, spec.kl_direction, self.vp.group)
        terms = objective.terms(stats, valid) if objective is not None else None
        return stats, terms, None

    @torch.no_grad()
    def backward(self, inputs: HeadInputs, spec: HeadSpec, stats: TokenStats, coefs: Coefficients,
                 needs: GradNeeds) -> Grads:
        local, local_spec, _, _ = self._local(inputs, spec, not_owned=_NOT_OWNED)
        grads = self.inner.backward(local, local_spec, stats, coefs, needs)
        if grads.hidden is not None:  # each shard's part of dl/dh: one sum, in fp32 for half inputs
            gh = grads.hidden.to(inputs.compute_dtype)
            dist.all_reduce(gh, op=dist.ReduceOp.SUM, group=self.vp.group)
            grads.hidden = gh.to(grads.hidden.dtype)
        return grads


def resolve(backend: str, inputs: HeadInputs, ignore_index: int, vp: VocabParallel) -> VocabParallelBackend:
    """The vocabulary-parallel backend for ``backend``; checks what can be checked without communicating."""
    y = inputs.targets
    bad = (y != ignore_index) & (y < 0)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"targets must be global vocabulary ids >= 0 or equal ignore_index={ignore_index}; "
                         f"got {int(y[i])} at flat position {i}")
    return VocabParallelBackend(_shard_backend(backend, inputs.hidden.device), vp)


# ----------------------------------------------------------------------------------------------
# backend="reference": gather the head, run the plain oracle
# ----------------------------------------------------------------------------------------------


class _GatherRows(torch.autograd.Function):
    """All shards of a tensor stacked along dim 0 in vocabulary order; the backward keeps this
    rank's rows (every rank computes the same loss from the same gathered head, so the gradient
    each rank sees for the full head is already the whole gradient)."""

    @staticmethod
    def forward(ctx, local: Tensor, vp: VocabParallel, layout):
        sizes, starts, order = layout
        ctx.rows = (vp.start, vp.start + local.shape[0])
        width = max(sizes)
        pad = local.new_zeros((width,) + local.shape[1:])
        pad[:local.shape[0]] = local
        parts = [torch.empty_like(pad) for _ in sizes]
        dist.all_gather(parts, pad.contiguous(), group=vp.group)
        return torch.cat([parts[r][:sizes[r]] for r in order])

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad[ctx.rows[0]:ctx.rows[1]], None, None


def _layout(vp: VocabParallel, v_local: int, device):
    """Every rank's ``(size, start)``, and the rank order along the vocabulary (checked to tile it)."""
    mine = torch.tensor([v_local, vp.start], dtype=torch.int64, device=device)
    parts = [torch.empty_like(mine) for _ in range(dist.get_world_size(vp.group))]
    dist.all_gather(parts, mine, group=vp.group)
    sizes, starts = [int(p[0]) for p in parts], [int(p[1]) for p in parts]
    order = sorted(range(len(parts)), key=lambda r: starts[r])
    edge = 0
    for r in order:
        if starts[r] != edge:
            raise ValueError(f"vocab_parallel: the shards must tile [0, V) without gaps or overlaps; "
                             f"got (start, size) per rank {list(zip(starts, sizes))}")
        edge += sizes[r]
    return sizes, starts, order


def reference(kind: str, vp: VocabParallel, hidden, weight, targets, *, bias=None, ref_weight=None, ref_bias=None,
              **kw):
    """``backend="reference"`` on a sharded head: all-gather the shards, then the unsharded oracle."""
    from . import reference as ref_mod

    layout = _layout(vp, weight.shape[0], weight.device)
    gather = lambda t: None if t is None else _GatherRows.apply(t, vp, layout)  # noqa: E731
    full = dict(bias=gather(bias))
    if kind == "asft":
        full.update(ref_weight=gather(ref_weight), ref_bias=gather(ref_bias))
    fn = getattr(ref_mod, "linear_logprobs" if kind == "logprobs" else f"linear_{kind}_loss")
    return fn(hidden, gather(weight), targets, **full, **kw)


__all__ = ["VocabParallel", "merge_stats", "VocabParallelBackend"]
