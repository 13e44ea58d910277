"""TRL integration: ``SFTTrainer`` / ``SFTConfig`` with PSFT, DFT, ASFT and SFT on the fused lm-head.

A TRL script changes two names:

    from psft_kernels.integrations.trl import FusedSFTConfig, FusedSFTTrainer

    args = FusedSFTConfig(output_dir="out", loss_type="psft", assistant_only_loss=True, packing=True)
    trainer = FusedSFTTrainer(model="path/to/model", args=args, train_dataset=dataset, peft_config=lora)
    trainer.train()

Everything TRL does with the data stays TRL's: text, prompt-completion and conversational
datasets, chat templates, ``completion_only_loss`` / ``assistant_only_loss`` labels, ``packing``,
``padding_free`` batches with ``position_ids``, ``peft_config``, model loading from a name. What
changes is the loss and its protocol, which come from
:class:`~psft_kernels.integrations._core.FusedLossCore` through
:class:`~psft_kernels.integrations.hf.PSFTTrainer` (this trainer is both an ``SFTTrainer`` and a
``PSFTTrainer``): pi_old groups of ``old_policy_refresh_steps`` optimizer steps, the SFT warm-up,
ASFT's reference (``ref_model=``, or a peft model's base with its adapter off), the head probe, the
loss inside the lm-head's module call (DDP, FSDP1/2, DeepSpeed ZeRO as ``PSFTTrainer`` supports them).

``loss_type``: ``"psft"`` (default), ``"sft"``, ``"dft"``, ``"asft"``; TRL's ``"nll"`` (and its
deprecated ``"chunked_nll"``) means ``"sft"``. ``"sft"`` and ``"dft"`` take the optimizer steps of
TRL's own ``loss_type="nll"`` / ``"dft"``.

Logged metrics:

* TRL's own, with TRL's definitions, from the fused pass's per-token stats (no logits):
  ``entropy`` and ``mean_token_accuracy`` (per micro-batch token means, averaged over the
  micro-batches since the last log), ``num_tokens`` (tokens seen in training, padding excluded).
  The fused losses compute ``log p(target)`` and the entropy but not which token has the largest
  logit, so ``mean_token_accuracy`` costs one more forward-only pass over the head for the target
  tokens, in chunks, inside the same head call (one GEMM beside the three or four of the loss);
  ``token_accuracy=False`` skips it and the metric.
* psft_kernels' token-weighted ``nll``, ``tokens`` and, for PSFT, ``clip_fraction*``,
  ``ratio_mean``, ``approx_kl``; for ASFT ``kl`` (see ``hf.PSFTTrainer``).

Differences from ``SFTTrainer`` (each refused or documented, never silently different):
``compute_loss_func``, ``label_smoothing_factor`` and context / sequence / tensor parallelism are
refused; a MoE router's ``aux_loss`` is added as the model's own forward adds it (``coef * aux``
per micro-batch, as ``PSFTTrainer`` does), where TRL divides it by the accumulation steps.

Tested with TRL 1.16 and transformers 5.23 on CPU: one process and DDP (2 gloo processes); FSDP and
DeepSpeed come from PSFTTrainer and were not run through this trainer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import trl
from torch import Tensor, nn
from trl import SFTConfig, SFTTrainer

from .. import chunked
from ._fused import LossRequest, head_inputs
from ._lm_head import IGNORE_INDEX
from .hf import LOSS_TYPES, PSFTConfig, PSFTTrainer

__all__ = ["FusedSFTConfig", "FusedSFTTrainer", "LOSS_TYPES"]

# SFTTrainer's internals this module builds on (its metrics dict, the loss_type check, the token count)
# are those of TRL 1.16; older releases computed the loss and metrics differently.
_TRL_VERSION = tuple(int(p) for p in trl.__version__.split(".")[:2] if p.isdigit())
if _TRL_VERSION < (1, 16):
    raise ImportError(f"psft_kernels.integrations.trl needs trl >= 1.16 (pip install 'psft-kernels[trl]'); "
                      f"trl {trl.__version__} is installed")

# TRL's names for psft_kernels' losses
TRL_LOSS_NAMES = {"nll": "sft", "chunked_nll": "sft"}


# SFTConfig first: a dataclass's fields come from its bases in reverse MRO order, and PSFTConfig
# carries every TrainingArguments field with TrainingArguments' defaults. Listed first, it would
# reset SFTConfig's own defaults (learning_rate, logging_steps, bf16, gradient_checkpointing).
@dataclass
class FusedSFTConfig(SFTConfig, PSFTConfig):
    """TRL's ``SFTConfig`` plus psft_kernels' loss options (those of ``hf.PSFTConfig``: ``eps_low``,
    ``eps_high``, ``entropy_coef``, ``old_policy_refresh_steps``, ``sft_warmup_steps``, ``kl_coef``,
    ``kl_direction``, ``loss_backend``, ``verify_lm_head``) and ``token_accuracy``."""

    loss_type: str = field(
        default="psft",
        metadata={"help": "One of 'psft', 'sft', 'dft', 'asft'; TRL's 'nll' is accepted as 'sft'."})
    token_accuracy: bool = field(
        default=True,
        metadata={"help": "Log TRL's mean_token_accuracy: one more forward-only GEMM over the head per micro-batch."})

    def __post_init__(self):
        self.loss_type = TRL_LOSS_NAMES.get(self.loss_type, self.loss_type)
        if not isinstance(self.token_accuracy, bool):
            raise TypeError(f"token_accuracy must be a bool; got {type(self.token_accuracy).__name__}")
        super().__post_init__()


def target_is_top1(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
                   softcap: Optional[float] = None) -> Tensor:
    """Whether each target is the most likely token, ``False`` where ignored; no gradient.

    PyTorch equivalent: ``softcap(hidden @ weight.T + bias).argmax(-1) == targets`` (the first index
    wins a tie, as in TRL), in chunks of at most the chunked backend's logit block. The temperature
    is left out: dividing by it does not move the argmax.
    """
    flat_h, flat_t = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    out = torch.zeros(flat_t.shape, dtype=torch.bool, device=flat_t.device)
    rows = (flat_t != IGNORE_INDEX).nonzero().squeeze(1)
    step = max(1, chunked.CHUNK_ELEMENTS // weight.shape[0])
    with torch.no_grad():
        for start in range(0, rows.numel(), step):
            r = rows[start:start + step]
            x = flat_h[r] @ weight.T if bias is None else torch.addmm(bias, flat_h[r], weight.T)
            if softcap is not None:
                x = torch.tanh(x / softcap) * softcap
            out[r] = x.argmax(-1) == flat_t[r]
    return out.reshape(targets.shape)


class _LossAndTop1Request(LossRequest):
    """The loss request plus ``is_top1``, computed from the same whole head inside the same call."""

    def compute(self, module, hidden):
        out = super().compute(module, hidden)
        weight, bias = self.head_weights(module, hidden)
        h, w, b, targets = head_inputs(hidden.detach(), weight.detach(), None if bias is None else bias.detach(),
                                       self.targets)
        out["is_top1"] = target_is_top1(h, w, b, targets, self.head.softcap)
        return out


class _PSFTBase(PSFTTrainer):
    """Sits between ``SFTTrainer`` and ``PSFTTrainer`` in the MRO: ``SFTTrainer.__init__`` calls
    ``super().__init__`` with ``Trainer``'s arguments only, so the loss type it was shown ("nll", to pass
    its own check) is put back and ``ref_model`` handed over here."""

    def __init__(self, **kwargs):
        loss_type, ref_model = self._psft_init
        kwargs["args"].loss_type = loss_type
        super().__init__(ref_model=ref_model, **kwargs)


class FusedSFTTrainer(SFTTrainer, _PSFTBase):
    """TRL's ``SFTTrainer`` whose loss is PSFT, DFT, ASFT or SFT on the fused lm-head.

    Takes ``SFTTrainer``'s arguments (``args`` must be a :class:`FusedSFTConfig`) plus ``ref_model``
    (ASFT's frozen reference; a peft model, including one made from ``peft_config``, may leave it out).
    """

    loss_is_scaled_for_ga = True  # compute_loss divides by num_items_in_batch itself

    def __init__(self, model, args: Optional[FusedSFTConfig] = None, *sft_args, ref_model: Optional[nn.Module] = None,
                 **sft_kwargs):
        if args is None:
            name = model if isinstance(model, str) else getattr(getattr(model, "config", None), "_name_or_path", "")
            args = FusedSFTConfig(f"{(name or 'model').split('/')[-1]}-SFT")
        if not isinstance(args, FusedSFTConfig):
            raise TypeError(f"args must be a FusedSFTConfig (TRL's SFTConfig plus the loss options); got "
                            f"{type(args).__name__}")
        loss_type = args.loss_type
        self._psft_init = (loss_type, ref_model)
        # SFTTrainer checks that loss_type is one of its own: show it one for the duration of its __init__.
        args.loss_type = "nll"
        try:
            super().__init__(model, args, *sft_args, **sft_kwargs)
        finally:
            args.loss_type = loss_type
            del self._psft_init
        if args.token_accuracy:
            self._core.loss_request = _LossAndTop1Request
        self._pending = {"train": [], "eval": []}  # per micro-batch (tokens, entropy sum, correct), on the device
        self._seen_tokens: Optional[Tensor] = None  # num_tokens, on the device until logged
        self._logged_tokens = 0

    # ------------------------------------------------------------------------------------------
    # The loss is PSFTTrainer's; TRL's metrics are read from its stats
    # ------------------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.model.training and not return_outputs:
            self._count_seen_tokens(inputs)
        return PSFTTrainer.compute_loss(self, model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)

    def compute_loss_and_stats(self, model, inputs, **kwargs):
        loss, stats = super().compute_loss_and_stats(model, inputs, **kwargs)
        valid = stats["num_tokens"].detach()
        correct = stats["is_top1"].sum() if "is_top1" in stats else torch.zeros_like(valid)
        per_batch = torch.stack([valid.double(), stats["entropy"].detach().double().sum(), correct.double()])
        self._pending["train" if self.model.training else "eval"].append(per_batch)
        return loss, stats

    def _count_seen_tokens(self, inputs):
        # TRL's count: the attention mask's ones, or a padding-free row's length.
        if "attention_mask" in inputs:
            n = inputs["attention_mask"].sum()
        elif "position_ids" in inputs:
            n = torch.tensor(inputs["position_ids"].size(1), device=inputs["position_ids"].device)
        else:
            raise ValueError("Expected 'attention_mask' or 'position_ids' in inputs.")
        n = self.accelerator.gather_for_metrics(n.reshape(1)).sum() // self._tp_size
        self._seen_tokens = n if self._seen_tokens is None else self._seen_tokens + n

    def log(self, logs, start_time=None):
        mode = "train" if self.model.training else "eval"
        pending, self._pending[mode] = self._pending[mode], []
        if pending:
            # One gather and one host transfer per log, not per micro-batch (a plain gather: at log time
            # gather_for_metrics could take it for the end of an eval dataloader and drop "duplicates").
            sums = self.accelerator.gather(torch.stack(pending)).reshape(-1, len(pending), 3).sum(0)
            for valid, entropy, correct in sums.tolist():
                self._metrics[mode]["entropy"].append(entropy / valid if valid > 0 else 0.0)
                if self.args.token_accuracy:
                    self._metrics[mode]["mean_token_accuracy"].append(correct / valid if valid > 0 else 0.0)
        if self._seen_tokens is not None:
            self._logged_tokens += int(self._seen_tokens.item())
            self._seen_tokens = None
        self._metrics[mode]["num_tokens"] = [self._logged_tokens]
        if "loss" in logs and self._core.metrics:
            reduce = None
            if self.accelerator.num_processes > 1:
                reduce = lambda t: self.accelerator.reduce(t, reduction="sum")  # noqa: E731
            fused = self._core.metrics.pop(reduce)
            fused.pop("entropy")  # TRL's entropy (above), with TRL's definition, is logged instead
            logs.update(fused)
        return SFTTrainer.log(self, logs, start_time)
