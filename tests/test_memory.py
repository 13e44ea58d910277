"""The memory property: no tensor with N x V (or more) elements ever exists in a fused backend.

A TorchDispatchMode sees every tensor every ATen op returns, in the forward and the backward,
and records the largest. The same probe run on the reference (which materializes the logits)
shows that it would catch a violation.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from helpers import LOSSES, cpu_backends, make_problem, run

BATCH, D, V, CHUNK = (4, 128), 24, 1000, 32
N = BATCH[0] * BATCH[1]


class LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.numel, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.numel() > self.numel:
                self.numel, self.op = t.numel(), str(func)
        return out


def _largest(loss, backend, **options):
    p = make_problem(batch=BATCH, D=D, V=V, ref=loss == "asft", bias=True, ignore_frac=0.1)
    with LargestTensor() as probe:
        run(loss, backend, p, **options)
    return probe


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_no_full_logits(backend, loss, reduction):
    probe = _largest(loss, backend, chunk_size=CHUNK, reduction=reduction, entropy_coef=0.1)
    # A chunk's logits are CHUNK x V; everything else is O(N), O(N D) or O(V D).
    assert probe.numel < N * V, f"{backend}/{loss}: a tensor of {probe.numel} elements ({probe.op}) >= N x V"
    assert probe.numel <= CHUNK * V, f"{backend}/{loss}: {probe.numel} elements ({probe.op}) > one chunk"


def test_probe_catches_materialized_logits():
    assert _largest("psft", "reference").numel >= N * V
