"""Vocabulary-parallel losses on real gloo process groups (2 and 3 ranks, torch.multiprocessing).

Each launch runs every case of tests/vp_worker.py on every rank (about 300: every public function x
option set x backend x dtype, edge cases, modules, DTensor, errors) and the collective counts; the
test reads what each rank wrote. One launch per group size keeps the set well under a minute each.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import vp_worker

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is needed")


@pytest.fixture(scope="module", params=[2, 3], ids=["2ranks", "3ranks"])
def launch(request, tmp_path_factory):
    world = request.param
    out = tmp_path_factory.mktemp(f"vp{world}")
    mp.spawn(vp_worker.main, args=(world, str(out)), nprocs=world, join=True)
    return world, [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


def test_every_case_matches_the_unsharded_head(launch):
    world, ranks = launch
    for r, result in enumerate(ranks):
        assert not result["failures"], f"rank {r}/{world}:\n" + "\n".join(result["failures"][:20])
        assert result["passed"] == result["cases"] >= 300


def _sum_rows(variant: str) -> int:
    """Statistics packed per token in the SUM all-reduce (vocab_parallel.merge_stats)."""
    return {"asft_forward": 9, "asft_reverse": 8}.get(variant, 5)


def test_collectives_per_call(launch):
    """Forward: one MAX and one SUM all-reduce of O(N) values; backward: one SUM all-reduce of
    grad_hidden (N x D). Bytes grow with N and do not depend on V."""
    world, ranks = launch
    for backend, counts in ranks[0]["counts"].items():
        assert len(counts) == 6 * 4
        for key, c in counts.items():
            variant = key.split("/")[0]
            n, item = c["N"], c["itemsize"]
            fwd = [tuple(x) for x in c["forward"]]
            bwd = [tuple(x) for x in c["backward"]]
            ref = variant.startswith("asft")
            assert fwd == [("allreduce", "MAX", n * item * (2 if ref else 1)),
                           ("allreduce", "SUM", n * item * _sum_rows(variant))], (backend, key, fwd)
            assert bwd == [("allreduce", "SUM", n * c["D"] * item)], (backend, key, bwd)
            assert sum(b for *_, b in fwd) < n * c["V"] * item  # never the logits
        # the same call at 4x the vocabulary moves the same bytes
        for key, c in counts.items():
            if "/V53/" in key:
                big = counts[key.replace("/V53/", "/V213/")]
                assert big["forward"] == c["forward"] and big["backward"] == c["backward"], key
    assert all(r["counts"] == ranks[0]["counts"] for r in ranks)  # every rank takes part in every call


def test_unsharded_callers_are_unchanged():
    """vocab_parallel=None takes the plain path: no process group needed, nothing communicated."""
    import psft_kernels as pk
    from helpers import make_problem, run

    problem = make_problem(V=53)
    a = run("psft", "chunked", problem)
    b = run("psft", "chunked", problem, vocab_parallel=None)
    assert torch.equal(a.loss, b.loss) and all(torch.equal(a.grads[k], b.grads[k]) for k in a.grads)
    if not dist.is_initialized():  # another test of the session may have made a default group
        with pytest.raises(RuntimeError, match="init_process_group"):
            pk.linear_sft_loss(problem.hidden, problem.weight, problem.targets, vocab_parallel=(None, 0))
