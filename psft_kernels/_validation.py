"""Input validation shared by every entry point (public API, reference, modules).

Every check raises ``TypeError`` (wrong kind of thing) or ``ValueError`` (right kind, wrong
value) with a message naming the argument, what was expected and what came.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from ._types import HeadInputs

REDUCTIONS = ("mean", "sum", "none")
BACKENDS = ("auto", "reference", "chunked", "triton", "native")
KL_DIRECTIONS = ("forward", "reverse")


def check_choice(name: str, value, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def _as_real(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, Tensor)):
        raise TypeError(f"{name} must be a real number; got {type(value).__name__}")
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.is_complex():
            raise TypeError(f"{name} must be a real number; got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite; got {value}")
    return value


def check_real(name: str, value) -> float:
    return _as_real(name, value)


def check_positive(name: str, value, *, allow_none: bool = False) -> Optional[float]:
    if value is None and allow_none:
        return None
    v = _as_real(name, value)
    if v <= 0:
        raise ValueError(f"{name} must be > 0{' or None' if allow_none else ''}; got {v}")
    return v


def check_nonnegative(name: str, value) -> float:
    v = _as_real(name, value)
    if v < 0:
        raise ValueError(f"{name} must be >= 0; got {v}")
    return v


def check_eps_low(value) -> float:
    """PSFT's ``eps_low`` in [0, 1): the ratio floor ``1 - eps_low`` must stay positive."""
    v = check_nonnegative("eps_low", value)
    if v >= 1.0:
        raise ValueError(f"eps_low must be < 1 (the ratio floor 1 - eps_low must be > 0); got {v}")
    return v


def check_clip_ratio_c(value) -> Optional[float]:
    """Dual clip of negative advantages: None (off) or a bound ``c > 1`` on the ratio (verl: 3)."""
    if value is None:
        return None
    v = _as_real("clip_ratio_c", value)
    if v <= 1.0:
        raise ValueError(f"clip_ratio_c must be None (off) or > 1 (verl's default is 3.0); got {v}")
    return v


def check_chunk_size(value) -> Optional[int]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"chunk_size must be a positive int or None; got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"chunk_size must be a positive int or None; got {value}")
    return int(value)


def check_filter_eps(value) -> Optional[float]:
    """``filter_eps``: None (exact gradients) or a threshold in (0, 1)."""
    if value is None:
        return None
    v = _as_real("filter_eps", value)
    if not 0.0 < v < 1.0:
        raise ValueError(f"filter_eps must be None or in (0, 1) (e.g. 2**-12); got {v}")
    return v


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool; got {type(value).__name__}")
    return value


def check_num_items(value, reduction: str = "mean"):
    """``num_items_in_batch``: None, a positive number, or a tensor (used as is, clamped >= 1).

    Given, it divides the sum of the per-token losses (Hugging Face's meaning, for ``"mean"``
    and ``"sum"`` alike); with ``reduction="none"`` there is nothing to divide: an error.
    """
    if value is not None and reduction == "none":
        raise ValueError(
            "num_items_in_batch must be None with reduction='none' (it divides the summed loss); "
            f"got num_items_in_batch={value!r}. Use reduction='sum' or 'mean' with it, or divide "
            "the per-token losses yourself"
        )
    if value is None or isinstance(value, Tensor):
        if isinstance(value, Tensor) and value.numel() != 1:
            raise ValueError(
                f"num_items_in_batch must be a number or a one-element tensor; got shape {tuple(value.shape)}"
            )
        return value
    v = _as_real("num_items_in_batch", value)
    if v <= 0:
        raise ValueError(f"num_items_in_batch must be > 0; got {v}")
    return v


def _check_float_tensor(name: str, x) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor; got dtype {x.dtype}")
    return x


def _autocast(tensors, device_type: str):
    """Apply the autocast dtype the way F.linear would, so mixed-precision loops just work."""
    if device_type in ("cuda", "cpu") and torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        return [None if t is None else t.to(dtype) for t in tensors]
    return list(tensors)


def check_head(
    hidden,
    weight,
    targets,
    bias,
    ignore_index,
    *,
    ref_hidden=None,
    ref_weight=None,
    ref_bias=None,
    need_ref: bool = False,
    check_range: bool = True,
) -> Tuple[HeadInputs, torch.Size]:
    """Validate the tensors of one head and flatten them.

    Returns the flattened :class:`HeadInputs` and the batch shape (``targets.shape``).
    ``check_range=False`` leaves the target-range check (a host sync) to the caller.
    """
    hidden = _check_float_tensor("hidden", hidden)
    weight = _check_float_tensor("weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (V, D); got shape {tuple(weight.shape)}")
    if hidden.dim() < 1:
        raise ValueError("hidden must have at least one dimension (..., D); got a 0-d tensor")
    V, D = weight.shape
    if V == 0 or D == 0:
        raise ValueError(f"weight must have V >= 1 and D >= 1; got shape {tuple(weight.shape)}")
    if hidden.shape[-1] != D:
        raise ValueError(
            f"hidden.shape[-1] must equal weight.shape[1] (D={D}); got hidden of shape {tuple(hidden.shape)}"
        )
    if not isinstance(targets, Tensor):
        raise TypeError(f"targets must be a torch.Tensor of integer ids; got {type(targets).__name__}")
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise TypeError(f"targets must be an integer tensor (int64 token ids); got dtype {targets.dtype}")
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(
            f"targets.shape must equal hidden.shape[:-1] = {tuple(hidden.shape[:-1])}; got {tuple(targets.shape)}"
        )
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int; got {type(ignore_index).__name__}")
    if bias is not None:
        bias = _check_float_tensor("bias", bias)
        if bias.shape != (V,):
            raise ValueError(f"bias must have shape (V,) = ({V},); got {tuple(bias.shape)}")

    if need_ref:
        if ref_hidden is None or ref_weight is None:
            raise ValueError("ref_hidden and ref_weight are required for ASFT (the frozen reference model)")
        ref_hidden = _check_float_tensor("ref_hidden", ref_hidden)
        ref_weight = _check_float_tensor("ref_weight", ref_weight)
        if ref_weight.dim() != 2 or ref_weight.shape[0] != V:
            raise ValueError(
                f"ref_weight must be 2-D (V, D_ref) with V={V} like weight; got shape {tuple(ref_weight.shape)}"
            )
        if ref_hidden.shape[:-1] != hidden.shape[:-1] or ref_hidden.shape[-1] != ref_weight.shape[1]:
            raise ValueError(
                f"ref_hidden must have shape {tuple(hidden.shape[:-1]) + (ref_weight.shape[1],)} "
                f"(hidden's batch shape, ref_weight's D); got {tuple(ref_hidden.shape)}"
            )
        if ref_bias is not None:
            ref_bias = _check_float_tensor("ref_bias", ref_bias)
            if ref_bias.shape != (V,):
                raise ValueError(f"ref_bias must have shape (V,) = ({V},); got {tuple(ref_bias.shape)}")
        # The reference model is frozen: no gradient flows into it.
        ref_hidden, ref_weight = ref_hidden.detach(), ref_weight.detach()
        ref_bias = None if ref_bias is None else ref_bias.detach()

    named = {"hidden": hidden, "weight": weight, "targets": targets, "bias": bias,
             "ref_hidden": ref_hidden, "ref_weight": ref_weight, "ref_bias": ref_bias}
    for name, t in named.items():
        # Meta tensors (a model built under torch.device("meta") / init_empty_weights and not yet
        # loaded) have shapes but no values: nothing here could be computed from them.
        if t is not None and t.device.type == "meta":
            raise ValueError(
                f"{name} is on the meta device (shape {tuple(t.shape)}, no data): the loss needs real "
                "values. Load or materialize the model first (e.g. model.to_empty(device=...) and load its "
                "weights)"
            )
    for name, t in named.items():
        if t is not None and t.device != hidden.device:
            raise ValueError(f"{name} must be on hidden's device {hidden.device}; got {t.device}")

    hidden, weight, bias, ref_hidden, ref_weight, ref_bias = _autocast(
        (hidden, weight, bias, ref_hidden, ref_weight, ref_bias), hidden.device.type
    )
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != hidden.dtype:
            raise TypeError(f"{name} must have hidden's dtype {hidden.dtype}; got {t.dtype}")
    for name, t in (("ref_weight", ref_weight), ("ref_bias", ref_bias)):
        if t is not None and t.dtype != ref_hidden.dtype:
            raise TypeError(f"{name} must have ref_hidden's dtype {ref_hidden.dtype}; got {t.dtype}")

    batch_shape = targets.shape
    flat_targets = targets.reshape(-1).long()
    if check_range:
        check_targets_range(flat_targets, V, int(ignore_index))
    inputs = HeadInputs(
        hidden=hidden.reshape(-1, D),
        weight=weight,
        bias=bias,
        targets=flat_targets,
        ref_hidden=None if ref_hidden is None else ref_hidden.reshape(-1, ref_hidden.shape[-1]),
        ref_weight=ref_weight,
        ref_bias=ref_bias,
    )
    return inputs, batch_shape


def check_targets_range(targets: Tensor, vocab_size: int, ignore_index: int) -> None:
    """Every target is ``ignore_index`` or in ``[0, V)``; otherwise a ValueError with an example.

    This reads a flag back to the host (one sync on an accelerator); it keeps every backend from
    ever indexing out of bounds.
    """
    if targets.numel() == 0:
        return
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab_size))
    if bool(bad.any()):
        pos = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"targets must be in [0, V={vocab_size}) or equal ignore_index={ignore_index}; "
            f"got {int(targets[pos])} at flat position {pos} ({int(bad.sum())} such targets)"
        )


# log pi_old(y) <= 0. Up to this much above 0 is accepted as the rounding of a log-probability
# of about 1 (an fp32 log-softmax at logits of |z| ~ 1e4 carries ~1e-3 nats of rounding); it
# moves the ratio by at most 0.1 %, well inside any clip range, and is used as given.
OLD_LOGPROB_TOLERANCE = 1e-3


def check_old_logprobs(old: Tensor, targets: Tensor, ignore_index: int) -> None:
    """``old_logprobs`` (flat) are log-probabilities on every unmasked token: not NaN, not +inf,
    not above ``OLD_LOGPROB_TOLERANCE``. ``-inf`` (pi_old gave the token probability 0) is
    allowed: the log-ratio clamp turns it into a finite, clipped ratio. Masked tokens may hold
    anything. Like :func:`check_targets_range` this reads a flag back to the host."""
    if old.numel() == 0:
        return
    bad = (targets != ignore_index) & ~(old <= OLD_LOGPROB_TOLERANCE)  # NaN fails every comparison
    if bool(bad.any()):
        pos = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"old_logprobs must be log-probabilities (<= 0, not NaN, not +inf; up to "
            f"{OLD_LOGPROB_TOLERANCE:g} is accepted as rounding) on every token whose target is not "
            f"ignore_index; got {float(old[pos])} at flat position {pos} ({int(bad.sum())} such tokens)"
        )


def check_per_token(name: str, x, batch_shape: torch.Size, device: torch.device, *, broadcast: bool):
    """A per-token tensor shaped like targets (or broadcastable to it when ``broadcast``)."""
    if x is None:
        return None
    if isinstance(x, Tensor):
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor; got dtype {x.dtype}")
        if x.device != device:
            raise ValueError(f"{name} must be on hidden's device {device}; got {x.device}")
        if broadcast:
            try:
                shape = torch.broadcast_shapes(x.shape, batch_shape)
            except RuntimeError:
                shape = None
            if shape != batch_shape:
                raise ValueError(
                    f"{name} must be broadcastable to targets.shape {tuple(batch_shape)}; got {tuple(x.shape)}"
                )
        elif x.shape != batch_shape:
            raise ValueError(f"{name} must have targets' shape {tuple(batch_shape)}; got {tuple(x.shape)}")
        return x.detach()
    if broadcast and isinstance(x, numbers.Real) and not isinstance(x, bool):
        return x
    kind = "a float or a tensor broadcastable to targets" if broadcast else "a tensor shaped like targets"
    raise TypeError(f"{name} must be {kind}; got {type(x).__name__}")
