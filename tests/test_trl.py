"""FusedSFTTrainer / FusedSFTConfig (TRL integration) against TRL's own SFTTrainer, on tiny CPU models.

SFT and DFT through the fused trainer must take TRL's own optimizer steps (loss_type "nll" / "dft")
on the same random-init model and data, through TRL's data handling (chat template with
assistant-only loss, packing, padding-free batches); TRL's metrics must be TRL's numbers.
"""

from __future__ import annotations

import copy
import json
import os
import runpy
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from psft_kernels import chunked  # noqa: E402
from psft_kernels.integrations.hf import PSFTConfig, PSFTTrainer  # noqa: E402
from psft_kernels.integrations.trl import FusedSFTConfig, FusedSFTTrainer, target_is_top1  # noqa: E402
from test_hf import assert_params_close, assert_params_differ, torchrun  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = runpy.run_path(os.path.join(ROOT, "examples", "train_trl.py"))
PSFT_KEYS = {"clip_fraction", "clip_fraction_high", "clip_fraction_low", "ratio_mean", "approx_kl"}
TRL_KEYS = {"entropy", "mean_token_accuracy", "num_tokens"}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: a second thread only waits on the first (see test_hf.py)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tokenizer():
    return EXAMPLE["build_tokenizer"]()


def start_model(tokenizer, seed=0):
    return EXAMPLE["build_model"](len(tokenizer), seed, hidden_size=32)


def dataset(kind="conversational", n=32, seed=1):
    return datasets.Dataset.from_list(EXAMPLE["additions"](n, seed, kind))


COMMON = dict(max_steps=3, per_device_train_batch_size=2, gradient_accumulation_steps=2, logging_steps=1,
              report_to="none", save_strategy="no", disable_tqdm=True, use_cpu=True, optim="sgd", learning_rate=0.5,
              seed=0, bf16=False, gradient_checkpointing=False, max_length=64)


def run(trainer_cls, config_cls, model, tokenizer, data, tmp_path, name, **kw):
    options = {**COMMON, **kw}
    ref_model = options.pop("ref_model", None)
    peft_config = options.pop("peft_config", None)
    extra = {} if ref_model is None else {"ref_model": ref_model}
    trainer = trainer_cls(model=model, args=config_cls(output_dir=str(tmp_path / name), **options),
                          train_dataset=data, processing_class=tokenizer, peft_config=peft_config, **extra)
    trainer.train()
    return trainer


def fused(model, tokenizer, data, tmp_path, **kw):
    return run(FusedSFTTrainer, FusedSFTConfig, model, tokenizer, data, tmp_path, "fused", **kw)


def stock(model, tokenizer, data, tmp_path, **kw):
    return run(trl.SFTTrainer, trl.SFTConfig, model, tokenizer, data, tmp_path, "stock", **kw)


def step_logs(trainer):
    return [h for h in trainer.state.log_history if "loss" in h and "train_loss" not in h]


def assert_same_steps(ours, theirs, start):
    assert_params_differ(theirs.model, start)
    assert_params_close(ours.model, theirs.model)
    mine, trls = step_logs(ours), step_logs(theirs)
    assert len(mine) == len(trls) == 3
    for a, b in zip(mine, trls):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)
        assert a["entropy"] == pytest.approx(b["entropy"], rel=1e-5)
        # TRL divides in float32; one token more or less would move it by 1/14 or so
        assert a["mean_token_accuracy"] == pytest.approx(b["mean_token_accuracy"], abs=1e-6)
        assert a["num_tokens"] == b["num_tokens"]


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------


def test_config_keeps_trl_defaults_and_adds_the_loss_options(tmp_path):
    c = FusedSFTConfig(output_dir=str(tmp_path), use_cpu=True)
    s = trl.SFTConfig(output_dir=str(tmp_path), use_cpu=True)
    for name in ("learning_rate", "logging_steps", "gradient_checkpointing", "bf16", "max_length", "packing"):
        assert getattr(c, name) == getattr(s, name), name  # PSFTConfig's TrainingArguments defaults do not leak in
    assert (c.loss_type, c.eps_low, c.eps_high, c.old_policy_refresh_steps, c.kl_coef, c.token_accuracy) == (
        "psft", 0.2, 0.28, 8, 0.05, True)
    assert isinstance(c, PSFTConfig) and isinstance(c, trl.SFTConfig)
    assert FusedSFTConfig(output_dir=str(tmp_path), use_cpu=True, loss_type="nll").loss_type == "sft"


@pytest.mark.parametrize("field, value, error", [
    ("loss_type", "chunked_ce", ValueError),
    ("eps_low", -0.1, ValueError),
    ("old_policy_refresh_steps", 0, ValueError),
    ("kl_direction", "backward", ValueError),
    ("token_accuracy", "yes", TypeError),
])
def test_config_rejects_bad_values_naming_the_field(tmp_path, field, value, error):
    with pytest.raises(error, match=field):
        FusedSFTConfig(output_dir=str(tmp_path), use_cpu=True, **{field: value})


def test_trainer_rejects_bad_setups(tmp_path, tokenizer):
    model, data = start_model(tokenizer), dataset()
    with pytest.raises(TypeError, match="FusedSFTConfig"):
        FusedSFTTrainer(model=model, args=trl.SFTConfig(output_dir=str(tmp_path), use_cpu=True), train_dataset=data,
                        processing_class=tokenizer)
    args = FusedSFTConfig(output_dir=str(tmp_path), use_cpu=True, loss_type="asft")
    with pytest.raises(ValueError, match="reference model"):
        FusedSFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    assert args.loss_type == "asft"  # shown to SFTTrainer as "nll" during its __init__ only
    with pytest.raises(ValueError, match="compute_loss_func"):
        FusedSFTTrainer(model=model, args=FusedSFTConfig(output_dir=str(tmp_path), use_cpu=True, loss_type="sft"),
                        train_dataset=data, processing_class=tokenizer, compute_loss_func=lambda *a, **k: 0)


# ----------------------------------------------------------------------------------------------
# SFT and DFT take TRL's own steps
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["assistant_only", "packing", "padding_free"])
def test_sft_takes_trls_own_nll_steps(tmp_path, tokenizer, case):
    kw = {"assistant_only": dict(assistant_only_loss=True),
          "packing": dict(assistant_only_loss=True, packing=True, max_length=48),
          "padding_free": dict(padding_free=True, max_length=None)}[case]
    data, start = dataset("conversational" if case != "padding_free" else "prompt-completion"), start_model(tokenizer)
    theirs = stock(copy.deepcopy(start), tokenizer, data, tmp_path, loss_type="nll", **kw)
    ours = fused(copy.deepcopy(start), tokenizer, data, tmp_path, loss_type="sft", **kw)
    prepared = ours.train_dataset
    if case == "assistant_only":  # the user's turn is masked: fewer targets than tokens
        row = prepared[0]
        assert -100 in row["labels"] and any(t != -100 for t in row["labels"])
    if case == "packing":  # several conversations per row, kept apart by position_ids
        assert "seq_lengths" in prepared.column_names and len(prepared[0]["seq_lengths"]) > 1
    batch = next(iter(ours.get_train_dataloader()))
    assert ("position_ids" in batch) == (case != "assistant_only")
    assert_same_steps(ours, theirs, start)


def test_dft_takes_trls_own_dft_steps(tmp_path, tokenizer):
    data, start = dataset(), start_model(tokenizer)
    theirs = stock(copy.deepcopy(start), tokenizer, data, tmp_path, loss_type="dft", assistant_only_loss=True)
    ours = fused(copy.deepcopy(start), tokenizer, data, tmp_path, loss_type="dft", assistant_only_loss=True)
    assert_same_steps(ours, theirs, start)


def test_token_accuracy_off_omits_the_metric(tmp_path, tokenizer):
    trainer = fused(start_model(tokenizer), tokenizer, dataset(), tmp_path, loss_type="sft", token_accuracy=False,
                    max_steps=1)
    (log,) = step_logs(trainer)
    assert "mean_token_accuracy" not in log and {"entropy", "num_tokens", "nll"} <= log.keys()


def test_target_is_top1_against_argmax_of_the_logits():
    g = torch.Generator().manual_seed(0)
    hidden, weight, bias = torch.randn(3, 50, 8, generator=g), torch.randn(37, 8, generator=g), torch.randn(37)
    logits = torch.tanh((hidden @ weight.T + bias) / 2.0) * 2.0
    targets = logits.argmax(-1)
    targets[0, :25] = torch.randint(0, 37, (25,), generator=g)  # some right by chance, most wrong
    targets[1, ::3] = -100
    expected = (logits.argmax(-1) == targets) & (targets != -100)
    old = chunked.CHUNK_ELEMENTS
    try:
        chunked.CHUNK_ELEMENTS = 7 * 37  # chunks of 7 rows
        got = target_is_top1(hidden, weight, bias, targets, softcap=2.0)
    finally:
        chunked.CHUNK_ELEMENTS = old
    assert torch.equal(got, expected) and 0 < expected.sum() < expected.numel()


# ----------------------------------------------------------------------------------------------
# PSFT, ASFT, LoRA
# ----------------------------------------------------------------------------------------------


def test_psft_groups_and_metrics(tmp_path, tokenizer):
    trainer = fused(start_model(tokenizer), tokenizer, dataset(), tmp_path, loss_type="psft",
                    old_policy_refresh_steps=2, max_steps=4, assistant_only_loss=True)
    logs = step_logs(trainer)
    assert trainer.old_policy_refreshes == 2 and trainer.old_logprob_passes == 8
    assert all((PSFT_KEYS | TRL_KEYS | {"nll", "tokens"}) <= h.keys() for h in logs)
    for first in (logs[0], logs[2]):  # first step of a group: pi_old is the current policy
        assert first["ratio_mean"] == pytest.approx(1.0, abs=1e-6) and first["clip_fraction"] == 0
        assert first["loss"] == pytest.approx(-1.0, abs=1e-6)
    assert abs(logs[1]["ratio_mean"] - 1.0) > 1e-3
    assert [h["num_tokens"] for h in logs] == sorted(h["num_tokens"] for h in logs)


def test_asft_with_a_reference_copy(tmp_path, tokenizer):
    start = start_model(tokenizer)
    trainer = fused(copy.deepcopy(start), tokenizer, dataset(), tmp_path, loss_type="asft", ref_model=start,
                    assistant_only_loss=True, learning_rate=5.0)
    kls = [h["kl"] for h in step_logs(trainer)]
    assert kls[0] == pytest.approx(0.0, abs=1e-6) and kls[-1] > 1e-4
    assert all(TRL_KEYS <= h.keys() for h in step_logs(trainer))


@pytest.mark.parametrize("loss_type", ["psft", "asft"])
def test_lora_through_peft_config_trains_only_the_adapter(tmp_path, tokenizer, loss_type):
    peft = pytest.importorskip("peft")
    model = start_model(tokenizer)
    base_before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = fused(model, tokenizer, dataset(), tmp_path, loss_type=loss_type, old_policy_refresh_steps=2,
                    learning_rate=5.0, assistant_only_loss=True,
                    peft_config=peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    assert isinstance(trainer.model, peft.PeftModel) and trainer.ref_model is None
    lora = {k: v for k, v in trainer.model.named_parameters() if "lora_B" in k}
    assert lora and any(v.abs().max() > 0 for v in lora.values())  # LoRA's B starts at 0: it has moved
    base_after = trainer.model.get_base_model().state_dict()
    assert all(torch.equal(v, base_after[k]) for k, v in base_before.items() if k in base_after)
    logs = step_logs(trainer)
    if loss_type == "asft":  # the reference is the base model with the adapter disabled
        assert logs[0]["kl"] == pytest.approx(0.0, abs=1e-6) and logs[-1]["kl"] > 0
    else:
        assert logs[0]["ratio_mean"] == pytest.approx(1.0, abs=1e-6)


# ----------------------------------------------------------------------------------------------
# No (B, T, V) tensor
# ----------------------------------------------------------------------------------------------


class LargestLogitBlock(TorchDispatchMode):
    """Rows of the largest tensor whose last dimension is the vocabulary, other than the head's weight
    (V, D) and its transposed views (D, V)."""

    def __init__(self, vocab: int, hidden: int):
        super().__init__()
        self.vocab, self.hidden, self.rows = vocab, hidden, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] == self.vocab:
                rows = t.numel() // self.vocab
                weight_view = tuple(t.shape) == (self.vocab, self.hidden) or (
                    tuple(t.shape) == (self.hidden, self.vocab) and func.__name__.split(".")[0] in ("t", "permute",
                                                                                                    "transpose"))
                if not weight_view:
                    self.rows = max(self.rows, rows)
        return out


def test_no_batch_by_vocab_tensor_in_training(tmp_path, tokenizer, monkeypatch):
    """PSFT (pi_old pass, loss, token accuracy) on text rows, every token a target: at most one chunk of logits.

    The head probe is left out: it compares the model's own logits for one row of up to 32 tokens
    (once per model) with the head's."""
    monkeypatch.setattr(chunked, "CHUNK_ELEMENTS", 4 * len(tokenizer))  # chunks of 4 rows
    model, data = start_model(tokenizer), dataset("text")
    batch_rows = 2 * min(len(tokenizer(r["text"])["input_ids"]) for r in data)  # B x T of the smallest batch
    probe = LargestLogitBlock(len(tokenizer), model.config.hidden_size)
    with probe:
        fused(model, tokenizer, data, tmp_path, loss_type="psft", old_policy_refresh_steps=2, max_steps=2,
              loss_backend="chunked", verify_lm_head=False)
    assert 1 <= probe.rows <= 4 < batch_rows, probe.rows
    control = LargestLogitBlock(len(tokenizer), model.config.hidden_size)
    batch = tokenizer([data[0]["text"], data[1]["text"]], return_tensors="pt", padding=True)
    with control:  # the model's own loss materializes (B, T, V): the probe sees it
        model(**batch, labels=batch["input_ids"])
    assert control.rows >= batch["input_ids"].numel()


# ----------------------------------------------------------------------------------------------
# PSFTTrainer on TRL's prepared data (issue 14, item 4)
# ----------------------------------------------------------------------------------------------


def test_psft_trainer_keeps_packings_columns(tmp_path, tokenizer):
    data, start = dataset(), start_model(tokenizer)
    kw = dict(assistant_only_loss=True, packing=True, max_length=48)
    theirs = stock(copy.deepcopy(start), tokenizer, data, tmp_path, loss_type="nll", **kw)
    packed = theirs.train_dataset
    assert "seq_lengths" in packed.column_names
    collator = trl.trainer.sft_trainer.DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id,
                                                                       padding_free=True)
    args = PSFTConfig(loss_type="sft", output_dir=str(tmp_path / "psft"),
                      **{k: v for k, v in COMMON.items() if k not in ("gradient_checkpointing", "max_length")})
    assert args.remove_unused_columns  # the default that used to drop seq_lengths
    ours = PSFTTrainer(model=copy.deepcopy(start), args=args, train_dataset=packed, data_collator=collator)
    ours.train()
    assert_params_close(ours.model, theirs.model)
    # A collator that leaves seq_lengths in the batch (packed documents would attend to each other): refused.
    plain = PSFTTrainer(model=copy.deepcopy(start), args=args, train_dataset=packed,
                        data_collator=lambda rows: {**collator(rows), "seq_lengths": torch.tensor([0])})
    with pytest.raises(ValueError, match="seq_lengths"):
        plain.train()


# ----------------------------------------------------------------------------------------------
# The example
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss, flags", [
    ("sft", []), ("psft", ["--packing"]), ("dft", ["--format", "prompt-completion"]), ("asft", ["--lora"]),
])
def test_train_trl_example_writes_metrics(tmp_path, loss, flags):
    path = EXAMPLE["main"](["--loss", loss, "--max-steps", "2", "--output-dir", str(tmp_path), "--batch-size", "4",
                            "--refresh-steps", "2", "--no-progress", "--examples", "64", *flags])
    rows = [json.loads(line) for line in open(path)]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert ({"loss", "nll", "tokens"} | TRL_KEYS) <= r.keys() and r["tokens"] > 0
        assert (PSFT_KEYS <= r.keys()) == (loss == "psft")
        assert ("kl" in r) == (loss == "asft")


def test_evaluation_reports_trls_eval_metrics(tmp_path, tokenizer):
    start, train_data, eval_data = start_model(tokenizer), dataset(), dataset(n=8, seed=7)
    kw = dict(assistant_only_loss=True, max_steps=1, prediction_loss_only=True, per_device_eval_batch_size=4)
    trainers = {}
    for name, (cls, config_cls, loss) in {"stock": (trl.SFTTrainer, trl.SFTConfig, "nll"),
                                          "fused": (FusedSFTTrainer, FusedSFTConfig, "psft")}.items():
        trainers[name] = cls(model=copy.deepcopy(start), processing_class=tokenizer, train_dataset=train_data,
                             eval_dataset=eval_data,
                             args=config_cls(output_dir=str(tmp_path / name), loss_type=loss, **{**COMMON, **kw}))
    theirs, ours = trainers["stock"].evaluate(), trainers["fused"].evaluate()
    assert ours["eval_loss"] == pytest.approx(theirs["eval_loss"], rel=1e-5)  # the NLL, whatever loss_type says
    assert ours["eval_entropy"] == pytest.approx(theirs["eval_entropy"], rel=1e-5)
    assert ours["eval_mean_token_accuracy"] == pytest.approx(theirs["eval_mean_token_accuracy"], abs=1e-6)


def test_model_given_by_path_is_loaded_by_trl_and_prepared(tmp_path, tokenizer):
    start, data = start_model(tokenizer), dataset()
    start.save_pretrained(tmp_path / "model")
    theirs = stock(copy.deepcopy(start), tokenizer, data, tmp_path, loss_type="nll", max_steps=1)
    ours = fused(str(tmp_path / "model"), tokenizer, data, tmp_path, loss_type="sft", max_steps=1,
                 model_init_kwargs={"dtype": torch.float32})
    assert ours._core.head.verified  # the model TRL loaded is the one the fused loss runs on
    assert step_logs(ours)[0]["loss"] == pytest.approx(step_logs(theirs)[0]["loss"], rel=1e-5)


# ----------------------------------------------------------------------------------------------
# DDP: 2 gloo processes take the steps of one process with the same global batch
# ----------------------------------------------------------------------------------------------


def ddp_worker(out_dir: str, grad_accum: int) -> None:
    """Run under torchrun (this file as a script) or in-process: PSFT through TRL's data handling."""
    tok = EXAMPLE["build_tokenizer"]()
    distributed = {"ddp_backend": "gloo", "average_tokens_across_devices": True} if "WORLD_SIZE" in os.environ else {}
    trainer = fused(start_model(tok), tok, dataset(), Path(out_dir), loss_type="psft", old_policy_refresh_steps=2,
                    gradient_accumulation_steps=grad_accum, assistant_only_loss=True, **distributed)
    rank = int(os.environ.get("RANK", 0))
    params = {k: v.detach() for k, v in trainer.model.state_dict().items()}
    torch.save(params, os.path.join(out_dir, f"params{rank}.pt"))
    with open(os.path.join(out_dir, f"logs{rank}.json"), "w") as f:
        json.dump({"world_size": trainer.args.world_size, "engine": trainer.engine, "logs": step_logs(trainer)}, f)


@pytest.mark.slow
def test_ddp_two_processes_take_the_steps_of_one(tmp_path):
    """2 processes x (batch 2, GA 2) vs 1 process x (batch 2, GA 4): the same 8 conversations per step."""
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    ddp.mkdir(), single.mkdir()
    torchrun(2, os.path.abspath(__file__), ddp, 2, timeout=300)
    ddp_worker(str(single), 4)
    p0, p1, p = (torch.load(d / f"params{r}.pt") for d, r in ((ddp, 0), (ddp, 1), (single, 0)))
    for key in p:
        assert torch.equal(p0[key], p1[key]), key  # the processes stay in sync
        assert torch.allclose(p0[key], p[key], rtol=0, atol=1e-6), key
    logs = {name: json.loads((d / "logs0.json").read_text()) for name, d in (("ddp", ddp), ("single", single))}
    assert (logs["ddp"]["world_size"], logs["ddp"]["engine"], logs["single"]["world_size"]) == (2, "ddp", 1)
    for a, b in zip(logs["ddp"]["logs"], logs["single"]["logs"]):
        assert (a["tokens"], a["num_tokens"]) == (b["tokens"], b["num_tokens"])  # reduced over the processes
        for key in ("nll", "ratio_mean", "clip_fraction"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key


if __name__ == "__main__":
    torch.set_num_threads(1)
    ddp_worker(sys.argv[1], int(sys.argv[2]))
