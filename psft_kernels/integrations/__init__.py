"""Integrations with training frameworks.

Each integration is its own module and imports its framework only when it is imported itself:
``import psft_kernels`` never needs them.

* :mod:`psft_kernels.integrations.hf`: ``PSFTConfig`` / ``PSFTTrainer`` for Hugging Face
  ``transformers.Trainer`` (needs ``transformers``; ``pip install psft-kernels[hf]``).
* :mod:`psft_kernels.integrations.plain`: ``prepare_model`` / ``fused_loss`` / ``fused_logprobs`` /
  ``count_targets`` for a training loop of your own, under DDP, FSDP1, FSDP2 or DeepSpeed
  (docs/distributed.md).
* :mod:`psft_kernels.integrations.cpu_engines`: run the Trainer under FSDP / DeepSpeed on CPUs
  (tests, demos, CI), where accelerate would silently fall back to DDP.
"""
