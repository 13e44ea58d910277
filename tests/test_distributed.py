"""Sharded training with the fused losses: 2 real gloo processes on the CPU against one process.

Each launch of tests/distributed_worker.py runs many cases (engines x models x losses) and
records, per case, the largest parameter difference to single-process training on the
concatenated batch, facts that show the engine was really active (accelerate silently runs DDP
on a CPU otherwise), and what the fused path allocated. The assertions live here.

Tolerances:
* float64 (DDP, FSDP1, FSDP2 in the plain loop): the runs differ only in the order of the
  gradient sums (per process, then reduced); measured differences are ~2e-16. 1e-10 is ~5e5
  float64 ulps of the O(1) weights, and 1e8 times below what a lost or doubled gradient share
  does (the weights move by >= 0.05 in every case, asserted).
* float32 (DeepSpeed, which trains in fp32, and PSFTTrainer): the suite's rule. Against a float64
  truth (the same single-process steps in float64), the distributed run's error may not exceed
  4x the single-process float32 run's error, plus 1e-7.
"""

from __future__ import annotations

import json
import os
import sys
from types import SimpleNamespace

import pytest
import torch

transformers = pytest.importorskip("transformers")

from test_hf import ROOT, collate, examples, llama, step_logs, torchrun  # noqa: E402

from psft_kernels.integrations import _engines  # noqa: E402
from psft_kernels.integrations.hf import PSFTConfig, PSFTTrainer  # noqa: E402
from psft_kernels.integrations.plain import count_targets, fused_logprobs, fused_loss, prepare_model  # noqa: E402

WORKER = os.path.join(ROOT, "tests", "distributed_worker.py")
TOL64 = 1e-10
VOCAB = 101


def launch(mode: str, tmp_path_factory):
    out = tmp_path_factory.mktemp(mode)
    torchrun(2, WORKER, mode, out, env={"DS_ACCELERATOR": "cpu"})
    ranks = [json.loads((out / f"{mode}{r}.json").read_text()) for r in (0, 1)]
    for cases in ranks:
        errors = [c for c in cases if "error" in c]
        assert not errors, errors[0]["error"]
    return out, ranks


@pytest.fixture(scope="module")
def plain_runs(tmp_path_factory):
    return launch("plain", tmp_path_factory)[1]


@pytest.fixture(scope="module")
def deepspeed_runs(tmp_path_factory):
    pytest.importorskip("deepspeed")
    return launch("deepspeed", tmp_path_factory)[1]


@pytest.fixture(scope="module")
def trainer_runs(tmp_path_factory):
    pytest.importorskip("deepspeed")
    return launch("trainer", tmp_path_factory)


def check_engine_active(case):
    engine, facts = case["engine"], case["facts"]
    if engine == "ddp":
        assert facts["ddp"]
    elif engine.startswith("fsdp2"):
        assert facts["all_dtensor"] and facts["local_rows"] < facts["rows"], facts
        assert facts["reshard_root"] == (engine in ("fsdp2_reshard_root", "fsdp2_offload"))
    elif engine.startswith("fsdp1"):
        assert facts["fsdp1"] and facts["units"] >= 3 and facts["sharded"], facts  # root + one per layer
        assert facts["use_orig_params"] == (engine == "fsdp1_orig_params")
        assert (facts["flat_params"] > 0) == (not facts["use_orig_params"]), facts
    else:
        assert facts["stage"] == int(engine[-1]), facts
        if engine == "zero3":  # partitioned at rest: the head exists whole only inside its call
            assert facts["head_numel_at_rest"] == 0 and facts["head_ds_numel"] > 0, facts
        else:
            assert facts["head_numel_at_rest"] > 0, facts


def check_case(case):
    name = f"{case['engine']}/{case['model']}/{case['loss']}"
    check_engine_active(case)
    if "refused" in case:  # FSDP1 + a peft model's own base as ASFT's reference: refused, never trained
        assert case["engine"].startswith("fsdp1") and (case["model"], case["loss"]) == ("llama_lora", "asft")
        assert "FSDP1" in case["refused"] and "ref_model=" in case["refused"], case["refused"]
        return
    assert not case["missing"], (name, case["missing"])
    assert case["moved"] >= 0.05, (name, case["moved"])  # the comparison is not between two starts
    if case["dtype"] == "torch.float64":
        assert case["max_abs_diff"] <= TOL64, (name, case["max_abs_diff"])
    else:
        assert case["err_vs_truth"] <= 4 * case["single_err_vs_truth"] + 1e-7, (name, case)
    if "fused_logit_rows" in case:
        # The fused path's biggest logits block is one chunk (4 rows), never the (B, T, V) logits
        # that the model's own forward makes under the same engine (the watch sees those).
        assert case["plain_logit_rows"] == case["tokens"], (name, case)
        assert case["fused_logit_rows"] <= 4 < case["tokens"], (name, case)


def check_runs(ranks, engines):
    for cases in ranks:  # each process gathered the full parameters and compared them itself
        assert {c["engine"] for c in cases} == set(engines)
        assert {c["loss"] for c in cases} == {"sft", "dft", "psft", "asft", "sft_none"}
        for engine in engines:
            assert {c["loss"] for c in cases if c["engine"] == engine} >= {"sft", "psft"}, engine
        for case in cases:
            check_case(case)
        # PSFT: a learning rate at which some tokens clip (else the ratio could be ignored unseen)
        assert any(max(c["clip"]) > 0 for c in cases if c["loss"] == "psft")


@pytest.mark.slow
def test_plain_loop_under_ddp_fsdp2_fsdp1_equals_one_process(plain_runs):
    """prepare_model + fused_loss under DDP, FSDP2 (root resharded after forward or not; the head
    in the root, in a unit with the final norm, or alone; CPUOffloadPolicy) and FSDP1
    (use_orig_params True / False): tiny Llama (untied, tied) and Qwen2 (q/k/v bias), every loss,
    ragged token counts, float64; an lm-head bias (Phi), softcap (Gemma 2), gradient checkpointing
    and peft LoRA under FSDP2 and FSDP1."""
    check_runs(plain_runs, ["ddp", "fsdp2_reshard_root", "fsdp2_keep_root", "fsdp2_head_unit", "fsdp2_head_alone",
                            "fsdp2_offload", "fsdp1_orig_params", "fsdp1_flat_params"])


@pytest.mark.slow
def test_plain_loop_under_deepspeed_zero2_zero3_equals_one_process(deepspeed_runs):
    """The same under deepspeed.initialize (its own optimizer step and accumulation), float32;
    ZeRO-3 with reduction="none" too (its backward needs the head gathered again)."""
    check_runs(deepspeed_runs, ["zero2", "zero3"])


def single_trainer_run(tmp_path, loss_type, tied, dtype):
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import distributed_worker as W
    model = llama(tie_word_embeddings=tied).to(dtype)
    ref = llama(seed=1).to(dtype) if loss_type == "asft" else None
    # 1 process x 4 micro-batches of 2 = 2 processes x 2 micro-batches of 2, the same sequences.
    args = W.trainer_args(tmp_path / f"single-{loss_type}-{tied}-{dtype}", loss_type, gradient_accumulation_steps=4)
    trainer = PSFTTrainer(model=model, args=args, train_dataset=examples(), data_collator=collate, ref_model=ref)
    trainer.train()
    return {k: v.detach() for k, v in trainer.model.named_parameters()}, step_logs(trainer)


def max_diff(a, b):
    return max((a[k].double() - b[k].double()).abs().max().item() for k in b)


@pytest.mark.slow
def test_psft_trainer_under_fsdp2_fsdp1_zero2_zero3_equals_one_process(trainer_runs, tmp_path):
    """PSFTTrainer with accelerate's FSDP2 (its layout: head and final norm in one unit), FSDP1
    (use_orig_params True / False) and DeepSpeed ZeRO-2 / ZeRO-3 (TrainingArguments.deepspeed),
    forced on the CPU: parameters, logged losses and token counts equal one process's."""
    out, ranks = trainer_runs
    expected = {"fsdp2": "fsdp2", "fsdp1_orig_params": "fsdp1", "fsdp1_flat_params": "fsdp1", "zero2": "zero2",
                "zero3": "zero3"}
    cases = ranks[0]
    assert {c["engine"] for c in cases} == set(expected)
    singles = {}
    for case in cases:
        key = (case["loss"], case["tied"])
        if key not in singles:
            singles[key] = (single_trainer_run(tmp_path, *key, torch.float32),
                            single_trainer_run(tmp_path, *key, torch.float64)[0])
        (single, single_logs), truth = singles[key]
        facts, engine = case["facts"], case["engine"]
        assert facts["engine"] == expected[engine], facts
        if engine == "fsdp2":
            assert facts["all_dtensor"], facts
        elif engine.startswith("fsdp1"):
            assert facts["wrapper"] == "FullyShardedDataParallel" and facts["fsdp1_units"] >= 3, facts
        else:
            assert facts["wrapper"] == "DeepSpeedEngine" and facts["stage"] == int(engine[-1]), facts
            assert (facts["head_numel_at_rest"] == 0) == (engine == "zero3"), facts
        got = torch.load(out / f"{case['case']}.pt")
        start = dict(llama(tie_word_embeddings=case["tied"]).named_parameters())
        assert max_diff(truth, start) >= 0.05, case["case"]
        err, single_err = max_diff(got, truth), max_diff(single, truth)
        assert err <= 4 * single_err + 1e-7, (case["case"], err, single_err)
        assert len(case["logs"]) == len(single_logs) == 3
        for a, b in zip(case["logs"], single_logs):
            assert a["tokens"] == b["tokens"]  # every process's targets, counted once
            for key in ("loss", "nll"):
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (case["case"], key)
        if case["loss"] == "psft":
            assert max(h["clip_fraction"] for h in case["logs"]) > 0, case["logs"]


# ----------------------------------------------------------------------------------------------
# One process: the plain-loop API, and the set-ups refused before the first step
# ----------------------------------------------------------------------------------------------


def test_prepare_model_changes_only_this_instance():
    a, b = llama(), llama()
    forward = type(a).forward
    prepare_model(a)
    assert "forward" in a.__dict__ and "forward" not in b.__dict__
    assert type(a).forward is forward and type(b) is type(a)
    assert "forward" in a.lm_head.__dict__ and "forward" not in b.lm_head.__dict__
    batch = collate(examples(4, seed=3))
    torch.testing.assert_close(a(**batch).logits, b(**batch).logits)  # without a request: the model as before
    prepare_model(a)  # idempotent
    assert a.__dict__["_psft_inner_forward"] is None


def test_plain_api_in_one_process_matches_the_models_own_loss():
    model = prepare_model(llama())
    batch = collate(examples(4, seed=3))
    own = model(**batch).loss
    loss, stats = fused_loss(model, batch)
    torch.testing.assert_close(loss, own, rtol=1e-5, atol=1e-6)
    n = count_targets([batch])
    assert int(n) == int(stats["num_tokens"]) == int(batch["labels"][:, 1:].ne(-100).sum())
    per_token, _ = fused_loss(model, batch, reduction="none")
    assert per_token.shape == batch["labels"].shape
    torch.testing.assert_close(per_token.sum() / n, own, rtol=1e-5, atol=1e-6)
    old = fused_logprobs(model, batch)
    assert old.shape == batch["labels"].shape and not old.requires_grad
    psft, stats = fused_loss(model, batch, loss_type="psft", old_logprobs=old)
    assert stats["ratio_mean"].item() == pytest.approx(1.0, abs=1e-6)  # no dropout: pi_old is the policy


def test_plain_api_refuses_a_wrapper_around_an_unprepared_model():
    with pytest.raises(TypeError, match="prepare_model"):
        fused_loss(torch.nn.DataParallel(llama()), collate(examples(2)))
    with pytest.raises(TypeError, match="before the engine wraps it"):
        prepare_model(torch.nn.DataParallel(llama()))


def test_refused_setups_name_the_engine_and_what_to_do(tmp_path):
    args = PSFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", loss_type="sft")
    with pytest.raises(TypeError, match="DataParallel.*torchrun"):
        PSFTTrainer(model=torch.nn.DataParallel(llama()), args=args)
    tp = llama()
    tp._tp_size = 2  # what from_pretrained(tp_plan=...) leaves on a tensor-parallel model
    with pytest.raises(ValueError, match="tensor-parallel.*FSDP or DeepSpeed"):
        PSFTTrainer(model=tp, args=args)

    def trainer(kind, **state):
        accelerator = SimpleNamespace(distributed_type=SimpleNamespace(value=kind), state=SimpleNamespace(**state))
        return SimpleNamespace(args=SimpleNamespace(n_gpu=0), accelerator=accelerator)

    with pytest.raises(ValueError, match="MEGATRON_LM engine.*DDP, FSDP1, FSDP2 and DeepSpeed"):
        _engines.check_trainer(trainer("MEGATRON_LM"))
    offload = {"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}}
    with pytest.raises(ValueError, match="ZeRO-3 with offload_param to 'cpu'"):
        _engines.check_trainer(trainer("DEEPSPEED", deepspeed_plugin=SimpleNamespace(deepspeed_config=offload)))
    fsdp1 = SimpleNamespace(fsdp_version=1, cpu_offload=SimpleNamespace(offload_params=True))
    with pytest.raises(ValueError, match="FSDP1 with cpu_offload"):
        _engines.check_trainer(trainer("FSDP", fsdp_plugin=fsdp1))
    for kind, state, engine in (("NO", {}, "single"), ("MULTI_CPU", {}, "ddp"),
                                ("FSDP", {"fsdp_plugin": SimpleNamespace(fsdp_version=2, cpu_offload=None)}, "fsdp2"),
                                ("DEEPSPEED", {"deepspeed_plugin": SimpleNamespace(
                                    deepspeed_config={"zero_optimization": {"stage": 3}})}, "zero3")):
        assert _engines.check_trainer(trainer(kind, **state)) == engine


@pytest.mark.slow
def test_fsdp_plain_example_matches_one_process():
    """The README's command: examples/fsdp_plain.py under torchrun checks itself against one process."""
    done = torchrun(2, os.path.join(ROOT, "examples", "fsdp_plain.py"), "--loss", "psft", "--check", timeout=300)
    lines = [line for line in done.stdout.splitlines() if "max |sharded - one process|" in line]
    assert len(lines) == 2, done.stdout  # both ranks compared
    assert any("clip_fraction 0.000" not in line for line in done.stdout.splitlines() if "clip_fraction" in line)
