"""Run the Hugging Face Trainer under FSDP or DeepSpeed on CPUs (gloo), for tests, demos and CI.

accelerate (1.15) turns FSDP on only for GPU-type set-ups and transformers drops DeepSpeed under
``use_cpu``: on a CPU both silently train with DDP instead. :func:`force_engine` builds
accelerate's state for the engine before ``TrainingArguments`` exist and returns the
TrainingArguments that make the Trainer use it (``accelerator_config={"use_configured_state":
True}``, the DeepSpeed config, ...). On GPUs none of this is needed: configure FSDP or DeepSpeed the usual
way (``fsdp=`` / ``fsdp_config=``, ``deepspeed=``, or ``accelerate launch --config_file``).

Call it after the process group exists (``torchrun`` sets the environment; this initializes the
group itself if needed) and again before each Trainer of a different engine in one process.
"""

from __future__ import annotations

import os
from typing import Dict, Optional, Sequence

import torch

ENGINES = ("ddp", "fsdp1", "fsdp2", "zero2", "zero3")


def deepspeed_config(stage: int) -> dict:
    """A DeepSpeed config for the Trainer: everything ``auto`` (filled from TrainingArguments) except
    ``train_batch_size``, which ``auto`` would fill before the processes exist, wrongly."""
    zero: Dict[str, object] = {"stage": stage}
    if stage == 3:
        zero["stage3_param_persistence_threshold"] = 0  # partition small parameters too (tiny test models)
    return {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto", "zero_optimization": zero, "zero_allow_untested_optimizer": True}


def force_engine(engine: str, wrap_classes: Optional[Sequence[str]] = None, *, use_orig_params: bool = True,
                 reshard_after_forward: bool = True) -> dict:
    """Configure accelerate's state for ``engine`` on the CPU; returns the extra TrainingArguments.

    ``engine``: 'ddp', 'fsdp1', 'fsdp2', 'zero2' or 'zero3'. ``wrap_classes``: FSDP's unit
    classes (the decoder layer, e.g. ``["LlamaDecoderLayer"]``).
    """
    from accelerate.state import AcceleratorState, GradientState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, TorchDynamoPlugin

    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(map(repr, ENGINES))}; got {engine!r}")
    AcceleratorState._reset_state(reset_partial_state=True)  # accelerate keeps its state per process
    GradientState._reset_state()
    if engine == "ddp":
        return {"use_cpu": True, "ddp_backend": "gloo"}
    common = {"accelerator_config": {"use_configured_state": True}, "ddp_backend": "gloo"}
    if engine.startswith("zero"):
        # Only the partial state, as DeepSpeed's: the Trainer's Accelerator adds the plugin from
        # TrainingArguments.deepspeed (without use_cpu, which would drop DeepSpeed).
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        try:
            state = PartialState(backend="gloo")
        finally:
            del os.environ["ACCELERATE_USE_DEEPSPEED"]
        if state.distributed_type != DistributedType.DEEPSPEED:
            raise RuntimeError(f"accelerate did not take DeepSpeed: {state.distributed_type}")
        return {**common, "deepspeed": deepspeed_config(int(engine[-1])), "use_cpu": False}
    kw = dict(fsdp_version=int(engine[-1]), sync_module_states=False, cpu_ram_efficient_loading=False,
              state_dict_type="FULL_STATE_DICT", reshard_after_forward=reshard_after_forward)
    if wrap_classes:
        kw.update(auto_wrap_policy="transformer_based_wrap", transformer_cls_names_to_wrap=list(wrap_classes))
    if engine == "fsdp1":
        kw["use_orig_params"] = use_orig_params
        kw["reshard_after_forward"] = "FULL_SHARD" if reshard_after_forward else "SHARD_GRAD_OP"
    plugin = FullyShardedDataParallelPlugin(**kw)
    state = AcceleratorState(cpu=True, backend="gloo", fsdp_plugin=plugin, dynamo_plugin=TorchDynamoPlugin(),
                             _from_accelerator=True)
    state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = plugin
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    # FSDP1 compares its device_id with the parameters' device: "cpu", not the state's "cpu:0".
    PartialState._shared_state["device"] = torch.device("cpu")
    return {**common, "use_cpu": True}
