"""verl integration: the fused log-prob / entropy op, PSFT's advantages and DFT as a policy loss.

Load it in every verl worker with ``VERL_USE_EXTERNAL_MODULES=psft_kernels.integrations.verl``
(docs/verl.md has the overrides of the official PSFT run). Importing it:

* registers the advantage estimator ``"psft"`` (``algorithm.adv_estimator=psft``): advantage 1
  on every response token, 0 elsewhere. With verl's ``vanilla`` policy loss (clip 0.2 / 0.28) and
  the demonstration where a rollout would be, that is PSFT: ``-min(r, clip(r, 0.8, 1.28))`` per
  token, pi_old scored once per global batch and K = train_batch_size / ppo_mini_batch_size
  optimizer steps on it;
* registers the policy loss ``"dft"`` (``actor_rollout_ref.actor.policy_loss.loss_mode=dft``):
  ``-A * sg(p) * log p`` per token, aggregated by verl's ``agg_loss`` like every verl loss;
* makes verl's fused-kernel forward (``actor_rollout_ref.model.use_fused_kernels=True``,
  ``fused_kernel_options.impl_backend=triton``) call :func:`linear_cross_entropy`, which has verl's
  contract and runs on psft_kernels' backends (chunked, native CPU, Triton), so it also works
  without a GPU.

What does not fit verl's policy-loss signature: ASFT. Its KL is over the full vocabulary against
the reference model's distribution; a verl policy loss sees per-token log-probs of the sampled
token only (verl's own ``use_kl_loss`` is a sampled-token estimate, not this KL). ASFT needs the
reference head inside the loss: use ``hf.PSFTTrainer`` or ``trl.FusedSFTTrainer``. Nor does the
vocabulary-parallel form of the op (``dist_process_group``): it is refused.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from ..api import linear_logprobs
from .. import _validation as V

from verl.trainer.ppo import core_algos  # noqa: E402  (this module is verl's plug-in: verl is required)
import verl.utils.kernel.linear_cross_entropy as _verl_lce  # noqa: E402

__all__ = ["linear_cross_entropy", "compute_psft_advantage", "compute_policy_loss_dft", "ADV_ESTIMATOR",
           "DFT_LOSS_MODE"]

ADV_ESTIMATOR = "psft"
DFT_LOSS_MODE = "dft"
REDUCTIONS = ("none", "sum", "mean")


def linear_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, temperature: float = 1.0,
                         reduction: str = "none", dist_process_group=None, *, backend: str = "auto"):
    """verl's ``linear_cross_entropy`` contract on psft_kernels: ``(logprobs, entropy)``, both differentiable.

    ``hidden``: ``(..., D)``; ``weight``: ``(V, D)``; ``labels``: ``(...)``, flattened like verl's op.
    PyTorch equivalent: ``lp = log_softmax(hidden @ weight.T / temperature, -1)``;
    ``logprobs = lp.gather(-1, labels[..., None]).flatten()`` (its sum or mean for ``reduction``
    "sum" / "mean"), ``entropy = -(lp.exp() * lp).sum(-1).flatten()`` (always per token); fp32 as verl's
    op returns them (fp64 for fp64 inputs).
    """
    if dist_process_group is not None:
        raise NotImplementedError(
            "dist_process_group (a vocabulary-parallel lm-head) is not supported by psft_kernels' verl op; got "
            f"{dist_process_group!r}. Use verl's own op for tensor-parallel heads")
    V.check_choice("reduction", reduction, REDUCTIONS)
    temperature = V.check_positive("temperature", temperature)
    logprobs, entropy = linear_logprobs(hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1),
                                        temperature=temperature, backend=backend)
    if reduction == "sum":
        logprobs = logprobs.sum()
    elif reduction == "mean":
        logprobs = logprobs.mean()
    return logprobs, entropy


@core_algos.register_adv_est(ADV_ESTIMATOR)
def compute_psft_advantage(token_level_rewards: Tensor, response_mask: Tensor, config=None, **kwargs):
    """PSFT's advantages: 1 on every response token (the demonstration), 0 elsewhere; returns the same.

    The rewards are not used: PSFT imitates the demonstration, it does not rank responses.
    """
    advantages = response_mask.to(torch.float32)
    return advantages, advantages.clone()


@core_algos.register_policy_loss(DFT_LOSS_MODE)
def compute_policy_loss_dft(old_log_prob: Tensor, log_prob: Tensor, advantages: Tensor, response_mask: Tensor,
                            loss_agg_mode: str = "token-mean", config: Optional[Any] = None,
                            rollout_is_weights: Optional[Tensor] = None):
    """DFT in verl's policy-loss signature: ``-A * sg(exp(log_prob)) * log_prob`` per token.

    ``old_log_prob`` only feeds the ``actor/ppo_kl`` metric (DFT has no pi_old). With the ``psft``
    advantages (A = 1) and ``token-mean`` this is ``pk.linear_dft_loss``'s loss.
    """
    losses = -advantages * log_prob.detach().exp() * log_prob
    if rollout_is_weights is not None:
        losses = losses * rollout_is_weights
    batch_info = getattr(config, "global_batch_info", None) or {}  # verl's token / sequence counts of the batch
    loss = core_algos.agg_loss(loss_mat=losses, loss_mask=response_mask, loss_agg_mode=loss_agg_mode, **batch_info)
    mask = response_mask.to(log_prob.dtype)
    ppo_kl = ((old_log_prob - log_prob).detach() * mask).sum() / mask.sum().clamp(min=1)
    return loss, {"actor/ppo_kl": ppo_kl.item()}


# verl's fused-kernel forwards import the op from this module at call time: point them at ours.
VERL_LINEAR_CROSS_ENTROPY = _verl_lce.linear_cross_entropy
_verl_lce.linear_cross_entropy = linear_cross_entropy
