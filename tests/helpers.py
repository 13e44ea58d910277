"""Problem generators and comparison rules shared by the test files.

``make_problem`` builds seeded inputs for every loss; ``run`` calls a loss on a backend and
returns the loss, the gradients and the stats; ``assert_matches_truth`` applies the suite's
accuracy rule: a backend's error against the float64 truth may not exceed the error that plain
PyTorch (the reference at the same dtype) makes, times a small factor, plus a small slack.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Dict, Optional, Tuple

import torch

import psft_kernels as pk
from psft_kernels import backends

LOSSES = ("sft", "dft", "psft", "asft")
FUNCTIONS = {
    "sft": pk.linear_sft_loss,
    "dft": pk.linear_dft_loss,
    "psft": pk.linear_psft_loss,
    "asft": pk.linear_asft_loss,
}


# Option sets every backend is compared on: problem options (how inputs are drawn) mixed with
# loss options; ``split_options`` separates them.
OPTION_SETS = {
    "plain": dict(),
    "bias": dict(bias=True),
    "temperature": dict(temperature=0.7),
    "softcap": dict(softcap=3.0, logit_scale=6.0),
    "softcap+temperature+bias": dict(softcap=2.5, temperature=1.3, bias=True, logit_scale=5.0),
    "entropy_coef": dict(entropy_coef=0.1),
    "no_ignored": dict(ignore_frac=0.0),
}
_PROBLEM_KEYS = {"bias", "logit_scale", "ignore_frac"}


def split_options(opts: Dict) -> Tuple[Dict, Dict]:
    """``(make_problem options, loss options)`` of one entry of OPTION_SETS."""
    return ({k: v for k, v in opts.items() if k in _PROBLEM_KEYS},
            {k: v for k, v in opts.items() if k not in _PROBLEM_KEYS})


def cpu_backends(include_slow: bool = False):
    """The non-reference backends that run on this machine's CPU.

    Triton runs on the CPU only under ``TRITON_INTERPRET=1`` and is slow there: it is included
    only when ``include_slow`` is set (its own test file uses small shapes).
    """
    names = ["chunked"]
    if backends.unavailable_reason("native", torch.device("cpu")) is None:
        names.append("native")
    if include_slow and os.environ.get("TRITON_INTERPRET") == "1":
        if backends.unavailable_reason("triton", torch.device("cpu")) is None:
            names.append("triton")
    return names


@dataclass
class Problem:
    hidden: torch.Tensor
    weight: torch.Tensor
    targets: torch.Tensor
    bias: Optional[torch.Tensor] = None
    old_logprobs: Optional[torch.Tensor] = None
    advantages: object = None
    ref_hidden: Optional[torch.Tensor] = None
    ref_weight: Optional[torch.Tensor] = None
    ref_bias: Optional[torch.Tensor] = None
    options: Dict = field(default_factory=dict)

    def to(self, dtype: torch.dtype) -> "Problem":
        """Same problem, floating inputs cast to ``dtype`` (targets / old / advantages unchanged)."""
        cast = lambda t: None if t is None else t.detach().to(dtype)  # noqa: E731
        return replace(self, hidden=cast(self.hidden), weight=cast(self.weight), bias=cast(self.bias),
                       ref_hidden=cast(self.ref_hidden), ref_weight=cast(self.ref_weight),
                       ref_bias=cast(self.ref_bias))


def make_problem(
    *,
    batch: Tuple[int, ...] = (3, 11),
    D: int = 16,
    V: int = 53,
    dtype: torch.dtype = torch.float64,
    bias: bool = False,
    ref: bool = False,
    D_ref: Optional[int] = None,
    ignore_frac: float = 0.2,
    logit_scale: float = 2.0,
    old: str = "perturbed",  # "perturbed" | "none" | "equal"
    old_noise: float = 0.3,
    advantages=None,
    seed: int = 0,
    device: str = "cpu",
) -> Problem:
    """Seeded inputs; logits have standard deviation about ``logit_scale``.

    ``old="perturbed"`` draws pi_old log-probs as the true ones plus Gaussian noise, so that a
    share of tokens clips on each side.
    """
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(s, generator=g, dtype=torch.float64)  # noqa: E731
    hidden = rnd(*batch, D)
    weight = rnd(V, D) * (logit_scale / D ** 0.5)
    targets = torch.randint(0, V, batch, generator=g)
    if ignore_frac > 0:
        targets[torch.rand(batch, generator=g) < ignore_frac] = -100
    p = Problem(hidden, weight, targets, advantages=advantages)
    if bias:
        p.bias = rnd(V) * 0.5
    if ref:
        d = D_ref or D
        p.ref_hidden = rnd(*batch, d)
        p.ref_weight = rnd(V, d) * (logit_scale / d ** 0.5)
        if bias:
            p.ref_bias = rnd(V) * 0.5
    if old != "none":
        with torch.no_grad():
            logp, _ = pk.linear_logprobs(p.hidden, p.weight, p.targets, bias=p.bias, backend="reference")
        # log-probabilities are <= 0 (the API refuses others): noise pushing one above 0 is cut there
        p.old_logprobs = logp if old == "equal" else (logp + old_noise * rnd(*batch)).clamp(max=0.0)
    if device != "cpu":
        p = replace(p, **{k: v.to(device) for k, v in vars(p).items() if isinstance(v, torch.Tensor)})
    return p.to(dtype)


def loss_kwargs(loss: str, problem: Problem, **options) -> Tuple[tuple, dict]:
    """Positional and keyword arguments of ``FUNCTIONS[loss]`` for ``problem``."""
    args = (problem.hidden, problem.weight, problem.targets)
    kw = dict(bias=problem.bias, **options)
    if loss == "psft":
        kw.update(old_logprobs=problem.old_logprobs, advantages=problem.advantages)
    elif loss == "asft":
        args = args + (problem.ref_hidden, problem.ref_weight)
        kw["ref_bias"] = problem.ref_bias
    return args, kw


@dataclass
class Result:
    loss: torch.Tensor
    grads: Dict[str, torch.Tensor]
    stats: Dict[str, torch.Tensor]


def run(loss: str, backend: str, problem: Problem, *, grad_seed: int = 1, grads=("hidden", "weight", "bias"),
        **options) -> Result:
    """Loss, gradients of ``sum(loss * G)`` (G seeded random for ``reduction="none"``), and stats."""
    leaves = {}
    for name in grads:
        t = getattr(problem, name)
        if t is not None:
            leaves[name] = t.detach().clone().requires_grad_(True)
    prob = replace(problem, **leaves)
    args, kw = loss_kwargs(loss, prob, backend=backend, return_stats=True, **options)
    out, stats = FUNCTIONS[loss](*args, **kw)
    if leaves:
        if out.dim() == 0:
            out.backward()
        else:
            g = torch.Generator().manual_seed(grad_seed)
            weights = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.device, out.dtype)
            (out * weights).sum().backward()
    grads_out = {k: (v.grad if v.grad is not None else torch.zeros_like(v)) for k, v in leaves.items()}
    return Result(out.detach(), grads_out, {k: v.detach() for k, v in stats.items()})


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_close(actual: Result, expected: Result, *, rtol: float, atol: float, what: str = "") -> None:
    """Loss, every gradient and every stat of ``actual`` close to ``expected``."""
    pairs = [("loss", actual.loss, expected.loss)]
    pairs += [(f"grad_{k}", actual.grads[k], expected.grads[k]) for k in expected.grads]
    pairs += [(f"stats[{k}]", actual.stats[k], v) for k, v in expected.stats.items()]
    for name, a, e in pairs:
        assert a.shape == e.shape, f"{what} {name}: shape {tuple(a.shape)} != {tuple(e.shape)}"
        if a.dtype in (torch.bool, torch.int64):
            assert torch.equal(a, e), f"{what} {name}: {a} != {e}"
            continue
        scale = e.double().abs().max().item() if e.numel() else 0.0
        err = max_err(a, e)
        assert err <= atol + rtol * scale, f"{what} {name}: max abs err {err:.3e} > {atol:.1e} + {rtol:.1e} * {scale:.3e}"


def assert_matches_truth(actual: Result, plain: Result, truth: Result, *, factor: float = 2.0, slack: float,
                         what: str = "") -> Dict[str, float]:
    """The accuracy rule: ``err(actual) <= factor * err(plain) + slack * scale`` for every output.

    ``plain`` is the reference at the same dtype as ``actual``; ``truth`` the float64 reference.
    ``slack`` is relative to the output's magnitude. Returns the errors seen, for reporting.
    """
    seen = {}
    names = ["loss"] + [f"grad_{k}" for k in truth.grads]
    for name in names:
        get = (lambda r: r.loss) if name == "loss" else (lambda r, k=name[5:]: r.grads[k])
        t = get(truth)
        scale = t.double().abs().max().item() if t.numel() else 0.0
        err_a, err_p = max_err(get(actual), t), max_err(get(plain), t)
        seen[name] = err_a
        assert err_a <= factor * err_p + slack * scale, (
            f"{what} {name}: error vs float64 {err_a:.3e} > {factor} x plain PyTorch's {err_p:.3e} "
            f"+ {slack:.1e} x {scale:.3e}"
        )
    return seen
