"""Which training engine runs the model, and the set-ups the fused loss refuses before the first step.

Supported (docs/distributed.md): one process, DDP, FSDP1, FSDP2 and DeepSpeed ZeRO-0/1/2/3. The
fused loss runs inside the lm-head's module call (``_fused.py``), where each of them has the
weight whole, and leaves the gradient reduction to the engine. Refused, each with what to do
instead: ``torch.nn.DataParallel`` (one process, several devices: its replicas would each hold
the head), transformers' ``tp_plan`` (its own tensor-parallel layers, untested), a head already
sharded (a DTensor) when handed to PSFTTrainer, context / sequence parallelism (a row's tokens are
split over processes), parameter offload that has not been tested, and an engine this module does
not know. The plain-loop API accepts a head sharded over the vocabulary by torch's
``ColwiseParallel`` (``_fused.py`` computes its loss with ``psft_kernels.vocab_parallel``).
"""

from __future__ import annotations

from torch import nn

from ..vocab_parallel import _is_dtensor
from ._lm_head import base_model

_DDP_TYPES = {"MULTI_CPU", "MULTI_GPU", "MULTI_NPU", "MULTI_MLU", "MULTI_SDAA", "MULTI_MUSA", "MULTI_XPU",
              "MULTI_HPU", "MULTI_NEURON"}


def check_model(model: nn.Module, what: str = "model", tensor_parallel_head: bool = False) -> None:
    """Refusals that the model alone decides (a wrapper we cannot see into, a tensor-parallel plan).

    ``tensor_parallel_head``: whether the caller drives a head sharded over the vocabulary by torch's
    ``ColwiseParallel`` (the plain-loop API does; PSFTTrainer does not). Which plans work on the head
    is decided inside its call (``_fused._check_tensor_parallel``), where its placements are known.
    """
    if isinstance(model, nn.DataParallel):
        raise TypeError(
            f"{what} is wrapped in torch.nn.DataParallel, which the fused loss does not support: launch one process "
            "per device (torchrun / accelerate launch) and use DDP, FSDP or DeepSpeed")
    base = base_model(model)
    tp = getattr(base, "_tp_size", None)
    if (tp is not None and tp > 1) or getattr(base, "_device_mesh", None) is not None:
        raise ValueError(
            f"{what} was loaded with transformers' tensor-parallel plan (tp_plan, tp_size={tp}), which the fused loss "
            "does not support (untested: its own layer classes). Load it without tp_plan and shard it with FSDP or "
            "DeepSpeed ZeRO-3, or, in a loop of your own (psft_kernels.integrations.plain), shard the lm-head over the "
            "vocabulary with parallelize_module(model, tp_mesh, {'lm_head': ColwiseParallel()})")
    head = base.get_output_embeddings() if callable(getattr(base, "get_output_embeddings", None)) else None
    if not tensor_parallel_head and _is_dtensor(getattr(head, "weight", None)):
        raise ValueError(
            f"{what}'s lm-head weight is already a DTensor (a tensor-parallel plan such as ColwiseParallel, or "
            "fully_shard applied before PSFTTrainer): PSFTTrainer does not drive a tensor-parallel head (accelerate's "
            "tensor parallelism takes only models loaded with transformers' tp_plan) and applies FSDP itself. Pass the "
            "model unsharded, or train a ColwiseParallel head with the plain-loop API "
            "(psft_kernels.integrations.plain)")


def check_trainer(trainer) -> str:
    """The engine a ``transformers.Trainer`` will run: 'single', 'ddp', 'fsdp1', 'fsdp2' or 'zeroN'."""
    args, acc = trainer.args, trainer.accelerator
    if args.n_gpu > 1:
        raise ValueError(f"PSFTTrainer does not support DataParallel (n_gpu={args.n_gpu}); launch one process "
                         "per GPU with torchrun / accelerate launch instead")
    for name in ("get_tp_size", "get_cp_size", "get_sp_size"):
        size = getattr(trainer, name, lambda: 1)()
        if size > 1:
            kind = {"get_tp_size": "tensor", "get_cp_size": "context", "get_sp_size": "sequence"}[name]
            raise ValueError(
                f"PSFTTrainer does not support {kind} parallelism ({name[4:]}={size}): the fused loss needs each "
                "row's tokens and the whole vocabulary of the lm-head on one process. Use data parallelism with "
                "DDP, FSDP or DeepSpeed ZeRO instead")
    kind = getattr(acc.distributed_type, "value", str(acc.distributed_type))
    if kind == "NO":
        return "single"
    if kind in _DDP_TYPES:
        return "ddp"
    if kind == "FSDP":
        plugin = acc.state.fsdp_plugin
        version = int(getattr(plugin, "fsdp_version", 1) or 1)
        offload = getattr(plugin, "cpu_offload", None)
        if version == 1 and getattr(offload, "offload_params", False):
            raise ValueError(
                "FSDP1 with cpu_offload(offload_params=True) is not supported by PSFTTrainer (untested); use FSDP2 "
                "(fsdp_version=2; its CPUOffloadPolicy is tested) or no parameter offload")
        return f"fsdp{version}"
    if kind == "DEEPSPEED":
        plugin = acc.state.deepspeed_plugin
        config = getattr(plugin, "deepspeed_config", None) or {}
        zero = config.get("zero_optimization", {}) or {}
        stage = int(zero.get("stage", getattr(plugin, "zero_stage", 0)) or 0)
        device = (zero.get("offload_param") or {}).get("device", "none")
        if device not in (None, "none"):
            raise ValueError(
                f"DeepSpeed ZeRO-{stage} with offload_param to {device!r} is not supported by PSFTTrainer (untested); "
                "leave offload_param out (offload_optimizer does not touch the forward)")
        return f"zero{stage}"
    raise ValueError(
        f"PSFTTrainer does not support the {kind} engine: the fused loss is known to run inside the lm-head's call "
        "only under one process, DDP, FSDP1, FSDP2 and DeepSpeed ZeRO; use one of those")


def shards_parameters(runner: nn.Module) -> bool:
    """Whether ``runner``'s parameters live sharded outside their module calls (FSDP1, FSDP2, ZeRO-3)."""
    if hasattr(runner, "_fsdp_wrapped_module"):
        return True
    for p in runner.parameters():
        # FSDP2: DTensor parameters; ZeRO-3: parameters carry a ds_id (ZeRO-1/2 do not).
        return type(p).__name__ == "DTensor" or hasattr(p, "ds_id")
    return False
