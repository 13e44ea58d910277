"""A causal LM's lm-head, read through public APIs only: last hidden states, weight, bias, softcap.

The fused losses need what goes *into* the lm-head (the decoder's last hidden states) and the
head's parameters, never the logits. They are found without patching any model class:

* hidden states: what the model itself hands its lm-head, inside its own ``forward`` (see
  ``_fused.py``): whatever the model does before its head is kept, and the engine's work (DDP's
  gradient synchronisation, FSDP's and ZeRO-3's parameter gathering) is armed by its wrapper's
  ``forward`` as usual.
* the head: ``model.get_output_embeddings()``: its ``weight`` (the input embedding's parameter
  itself when the two are tied, so the gradient reaches the shared tensor) and its ``bias``.
* the logit transform: ``final_logit_softcapping`` from the (text) config (Gemma 2 and later).
  Anything else a model does to its logits is caught by :meth:`LMHead.verify`, which compares
  the reconstruction with the model's own logits once, on a few tokens: a constant factor
  (Cohere's ``logit_scale``, Granite's ``logits_scaling``, ...) is measured and applied as a
  temperature; any other difference is an error, never a silently different loss.

Only ``torch`` is imported here; the model is duck-typed (a ``transformers`` model, possibly
inside a ``peft`` model).
"""

from __future__ import annotations

import inspect
from typing import Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IGNORE_INDEX = -100  # Hugging Face's label mask
# Keys of a batch that the model's forward must not see: the losses are computed here, and keys
# with this prefix are data attached by the trainer (pi_old log-probs).
PRIVATE_PREFIX = "psft_"
_LOSS_KEYS = ("labels", "shift_labels", "num_items_in_batch")
PROBE_TOKENS = 32  # tokens of one row used to check the head against the model's own logits


def shifted_targets(inputs: Mapping[str, Tensor]) -> Tensor:  # (B, T) int64
    """Targets aligned with the hidden states: ``labels[:, t + 1]`` at position t, -100 at the end.

    This is Hugging Face's causal-LM label shift (``ForCausalLMLoss``) applied to the labels
    rather than to the hidden states, so the ``(B, T, D)`` hidden states are used without a copy.
    A collator's ``shift_labels`` (padding-free batches) are already aligned and used as given.
    """
    shift = inputs.get("shift_labels")
    if shift is not None:
        return shift
    labels = inputs.get("labels")
    if labels is None:
        raise ValueError(
            "every batch needs 'labels' (or 'shift_labels'): token ids to learn, -100 where masked; "
            f"got keys {sorted(inputs)}"
        )
    return F.pad(labels[..., 1:], (0, 1), value=IGNORE_INDEX)


def forward_inputs(inputs: Mapping[str, Tensor]) -> dict:
    """The batch without labels and private keys: what the model's forward is given."""
    return {k: v for k, v in inputs.items() if k not in _LOSS_KEYS and not k.startswith(PRIVATE_PREFIX)}


def base_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft model (the model itself otherwise)."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def is_peft_model(model: nn.Module) -> bool:
    return callable(getattr(model, "disable_adapter", None)) and hasattr(model, "peft_config")


def _text_config(config):
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def _softcap(config) -> Optional[float]:
    for cfg in (config, _text_config(config)):
        cap = getattr(cfg, "final_logit_softcapping", None)
        if cap:
            return float(cap)
    return None


class LMHead:
    """How to get ``(hidden, weight, bias)`` and the logit transform from one causal LM."""

    def __init__(self, model: nn.Module, what: str = "model"):
        self.what = what
        base = base_model(model)
        for method in ("get_decoder", "get_output_embeddings"):
            if not callable(getattr(base, method, None)):
                raise TypeError(
                    f"{what} must be a causal LM with get_decoder() and get_output_embeddings() "
                    f"(a transformers *ForCausalLM model); {type(base).__name__} has no {method}()"
                )
        config = getattr(base, "config", None)
        if getattr(config, "is_encoder_decoder", False):
            raise TypeError(f"{what} is an encoder-decoder model; only decoder-only causal LMs are supported")
        if is_peft_model(model):
            peft_config = model.peft_config.get(getattr(model, "active_adapter", None)) if isinstance(
                getattr(model, "peft_config", None), dict) else None
            if getattr(peft_config, "is_prompt_learning", False):
                raise TypeError(
                    f"{what} uses a prompt-learning peft adapter ({type(peft_config).__name__}): it adds virtual "
                    "tokens the labels do not cover; use an adapter that changes weights (LoRA and the like)"
                )
        weight, _ = self.weights(model)  # fail now, not at the first step, on a head we cannot use
        embedding = base.get_input_embeddings() if callable(getattr(base, "get_input_embeddings", None)) else None
        # Tied to the input embedding (a tensor-parallel plan cannot shard such a head: _fused.py refuses it).
        self.tied = bool(getattr(_text_config(config), "tie_word_embeddings", False)) or (
            getattr(embedding, "weight", None) is weight)
        self.softcap = _softcap(config)
        self.temperature = 1.0  # becomes 1/c when verify() finds the model multiplying its logits by c
        self.verified = False
        params = inspect.signature(base.forward).parameters
        # Passed as 0 (all positions) where the forward takes it: the armed head gets every position.
        self._keep_kwarg = next((k for k in ("logits_to_keep", "num_logits_to_keep") if k in params), None)

    def weights(self, model: nn.Module) -> Tuple[Tensor, Optional[Tensor]]:
        """The output embedding's ``(weight (V, D), bias (V,) or None)`` as the model uses them now.

        Called again on every use: inside peft's ``disable_adapter()`` a ``modules_to_save`` head
        resolves to the original module's parameters.
        """
        head = base_model(model).get_output_embeddings()
        if head is None:
            raise TypeError(f"{self.what}.get_output_embeddings() returned None: the model has no lm-head")
        if hasattr(head, "base_layer") and callable(getattr(head, "get_base_layer", None)):
            raise TypeError(
                f"{self.what}'s lm-head is wrapped by a peft tuner layer ({type(head).__name__}): the fused loss "
                "needs the plain head weight; leave the lm-head out of target_modules (modules_to_save is fine)"
            )
        weight, bias = getattr(head, "weight", None), getattr(head, "bias", None)
        # A ZeRO-3 parameter (built under deepspeed.zero.Init) is (0,) at rest; its ds_shape is its shape.
        shape = tuple(getattr(weight, "ds_shape", getattr(weight, "shape", ())))
        if not isinstance(weight, Tensor) or len(shape) != 2 or not weight.is_floating_point():
            got = type(weight).__name__ if not isinstance(weight, Tensor) else f"{weight.dtype} {shape}"
            raise TypeError(
                f"{self.what}'s output embedding ({type(head).__name__}) must have a floating (V, D) weight, as a "
                f"plain or tied nn.Linear has (a quantized lm-head is not supported); got {got}"
            )
        return weight, bias if isinstance(bias, Tensor) else None

    def logits_from(self, hidden: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        """The materialized logits this head stands for, in float64 (for checks only)."""
        x = hidden.double() @ weight.double().T
        if bias is not None:
            x = x + bias.double()
        if self.softcap is not None:
            x = self.softcap * torch.tanh(x / self.softcap)
        return x / self.temperature

    def verify(self, logits: Tensor, reconstructed: Tensor, *, low_precision: bool) -> None:
        """Check, once, that the head reproduces the model's own logits on a few tokens.

        ``logits``: the model's own logits for a probe of ``PROBE_TOKENS`` tokens (eval mode);
        ``reconstructed``: :meth:`logits_from` of its hidden states and head, taken inside the
        head's call (``_fused.ProbeRequest``). A constant factor between the two is adopted as
        ``temperature = 1 / factor``; any other mismatch raises, naming the error found.
        """
        low_precision = low_precision or logits.dtype in (torch.float16, torch.bfloat16)
        y, x = logits.double().to(reconstructed.device), reconstructed * self.temperature
        if y.shape != x.shape:
            raise ValueError(
                f"{self.what}: logits of shape {tuple(y.shape)} cannot come from its hidden states and lm-head "
                f"(which give {tuple(x.shape)}); this model's head is not supported"
            )
        tol = (3e-2 if low_precision else 1e-3) * max(1.0, y.abs().max().item())
        err = (y - x).abs().max().item()
        if err <= tol:
            self.verified = True
            return
        if self.softcap is None:
            factor = ((x * y).sum() / (x * x).sum().clamp(min=1e-300)).item()
            if factor > 0 and (y - factor * x).abs().max().item() <= tol:
                self.temperature = 1.0 / factor
                self.verified = True
                return
        raise ValueError(
            f"{self.what}'s logits are not softcap(hidden @ lm_head.weight.T + bias) / T for any T (softcap="
            f"{self.softcap}): max abs difference {err:.3g} > {tol:.3g} on {y.shape[1]} tokens. Its forward does "
            "something else to the logits; this model is not supported by the fused loss"
        )
