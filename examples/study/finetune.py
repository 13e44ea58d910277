"""One fine-tuning run (method x learning rate x seed) through ``PSFTTrainer``, with its evaluations."""

from __future__ import annotations

import math
import os
import tempfile
import time
from typing import Dict, List

import torch

from .base import load_base
from .config import StudyConfig
from .evaluate import accuracy, answer_entropy, collate, encode_problem, ood_loss
from .task import eval_problems, train_problems
from .tokenizer import TextCodec

# What each study method is in PSFTConfig terms (the warm-up length is set per run: whole epochs).
_LOSS_TYPE = {"sft": "sft", "psft": "psft", "psft_warmup": "psft", "dft": "dft", "asft": "asft"}
_LOGGED = ("loss", "nll", "entropy", "clip_fraction", "clip_fraction_high", "clip_fraction_low", "ratio_mean",
           "approx_kl", "kl", "tokens", "learning_rate", "grad_norm")


def steps_per_epoch(cfg: StudyConfig) -> int:
    return math.ceil(cfg.task.train_problems / cfg.finetune.batch_size)


def eval_steps(cfg: StudyConfig) -> List[int]:
    per_epoch = steps_per_epoch(cfg)
    total = per_epoch * cfg.finetune.epochs
    every = max(1, round(cfg.finetune.eval_every_epochs * per_epoch))
    return sorted(set([0] + list(range(every, total + 1, every)) + [total]))


class _Probe:
    """Everything a run evaluates, prepared once per run."""

    def __init__(self, cfg: StudyConfig, codec: TextCodec, heldout: torch.Tensor, train):
        self.cfg, self.codec, self.heldout = cfg, codec, heldout
        self.eval_set = eval_problems(cfg.task)
        self.train_probe = train[: cfg.task.entropy_probe]
        self.heldout_probe = self.eval_set[: cfg.task.entropy_probe]

    def __call__(self, model, step: int, epoch: float) -> Dict[str, float]:
        was_training = model.training
        model.eval()
        try:
            acc, texts = accuracy(model, self.codec, self.eval_set, self.cfg.finetune.max_new_tokens)
            return {
                "step": step, "epoch": epoch, "accuracy": acc,
                "ood_loss": ood_loss(model, self.heldout, self.cfg.loss_backend),
                "entropy_train_probe": answer_entropy(model, self.codec, self.train_probe, self.cfg.loss_backend),
                "entropy_heldout_probe": answer_entropy(model, self.codec, self.heldout_probe, self.cfg.loss_backend),
                "sample": texts[0],
            }
        finally:
            model.train(was_training)


def run_one(job: dict) -> dict:
    """Train one (method, lr, seed) and return its logs and evaluations (plain JSON-able data)."""
    from transformers import PrinterCallback, TrainerCallback
    from transformers.utils import logging as hf_logging

    from psft_kernels.integrations.hf import PSFTConfig, PSFTTrainer

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(job["threads"])
    cfg: StudyConfig = job["config"]
    method, lr, seed = job["method"], job["lr"], job["seed"]
    ft = cfg.finetune
    t0 = time.perf_counter()

    codec = TextCodec.load(os.path.join(job["base_path"], "tokenizer.json"))
    heldout = torch.load(os.path.join(job["base_path"], "heldout_windows.pt"))
    train = train_problems(cfg.task, seed)
    dataset = [encode_problem(codec, p) for p in train]
    probe = _Probe(cfg, codec, heldout, train)
    per_epoch = steps_per_epoch(cfg)
    at = set(eval_steps(cfg))

    torch.manual_seed(seed)
    model = load_base(job["base_path"])
    model.train()
    ref = load_base(job["base_path"]) if method == "asft" else None  # the frozen base model

    history: List[dict] = []  # one row per logged optimizer step
    evals: List[dict] = []

    class Recorder(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            evals.append(probe(model, 0, 0.0))

        def on_step_end(self, args, state, control, model=None, **kw):
            if state.global_step in at and state.global_step > 0:
                evals.append(probe(model, state.global_step, state.global_step / per_epoch))

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                row = {"step": state.global_step}
                row.update({k: float(logs[k]) for k in _LOGGED if k in logs})
                history.append(row)

    with tempfile.TemporaryDirectory(prefix="psft-study-") as out_dir:
        args = PSFTConfig(
            output_dir=out_dir, loss_type=_LOSS_TYPE[method], learning_rate=lr, seed=seed, data_seed=seed,
            per_device_train_batch_size=ft.batch_size, num_train_epochs=ft.epochs,
            lr_scheduler_type="constant_with_warmup", warmup_steps=ft.warmup_steps, weight_decay=ft.weight_decay,
            max_grad_norm=ft.max_grad_norm,
            old_policy_refresh_steps=ft.psft_k, eps_low=ft.psft_eps_low, eps_high=ft.psft_eps_high,
            sft_warmup_steps=ft.psft_warmup_epochs * per_epoch if method == "psft_warmup" else 0,
            kl_coef=ft.asft_kl_coef, loss_backend=cfg.loss_backend,
            logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, use_cpu=True,
            dataloader_pin_memory=False,
        )
        trainer = PSFTTrainer(model=model, args=args, train_dataset=dataset,
                              data_collator=lambda f: collate(f, codec.pad_id), ref_model=ref,
                              callbacks=[Recorder()])
        trainer.remove_callback(PrinterCallback)
        trainer.train()
    return {"method": method, "lr": lr, "seed": seed, "logs": history, "evals": evals,
            "steps": trainer.state.global_step, "steps_per_epoch": per_epoch,
            "old_policy_refreshes": trainer.old_policy_refreshes, "seconds": time.perf_counter() - t0}
