"""Hugging Face ``Trainer`` integration: PSFT, DFT, ASFT and SFT on the fused lm-head.

    from psft_kernels.integrations.hf import PSFTConfig, PSFTTrainer

    args = PSFTConfig(output_dir="out", loss_type="psft", old_policy_refresh_steps=8, learning_rate=1e-6)
    trainer = PSFTTrainer(model=model, args=args, train_dataset=train, data_collator=collator)
    trainer.train()

What the trainer does beyond ``transformers.Trainer`` (docs/method.md, "Training protocol"):

* The loss is computed by the fused kernels of :mod:`psft_kernels` inside the model's own call of
  its lm-head, from the hidden states the model hands it and the head's weight (``_fused.py``);
  the head returns a ``(B, T, 1)`` placeholder, so the ``(B, T, V)`` logits never exist. Labels are
  shifted as Hugging Face does (position t predicts ``labels[t + 1]``; ``-100`` is masked); the
  loss is the token sum divided by ``num_items_in_batch``, the target count of the whole
  accumulated batch, so ``n`` micro-batches of ``b`` make exactly the update of one batch of ``n * b``.
* PSFT's pi_old: at the start of every group of ``old_policy_refresh_steps`` (K) optimizer steps
  the trainer fetches the group's ``K x gradient_accumulation_steps`` micro-batches, computes
  their per-token log-probs under the current model once (eval mode, no gradient, the fused
  forward-only pass), then trains on them. pi_old is the policy itself, scored without dropout:
  the first step of a group has ratio 1 everywhere (an SFT step) for a model without dropout;
  with dropout, training runs in train mode and that step's ratios are the dropout noise
  around 1 (GPT-2's first PSFT loss is about -0.996, not -1). Set the model's dropout to 0 for
  the exact protocol. A group ends early at the end of an epoch or at ``max_steps``, and a
  run resumed from a checkpoint starts a new group.
* ``sft_warmup_steps``: the first optimizer steps use SFT, whatever ``loss_type`` says.
* ASFT's reference: ``ref_model`` (frozen, eval mode, no gradient), or for a peft model without
  one, the same model with its adapter disabled.
* MoE models (Mixtral, Qwen2-MoE, Qwen3-MoE, ...) with ``output_router_logits``: the router's
  ``aux_loss`` is added to every loss type exactly as the model's forward adds it to its own
  loss: ``router_aux_loss_coef * aux_loss`` per micro-batch (not divided by the token count;
  under gradient accumulation and across processes it is scaled as ``Trainer`` scales the
  model's loss), and logged as ``aux_loss``.
* Distributed: the loss, the pi_old pass, the reference pass and the head probe run inside the
  lm-head's module call (``_fused.py``), so DDP, FSDP1, FSDP2 and DeepSpeed ZeRO-0..3 work as
  configured through ``TrainingArguments`` (docs/distributed.md). Each process's logged ``loss``
  is its own micro-batches' share of the global token mean times the number of processes.
* Metrics, logged at every logging step beside Hugging Face's ``loss``: ``nll`` and ``entropy``
  (token means), ``tokens`` (target tokens since the last log), and for PSFT ``clip_fraction``
  (``_high``, ``_low``), ``ratio_mean``, ``approx_kl`` (mean of old - new log-prob), for ASFT
  ``kl``: all token-weighted over the steps since the last log. Note that PSFT's loss is the
  clipped surrogate (about -1 per token), so ``nll`` is the number to compare with SFT's loss.
* Evaluation reports the token-mean NLL (cross-entropy), whatever ``loss_type`` says, through the
  fused head when ``prediction_loss_only=True``; otherwise through the model's own forward.

Tested on CPU with transformers 4.46, 5.17 and 5.23: fp32 and bf16 models, autocast,
gradient checkpointing, peft LoRA; with transformers 5.23, 2 gloo processes under DDP, FSDP1,
FSDP2 and DeepSpeed ZeRO-2/3. Not supported (refused before the first step): DataParallel
(``n_gpu > 1``; launch with ``torchrun``), tensor / context / sequence parallelism, parameter
offload under FSDP1 or DeepSpeed, label smoothing, ``compute_loss_func``, prompt-learning peft
adapters, a peft tuner on the lm-head.
"""

from __future__ import annotations

import json
import numbers
import os
from collections import deque
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor, nn
from transformers import Trainer, TrainerCallback, TrainingArguments

from .. import _validation as V
from .. import backends
from . import _engines
from ._core import FSDP1_PEFT_REFERENCE, LOSS_TYPES, OLD_LOGPROBS_KEY, FusedLossCore
from ._lm_head import IGNORE_INDEX, is_peft_model, shifted_targets

__all__ = ["PSFTConfig", "PSFTTrainer", "MetricsJsonlCallback", "LOSS_TYPES", "OLD_LOGPROBS_KEY"]


# Dataset columns that a collator turns into the attention structure (TRL's packing: seq_lengths ->
# position_ids; padding-free batches: position_ids, cu_seq_lens_*). They are not in the model's forward
# signature, and dropping them (remove_unused_columns) silently lets packed documents attend to each other.
COLLATOR_COLUMNS = ("seq_lengths", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int; got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {value}")
    return int(value)


@dataclass
class PSFTConfig(TrainingArguments):
    """``TrainingArguments`` plus the loss options. The official PSFT recipe (docs/method.md): lr 1e-6,
    10 warm-up steps, weight decay 0.1, grad clip 1.0, eps 0.2 / 0.28, K = 8."""

    loss_type: str = field(default="psft", metadata={"help": "One of 'psft', 'sft', 'dft', 'asft'."})
    eps_low: float = field(default=0.2, metadata={"help": "PSFT: lower clip range (ratio >= 1 - eps_low)."})
    eps_high: float = field(default=0.28, metadata={"help": "PSFT: upper clip range (ratio <= 1 + eps_high)."})
    entropy_coef: float = field(default=0.0, metadata={"help": "Entropy bonus: loss -= entropy_coef * H."})
    old_policy_refresh_steps: int = field(
        default=8, metadata={"help": "PSFT: K, the optimizer steps between two refreshes of pi_old."})
    sft_warmup_steps: int = field(default=0, metadata={"help": "Optimizer steps of plain SFT before loss_type."})
    kl_coef: float = field(default=0.05, metadata={"help": "ASFT: weight of the KL to the reference model."})
    kl_direction: str = field(
        default="forward", metadata={"help": "ASFT: 'forward' = KL(ref || model) (official code), 'reverse'."})
    loss_backend: str = field(
        default="auto", metadata={"help": "psft_kernels backend: 'auto', 'chunked', 'triton', 'native', 'reference'."})
    verify_lm_head: bool = field(
        default=True, metadata={"help": "Check once that hidden @ lm_head reproduces the model's own logits."})

    def __post_init__(self):
        V.check_choice("loss_type", self.loss_type, LOSS_TYPES)
        self.eps_low = V.check_nonnegative("eps_low", self.eps_low)
        self.eps_high = V.check_nonnegative("eps_high", self.eps_high)
        self.entropy_coef = V.check_real("entropy_coef", self.entropy_coef)
        self.old_policy_refresh_steps = _check_int("old_policy_refresh_steps", self.old_policy_refresh_steps, 1)
        self.sft_warmup_steps = _check_int("sft_warmup_steps", self.sft_warmup_steps, 0)
        self.kl_coef = V.check_nonnegative("kl_coef", self.kl_coef)
        V.check_choice("kl_direction", self.kl_direction, V.KL_DIRECTIONS)
        V.check_choice("loss_backend", self.loss_backend, V.BACKENDS)
        super().__post_init__()


class PSFTTrainer(Trainer):
    """``transformers.Trainer`` whose loss is PSFT, DFT, ASFT or SFT on the fused lm-head.

    Takes the arguments of ``Trainer`` (``args`` must be a :class:`PSFTConfig`) plus ``ref_model``:
    ASFT's frozen reference model (a peft model may leave it out: its base model, adapter
    disabled, is used). Attributes for inspection: ``old_policy_refreshes`` (pi_old groups
    started) and ``old_logprob_passes`` (micro-batches whose pi_old log-probs were computed).

    The protocol (pi_old groups, warm-up, reference, head probe, metrics) lives in
    :class:`~psft_kernels.integrations._core.FusedLossCore`; this class adapts it to ``Trainer``.
    """

    # compute_loss divides by num_items_in_batch itself: recent transformers read this flag, older
    # versions model_accepts_loss_kwargs (set in __init__).
    loss_is_scaled_for_ga = True

    def __init__(self, model=None, args=None, *trainer_args, ref_model: Optional[nn.Module] = None, **trainer_kwargs):
        if args is None:
            args = PSFTConfig(output_dir="tmp_trainer")
        if not isinstance(args, PSFTConfig):
            raise TypeError(f"args must be a PSFTConfig (TrainingArguments plus the loss options); got "
                            f"{type(args).__name__}")
        if trainer_kwargs.get("compute_loss_func") is not None:
            raise ValueError("PSFTTrainer computes its own loss; compute_loss_func must be None")
        if model is None:
            raise ValueError("PSFTTrainer needs model= (model_init is not supported)")
        _engines.check_model(model)
        # Before Trainer wraps the model (DDP / FSDP / DeepSpeed, in train()): the engine must wrap
        # the instance whose forward computes the loss inside the lm-head's call (_fused.py).
        self._core = FusedLossCore(args, model, self._setup_ref_model(model, args, ref_model))
        super().__init__(model, args, *trainer_args, **trainer_kwargs)
        if args.label_smoothing_factor:
            raise ValueError(
                f"label_smoothing_factor is not supported by PSFTTrainer; got {args.label_smoothing_factor}")
        if args.loss_backend != "auto":
            reason = backends.unavailable_reason(args.loss_backend, args.device)
            if reason is not None:
                raise ValueError(f"loss_backend={args.loss_backend!r} cannot run on {args.device}: {reason}")
        self.engine = _engines.check_trainer(self)
        if self.engine == "fsdp1" and args.loss_type == "asft" and ref_model is None:
            raise ValueError(FSDP1_PEFT_REFERENCE)
        # Tells every transformers version that the loss is already normalized by num_items_in_batch
        # (no division by the accumulation steps) and that num_items_in_batch must be counted.
        self.model_accepts_loss_kwargs = True
        self._group = deque()  # prefetched optimizer steps of the current pi_old group
        self._group_source = None  # the epoch iterator they came from

    @property
    def ref_model(self):
        return self._core.ref_model

    @property
    def old_policy_refreshes(self) -> int:
        return self._core.old_policy_refreshes

    @property
    def old_logprob_passes(self) -> int:
        return self._core.old_logprob_passes

    # ------------------------------------------------------------------------------------------
    # Setup
    # ------------------------------------------------------------------------------------------

    @staticmethod
    def _setup_ref_model(model, args, ref_model):
        if args.loss_type != "asft":
            if ref_model is not None:
                raise ValueError(f"ref_model is used only by loss_type='asft'; got loss_type={args.loss_type!r}")
            return None
        if ref_model is None:
            if not is_peft_model(model):
                raise ValueError(
                    "loss_type='asft' needs a reference model: pass ref_model= (e.g. a copy.deepcopy(model) made "
                    "before training), or train a peft model, whose base with the adapter disabled is the reference"
                )
            return None
        if ref_model is model:
            raise ValueError("ref_model must be a separate frozen copy, not the model being trained")
        # The reference is held whole on every process (not sharded by the engine): it has no
        # optimizer state or gradients, and ASFT needs its whole head inside the policy's head call.
        ref_model.requires_grad_(False)
        ref_model.eval()
        if getattr(ref_model, "hf_device_map", None) is None:
            ref_model.to(args.device)
        return ref_model

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        kept = list(self._signature_columns or [])
        self._signature_columns = kept + [c for c in COLLATOR_COLUMNS if c not in kept]

    def _runner(self):
        """What forwards go through: the engine's wrapper once training has wrapped the model."""
        return self.model_wrapped if self.model_wrapped is not None else self.model

    def _low_precision(self) -> bool:
        return bool(self.args.bf16 or self.args.fp16)

    # ------------------------------------------------------------------------------------------
    # pi_old: prefetch a group of optimizer steps and score it once with the current model
    # ------------------------------------------------------------------------------------------

    def _objective(self) -> str:
        """The loss of the optimizer step about to be taken."""
        return self._core.objective(self.state.global_step)

    def get_batch_samples(self, epoch_iterator, num_batches, *args, **kwargs):
        """The micro-batches of the next optimizer step and their target count.

        The training loop calls this once per optimizer step. For PSFT it fetches a whole group of
        steps at its start, scores all of them under the current model, and hands them out one step
        at a time. The target count (for ``num_items_in_batch``) is always counted here, after HF's
        label shift, so that every transformers version divides by the same number.
        """
        if epoch_iterator is not self._group_source:
            self._group.clear()  # a new epoch or a new train() call: groups never span iterators
            self._group_source = epoch_iterator

        def fetch(n):
            return super(PSFTTrainer, self).get_batch_samples(epoch_iterator, n, *args, **kwargs)[0]

        if not self._group:
            if self._objective() != "psft":
                batches = fetch(num_batches)
                return batches, self._count_targets(batches)
            self._start_group(fetch, num_batches)
        batches = self._group.popleft() if self._group else []
        return batches, self._count_targets(batches)

    def _start_group(self, fetch, num_batches: int) -> None:
        steps = self.args.old_policy_refresh_steps
        if self.state.max_steps and self.state.max_steps > 0:
            steps = max(1, min(steps, self.state.max_steps - self.state.global_step))
        for i in range(steps):
            # The loop's own count for this step (fewer at the end of an epoch), then full steps;
            # the iterator running out ends the group early.
            batches = fetch(num_batches if i == 0 else self.args.gradient_accumulation_steps)
            if not batches:
                break
            self._group.append(batches)
        if self._group:
            self._core.score_old_policy(self._runner(), [b for step in self._group for b in step],
                                        self._prepare_inputs, self.compute_loss_context_manager,
                                        low_precision=self._low_precision())

    def _tokens_across_processes(self) -> bool:
        return bool(getattr(self.args, "average_tokens_across_devices", False)) and self.accelerator.num_processes > 1

    def _count_targets(self, batches):
        if not batches:
            return None
        count = sum(shifted_targets(b).ne(IGNORE_INDEX).sum() for b in batches).to(self.args.device)
        if self._tokens_across_processes():
            count = self.accelerator.gather(count.reshape(1)).sum()
        return count

    # ------------------------------------------------------------------------------------------
    # Loss
    # ------------------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        if "seq_lengths" in inputs:
            raise ValueError(
                "the batch still holds 'seq_lengths' (a packed dataset's document lengths): the data collator did not "
                "turn them into position_ids, so packed documents would attend to each other. Use a collator that "
                "does, e.g. trl's DataCollatorForLanguageModeling(pad_token_id, padding_free=True)")
        old = inputs.pop(OLD_LOGPROBS_KEY, None)
        if return_outputs:
            # prediction_step wants the model's outputs (logits for metrics): the model's own forward.
            outputs = model(**inputs)
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs[0]
            return loss, outputs
        if not model.training:
            return self.compute_loss_and_stats(model, inputs, loss_type="sft")[0]
        kind = self._objective()
        if kind == "psft" and old is None:
            raise RuntimeError(
                "PSFT micro-batch without pi_old log-probs: PSFTTrainer attaches them in get_batch_samples; if you "
                f"drive training_step yourself, put log pi_old(targets) under batch[{OLD_LOGPROBS_KEY!r}]"
            )
        loss, stats = self.compute_loss_and_stats(model, inputs, loss_type=kind, old_logprobs=old,
                                                  num_items_in_batch=num_items_in_batch)
        self._core.metrics.add(stats)
        if num_items_in_batch is not None and self._tokens_across_processes():
            # num_items_in_batch counts every process's targets and every engine (DDP, FSDP, DeepSpeed)
            # averages the gradients over processes: scale back up so that the update is the token mean
            # over all of them. Like Trainer, this scales a MoE router loss too.
            loss = loss * self.accelerator.num_processes
        return loss

    def compute_loss_and_stats(self, model, inputs, *, loss_type: Optional[str] = None,
                               old_logprobs: Optional[Tensor] = None, num_items_in_batch=None):
        """The fused loss of one micro-batch and its stats dict (tensors; nothing is logged).

        ``model``: the model or the engine's wrapper around it (what ``compute_loss`` is given).
        ``loss_type`` defaults to the config's. ``old_logprobs`` (PSFT): ``(B, T)`` like the labels,
        position t holding log pi_old(labels[t + 1]); None means pi_old = the current policy. Without
        ``num_items_in_batch`` the loss is the token mean of this micro-batch.
        """
        kind = V.check_choice("loss_type", loss_type or self.args.loss_type, LOSS_TYPES)
        return self._core.loss_and_stats(model, inputs, loss_type=kind, old_logprobs=old_logprobs,
                                         num_items_in_batch=num_items_in_batch, low_precision=self._low_precision())

    # ------------------------------------------------------------------------------------------
    # Evaluation and logging
    # ------------------------------------------------------------------------------------------

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """With ``prediction_loss_only`` the eval loss (token-mean NLL) comes from the fused head."""
        if not prediction_loss_only or (inputs.get("labels") is None and inputs.get("shift_labels") is None):
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss, _ = self.compute_loss_and_stats(model, inputs, loss_type="sft")
        return loss.detach(), None, None

    def log(self, logs, *args, **kwargs):
        if "loss" in logs and self._core.metrics:  # a training log (eval logs have eval_loss, the summary train_loss)
            reduce = None
            if self.accelerator.num_processes > 1:
                reduce = lambda t: self.accelerator.reduce(t, reduction="sum")  # noqa: E731
            logs.update(self._core.metrics.pop(reduce))
        return super().log(logs, *args, **kwargs)


class MetricsJsonlCallback(TrainerCallback):
    """Writes every training log (loss, nll, entropy, ... plus ``step``) as one JSON line to ``path``.

    The file is started afresh when training starts from step 0 and appended to on resume. Only the
    main process writes.
    """

    def __init__(self, path: str):
        self.path = path

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero and state.global_step == 0:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            open(self.path, "w").close()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or "loss" not in logs:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": state.global_step, **logs}) + "\n")
