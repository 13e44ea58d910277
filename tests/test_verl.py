"""psft_kernels.integrations.verl against the installed verl's own functions, on CPU.

verl pins transformers < 5.11, so it lives in its own environment (docs/verl.md); without verl
these tests skip.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

verl = pytest.importorskip("verl")

import psft_kernels as pk  # noqa: E402
import verl.utils.torch_functional as verl_F  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from verl.trainer.ppo import core_algos  # noqa: E402

from helpers import Result, assert_matches_truth, cpu_backends  # noqa: E402
from psft_kernels.integrations import verl as pkv  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
B, T, D, VOCAB = 3, 11, 16, 509


def problem(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    weight = torch.randn(VOCAB, D, generator=g, dtype=torch.float64) * 0.5
    labels = torch.randint(0, VOCAB, (B, T), generator=g)
    return hidden.to(dtype), weight.to(dtype), labels


def verl_reference(hidden, weight, labels, temperature):
    """What verl computes without fused kernels: materialized logits, then its own helpers."""
    logits = (hidden @ weight.T) / temperature
    return verl_F.logprobs_from_logits(logits, labels).reshape(-1), verl_F.entropy_from_logits(logits).reshape(-1)


def with_grads(fn, hidden, weight, labels, temperature, seed=1):
    """(logprobs, entropy) and the gradients of a random combination of both."""
    hidden, weight = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
    logprobs, entropy = fn(hidden, weight, labels, temperature)
    g = torch.Generator().manual_seed(seed)
    gl, ge = torch.randn(logprobs.shape, generator=g), torch.randn(entropy.shape, generator=g)
    ((logprobs * gl.to(logprobs.dtype)).sum() + (entropy * ge.to(entropy.dtype)).sum()).backward()
    return Result(torch.cat([logprobs, entropy]), {"hidden": hidden.grad, "weight": weight.grad}, {})


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_op_equals_verls_reference_forward_and_backward(backend, temperature):
    ours = lambda h, w, y, t: pkv.linear_cross_entropy(h, w, y, t, "none", backend=backend)  # noqa: E731
    truth = with_grads(verl_reference, *problem(torch.float64), temperature)
    plain = with_grads(verl_reference, *problem(torch.float32), temperature)
    fused = with_grads(ours, *problem(torch.float32), temperature)
    assert fused.loss.shape == (2 * B * T,) and fused.loss.dtype == torch.float32
    assert_matches_truth(fused, plain, truth, slack=1e-5, what=f"{backend} T={temperature}")


def test_op_reductions_and_refusals():
    hidden, weight, labels = problem(torch.float64)
    logprobs, entropy = pkv.linear_cross_entropy(hidden, weight, labels, 1.0, "none")
    for reduction, expected in (("sum", logprobs.sum()), ("mean", logprobs.mean())):
        reduced, ent = pkv.linear_cross_entropy(hidden, weight, labels, 1.0, reduction)
        assert reduced.shape == () and torch.allclose(reduced, expected, rtol=1e-6)
        assert torch.equal(ent, entropy)  # verl's op reduces the log-probs only
    with pytest.raises(ValueError, match="reduction"):
        pkv.linear_cross_entropy(hidden, weight, labels, 1.0, "max")
    with pytest.raises(NotImplementedError, match="dist_process_group"):
        pkv.linear_cross_entropy(hidden, weight, labels, 1.0, "none", object())


def test_verls_fused_forward_calls_our_op():
    import verl.utils.kernel.linear_cross_entropy as verl_lce

    assert verl_lce.linear_cross_entropy is pkv.linear_cross_entropy
    assert pkv.VERL_LINEAR_CROSS_ENTROPY == verl_lce.LinearCrossEntropy.apply  # verl's own op, kept


# ----------------------------------------------------------------------------------------------
# Registered pieces, through verl's registries and verl's own loss
# ----------------------------------------------------------------------------------------------


def actor_config():
    return OmegaConf.create(dict(clip_ratio=0.2, clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=10.0,
                                 global_batch_info={}))


def response_batch(seed=2):
    """Per-token inputs of a verl actor update: hidden / head for the log-probs, a response mask."""
    hidden, weight, labels = problem(torch.float64, seed)
    mask = torch.ones(B, T)
    mask[0, :4] = 0  # prompt / padding positions
    mask[2, 7:] = 0
    return hidden, weight, labels, mask


def test_psft_estimator_is_found_by_name_and_gives_unit_advantages():
    estimator = core_algos.get_adv_estimator_fn("psft")
    assert estimator is pkv.compute_psft_advantage
    _, _, _, mask = response_batch()
    advantages, returns = estimator(token_level_rewards=torch.randn(B, T), response_mask=mask, config=None,
                                    index=None)
    assert torch.equal(advantages, mask) and torch.equal(returns, mask)


def test_vanilla_loss_with_psft_advantages_is_pks_psft_loss():
    """verl's own clipped loss on our op's log-probs, advantages from the registered estimator, equals
    pk.linear_psft_loss on the same head: value and gradients."""
    hidden, weight, labels, mask = response_batch()
    with torch.no_grad():  # pi_old: the policy before a few steps, here a perturbed head
        old, _ = pkv.linear_cross_entropy(hidden, weight + 0.05 * torch.randn_like(weight), labels)
    old = old.reshape(B, T)
    advantages, _ = core_algos.get_adv_estimator_fn("psft")(token_level_rewards=torch.zeros(B, T), response_mask=mask)

    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logp, _ = pkv.linear_cross_entropy(h1, w1, labels)
    vanilla = core_algos.get_policy_loss_fn("vanilla")
    loss_verl, metrics = vanilla(old, logp.reshape(B, T), advantages.double(), mask.double(), "token-mean",
                                 actor_config())
    loss_verl.backward()

    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    targets = labels.masked_fill(mask == 0, -100)
    loss_pk, stats = pk.linear_psft_loss(h2, w2, targets, old_logprobs=old, eps_low=0.2, eps_high=0.28,
                                         return_stats=True)
    loss_pk.backward()
    assert 0 < metrics["actor/pg_clipfrac"] < 1  # some tokens clipped: the test exercises the clip
    assert loss_verl.item() == pytest.approx(loss_pk.item(), rel=1e-10)
    # verl averages in float32; one token more or less clipped would move it by 1/25 or so
    assert metrics["actor/pg_clipfrac"] == pytest.approx(stats["clip_fraction"].item(), abs=1e-6)
    assert torch.allclose(h1.grad, h2.grad, rtol=1e-9, atol=1e-12)
    assert torch.allclose(w1.grad, w2.grad, rtol=1e-9, atol=1e-12)


def test_dft_policy_loss_is_found_by_name_and_is_pks_dft_loss():
    hidden, weight, labels, mask = response_batch()
    dft = core_algos.get_policy_loss_fn("dft")
    assert dft is pkv.compute_policy_loss_dft
    advantages, _ = pkv.compute_psft_advantage(torch.zeros(B, T), mask)

    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logp, _ = pkv.linear_cross_entropy(h1, w1, labels)
    logp = logp.reshape(B, T)
    loss_verl, metrics = dft(logp.detach(), logp, advantages.double(), mask.double(), "token-mean", actor_config())
    loss_verl.backward()

    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss_pk = pk.linear_dft_loss(h2, w2, labels.masked_fill(mask == 0, -100))
    loss_pk.backward()
    assert loss_verl.item() == pytest.approx(loss_pk.item(), rel=1e-10)
    assert metrics["actor/ppo_kl"] == 0.0
    assert torch.allclose(h1.grad, h2.grad, rtol=1e-9, atol=1e-12)
    assert torch.allclose(w1.grad, w2.grad, rtol=1e-9, atol=1e-12)


def test_verl_loads_the_module_through_its_external_modules_variable():
    code = ("import verl; from verl.trainer.ppo import core_algos as c; "
            "import verl.utils.kernel.linear_cross_entropy as l; "
            "assert c.get_adv_estimator_fn('psft').__module__ == 'psft_kernels.integrations.verl'; "
            "assert c.get_policy_loss_fn('dft').__module__ == 'psft_kernels.integrations.verl'; "
            "assert l.linear_cross_entropy.__module__ == 'psft_kernels.integrations.verl'")
    env = {**os.environ, "VERL_USE_EXTERNAL_MODULES": "psft_kernels.integrations.verl",
           "PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_verls_triton_backend_forward_runs_on_our_op_and_matches_its_torch_backend():
    """verl's own patched forward (use_fused_kernels, impl_backend=triton) on a tiny Llama, through our op,
    against verl's torch-backend forward of the same model: per-token log-probs, entropy, head gradient."""
    import copy

    transformers = pytest.importorskip("transformers")
    from verl.models.transformers import dense_common

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=301, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    ours_model = transformers.LlamaForCausalLM(config)
    verl_model = copy.deepcopy(ours_model)
    ids = torch.randint(0, 301, (2, 9))
    ours = dense_common.forward_with_triton_backend(ours_model, input_ids=ids, return_dict=True, temperature=0.8)
    theirs = dense_common.forward_with_torch_backend(verl_model, input_ids=ids, return_dict=True, temperature=0.8)
    assert ours.log_probs.shape == (18,)  # flattened, as verl's Triton op returns them
    assert torch.allclose(ours.log_probs, theirs.log_probs.reshape(-1), rtol=1e-5, atol=1e-5)
    assert torch.allclose(ours.entropy, theirs.entropy.reshape(-1), rtol=1e-5, atol=1e-5)
    (ours.log_probs.sum() + 0.1 * ours.entropy.sum()).backward()
    (theirs.log_probs.sum() + 0.1 * theirs.entropy.sum()).backward()
    g1, g2 = ours_model.lm_head.weight.grad, verl_model.lm_head.weight.grad
    assert g2.abs().max() > 0 and torch.allclose(g1, g2, rtol=1e-4, atol=1e-6)
