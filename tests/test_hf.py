"""PSFTTrainer / PSFTConfig (Hugging Face Trainer integration) and the examples, on tiny CPU models.

The checks compare against what plain transformers computes (the model's own loss, the stock
Trainer's optimizer steps, materialized logits), at fp32 tolerances.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import json
import os
import runpy
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from psft_kernels.integrations.hf import (  # noqa: E402
    OLD_LOGPROBS_KEY,
    MetricsJsonlCallback,
    PSFTConfig,
    PSFTTrainer,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 101
PSFT_KEYS = {"clip_fraction", "clip_fraction_high", "clip_fraction_low", "ratio_mean", "approx_kl"}


# ----------------------------------------------------------------------------------------------
# Tiny models, data and trainers
# ----------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: a second thread buys nothing, and on a shared, oversubscribed CPU
    the threads of one small op wait on each other (up to 100x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1",
                  "PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)}


def torchrun(nproc: int, script: str, *args, env=None, timeout: int = 600) -> subprocess.CompletedProcess:
    """``script args`` in ``nproc`` processes under torchrun, from the repository root (gloo on CPUs);
    fails the test with the end of the output if any process fails."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), script,
           *map(str, args)]
    done = subprocess.run(cmd, cwd=ROOT, env={**SUBPROCESS_ENV, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    return done


def llama(seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64)
    cfg.update(overrides)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg))


def examples(n=32, seed=1):
    """Variable lengths and prompt masks, so micro-batches hold different numbers of targets."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(4, 17, (1,), generator=g))
        ids = torch.randint(0, VOCAB, (length,), generator=g)
        labels = ids.clone()
        labels[: int(torch.randint(0, length - 2, (1,), generator=g))] = -100
        out.append({"input_ids": ids, "labels": labels})
    return out


def collate(features):
    T = max(len(f["input_ids"]) for f in features)
    ids = torch.zeros(len(features), T, dtype=torch.long)
    labels = torch.full((len(features), T), -100)
    mask = torch.zeros(len(features), T, dtype=torch.long)
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        ids[i, :n], labels[i, :n], mask[i, :n] = f["input_ids"], f["labels"], 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def config(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=2,
                gradient_accumulation_steps=2, logging_steps=1, report_to="none", save_strategy="no",
                disable_tqdm=True, use_cpu=True, optim="sgd", learning_rate=0.5, seed=0)
    base.update(kw)
    return PSFTConfig(**base)


# transformers 5.2x renamed gradient_checkpointing (now a deprecated alias) to activation_checkpointing
CHECKPOINTING = ("activation_checkpointing" if "activation_checkpointing" in
                 {f.name for f in dataclasses.fields(transformers.TrainingArguments)} else "gradient_checkpointing")


def checkpointing_on(model):
    return getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing


def train(model, tmp_path, data=None, ref_model=None, callbacks=None, **kw):
    trainer = PSFTTrainer(model=model, args=config(tmp_path, **kw), train_dataset=data or examples(),
                          data_collator=collate, ref_model=ref_model, callbacks=callbacks)
    trainer.train()
    return trainer


def step_logs(trainer):
    return [h for h in trainer.state.log_history if "nll" in h]


def assert_params_close(a, b, atol=2e-5):
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys()
    worst = max((pa[k] - pb[k]).abs().max().item() for k in pa)
    assert worst <= atol, f"parameters differ by up to {worst:.3e}"


def assert_params_differ(a, b):
    assert any(not torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def batch_of(n=4, seed=3):
    return collate(examples(n, seed))


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("field, value, error", [
    ("loss_type", "ppo", ValueError),
    ("eps_low", -0.1, ValueError),
    ("eps_high", float("nan"), ValueError),
    ("entropy_coef", "0.1", TypeError),
    ("old_policy_refresh_steps", 0, ValueError),
    ("old_policy_refresh_steps", 2.5, TypeError),
    ("sft_warmup_steps", -1, ValueError),
    ("kl_coef", -0.05, ValueError),
    ("kl_direction", "backward", ValueError),
    ("loss_backend", "cuda", ValueError),
])
def test_config_rejects_bad_values_naming_the_field(tmp_path, field, value, error):
    with pytest.raises(error, match=field):
        PSFTConfig(output_dir=str(tmp_path), **{field: value})


def test_config_defaults_are_the_official_recipe(tmp_path):
    c = PSFTConfig(output_dir=str(tmp_path))
    assert (c.loss_type, c.eps_low, c.eps_high, c.old_policy_refresh_steps, c.kl_coef, c.kl_direction) == (
        "psft", 0.2, 0.28, 8, 0.05, "forward")
    assert (c.entropy_coef, c.sft_warmup_steps, c.loss_backend) == (0.0, 0, "auto")


def test_trainer_rejects_bad_setups(tmp_path):
    model = llama()
    with pytest.raises(TypeError, match="PSFTConfig"):
        PSFTTrainer(model=model, args=transformers.TrainingArguments(output_dir=str(tmp_path), use_cpu=True))
    with pytest.raises(ValueError, match="reference model"):
        PSFTTrainer(model=model, args=config(tmp_path, loss_type="asft"))
    with pytest.raises(ValueError, match="only by loss_type='asft'"):
        PSFTTrainer(model=model, args=config(tmp_path, loss_type="dft"), ref_model=llama())
    with pytest.raises(ValueError, match="label_smoothing_factor"):
        PSFTTrainer(model=model, args=config(tmp_path, label_smoothing_factor=0.1))


# ----------------------------------------------------------------------------------------------
# The loss against the model's own
# ----------------------------------------------------------------------------------------------


def _loss_vs_model(model, tmp_path, batch):
    trainer = PSFTTrainer(model=model, args=config(tmp_path, loss_type="sft"))
    model.train()
    ours = trainer.compute_loss(model, batch)
    theirs = model(**batch).loss
    assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-6), (ours.item(), theirs.item())
    if not any(p.kind == p.VAR_KEYWORD for p in inspect.signature(model.forward).parameters.values()):
        return trainer  # this model (in this transformers version) takes no num_items_in_batch
    # num_items_in_batch: the token sum divided by that count, as the model does.
    n = torch.tensor(37)
    ours_n = trainer.compute_loss(model, batch, num_items_in_batch=n)
    theirs_n = model(**batch, num_items_in_batch=n).loss
    assert torch.allclose(ours_n, theirs_n, rtol=1e-5, atol=1e-6), (ours_n.item(), theirs_n.item())
    return trainer


def test_sft_loss_equals_the_models_own_loss(tmp_path):
    _loss_vs_model(llama(), tmp_path, batch_of())


@pytest.mark.parametrize("kind", ["gemma2_softcap", "phi_bias", "cohere_logit_scale", "granite_logits_scaling"])
def test_sft_loss_equals_model_loss_for_other_heads(tmp_path, kind):
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    if kind == "gemma2_softcap":
        # A small cap makes the softcap change the loss a lot: a missed softcap cannot pass.
        cfg = transformers.Gemma2Config(num_key_value_heads=2, head_dim=8, final_logit_softcapping=0.5, **common)
    elif kind == "phi_bias":
        cfg = transformers.PhiConfig(**common)
    elif kind == "cohere_logit_scale":
        cfg = transformers.CohereConfig(num_key_value_heads=2, logit_scale=0.25, **common)
    else:
        cfg = transformers.GraniteConfig(num_key_value_heads=2, logits_scaling=8.0, **common)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    trainer = _loss_vs_model(model, tmp_path, batch_of())
    head = trainer._core.head
    if kind == "phi_bias":
        assert head.weights(model)[1] is not None
    if kind == "gemma2_softcap":
        assert head.softcap == 0.5
    if kind == "cohere_logit_scale":
        assert head.temperature == pytest.approx(4.0, rel=1e-6)
    if kind == "granite_logits_scaling":
        assert head.temperature == pytest.approx(8.0, rel=1e-6)


class ShiftedLogitsLlama(transformers.LlamaForCausalLM):
    """A model whose forward adds something to its logits that the fused head cannot know about."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits + torch.linspace(0, 5, out.logits.shape[-1])
        return out


def test_unsupported_logit_transform_is_an_error_not_a_different_loss(tmp_path):
    torch.manual_seed(0)
    model = ShiftedLogitsLlama(llama().config)
    trainer = PSFTTrainer(model=model, args=config(tmp_path, loss_type="sft"))
    with pytest.raises(ValueError, match="not supported"):
        trainer.compute_loss(model, batch_of())


def test_tied_embeddings_get_the_lm_head_gradient(tmp_path):
    model = llama(tie_word_embeddings=True)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    reference = copy.deepcopy(model)
    batch = batch_of()
    trainer = PSFTTrainer(model=model, args=config(tmp_path, loss_type="sft"))
    model.train()
    trainer.compute_loss(model, batch).backward()
    reference(**batch).loss.backward()
    ours, theirs = model.get_input_embeddings().weight.grad, reference.get_input_embeddings().weight.grad
    assert torch.allclose(ours, theirs, rtol=1e-4, atol=1e-6)


def test_compute_loss_refuses_psft_training_without_pi_old(tmp_path):
    model = llama()
    trainer = PSFTTrainer(model=model, args=config(tmp_path, loss_type="psft"))
    model.train()
    with pytest.raises(RuntimeError, match=OLD_LOGPROBS_KEY):
        trainer.compute_loss(model, batch_of())


# ----------------------------------------------------------------------------------------------
# Optimizer steps: PSFT with K = 1 is SFT; gradient accumulation; gradient checkpointing
# ----------------------------------------------------------------------------------------------


def test_psft_with_refresh_every_step_takes_sfts_steps(tmp_path):
    """r = 1 on every token, so PSFT's gradient is SFT's: same parameters as the stock Trainer."""
    start = llama()
    data = examples()
    stock_model = copy.deepcopy(start)
    stock_args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "stock"), max_steps=4, per_device_train_batch_size=2, gradient_accumulation_steps=2,
        report_to="none", save_strategy="no", disable_tqdm=True, use_cpu=True, optim="sgd", learning_rate=0.5, seed=0)
    transformers.Trainer(model=stock_model, args=stock_args, train_dataset=data, data_collator=collate).train()
    psft = train(copy.deepcopy(start), tmp_path, data, loss_type="psft", old_policy_refresh_steps=1, max_steps=4)
    assert_params_differ(stock_model, start)
    assert_params_close(psft.model, stock_model)
    assert all(h["ratio_mean"] == pytest.approx(1.0, abs=1e-6) and h["clip_fraction"] == 0 for h in step_logs(psft))


@pytest.mark.parametrize("loss_type", ["sft", "psft", "dft"])
def test_gradient_accumulation_4x2_equals_1x8(tmp_path, loss_type):
    start, data = llama(), examples()
    kw = dict(loss_type=loss_type, max_steps=3, old_policy_refresh_steps=2)
    small = train(copy.deepcopy(start), tmp_path, data, per_device_train_batch_size=2, gradient_accumulation_steps=4,
                  **kw)
    big = train(copy.deepcopy(start), tmp_path, data, per_device_train_batch_size=8, gradient_accumulation_steps=1,
                **kw)
    assert_params_differ(big.model, start)
    assert_params_close(small.model, big.model)
    for a, b in zip(step_logs(small), step_logs(big)):
        assert a["tokens"] == b["tokens"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)
        assert a["nll"] == pytest.approx(b["nll"], rel=1e-5)


def test_gradient_checkpointing_gives_the_same_steps(tmp_path):
    start, data = llama(), examples()
    plain = train(copy.deepcopy(start), tmp_path, data, loss_type="psft", old_policy_refresh_steps=2)
    ckpt = train(copy.deepcopy(start), tmp_path, data, loss_type="psft", old_policy_refresh_steps=2,
                 **{CHECKPOINTING: True})
    assert checkpointing_on(ckpt.model)
    assert_params_close(plain.model, ckpt.model)


# ----------------------------------------------------------------------------------------------
# PSFT's pi_old protocol
# ----------------------------------------------------------------------------------------------


def _record_decoder_calls(model):
    calls = []
    model.get_decoder().register_forward_hook(
        lambda m, a, o: calls.append("old" if not torch.is_grad_enabled() else "train"))
    return calls


def test_pi_old_is_scored_once_per_group_before_training_on_it(tmp_path):
    model = llama()
    calls = _record_decoder_calls(model)
    trainer = train(model, tmp_path, loss_type="psft", old_policy_refresh_steps=3, max_steps=7,
                    gradient_accumulation_steps=2, verify_lm_head=False, learning_rate=4.0)
    # Groups of 3, 3 and 1 steps (max_steps ends the last), 2 micro-batches per step: each group is
    # scored in one burst of no-grad forwards, then trained on.
    expected = ["old"] * 6 + ["train"] * 6 + ["old"] * 6 + ["train"] * 6 + ["old"] * 2 + ["train"] * 2
    assert calls == expected
    assert (trainer.old_policy_refreshes, trainer.old_logprob_passes) == (3, 14)
    logs = step_logs(trainer)
    assert [h["step"] for h in logs] == list(range(1, 8))
    for h in logs:
        if (h["step"] - 1) % 3 == 0:  # first step of a group: pi_old is the current policy
            assert h["ratio_mean"] == pytest.approx(1.0, abs=1e-6)
            assert h["clip_fraction"] == 0 and h["approx_kl"] == pytest.approx(0.0, abs=1e-6)
        else:  # later steps: the policy has moved away from pi_old
            assert abs(h["ratio_mean"] - 1.0) > 1e-3
    assert any(h["clip_fraction"] > 0 for h in logs)


def test_sft_warmup_then_psft_groups(tmp_path):
    model = llama()
    calls = _record_decoder_calls(model)
    trainer = train(model, tmp_path, loss_type="psft", old_policy_refresh_steps=2, sft_warmup_steps=2, max_steps=5,
                    verify_lm_head=False)
    assert calls == ["train"] * 4 + ["old"] * 4 + ["train"] * 4 + ["old"] * 2 + ["train"] * 2
    logs = step_logs(trainer)
    for h in logs[:2]:  # SFT: no PSFT metrics, the loss is the NLL
        assert not PSFT_KEYS & h.keys()
        assert h["loss"] == pytest.approx(h["nll"], rel=1e-5)
    assert all(PSFT_KEYS <= h.keys() for h in logs[2:])
    for first_of_group in (logs[2], logs[4]):
        assert first_of_group["ratio_mean"] == pytest.approx(1.0, abs=1e-6)


OLD_LOOP = tuple(int(x) for x in transformers.__version__.split(".")[:2]) < (4, 50)


@pytest.mark.parametrize("n_examples", [
    # 6 micro-batches an epoch: steps of 2, 2, 2 -> groups of 2 and 1 steps per epoch.
    12,
    # 5 micro-batches: steps of 2, 2, 1 (a short last step) -> groups of 2 and 1 steps per epoch.
    pytest.param(10, marks=pytest.mark.skipif(
        OLD_LOOP, reason="transformers < 4.50 carries a short last accumulation into the next epoch")),
])
def test_groups_end_at_the_epoch_boundary(tmp_path, n_examples):
    model = llama()
    calls = _record_decoder_calls(model)
    trainer = train(model, tmp_path, data=examples(n_examples), loss_type="psft", old_policy_refresh_steps=2,
                    max_steps=6, verify_lm_head=False)
    last = 2 if n_examples == 12 else 1  # micro-batches of the epoch's last step
    epoch = ["old"] * 4 + ["train"] * 4 + ["old"] * last + ["train"] * last
    assert calls == epoch * 2
    assert trainer.old_policy_refreshes == 4
    ratios = [h["ratio_mean"] for h in step_logs(trainer)]
    for i in (0, 2, 3, 5):  # first steps of the groups
        assert ratios[i] == pytest.approx(1.0, abs=1e-6)


# ----------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------


def test_metrics_are_token_weighted_over_the_logging_interval(tmp_path):
    start, data = llama(), examples()
    every = step_logs(train(copy.deepcopy(start), tmp_path, data, loss_type="psft", old_policy_refresh_steps=2,
                            max_steps=4, logging_steps=1))
    pairs = step_logs(train(copy.deepcopy(start), tmp_path, data, loss_type="psft", old_policy_refresh_steps=2,
                            max_steps=4, logging_steps=2))
    assert [h["step"] for h in pairs] == [2, 4]
    for logged, (a, b) in zip(pairs, [every[0:2], every[2:4]]):
        assert logged["tokens"] == a["tokens"] + b["tokens"]
        for key in ("nll", "entropy", "ratio_mean", "clip_fraction", "approx_kl"):
            expected = (a[key] * a["tokens"] + b[key] * b["tokens"]) / (a["tokens"] + b["tokens"])
            assert logged[key] == pytest.approx(expected, rel=1e-5, abs=1e-7), key
        assert logged["loss"] == pytest.approx((a["loss"] + b["loss"]) / 2, rel=1e-5)  # HF's: mean over steps


def test_metrics_jsonl_callback(tmp_path):
    path = tmp_path / "m" / "metrics.jsonl"
    train(llama(), tmp_path, loss_type="dft", max_steps=3, callbacks=[MetricsJsonlCallback(str(path))])
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all({"loss", "nll", "entropy", "tokens"} <= r.keys() for r in rows)


def test_evaluation_reports_the_nll(tmp_path):
    model, data = llama(), examples(8, seed=5)
    trainer = PSFTTrainer(model=model, args=config(tmp_path, loss_type="psft", prediction_loss_only=True,
                                                   per_device_eval_batch_size=4), eval_dataset=data,
                          data_collator=collate)
    fused = trainer.evaluate()["eval_loss"]
    model.eval()
    with torch.no_grad():
        expected = sum(model(**collate(data[i:i + 4])).loss.item() for i in (0, 4)) / 2
    assert fused == pytest.approx(expected, rel=1e-5)
    trainer.args.prediction_loss_only = False  # the model's own forward (logits for metrics)
    assert trainer.evaluate()["eval_loss"] == pytest.approx(expected, rel=1e-5)


# ----------------------------------------------------------------------------------------------
# ASFT's reference; PEFT; bf16
# ----------------------------------------------------------------------------------------------


def test_asft_with_a_copy_of_the_model_as_reference(tmp_path):
    model = llama()
    trainer = PSFTTrainer(model=model, args=config(tmp_path, loss_type="asft", max_steps=3, learning_rate=50.0),
                          ref_model=copy.deepcopy(model),
                          train_dataset=examples(), data_collator=collate)
    batch = batch_of()
    model.train()
    asft_loss, stats = trainer.compute_loss_and_stats(model, batch)
    dft_loss, _ = trainer.compute_loss_and_stats(model, batch, loss_type="dft")
    assert stats["kl"].item() == pytest.approx(0.0, abs=1e-6)
    assert asft_loss.item() == pytest.approx(dft_loss.item(), rel=1e-5, abs=1e-7)
    trainer.train()
    kls = [h["kl"] for h in step_logs(trainer)]
    assert kls[0] == pytest.approx(0.0, abs=1e-6) and kls[-1] > 1e-4  # the reference stays put
    assert not trainer.ref_model.training and not any(p.requires_grad for p in trainer.ref_model.parameters())


def _lora(model, **kw):
    peft = pytest.importorskip("peft")
    return peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], **kw))


def _materialized_forward_kl(model, batch):
    """token-mean KL(q || p) over the shifted targets, q = the model with its adapter disabled."""
    with torch.no_grad():
        logp = torch.log_softmax(model(**batch).logits.double(), -1)
        with model.disable_adapter():
            logq = torch.log_softmax(model(**batch).logits.double(), -1)
    kl = (logq.exp() * (logq - logp)).sum(-1)[:, :-1]
    valid = batch["labels"][:, 1:] != -100
    return (kl * valid).sum().item() / valid.sum().item()


def test_asft_peft_reference_is_the_base_model_with_the_adapter_disabled(tmp_path):
    model = _lora(llama())
    model.enable_input_require_grads()  # peft's recipe for checkpointing with a frozen embedding
    base_before = {k: v.clone() for k, v in model.get_base_model().state_dict().items() if "lora_" not in k}
    trainer = train(model, tmp_path, loss_type="asft", max_steps=4, learning_rate=50.0,
                    **{CHECKPOINTING: True})
    assert trainer.ref_model is None
    kls = [h["kl"] for h in step_logs(trainer)]
    assert kls[0] == pytest.approx(0.0, abs=1e-6)  # LoRA starts at B = 0: the adapter changes nothing yet
    after = model.get_base_model().state_dict()
    assert all(torch.equal(v, after[k]) for k, v in base_before.items())  # the base (the reference) is frozen
    batch = batch_of()
    model.eval()
    _, stats = trainer.compute_loss_and_stats(model, batch)
    expected = _materialized_forward_kl(model, batch)
    assert expected > 1e-4
    # A KL of ~1e-4 between near-equal fp32 distributions carries ~1e-7 of cancellation error;
    # a wrong reference (adapter left on: 0; another model: O(1)) is far outside this.
    assert stats["kl"].item() == pytest.approx(expected, rel=5e-3)


def test_peft_lora_psft_trains_only_the_adapter(tmp_path):
    model = _lora(llama())
    lora_before = {k: v.clone() for k, v in model.named_parameters() if v.requires_grad}
    trainer = train(model, tmp_path, loss_type="psft", old_policy_refresh_steps=2, max_steps=3)
    assert trainer.old_policy_refreshes == 2
    assert any(not torch.equal(v, dict(model.named_parameters())[k]) for k, v in lora_before.items())
    assert step_logs(trainer)[0]["ratio_mean"] == pytest.approx(1.0, abs=1e-6)


def test_lora_on_the_lm_head_is_refused(tmp_path):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    with pytest.raises(TypeError, match="tuner layer"):  # at construction, before any step
        PSFTTrainer(model=model, args=config(tmp_path, loss_type="sft"))


def test_bf16_model_trains_and_matches_fp32_nll(tmp_path):
    start, data = llama(), examples()
    fp32 = step_logs(train(copy.deepcopy(start), tmp_path, data, loss_type="psft", old_policy_refresh_steps=2,
                           max_steps=2))
    bf16_model = copy.deepcopy(start).to(torch.bfloat16)
    bf16 = step_logs(train(bf16_model, tmp_path, data, loss_type="psft", old_policy_refresh_steps=2, max_steps=2))
    assert bf16[0]["ratio_mean"] == pytest.approx(1.0, abs=1e-6)  # pi_old pass and training pass agree exactly
    assert bf16[0]["nll"] == pytest.approx(fp32[0]["nll"], rel=2e-2)
    assert all(torch.isfinite(p).all() for p in bf16_model.parameters())
    assert next(bf16_model.parameters()).dtype == torch.bfloat16


@pytest.mark.slow
def test_ddp_two_processes_take_the_steps_of_one_with_the_same_global_batch(tmp_path):
    """2 processes x (batch 2, GA 2) vs 1 process x (batch 2, GA 4): the same 8 sequences per step
    (each process gets every other micro-batch of the same sampler). Checks DDP's gradient sync
    through the hooked forward, num_items_in_batch counted over both processes, pi_old per process."""
    worker = os.path.join(ROOT, "tests", "hf_ddp_worker.py")
    runs = {"ddp": tmp_path / "ddp", "single": tmp_path / "single"}
    runs["ddp"].mkdir()
    torchrun(2, worker, "psft", runs["ddp"], 2, timeout=300)
    runs["single"].mkdir()
    runpy.run_path(worker, run_name="worker")["main"]("psft", str(runs["single"]), 4)
    params = {f"{name}{r}": torch.load(runs[name] / f"params{r}.pt")
              for name, r in (("ddp", 0), ("ddp", 1), ("single", 0))}
    for key in params["single0"]:
        assert torch.equal(params["ddp0"][key], params["ddp1"][key]), key  # the processes stay in sync
        assert torch.allclose(params["ddp0"][key], params["single0"][key], rtol=0, atol=1e-6), key
    logs = {name: json.loads((runs[name] / "logs0.json").read_text()) for name in runs}
    assert (logs["ddp"]["world_size"], logs["single"]["world_size"]) == (2, 1)
    for a, b in zip(logs["ddp"]["logs"], logs["single"]["logs"]):
        assert a["tokens"] == b["tokens"]  # metrics are reduced over the processes
        for key in ("loss", "nll", "ratio_mean", "clip_fraction"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key


# ----------------------------------------------------------------------------------------------
# Import hygiene and the examples
# ----------------------------------------------------------------------------------------------


def test_importing_the_package_does_not_import_transformers():
    code = "import sys, psft_kernels, psft_kernels.integrations; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env=SUBPROCESS_ENV)


@pytest.fixture(scope="module")
def train_hf():
    return runpy.run_path(os.path.join(ROOT, "examples", "train_hf.py"))


@pytest.mark.parametrize("loss", ["sft", "psft", "dft", "asft"])
def test_train_hf_example_writes_metrics(tmp_path, train_hf, loss):
    path = train_hf["main"](["--loss", loss, "--max-steps", "3", "--output-dir", str(tmp_path), "--batch-size", "4",
                             "--refresh-steps", "2", "--no-progress"])
    rows = [json.loads(line) for line in open(path)]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert {"loss", "nll", "entropy", "tokens"} <= r.keys() and r["tokens"] > 0
        assert (PSFT_KEYS <= r.keys()) == (loss == "psft")
        assert ("kl" in r) == (loss == "asft")


def test_train_hf_example_cli_with_lora_and_a_dataset_file(tmp_path, monkeypatch):
    pytest.importorskip("peft")
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"{i} times 2 is", "completion": f" {2 * i}"}) for i in range(40)))
    argv = ["train_hf.py", "--loss", "asft", "--lora", "--max-steps", "2", "--dataset", str(data),
            "--output-dir", str(tmp_path / "run"), "--batch-size", "4"]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(os.path.join(ROOT, "examples", "train_hf.py"), run_name="__main__")
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2] and all("kl" in r for r in rows)


def test_plain_pytorch_example_learns(capsys):
    runpy.run_path(os.path.join(ROOT, "examples", "plain_pytorch.py"), run_name="__main__")
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step")]
    nll = [float(line.split("nll")[1].split()[0]) for line in lines]
    assert len(nll) >= 3 and nll[-1] < 0.5 * nll[0]


# ----------------------------------------------------------------------------------------------
# MoE: the router's auxiliary loss is added as the model's own forward adds it
# ----------------------------------------------------------------------------------------------


def moe(kind, seed=0):
    """Tiny random-init MoE causal LMs whose forward adds router_aux_loss_coef * aux_loss to its loss."""
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=64, output_router_logits=True, router_aux_loss_coef=0.5)
    if kind == "mixtral":
        cfg = transformers.MixtralConfig(intermediate_size=32, num_local_experts=4, num_experts_per_tok=2, **common)
    elif kind == "qwen2_moe":
        cfg = transformers.Qwen2MoeConfig(intermediate_size=32, moe_intermediate_size=16,
                                          shared_expert_intermediate_size=16, num_experts=4, num_experts_per_tok=2,
                                          decoder_sparse_step=1, **common)
    else:
        cfg = transformers.Qwen3MoeConfig(intermediate_size=32, moe_intermediate_size=16, num_experts=4,
                                          num_experts_per_tok=2, decoder_sparse_step=1, head_dim=8, **common)
    return transformers.AutoModelForCausalLM.from_config(cfg)


MOE_KINDS = ["mixtral", "qwen2_moe", "qwen3_moe"]


@pytest.mark.parametrize("kind", MOE_KINDS)
@pytest.mark.parametrize("loss_type", ["sft", "dft", "psft", "asft"])
def test_moe_router_loss_is_added_as_the_model_adds_it(tmp_path, kind, loss_type):
    model, batch = moe(kind), batch_of()
    ref = moe(kind, seed=1) if loss_type == "asft" else None
    trainer = PSFTTrainer(model=model, args=config(tmp_path, loss_type=loss_type), ref_model=ref)
    model.train()
    own = model(**batch)
    assert own.aux_loss is not None and own.aux_loss.item() > 0
    n = torch.tensor(29)
    with_aux, stats = trainer.compute_loss_and_stats(model, batch, num_items_in_batch=n)
    model.config.output_router_logits = False
    without, _ = trainer.compute_loss_and_stats(model, batch, num_items_in_batch=n)
    # The router loss is not divided by num_items_in_batch: the model's forward adds it per micro-batch.
    assert (with_aux - without).item() == pytest.approx(0.5 * own.aux_loss.item(), rel=1e-5, abs=1e-6)
    assert stats["aux_loss"].item() == pytest.approx(own.aux_loss.item(), rel=1e-6)


@pytest.mark.parametrize("kind", MOE_KINDS)
@pytest.mark.parametrize("grad_accum", [1, 2])
def test_moe_training_equals_the_stock_trainer(tmp_path, kind, grad_accum):
    """Step losses and final weights of plain Trainer on the model's own loss (CE + coef * aux)."""
    start, data = moe(kind), examples()
    stock_model = copy.deepcopy(start)
    stock_args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "stock"), max_steps=3, per_device_train_batch_size=2,
        gradient_accumulation_steps=grad_accum, logging_steps=1, report_to="none", save_strategy="no",
        disable_tqdm=True, use_cpu=True, optim="sgd", learning_rate=0.5, seed=0)
    stock = transformers.Trainer(model=stock_model, args=stock_args, train_dataset=data, data_collator=collate)
    stock.train()
    # PSFT with pi_old refreshed every step has ratio 1 and SFT's gradient: the same weights as well.
    for loss_type, refresh in (("sft", 1), ("psft", 1)):
        ours = train(copy.deepcopy(start), tmp_path, data, loss_type=loss_type, old_policy_refresh_steps=refresh,
                     gradient_accumulation_steps=grad_accum)
        assert_params_differ(stock_model, start)
        assert_params_close(ours.model, stock_model)
        if loss_type == "sft":
            theirs = [h["loss"] for h in stock.state.log_history if "loss" in h]
            mine = [h["loss"] for h in step_logs(ours)]
            assert mine == pytest.approx(theirs, rel=1e-5), (mine, theirs)
