"""The fused losses in a training loop of your own, under any engine (one process, DDP, FSDP1,
FSDP2's ``fully_shard``, DeepSpeed ZeRO-0..3). Needs ``transformers``-style models only by duck typing.

    from psft_kernels.integrations.plain import prepare_model, fused_loss, fused_logprobs, count_targets

    prepare_model(model)                       # 1. before the engine wraps the model
    for layer in model.model.layers:           # 2. shard / wrap as you like
        fully_shard(layer)
    fully_shard(model)
    n = count_targets(micro_batches)           # 3. targets of the whole step, over all processes
    for batch in micro_batches:
        loss, stats = fused_loss(model, batch, loss_type="sft", num_items_in_batch=n)
        (loss * world_size).backward()         # the engine averages gradients over processes
    optimizer.step(); optimizer.zero_grad()

:func:`prepare_model` makes the model's forward compute the loss inside the lm-head's own module
call (``_fused.py``), where every engine has the head's weight whole; the engine then gathers it
for the backward and reduces its gradient as it would any parameter's. Call it on the model you
hand to the engine, before wrapping it (``model`` is then the wrapper in the calls below).

Normalization: ``num_items_in_batch`` is the number of target tokens of the whole optimizer step
(all micro-batches, all processes: :func:`count_targets`); each micro-batch's loss is its token
sum divided by it, so summing the micro-batch gradients gives the step's token mean. Every
engine averages gradients over the R data-parallel processes, hence the factor R above; the
update is then exactly one step on the concatenated batch, whatever each process's token count.
The ``loss`` a process sees is its own share of the global token mean (times R once scaled).

A head sharded over the vocabulary by torch's ``ColwiseParallel`` (``parallelize_module``), alone
or with FSDP2 on the other dimension of a 2-D mesh, is supported: the ranks of a tensor-parallel
group hold the same batches, so R is the data-parallel size and :func:`count_targets` takes the
data-parallel group (docs/distributed.md, "A tensor-parallel lm-head").
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Iterable, Mapping, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ._core import OLD_LOGPROBS_KEY, FusedLossCore, _unwrapped
from ._engines import check_model
from ._fused import prepare_model as _prepare
from ._fused import prepared_head
from ._lm_head import IGNORE_INDEX, shifted_targets

__all__ = ["prepare_model", "fused_loss", "fused_logprobs", "count_targets"]


def prepare_model(model: nn.Module) -> nn.Module:
    """Give ``model`` (this instance only) a forward that can compute the fused loss inside its
    lm-head's call. Call before DDP / ``fully_shard`` / FSDP / ``deepspeed.initialize``. Returns it."""
    _prepare(model)
    return model


def _core(model: nn.Module, ref_model: Optional[nn.Module], **options) -> FusedLossCore:
    try:
        inner = _unwrapped(model)
    except TypeError:
        if model is not _plain(model):
            raise TypeError(
                f"{type(model).__name__} wraps a model that was not prepared: call "
                "psft_kernels.integrations.plain.prepare_model(model) before wrapping it") from None
        inner = prepare_model(model)
    check_model(inner, tensor_parallel_head=True)
    if ref_model is not None and prepared_head(ref_model) is None:
        _prepare(ref_model, "ref_model")
    defaults = dict(loss_type="sft", eps_low=0.2, eps_high=0.28, entropy_coef=0.0, kl_coef=0.05,
                    kl_direction="forward", loss_backend="auto", chunk_size=None, verify_lm_head=True,
                    sft_warmup_steps=0)
    defaults.update(options)
    return FusedLossCore(SimpleNamespace(**defaults), inner, ref_model)


def _plain(model: nn.Module) -> nn.Module:
    """``model`` itself unless it is an engine's wrapper (then its inner module)."""
    return getattr(model, "module", None) or getattr(model, "_fsdp_wrapped_module", None) or model


def fused_loss(model: nn.Module, batch: Mapping[str, Tensor], *, loss_type: str = "sft",
               old_logprobs: Optional[Tensor] = None, num_items_in_batch=None, reduction: str = "mean",
               ref_model: Optional[nn.Module] = None,
               eps_low: float = 0.2, eps_high: float = 0.28, entropy_coef: float = 0.0, kl_coef: float = 0.05,
               kl_direction: str = "forward", backend: str = "auto", chunk_size: Optional[int] = None,
               verify_lm_head: bool = True) -> Tuple[Tensor, dict]:
    """``(loss, stats)`` of one micro-batch, through ``model`` (the prepared model or its engine's wrapper).

    ``batch``: the model's inputs plus ``labels`` (HF's causal-LM labels, shifted here; -100 masked)
    or ``shift_labels``. ``old_logprobs``: PSFT's pi_old, ``(B, T)`` as :func:`fused_logprobs`
    returns it (None: pi_old = the current policy). ``reduction``: "mean" (over the micro-batch's
    targets, or the sum over ``num_items_in_batch``), "sum", or "none" (``(B, T)`` per-token
    losses, whose backward the engine serves by gathering the head again). ``ref_model``: ASFT's frozen reference, held
    whole on every process (not wrapped by the engine), or None for a peft model (its base model,
    adapter disabled). The head is checked once against the model's own logits unless
    ``verify_lm_head=False``. Under a sharding engine every process must make the same calls.
    """
    core = _core(model, ref_model, loss_type=loss_type, eps_low=eps_low, eps_high=eps_high,
                 entropy_coef=entropy_coef, kl_coef=kl_coef, kl_direction=kl_direction, loss_backend=backend,
                 chunk_size=chunk_size, verify_lm_head=verify_lm_head)
    return core.loss_and_stats(model, batch, loss_type=loss_type, old_logprobs=old_logprobs,
                               num_items_in_batch=num_items_in_batch, reduction=reduction)


def fused_logprobs(model: nn.Module, batch: Mapping[str, Tensor], *, backend: str = "auto",
                   verify_lm_head: bool = True) -> Tensor:  # (B, T)
    """``log p(target)`` per position (0 where masked) under ``model`` in eval mode, without gradient:
    PSFT's pi_old for :func:`fused_loss`. Position t holds the log-prob of ``labels[t + 1]``."""
    core = _core(model, None, loss_backend=backend, verify_lm_head=verify_lm_head)
    batch = dict(batch)
    core.score_old_policy(model, [batch], lambda b: b)
    return batch[OLD_LOGPROBS_KEY]


def count_targets(batches: Iterable[Mapping[str, Tensor]], group: Optional["dist.ProcessGroup"] = None) -> Tensor:
    """Target tokens (after the label shift, -100 excluded) of ``batches`` summed over the processes
    of ``group`` (all of them by default): ``num_items_in_batch`` for the step."""
    counts = [shifted_targets(b).ne(IGNORE_INDEX).sum() for b in batches]
    if not counts:
        raise ValueError("count_targets needs at least one batch")
    count = torch.stack(counts).sum().to(torch.int64)  # on the batches' device (NCCL needs it there)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(count, group=group)
    return count
