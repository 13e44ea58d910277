"""``num_items_in_batch`` follows Hugging Face: given, the loss is the sum over unmasked tokens
divided by it, for ``reduction="mean"`` and ``"sum"`` alike (``F.cross_entropy(...,
reduction="sum") / num_items_in_batch``); with ``"none"`` it is an error."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers import FUNCTIONS, assert_close, cpu_backends, loss_kwargs, make_problem, run

BACKENDS = ["reference"] + cpu_backends(include_slow=True)
N_ITEMS = [7, torch.tensor(7), torch.tensor(7.0)]


def _hf_style(problem, n):
    """The Hugging Face formula on materialized float64 logits: value and hidden / weight gradients."""
    h = problem.hidden.clone().requires_grad_()
    w = problem.weight.clone().requires_grad_()
    logits = F.linear(h, w)
    loss = F.cross_entropy(logits.flatten(0, -2), problem.targets.flatten(), ignore_index=-100, reduction="sum") / n
    loss.backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("n", N_ITEMS, ids=["int", "long_tensor", "float_tensor"])
def test_sft_equals_hugging_face_sum_over_num_items(backend, reduction, n):
    p = make_problem(batch=(4, 9))
    value, gh, gw = _hf_style(p, 7.0)
    r = run("sft", backend, p, reduction=reduction, num_items_in_batch=n, grads=("hidden", "weight"))
    torch.testing.assert_close(r.loss, value, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(r.grads["hidden"], gh, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(r.grads["weight"], gw, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", ["dft", "psft", "asft"])
def test_sum_and_mean_agree_given_num_items(backend, loss):
    """Every loss: with num_items_in_batch, "sum" and "mean" are both the float64 reference's
    plain sum divided by it (value and every gradient)."""
    p = make_problem(batch=(3, 10), ref=loss == "asft", bias=True)
    total = run(loss, "reference", p, reduction="sum")
    expected = type(total)(total.loss / 7, {k: g / 7 for k, g in total.grads.items()}, total.stats)
    for reduction in ("mean", "sum"):
        assert_close(run(loss, backend, p, reduction=reduction, num_items_in_batch=7), expected,
                     rtol=1e-10, atol=1e-12, what=f"{backend}/{reduction}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_none_with_num_items_is_an_error(backend):
    p = make_problem()
    args, kw = loss_kwargs("sft", p, backend=backend, reduction="none", num_items_in_batch=4)
    with pytest.raises(ValueError, match=r"num_items_in_batch must be None with reduction='none'"):
        FUNCTIONS["sft"](*args, **kw)
