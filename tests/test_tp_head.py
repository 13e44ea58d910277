"""A vocabulary-parallel lm-head from a torch tensor-parallel plan (``ColwiseParallel`` on ``lm_head``)
through the plain-loop API: 2 real gloo processes (one tensor-parallel group of 2) against one process.

tests/tp_head_worker.py trains 3 SGD steps in float64 per case (SFT, DFT, PSFT with pi_old, ASFT
against a whole reference model, reduction="none"; ``use_local_output`` True and False, the
output gathered to Replicate, an lm-head bias, ``prepare_model`` before and after the plan) and
records the largest difference of every parameter (the head's shards gathered) to single-process
training on the same batches.

Tolerance: both runs compute the same sums in float64, grouped differently (the vocabulary split
in two shards, merged by all-reduces); measured differences are ~5e-16. 1e-10 is ~5e5 float64 ulps
of the O(1) weights. Summing grad_hidden once too often (the ColwiseParallel input hook's backward
on top of vocab_parallel's all-reduce) would double every body parameter's gradient, and the body
parameters move by >= 5e-5 in every case (asserted), so such a bug shows as a difference >= 5e-5,
five orders of magnitude above the tolerance.
"""

from __future__ import annotations

import json
import os

import pytest

pytest.importorskip("transformers")

from test_hf import ROOT, torchrun  # noqa: E402

WORKER = os.path.join(ROOT, "tests", "tp_head_worker.py")
TOL64 = 1e-10
MIN_MOVED = 5e-5


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("tp_head")
    torchrun(2, WORKER, out)
    ranks = [json.loads((out / f"tp{r}.json").read_text()) for r in (0, 1)]
    for cases in ranks:
        errors = [c for c in cases if "error" in c]
        assert not errors, errors[0]["error"]
    return ranks


@pytest.mark.slow  # ~40 s on 2 cores (two processes, 8 training cases plus their single-process runs)
def test_colwise_parallel_head_trains_like_one_process(runs):
    trained = [[c for c in cases if not c["case"].startswith("refused")] for cases in runs]
    assert len(trained[0]) == 8
    for rank, cases in enumerate(trained):
        for c in cases:
            assert c["head_is_dtensor"], c
            # V = 101 over 2 ranks: torch.chunk's uneven split, 51 and 50 rows
            assert c["head_local_rows"] == (51, 50)[rank], c
            assert c["min_moved"] >= MIN_MOVED, c
            assert c["max_abs_diff"] <= TOL64, c


@pytest.mark.slow
def test_unsupported_tensor_parallel_heads_are_refused(runs):
    for cases in runs:
        msgs = {c["case"]: c["error_message"] for c in cases if c["case"].startswith("refused")}
        assert "tied to the input embedding" in msgs["refused/llama_tied/ColwiseParallel"]
        assert "only ColwiseParallel" in msgs["refused/llama/RowwiseParallel"]
        assert "Shard(dim=1)" in msgs["refused/llama/RowwiseParallel"]
        # PSFTTrainer cannot drive it (accelerate's TP takes transformers' tp_plan models only): said up front
        assert "PSFTTrainer does not drive a tensor-parallel head" in msgs["refused/trainer"]
        assert "plain-loop API" in msgs["refused/trainer"]


@pytest.fixture(scope="module")
def runs_2d(tmp_path_factory):
    out = tmp_path_factory.mktemp("tp_head_2d")
    torchrun(4, WORKER, out, "2d")
    return [json.loads((out / f"tp2d{r}.json").read_text()) for r in range(4)]


@pytest.mark.slow  # ~35 s on 2 cores (4 processes)
def test_colwise_head_with_fsdp2_on_a_2d_mesh_trains_like_one_process(runs_2d):
    """dp=2 x tp=2: the head ColwiseParallel on "tp", FSDP2 on "dp"; SFT, PSFT, ASFT. Same tolerance and
    argument as above; a lost or doubled data-parallel share would also show at >= MIN_MOVED."""
    for rank, cases in enumerate(runs_2d):
        errors = [c for c in cases if "error" in c]
        assert not errors, errors[0]["error"]
        assert [c["case"] for c in cases] == ["fsdp2_tp/sft", "fsdp2_tp/psft", "fsdp2_tp/asft"]
        for c in cases:
            # FSDP2 on "dp" and ColwiseParallel on "tp" both split the 101 rows: 26 + 25 + 25 + 25
            assert c["head_placements"].count("Shard(dim=0") == 2, c  # (_StridedShard(dim=0, sf=2), Shard(dim=0))
            assert c["head_local_rows"] == (26, 25, 25, 25)[rank], c
            assert c["min_moved"] >= MIN_MOVED, c
            assert c["max_abs_diff"] <= TOL64, c
