"""The chunked and native backends allocate no logit block per chunk: every block-sized tensor any
op returns lives in the shared workspace, which is reused across chunks and calls and freed by
``pk.empty_cache()``.

Block-sized allocations per chunk are what made the chunked backend's resident memory grow to
gigabytes with glibc's default allocator (bench/rss.py measures that in a fresh process; this is
the deterministic check of its cause). A TorchDispatchMode sees the storage of every tensor every
ATen op returns, forward and backward.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import psft_kernels as pk
from helpers import LOSSES, cpu_backends, make_problem, run
from psft_kernels import _workspace

BATCH, D, V, CHUNK = (4, 96), 8, 1000, 32  # 12 chunks; V x D (the weight gradient) < half a block


class LargeStorages(TorchDispatchMode):
    """Storages of op outputs with at least ``numel`` elements, and the ops that returned them."""

    def __init__(self, numel: int):
        super().__init__()
        self.numel, self.seen = numel, {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.numel() >= self.numel:
                self.seen.setdefault(t.untyped_storage().data_ptr(), str(func))
        return out


def _workspace_storages():
    return {b.untyped_storage().data_ptr() for b in _workspace.WORKSPACE._buffers.values()}


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("options", [dict(), dict(reduction="none", entropy_coef=0.1),
                                     dict(softcap=5.0, entropy_coef=0.1)])
def test_no_block_allocated_per_chunk(backend, loss, options):
    problem = make_problem(batch=BATCH, D=D, V=V, ref=loss == "asft", bias=True, ignore_frac=0.1)
    if loss == "asft":
        options = dict(options, kl_coef=0.2)
    pk.empty_cache()
    run(loss, backend, problem, chunk_size=CHUNK, **options)  # the workspace takes its blocks
    held = {k: v.untyped_storage().data_ptr() for k, v in _workspace.WORKSPACE._buffers.items()}
    assert held, "the workspace holds the blocks between calls"
    with LargeStorages(CHUNK * V // 2) as probe:
        run(loss, backend, problem, chunk_size=CHUNK, **options)
    stray = {ptr: op for ptr, op in probe.seen.items() if ptr not in _workspace_storages()}
    assert not stray, f"{backend}/{loss}: block-sized tensors outside the workspace, from {sorted(set(stray.values()))}"
    assert {k: v.untyped_storage().data_ptr() for k, v in _workspace.WORKSPACE._buffers.items()} == held, \
        "the second call reused the first call's blocks"
    pk.empty_cache()
    assert not _workspace.WORKSPACE._buffers


def test_probe_sees_blocks_outside_the_workspace():
    """The probe is not blind: with the workspace disabled every block is a fresh allocation."""
    problem = make_problem(batch=BATCH, D=D, V=V)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PSFT_KERNELS_WORKSPACE", "0")
        pk.empty_cache()
        with LargeStorages(CHUNK * V // 2) as probe:
            run("sft", "chunked", problem, chunk_size=CHUNK)
        assert not _workspace.WORKSPACE._buffers, "disabled: nothing kept between calls"
    assert len(probe.seen) >= 2


def test_default_blocks_are_bounded_and_large_enough_for_the_gemms():
    """Default rows per block: at most 2^25 / V and 2^20 / D, evened out over the rows."""
    from psft_kernels._types import HeadInputs, HeadSpec
    from psft_kernels.chunked import ChunkedBackend

    def sizes(N, V, D):
        inputs = HeadInputs(torch.empty(N, D), torch.empty(V, D), None, torch.zeros(N, dtype=torch.long))
        return [c.stop - c.start for c in ChunkedBackend()._row_chunks(inputs, HeadSpec(), None)]

    assert sizes(1024, 152064, 896) == [205] * 4 + [204]  # 220 rows at most: 128 MiB fp32 blocks
    assert sizes(4000, 152064, 8)[0] * 152064 <= 1 << 25
    assert sizes(2048, 32000, 4096) == [256] * 8  # the D bound
