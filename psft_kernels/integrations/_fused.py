"""The fused loss computed inside the model's own forward, inside the lm-head's own module call.

Sharding engines (FSDP1, FSDP2, DeepSpeed ZeRO-3) hold a parameter whole only while the module
that owns it runs: they gather it in a pre-forward hook, free it after the call, and gather it
again for the backward when a gradient reaches that call's outputs. A loss computed from
``get_output_embeddings().weight`` after the forward has returned sees a shard, a ``(0,)``
placeholder or a ``DTensor``. So the loss is computed *inside* the head's call:

* :func:`prepare_model` gives the model instance (never its class) a ``forward`` that accepts one
  extra keyword, ``psft_request``, and gives the lm-head module(s) a ``forward`` that serves a
  request while one is armed. Without a request both behave exactly as before. It must run
  before the engine wraps the model: the engines keep calling the instance they wrapped.
* A call ``runner(**batch, psft_request=request)`` (``runner`` is the model or whatever engine
  wraps it: DDP, FSDP, a DeepSpeed engine) arms the head with the request and runs the model's
  own forward with all positions kept (``logits_to_keep=0``). The model calls its lm-head once,
  as usual, through whatever hooks the engine put there; the armed head computes the request
  (the fused loss, log-probs, the head probe) from the hidden states it is given and the weight
  as it is inside its call, keeps the result in the request, and returns a ``(B, T, 1)``
  *carrier* instead of the ``(B, T, V)`` logits. The carrier is zero and depends on the loss, and
  the loss handed back is ``loss + 0 * carrier-as-the-model-returned-it``: the backward then
  passes through the engine's hooks on the head's output (FSDP2's pre-backward unshard, ZeRO-3's
  re-gather) before it reaches the loss, and the head's gradient is reduced by the engine like
  any other parameter's. The head is called once per forward: no second call for the engine's
  bookkeeping to trip over (FSDP2 units holding several modules do).
* The model's own auxiliary loss (MoE routers' ``aux_loss``) is added exactly as its forward adds
  it when given labels: ``loss + router_aux_loss_coef * aux_loss``.

Nothing is monkey-patched on a class, and another instance of the same model is untouched.
"""

from __future__ import annotations

import functools
import types
from typing import Callable, Dict, Mapping, Optional

import torch
from torch import Tensor, nn

from ..api import linear_asft_loss, linear_dft_loss, linear_logprobs, linear_psft_loss, linear_sft_loss
from ..vocab_parallel import _dtensor_shard, _is_dtensor
from ._lm_head import LMHead, base_model, forward_inputs

REQUEST_KWARG = "psft_request"
_INNER = "_psft_inner_forward"  # the forward an instance had before prepare_model (None: its class's)
_ARMED = "_psft_armed_request"  # set on the lm-head module(s) while a request-carrying forward runs
LOSSES = {"sft": linear_sft_loss, "dft": linear_dft_loss, "psft": linear_psft_loss, "asft": linear_asft_loss}


def head_inputs(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], *per_token: Optional[Tensor]):
    """Everything on the head's device and the head in the hidden states' dtype (differentiable moves).

    A model split over devices (``device_map``) has its last hidden states and its lm-head where
    they are; under autocast an fp32 head meets bf16 hidden states, and the lm-head would have run
    in bf16 as well.
    """
    device = weight.device
    hidden = hidden.to(device)
    if weight.dtype != hidden.dtype:
        weight = weight.to(hidden.dtype)
    if bias is not None and bias.dtype != hidden.dtype:
        bias = bias.to(hidden.dtype)
    return (hidden, weight, bias, *(None if t is None else t.to(device) for t in per_token))


# ----------------------------------------------------------------------------------------------
# A vocabulary-parallel lm-head: torch's ColwiseParallel plan (docs/distributed.md). Its input hook
# hands the head call a Replicate DTensor of the hidden states and its weight (and bias) are Shard(0)
# DTensors: the loss functions take them as they are (psft_kernels.vocab_parallel), and the single
# all-reduce of grad_hidden there is the only one: the gradient reaches the Replicate input as a
# Replicate gradient, which the hook's backward passes on without another sum.
# ----------------------------------------------------------------------------------------------


def _check_tensor_parallel(head: LMHead, module: nn.Module, weight, hidden) -> None:
    if not _is_dtensor(hidden):
        raise RuntimeError(
            f"{head.what}'s lm-head weight is a sharded DTensor inside the lm-head's own call, but its input is a "
            "plain tensor: a fully_shard unit that does not contain the lm-head module, or a tensor-parallel plan "
            "other than ColwiseParallel. Put the lm-head in a fully_shard unit (the root is fine); to shard it over "
            "the vocabulary use parallelize_module(model, tp_mesh, {'lm_head': ColwiseParallel()})")
    if head.tied:
        raise ValueError(
            f"{head.what}'s lm-head is tied to the input embedding: a tensor-parallel plan cannot shard it over the "
            "vocabulary (ColwiseParallel replaces lm_head.weight, untying it). Use an untied head, or no "
            "tensor-parallel plan on the head")
    try:
        _dtensor_shard(weight)
    except ValueError as e:
        raise ValueError(f"{head.what}'s lm-head has a tensor-parallel plan the fused loss does not support (only "
                         f"ColwiseParallel, the head sharded over the vocabulary, is): {e}") from None
    if hidden.device_mesh.ndim != 1:
        raise ValueError(f"{head.what}'s lm-head: ColwiseParallel on a {hidden.device_mesh.ndim}-D mesh is not "
                         "supported; parallelize the head on the tensor-parallel sub-mesh (mesh['tp'])")


def _vocab_placements(weight, ndim: int):
    """A tensor's placements when its last dim is split like the head's rows (Shard(0))."""
    from torch.distributed.tensor import Replicate, Shard

    return [Shard(ndim - 1) if isinstance(p, Shard) and p.dim == 0 else Replicate() for p in weight.placements]


def _tp_carrier(carrier: Tensor, hidden, weight):
    """The carrier as the ColwiseParallel output hook expects the logits: a DTensor split over the last dim."""
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(carrier, hidden.device_mesh, _vocab_placements(weight, carrier.dim()), run_check=False)


def _gather_vocab(local: Tensor, weight) -> Tensor:
    """Every rank's columns of ``local`` (its shard of the vocabulary), whole (no gradient: the probe)."""
    from torch.distributed.tensor import DTensor

    shape = (*local.shape[:-1], weight.shape[0])
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(local.contiguous(), weight.device_mesh, _vocab_placements(weight, local.dim()),
                              run_check=False, shape=shape, stride=stride).full_tensor()


def _ref_shard(weight, ref_hidden, ref_weight, ref_bias):
    """ASFT's reference head cut like the policy's: a whole (unsharded) reference head keeps this rank's rows."""
    if _is_dtensor(ref_weight):
        if ref_weight.placements != weight.placements or ref_weight.shape != weight.shape:
            raise ValueError(f"the reference lm-head is sharded {ref_weight.placements} {tuple(ref_weight.shape)}, the "
                             f"model's {weight.placements} {tuple(weight.shape)}: ASFT needs them sharded alike")
        return ref_hidden, ref_weight, ref_bias
    if ref_weight.shape[0] != weight.shape[0]:
        raise ValueError(f"the reference lm-head has {ref_weight.shape[0]} rows, the model's {weight.shape[0]}: ASFT "
                         "needs the same vocabulary")
    start = _dtensor_shard(weight).start
    rows = slice(start, start + weight.to_local().shape[0])
    return ref_hidden, ref_weight[rows], None if ref_bias is None else ref_bias[rows]


# ----------------------------------------------------------------------------------------------
# Requests: what the head call computes. Plain classes on purpose (not dataclasses, not tensor
# containers): engines that walk a forward's arguments to cast or move tensors (FSDP's mixed
# precision, DeepSpeed's fp16 input cast) must leave the pi_old log-probs and targets alone.
# ----------------------------------------------------------------------------------------------


class Request:
    def __init__(self, head: LMHead):
        self.head = head
        self.result: Optional[Dict[str, Tensor]] = None

    def compute(self, module: nn.Module, hidden: Tensor) -> Dict[str, Tensor]:
        raise NotImplementedError

    def serve(self, module: nn.Module, hidden: Tensor) -> Tensor:
        """The armed head's call: compute the request, return what the model gets as its logits."""
        if self.result is not None:
            raise RuntimeError(
                f"{self.head.what}'s lm-head was called twice in one forward; the fused loss needs one call")
        self.result = self.compute(module, hidden)
        anchor = next((t for t in self.result.values() if t.requires_grad and not _is_dtensor(t)), None)
        local = hidden.to_local() if _is_dtensor(hidden) else hidden
        carrier = local.new_zeros(*local.shape[:-1], 1)
        if anchor is not None:
            carrier = carrier + 0 * anchor.reshape(-1)[:1].to(carrier.dtype)
        return _tp_carrier(carrier, hidden, module.weight) if _is_dtensor(hidden) else carrier

    def finish(self, output, aux) -> Dict[str, Tensor]:
        """The model forward's return value, from the served result, the model's own output and its
        router loss ``(coefficient, aux_loss)`` if it returned one (else None)."""
        return self.result

    @staticmethod
    def _through_carrier(loss: Tensor, output) -> Tensor:
        """``loss`` made to depend on the carrier as the model returned it (see the module doc)."""
        logits = output.get("logits") if isinstance(output, Mapping) else getattr(output, "logits", None)
        if logits is None:
            logits = output[0]
        if _is_dtensor(logits):  # a tensor-parallel head's carrier, left a DTensor (use_local_output=False)
            logits = logits.to_local()
        if not logits.requires_grad:
            return loss
        return loss + 0 * logits.reshape(-1)[:1].sum().to(loss.dtype)

    def head_weights(self, module: nn.Module, hidden: Tensor):
        """``(weight, bias)`` of the head module as it is inside its own call: whole, the DTensor
        shards of a vocabulary-parallel (``ColwiseParallel``) head, or an error."""
        weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
        if _is_dtensor(weight):
            _check_tensor_parallel(self.head, module, weight, hidden)
            return weight, bias if isinstance(bias, Tensor) else None
        if not isinstance(weight, Tensor) or weight.dim() != 2 or weight.numel() == 0:
            shape = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
            raise RuntimeError(
                f"{self.head.what}'s lm-head weight is {shape} inside the lm-head's own call: an engine did not "
                "gather it (a sharding engine this integration does not know, or parameters offloaded elsewhere)")
        return weight, bias if isinstance(bias, Tensor) else None


class LossRequest(Request):
    """One micro-batch's fused loss and stats. ``options`` go to the loss function as they are."""

    def __init__(self, head: LMHead, kind: str, targets: Tensor, options: Mapping, *,
                 old_logprobs: Optional[Tensor] = None, reference: Optional["Reference"] = None):
        super().__init__(head)
        self.kind, self.targets, self.options = kind, targets, dict(options)
        self.old_logprobs, self.reference = old_logprobs, reference

    def compute(self, module, hidden):
        weight, bias = self.head_weights(module, hidden)
        hidden, weight, bias, targets, old = head_inputs(hidden, weight, bias, self.targets, self.old_logprobs)
        opts = dict(self.options, bias=bias, softcap=self.head.softcap, temperature=self.head.temperature,
                    return_stats=True)
        if self.kind == "psft":
            opts["old_logprobs"] = old
        if self.kind == "asft":
            ref = self.reference.tensors(module, weight)
            if _is_dtensor(weight):
                ref = _ref_shard(weight, *ref)
            opts.update(zip(("ref_hidden", "ref_weight", "ref_bias"), ref))
        loss, stats = LOSSES[self.kind](hidden, weight, targets, **opts)
        return {"loss": loss, **{k: v for k, v in stats.items() if isinstance(v, Tensor)}}

    def finish(self, output, aux):
        result = self.result
        result["loss"] = self._through_carrier(result["loss"], output)
        if aux is not None:
            coef, aux = aux
            loss = result["loss"]
            # As the model's forward adds it when given labels: per micro-batch, coefficient times
            # the router loss, not divided by the token count (Trainer's accumulation keeps it so).
            result["loss"] = loss + coef * aux.to(loss.device, loss.dtype)
            result["aux_loss"] = aux.detach()
        return result


class LogprobsRequest(Request):
    """Per-token ``log p(target)`` (and entropy), forward only: PSFT's pi_old."""

    def __init__(self, head: LMHead, targets: Tensor, backend: str):
        super().__init__(head)
        self.targets, self.backend = targets, backend

    def compute(self, module, hidden):
        hidden, weight, bias, targets = head_inputs(hidden, *self.head_weights(module, hidden), self.targets)
        logp, entropy = linear_logprobs(hidden, weight, targets, bias=bias, softcap=self.head.softcap,
                                        temperature=self.head.temperature, backend=self.backend)
        return {"logprobs": logp, "entropy": entropy}


class HeadInputsRequest(Request):
    """A reference model's ``(hidden, weight, bias)``, for ASFT's KL (forward only).

    The weight is handed out of its module call: ``clone_weight`` copies it when an engine would
    free it after the call (a reference inside the sharded model, e.g. a peft base head kept by
    ``modules_to_save``); a reference that is whole (a separate, unsharded ref_model) is not copied.
    """

    def __init__(self, head: LMHead, clone_weight: bool):
        super().__init__(head)
        self.clone_weight = clone_weight

    def compute(self, module, hidden):
        weight, bias = self.head_weights(module, hidden)
        if self.clone_weight:
            weight, bias = weight.detach().clone(), None if bias is None else bias.detach().clone()
        return {"hidden": hidden.detach(), "weight": weight.detach(),
                **({} if bias is None else {"bias": bias.detach()}), "module_id": torch.tensor(id(module))}


class ProbeRequest(Request):
    """The model's own logits (all positions) beside ``softcap(hidden @ W.T + b)`` in float64:
    the head call computes both, and returns the real logits for the model to finish."""

    def serve(self, module, hidden):
        weight, bias = self.head_weights(module, hidden)
        if _is_dtensor(weight):  # a vocabulary-parallel head: compare the whole logits (a few tokens)
            self.tp_head = weight
            local = [None if t is None else t.to_local() for t in (hidden, weight, bias)]
            self.result = {"hidden": local[0], "reconstructed": _gather_vocab(self.head.logits_from(*local), weight)}
        else:
            self.result = {"hidden": hidden,
                           "reconstructed": self.head.logits_from(hidden.to(weight.device), weight, bias)}
        return _inner_forward(module)(hidden)

    def finish(self, output, aux):
        logits = output.get("logits") if isinstance(output, Mapping) else getattr(output, "logits", None)
        logits = output[0] if logits is None else logits
        head = getattr(self, "tp_head", None)
        if _is_dtensor(logits):
            logits = logits.full_tensor()
        elif head is not None and logits.shape[-1] != head.shape[0]:  # use_local_output: this rank's columns
            logits = _gather_vocab(logits, head)
        self.result["logits"] = logits
        return self.result


class Reference:
    """ASFT's reference head inputs, taken from a reference forward (HeadInputsRequest's result).

    When the reference head is the very module being trained (a peft model's base head with the
    adapter disabled: LoRA does not touch the head), its weight is read inside the policy's own
    head call instead of being carried out of the reference's.
    """

    def __init__(self, result: Dict[str, Tensor]):
        self.hidden, self.weight, self.bias = result["hidden"], result["weight"], result.get("bias")
        self.module_id = int(result["module_id"])

    def tensors(self, module: nn.Module, weight: Tensor):
        if id(module) == self.module_id:
            bias = getattr(module, "bias", None)
            ref = (self.hidden, weight.detach(), None if bias is None else bias.detach())
        else:
            ref = (self.hidden, self.weight, self.bias)
        return tuple(None if t is None else t.to(weight.device) for t in ref)


def _router_loss(model: nn.Module, output):
    """``(coefficient, aux_loss)`` when the forward returned a router loss that, given labels, it
    would have added to its loss (Mixtral, Qwen2-MoE, Qwen3-MoE, ...); None otherwise."""
    aux = output.get("aux_loss") if isinstance(output, Mapping) else getattr(output, "aux_loss", None)
    if not isinstance(aux, Tensor):
        return None
    coef = getattr(model, "router_aux_loss_coef", None)
    if coef is None:
        coef = getattr(getattr(model, "config", None), "router_aux_loss_coef", None)
    if coef is None:
        raise ValueError(f"{type(model).__name__} returned an aux_loss but has no router_aux_loss_coef: cannot add "
                         "it as its own forward would")
    return float(coef), aux


# ----------------------------------------------------------------------------------------------
# The instance forwards
# ----------------------------------------------------------------------------------------------


def _inner_forward(module: nn.Module) -> Callable:
    inner = module.__dict__.get(_INNER)
    return inner if inner is not None else types.MethodType(type(module).forward, module)


def _model_forward(self, *args, **kwargs):
    request = kwargs.pop(REQUEST_KWARG, None)
    if request is None:
        return _inner_forward(self)(*args, **kwargs)
    return _run(self, request, args, kwargs)


def _head_forward(self, *args, **kwargs):
    request = self.__dict__.get(_ARMED)
    if request is None:
        return _inner_forward(self)(*args, **kwargs)
    (hidden,) = args
    return request.serve(self, hidden)


def _install(module: nn.Module, impl) -> None:
    current = module.__dict__.get("forward")
    if getattr(getattr(current, "__func__", None), "_psft_impl", None) is impl:
        return  # already prepared
    module.__dict__[_INNER] = current  # an instance-level forward set by someone else: keep calling it
    signature_of = current if current is not None else type(module).forward

    # A function bound as a method, not a closure: accelerate re-wraps ``model.forward.__func__``
    # for mixed precision. ``wraps`` keeps the inner signature visible (Trainer reads it to decide
    # which dataset columns the model takes).
    @functools.wraps(signature_of)
    def forward(self, *args, **kwargs):
        return impl(self, *args, **kwargs)

    forward._psft_impl = impl
    module.forward = types.MethodType(forward, module)


def _head_leaves(head: nn.Module):
    """The modules under the output embedding that hold a weight (the head itself, or a peft
    ``modules_to_save`` wrapper's original and copies): each gets the request-aware forward."""
    return [m for m in head.modules() if isinstance(getattr(m, "weight", None), Tensor)
            and not any(True for _ in m.children())]


def prepare_model(model: nn.Module, what: str = "model") -> LMHead:
    """Make ``model`` compute the fused loss inside its own forward; returns its :class:`LMHead`.

    Call it on the model you will hand to the engine (the peft model for a peft model), before
    ``fully_shard`` / ``FullyShardedDataParallel`` / ``deepspeed.initialize`` / DDP wrap it.
    Idempotent; changes this instance only. The model behaves as before unless a call passes
    ``psft_request=``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"{what} must be a torch.nn.Module; got {type(model).__name__}")
    wrapper = type(model).__module__.split(".")[0]
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)) or wrapper == "deepspeed" or \
            hasattr(model, "_fsdp_wrapped_module"):
        raise TypeError(
            f"{what} is already wrapped by {type(model).__name__}: call prepare_model on the model itself, before the "
            "engine wraps it (the engine keeps calling the forward of the instance it wrapped)")
    head = model.__dict__.get("_psft_head")
    if head is None:
        head = LMHead(model, what)
        model.__dict__["_psft_head"] = head
    _install(model, _model_forward)
    for leaf in _head_leaves(base_model(model).get_output_embeddings()):
        _install(leaf, _head_forward)
    return head


def prepared_head(model: nn.Module) -> Optional[LMHead]:
    return model.__dict__.get("_psft_head")


def armed_heads(base: nn.Module):
    """The request-aware modules under the output embedding as the model uses it now (inside
    an FSDP1 wrapper, a peft ``modules_to_save`` wrapper's original and copies)."""
    heads = [m for m in base.get_output_embeddings().modules()
             if getattr(getattr(m.__dict__.get("forward"), "__func__", None), "_psft_impl", None) is _head_forward]
    if not heads:
        raise RuntimeError("the lm-head was replaced after prepare_model: call prepare_model again")
    return heads


def _run(model: nn.Module, request: Request, args, kwargs):
    base = base_model(model)
    kwargs = forward_inputs(kwargs)
    kwargs["use_cache"] = False
    keep = request.head._keep_kwarg
    if keep is not None:
        kwargs[keep] = 0  # all positions go to the head: the armed head never forms their logits
    heads = armed_heads(base)
    for m in heads:
        m.__dict__[_ARMED] = request
    try:
        output = _inner_forward(model)(*args, **kwargs)
    finally:
        for m in heads:
            m.__dict__.pop(_ARMED, None)
    if request.result is None:
        raise RuntimeError(
            f"{request.head.what}'s forward did not call its lm-head ({type(base.get_output_embeddings()).__name__}); "
            "this model is not supported by the fused loss")
    return request.finish(output, _router_loss(base, output))
