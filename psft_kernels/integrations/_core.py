"""The training protocol around the fused losses, for any trainer that drives it.

A trainer (``hf.PSFTTrainer``; a TRL trainer would be another) owns the loop, the data and the
engine; :class:`FusedLossCore` owns what PSFT/DFT/ASFT/SFT training adds to it:

* which objective a step uses (``sft_warmup_steps``, then ``loss_type``);
* PSFT's pi_old: :meth:`FusedLossCore.score_old_policy` attaches ``log pi_old`` to the micro-batches
  of a group of K optimizer steps, scored once under the current model;
* ASFT's frozen reference (a separate ``ref_model``, or a peft model's base with the adapter off);
* the head probe (the head reproduces the model's own logits, once per model);
* token-weighted metrics.

Every forward goes through ``runner`` (the model or the engine wrapping it) with a request
(``_fused``), so the loss, the pi_old pass, the reference and the probe all run inside the
module calls that FSDP1/FSDP2/ZeRO-3 gather the lm-head for. ``options`` is any object with the
attributes of ``hf.PSFTConfig``'s loss options (loss_type, eps_low, eps_high, entropy_coef, kl_coef,
kl_direction, loss_backend, verify_lm_head, old_policy_refresh_steps, sft_warmup_steps).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Optional

import torch
from torch import Tensor, nn

from ._engines import shards_parameters
from ._fused import (REQUEST_KWARG, HeadInputsRequest, LogprobsRequest, LossRequest, ProbeRequest, Reference,
                     armed_heads, prepare_model, prepared_head)
from ._lm_head import PRIVATE_PREFIX, PROBE_TOKENS, LMHead, base_model, forward_inputs, is_peft_model, shifted_targets
from ._metrics import TokenWeightedMeans

LOSS_TYPES = ("psft", "sft", "dft", "asft")
# The batch key under which a micro-batch carries its pi_old log-probs, shaped like its labels
# and aligned with the shifted targets (position t holds log pi_old(labels[t + 1])).
OLD_LOGPROBS_KEY = PRIVATE_PREFIX + "old_logprobs"


# Measured: under FSDP1 the peft reference pass (adapter disabled) leaves updates that differ from one
# process's (FSDP2 and ZeRO-3 match); refused rather than trained wrongly.
FSDP1_PEFT_REFERENCE = (
    "loss_type='asft' with a peft model's own base as the reference (no ref_model=) is not supported under "
    "FSDP1: pass ref_model= (a frozen copy of the base model), or use FSDP2 or DeepSpeed")


@contextlib.contextmanager
def eval_mode(module: nn.Module):
    """pi_old, the reference and the probe are the policy itself, scored deterministically: no
    dropout (so the first step of a pi_old group has ratio 1 only for a model without dropout)."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


class FusedLossCore:
    # The request a training micro-batch's loss goes through: a trainer may set a LossRequest subclass
    # that computes more in the same head call (the TRL trainer adds its token-accuracy metric).
    loss_request = LossRequest

    def __init__(self, options, model: nn.Module, ref_model: Optional[nn.Module] = None):
        self.options = options
        self.head = prepare_model(model, "model")
        self.ref_model = ref_model
        self.ref_head = None if ref_model is None else prepare_model(ref_model, "ref_model")
        self.metrics = TokenWeightedMeans()
        self.old_policy_refreshes = 0  # pi_old groups started
        self.old_logprob_passes = 0  # micro-batches whose pi_old log-probs were computed

    def objective(self, global_step: int) -> str:
        """The loss of the optimizer step about to be taken."""
        return "sft" if global_step < self.options.sft_warmup_steps else self.options.loss_type

    # ------------------------------------------------------------------------------------------
    # The head probe
    # ------------------------------------------------------------------------------------------

    def _verified(self, runner: nn.Module, head: LMHead, inputs, low_precision: bool) -> None:
        if head.verified or not self.options.verify_lm_head or inputs.get("input_ids") is None:
            return
        probe = {"input_ids": inputs["input_ids"][:1, :PROBE_TOKENS]}
        with torch.no_grad(), eval_mode(runner):
            out = runner(**probe, **{REQUEST_KWARG: ProbeRequest(head)})
        low_precision = low_precision or out["hidden"].dtype in (torch.float16, torch.bfloat16)
        head.verify(out["logits"], out["reconstructed"], low_precision=low_precision)

    # ------------------------------------------------------------------------------------------
    # pi_old
    # ------------------------------------------------------------------------------------------

    def score_old_policy(self, runner: nn.Module, batches: Iterable[dict], prepare: Callable[[dict], dict],
                         context=contextlib.nullcontext, low_precision: bool = False) -> None:
        """Attach ``log pi_old`` of every target token to each micro-batch, one forward each.

        ``prepare`` moves a batch to the device; ``context`` is the trainer's autocast context.
        Eval mode: see :func:`eval_mode`.
        """
        o = self.options
        with torch.no_grad(), context():
            for batch in batches:
                inputs = prepare(batch)
                self._verified(runner, self.head, inputs, low_precision)
                with eval_mode(runner):
                    out = runner(**forward_inputs(inputs),
                                 **{REQUEST_KWARG: LogprobsRequest(self.head, shifted_targets(inputs), o.loss_backend)})
                batch[OLD_LOGPROBS_KEY] = out["logprobs"]
                self.old_logprob_passes += 1
        self.old_policy_refreshes += 1

    # ------------------------------------------------------------------------------------------
    # The loss
    # ------------------------------------------------------------------------------------------

    def loss_and_stats(self, runner: nn.Module, inputs, *, loss_type: Optional[str] = None,
                       old_logprobs: Optional[Tensor] = None, num_items_in_batch=None, reduction: str = "mean",
                       low_precision: bool = False):
        """The fused loss of one micro-batch through ``runner`` and its stats dict (tensors).

        ``old_logprobs`` (PSFT): ``(B, T)`` like the labels, position t holding log pi_old(labels[t + 1]);
        None means pi_old = the current policy (ratio 1). Without ``num_items_in_batch`` the loss is the token
        mean of this micro-batch. ``reduction="none"``: the ``(B, T)`` per-token losses (0 where masked);
        their backward needs the head again, which the engine re-gathers through the head call's hooks.
        """
        o = self.options
        kind = loss_type or o.loss_type
        if kind not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {', '.join(map(repr, LOSS_TYPES))}; got {kind!r}")
        self._verified(runner, self.head, inputs, low_precision)
        reference = self._reference(runner, inputs, low_precision) if kind == "asft" else None
        options = dict(entropy_coef=o.entropy_coef, num_items_in_batch=num_items_in_batch, backend=o.loss_backend,
                       chunk_size=getattr(o, "chunk_size", None), reduction=reduction)
        if kind == "psft":
            options.update(eps_low=o.eps_low, eps_high=o.eps_high)
        if kind == "asft":
            options.update(kl_coef=o.kl_coef, kl_direction=o.kl_direction)
        request = self.loss_request(self.head, kind, shifted_targets(inputs), options, old_logprobs=old_logprobs,
                                    reference=reference)
        out = runner(**forward_inputs(inputs), **{REQUEST_KWARG: request})
        loss = out.pop("loss")
        return loss, out

    def _reference(self, runner: nn.Module, inputs, low_precision: bool) -> Reference:
        """ASFT's reference head inputs: ref_model (held whole), or the peft base model."""
        head = self.head
        kwargs = forward_inputs(inputs)
        if self.ref_model is not None:
            ref, ref_head = self.ref_model, self.ref_head
            self._verified(ref, ref_head, inputs, low_precision)
            if (ref_head.softcap, ref_head.temperature) != (head.softcap, head.temperature):
                raise ValueError(
                    f"ref_model's logit transform (softcap={ref_head.softcap}, temperature={ref_head.temperature}) "
                    f"differs from the model's (softcap={head.softcap}, temperature={head.temperature}); ASFT applies "
                    "one transform to both"
                )
            with torch.no_grad():
                return Reference(ref(**kwargs, **{REQUEST_KWARG: HeadInputsRequest(ref_head, clone_weight=False)}))
        unwrapped = _unwrapped(runner)
        if not is_peft_model(unwrapped):
            raise ValueError("loss_type='asft' needs ref_model= unless the model is a peft model")
        if hasattr(runner, "_fsdp_wrapped_module"):
            raise ValueError(FSDP1_PEFT_REFERENCE)
        with torch.no_grad(), eval_mode(runner), unwrapped.disable_adapter():
            # Only a base head kept apart by modules_to_save (several head modules) has to be carried out
            # of its call, copied, under a sharding engine; a plain head is read in the policy's call.
            several = len(armed_heads(base_model(unwrapped))) > 1
            request = HeadInputsRequest(head, clone_weight=several and shards_parameters(runner))
            return Reference(runner(**kwargs, **{REQUEST_KWARG: request}))


def _unwrapped(runner: nn.Module) -> nn.Module:
    """The prepared model inside an engine's wrapper (DDP, FSDP1, a DeepSpeed engine) or itself."""
    module = runner
    for _ in range(8):
        if prepared_head(module) is not None:
            return module
        inner = getattr(module, "module", None) or getattr(module, "_fsdp_wrapped_module", None)
        if not isinstance(inner, nn.Module):
            break
        module = inner
    raise TypeError(
        f"{type(runner).__name__} does not wrap a model prepared by psft_kernels (prepare_model / PSFTTrainer)")


