"""Integrations with training frameworks.

Each integration is its own module and imports its framework only when it is imported itself:
``import psft_kernels`` never needs them.

* :mod:`psft_kernels.integrations.hf`: ``PSFTConfig`` / ``PSFTTrainer`` for Hugging Face
  ``transformers.Trainer`` (needs ``transformers``; ``pip install psft-kernels[hf]``).
"""
