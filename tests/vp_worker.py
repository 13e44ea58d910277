"""One rank of the vocabulary-parallel tests (tests/test_vocab_parallel.py starts 2 or 3 of them).

Every rank builds the same seeded problems, keeps its own rows of the lm-head (uneven shards of a
prime V), calls the public functions with ``vocab_parallel`` and checks what it gets against the
unsharded float64 reference on the full head: loss, per-token stats and every gradient (its own
rows of ``grad_weight`` / ``grad_bias``), float64 to 1e-10 relative, float32 and bf16 by the suite's
rule (tests/helpers.py). It also checks that all ranks return bitwise the same values, and counts
the collectives and bytes of each forward and backward by wrapping the real gloo process group's
methods. Failures are collected (the collectives of a case all run before its checks, so a
failing rank never leaves the others waiting) and written to ``<out>/rank<r>.json``.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import traceback
from dataclasses import replace

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # for bench

import psft_kernels as pk  # noqa: E402
from bench.tp import CollectiveLog  # noqa: E402 (wraps the real ProcessGroup's methods)
from helpers import (FUNCTIONS, OPTION_SETS, Result, assert_close, assert_matches_truth, make_problem, run,  # noqa: E402
                     split_options)

V = 53  # prime: no group size divides it
BOUNDS = {2: [0, 20, 53], 3: [0, 7, 30, 53]}  # uneven shards
TIGHT = dict(rtol=1e-10, atol=1e-12)
SLACK = {torch.float32: 1e-6, torch.bfloat16: 1e-2}  # tests/test_backends.py's fp32 and half rules
BACKENDS = ("reference", "chunked", "native")


# ----------------------------------------------------------------------------------------------
# Counting the collectives: the real gloo ProcessGroup's methods, wrapped
# ----------------------------------------------------------------------------------------------

# ----------------------------------------------------------------------------------------------
# Running one case
# ----------------------------------------------------------------------------------------------


def shard(problem, start, stop):
    cut = lambda t: None if t is None else t[start:stop]  # noqa: E731
    return replace(problem, weight=cut(problem.weight), bias=cut(problem.bias), ref_weight=cut(problem.ref_weight),
                   ref_bias=cut(problem.ref_bias))


def run_logprobs(backend, problem, grads=("hidden", "weight", "bias"), **options) -> Result:
    """``linear_logprobs`` as a Result: loss = logp, stats = entropy, gradients of a seeded sum."""
    leaves = {n: getattr(problem, n).detach().clone().requires_grad_(True) for n in grads
              if getattr(problem, n) is not None}
    p = replace(problem, **leaves)
    logp, entropy = pk.linear_logprobs(p.hidden, p.weight, p.targets, bias=p.bias, backend=backend, **options)
    g = torch.Generator().manual_seed(3)
    w1, w2 = (torch.randn(logp.shape, generator=g, dtype=torch.float64).to(logp.dtype) for _ in range(2))
    if leaves:
        ((logp * w1).sum() + (entropy * w2).sum()).backward()
    grads_out = {k: (v.grad if v.grad is not None else torch.zeros_like(v)) for k, v in leaves.items()}
    return Result(logp.detach(), grads_out, {"entropy": entropy.detach()})


def call(loss, backend, problem, **options) -> Result:
    if loss == "logprobs":
        for k in ("reduction", "return_stats", "entropy_coef"):  # not options of linear_logprobs
            options.pop(k, None)
        return run_logprobs(backend, problem, **options)
    return run(loss, backend, problem, **options)


def sliced_truth(truth: Result, start, stop) -> Result:
    grads = {k: (v[start:stop] if k in ("weight", "bias") else v) for k, v in truth.grads.items()}
    return Result(truth.loss, grads, truth.stats)


def same_on_every_rank(result: Result, group=None):
    """Loss, stats and grad_hidden are bitwise equal across ranks (one all-gather, outside any count)."""
    parts = [result.loss.reshape(-1)] + [v.reshape(-1).to(result.loss.dtype) for v in result.stats.values()]
    if "hidden" in result.grads:
        parts.append(result.grads["hidden"].reshape(-1).to(result.loss.dtype))
    mine = torch.cat(parts).double()
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(every, mine, group=group)
    return all(torch.equal(every[0], x) for x in every[1:])


def check_case(loss, backend, problem, vp_start, vp_stop, dtype, truth, plain, **options):
    """The sharded call on ``problem.to(dtype)`` against the unsharded truth (and ``plain``, the
    unsharded reference at ``dtype``, which sets the error allowed below float64)."""
    local = shard(problem.to(dtype), vp_start, vp_stop)
    vp = pk.VocabParallel(None, vp_start)
    actual = call(loss, backend, local, vocab_parallel=vp, **options)
    identical = same_on_every_rank(actual)
    expected = sliced_truth(truth, vp_start, vp_stop)
    assert identical, "ranks returned different values"
    if dtype == torch.float64:
        assert_close(actual, expected, **TIGHT)
        return
    assert_matches_truth(actual, sliced_truth(plain, vp_start, vp_stop), expected, slack=SLACK[dtype])
    for key, t in truth.stats.items():  # per-token stats by the same rule
        if t.dim() == 0 or t.dtype in (torch.bool, torch.int64):
            continue
        scale = t.double().abs().max().item()
        err = (actual.stats[key].double() - t.double()).abs().max().item()
        err_plain = (plain.stats[key].double() - t.double()).abs().max().item()
        assert err <= 2 * err_plain + SLACK[dtype] * scale, f"stats[{key}]: {err:.2e} vs plain {err_plain:.2e}"


LOSS_VARIANTS = {  # name -> (function, extra options, problem options)
    "logprobs": ("logprobs", {}, {}),
    "sft": ("sft", {}, {}),
    "dft": ("dft", {}, {}),
    "psft": ("psft", dict(eps_low=0.15, eps_high=0.25), {}),
    "asft_forward": ("asft", dict(kl_coef=0.3, kl_direction="forward"), dict(ref=True)),
    "asft_reverse": ("asft", dict(kl_coef=0.3, kl_direction="reverse"), dict(ref=True, D_ref=9)),
}
REDUCTIONS = ("mean", "sum", "none")


def matrix_cases(world):
    """Every loss x option set x backend x dtype, against the float64 unsharded truth."""
    bounds = BOUNDS[world]
    i = 0
    for variant, (loss, loss_opts, prob_extra) in LOSS_VARIANTS.items():
        for opt_name, opts in OPTION_SETS.items():
            prob_opts, head_opts = split_options(opts)
            reduction = REDUCTIONS[i % 3]
            i += 1
            problem = make_problem(V=V, seed=i, **prob_opts, **prob_extra)
            options = dict(reduction=reduction, **head_opts, **loss_opts)
            truth = call(loss, "reference", problem, **options)
            for dtype in (torch.float64, torch.float32):
                plain = call(loss, "reference", problem.to(dtype), **options) if dtype != torch.float64 else None
                for backend in BACKENDS:
                    extra = {} if backend == "reference" else dict(chunk_size=7)  # several chunks
                    name = f"{variant}/{opt_name}/{reduction}/{str(dtype)[6:]}/{backend}"
                    yield name, (lambda loss=loss, backend=backend, problem=problem, dtype=dtype, truth=truth,
                                 plain=plain, kw=dict(options, **extra): check_case(
                                     loss, backend, problem, *my_shard(bounds), dtype, truth, plain, **kw))


def my_shard(bounds):
    r = dist.get_rank()
    return bounds[r], bounds[r + 1]


def edge_cases(world):
    """Edge cases on the chunked and native backends (float64, tight)."""
    bounds = BOUNDS[world]
    g = torch.Generator().manual_seed(11)
    cases = {
        # every target in rank 0's shard: the other ranks own none
        "targets_in_one_shard": (dict(), lambda p: replace(p, targets=torch.where(p.targets >= 0,
                                                                                   p.targets % bounds[1], -100)), {}),
        "all_ignored": (dict(), lambda p: replace(p, targets=torch.full_like(p.targets, -100)), {}),
        "ignore_index_minus_1": (dict(), lambda p: replace(p, targets=torch.where(p.targets >= 0, p.targets, -1)),
                                 dict(ignore_index=-1)),
        "num_items_in_batch": (dict(), None, dict(num_items_in_batch=40)),
        "psft_per_token_adv": (dict(advantages=torch.randn(3, 11, generator=g, dtype=torch.float64)), None,
                               dict(eps_low=0.1, eps_high=0.1)),
        "psft_negative_adv_no_old": (dict(advantages=-1.3, old="none"), None, {}),
        "large_logits": (dict(logit_scale=30.0), None, {}),
        "softcap_entropy_bias_temp": (dict(bias=True, logit_scale=6.0), None,
                                      dict(softcap=2.0, temperature=0.6, entropy_coef=0.2)),
    }
    for name, (prob_opts, edit, options) in cases.items():
        for loss in ("sft", "psft", "asft"):
            problem = make_problem(V=V, ref=loss == "asft", seed=17, **prob_opts)
            if edit is not None:
                problem = edit(problem)
            opts = dict(options)
            if loss != "psft":
                opts.pop("eps_low", None), opts.pop("eps_high", None)
            if loss == "asft":
                opts["kl_coef"] = 0.4
            truth = call(loss, "reference", problem, **opts)
            for backend in ("chunked", "native"):
                yield f"edge/{name}/{loss}/{backend}", (lambda loss=loss, backend=backend, problem=problem, truth=truth,
                                                        opts=opts: check_case(loss, backend, problem,
                                                                              *my_shard(bounds), torch.float64,
                                                                              truth, None, **opts))
    for loss in ("sft", "psft"):  # bf16: grad_hidden summed in fp32, the suite's half-precision rule
        problem = make_problem(V=V, batch=(4, 16), D=32, bias=True, seed=5)
        truth = call(loss, "reference", problem)
        plain = call(loss, "reference", problem.to(torch.bfloat16))
        for backend in ("chunked", "native"):
            yield f"bf16/{loss}/{backend}", (lambda loss=loss, backend=backend, problem=problem, truth=truth,
                                             plain=plain: check_case(loss, backend, problem, *my_shard(bounds),
                                                                     torch.bfloat16, truth, plain))


def group_of_one_case():
    """A group of one rank is the unsharded call, bitwise."""
    groups = [dist.new_group([r]) for r in range(dist.get_world_size())]  # every rank creates every group
    mine = groups[dist.get_rank()]

    def case():
        problem = make_problem(V=V, ref=True, bias=True, seed=23).to(torch.float32)
        for loss in ("sft", "psft", "asft"):
            for backend in ("chunked", "native"):
                plain = run(loss, backend, problem)
                vp = run(loss, backend, problem, vocab_parallel=(mine, 0))
                assert_close(vp, plain, rtol=0, atol=0)

    pair = dist.new_group([0, 1])  # a group that is not the default one (all ranks must create it)

    def subgroup_case():
        """vocab_parallel's group is the one used: ranks 0 and 1 split the head, the others idle."""
        if dist.get_rank() > 1:
            return
        problem = make_problem(V=V, ref=True, bias=True, seed=37)
        start, stop = [(0, 26), (26, V)][dist.get_rank()]
        for loss in ("psft", "asft"):
            opts = dict(kl_coef=0.2) if loss == "asft" else {}
            truth = sliced_truth(run(loss, "reference", problem, **opts), start, stop)
            local = shard(problem, start, stop)
            assert_close(run(loss, "chunked", local, vocab_parallel=(pair, start), **opts), truth, **TIGHT)

    return [("group_of_one", case), ("subgroup", subgroup_case)]


def module_and_dtensor_cases(world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    def module_case():
        bounds = BOUNDS[world]
        problem = make_problem(V=V, seed=29)
        truth = run("psft", "reference", problem, eps_low=0.1, eps_high=0.1)
        start, stop = my_shard(bounds)
        w = problem.weight[start:stop].clone().requires_grad_(True)
        h = problem.hidden.clone().requires_grad_(True)
        module = pk.LinearPSFTLoss(eps_low=0.1, eps_high=0.1, vocab_parallel=(None, start), backend="chunked")
        loss = module(h, w, problem.targets, problem.old_logprobs)
        loss.backward()
        torch.testing.assert_close(loss, truth.loss, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(w.grad, truth.grads["weight"][start:stop], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(h.grad, truth.grads["hidden"], rtol=1e-10, atol=1e-12)

    def dtensor_case():
        mesh = init_device_mesh("cpu", (world,))
        for loss in ("sft", "asft"):
            problem = make_problem(V=V, ref=loss == "asft", bias=True, seed=31)
            opts = dict(kl_coef=0.3) if loss == "asft" else {}
            truth = run(loss, "reference", problem, **opts)
            w = distribute_tensor(problem.weight, mesh, [Shard(0)]).requires_grad_(True)
            b = distribute_tensor(problem.bias, mesh, [Shard(0)]).requires_grad_(True)
            h = distribute_tensor(problem.hidden, mesh, [Replicate()]).requires_grad_(True)
            args = (h, w, problem.targets)
            kw = dict(bias=b, backend="chunked", **opts)
            if loss == "asft":
                args += (problem.ref_hidden, distribute_tensor(problem.ref_weight, mesh, [Shard(0)]))
                kw["ref_bias"] = distribute_tensor(problem.ref_bias, mesh, [Shard(0)])
            out = FUNCTIONS[loss](*args, **kw)
            out.backward()
            torch.testing.assert_close(out, truth.loss, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(w.grad.full_tensor(), truth.grads["weight"], rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(b.grad.full_tensor(), truth.grads["bias"], rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(h.grad.to_local(), truth.grads["hidden"], rtol=1e-10, atol=1e-12)
        # hidden sharded over tokens (sequence parallel) is refused, on every rank
        p = make_problem(V=V, batch=(world * 4,), seed=3)
        w = distribute_tensor(p.weight, mesh, [Shard(0)])
        h = distribute_tensor(p.hidden, mesh, [Shard(0)])
        try:
            pk.linear_sft_loss(h, w, p.targets)
        except ValueError as exc:
            assert "sequence parallel" in str(exc), exc
        else:
            raise AssertionError("a token-sharded hidden DTensor was accepted")

    return [("module", module_case), ("dtensor", dtensor_case)]


def error_cases(world):
    bounds = BOUNDS[world]

    def expect(exc_type, words, fn):
        try:
            fn()
        except exc_type as exc:
            assert all(w in str(exc) for w in words), f"message {exc!r} lacks {words}"
        else:
            raise AssertionError(f"no {exc_type.__name__}")

    def case():
        problem = make_problem(V=V, seed=2)
        start, stop = my_shard(bounds)
        local = shard(problem, start, stop)
        vp = (None, start)
        expect(pk.BackendUnavailableError, ["triton", "vocab_parallel"],
               lambda: pk.linear_sft_loss(local.hidden, local.weight, local.targets, backend="triton",
                                          vocab_parallel=vp))
        too_big = problem.targets.clone()
        too_big[0, 3] = V + 2
        expect(ValueError, ["exactly one rank's shard", "position 3"],
               lambda: pk.linear_sft_loss(local.hidden, local.weight, too_big, backend="chunked", vocab_parallel=vp))
        gap = (None, start + (1 if dist.get_rank() == world - 1 else 0))  # the last shard starts one id late
        t = problem.targets.clone()
        t[0, 0] = bounds[-2]  # a target in the gap
        expect(ValueError, ["exactly one rank's shard"],
               lambda: pk.linear_sft_loss(local.hidden, local.weight, t, backend="chunked", vocab_parallel=gap))
        expect(ValueError, ["tile"], lambda: pk.linear_sft_loss(local.hidden, local.weight, problem.targets,
                                                                backend="reference", vocab_parallel=gap))
        expect(ValueError, ["start", ">= 0"], lambda: pk.linear_sft_loss(local.hidden, local.weight, local.targets,
                                                                          vocab_parallel=(None, -1)))
        expect(TypeError, ["vocab_parallel"], lambda: pk.linear_sft_loss(local.hidden, local.weight, local.targets,
                                                                          vocab_parallel="tp"))
        neg = problem.targets.clone()
        neg[1, 1] = -5
        expect(ValueError, ["global vocabulary ids", "-5"],
               lambda: pk.linear_sft_loss(local.hidden, local.weight, neg, backend="chunked", vocab_parallel=vp))

    return [("errors", case)]


# ----------------------------------------------------------------------------------------------
# Collectives per call
# ----------------------------------------------------------------------------------------------


def count_collectives(world, backend):
    """Collectives and bytes of each forward and backward, at two vocabulary sizes (bytes must not
    depend on V) and two row counts (bytes proportional to N)."""
    out = {}
    for variant, (loss, loss_opts, prob_extra) in LOSS_VARIANTS.items():
        for vocab in (V, 4 * V + 1):
            for batch in ((3, 11), (6, 11)):
                problem = make_problem(V=vocab, batch=batch, seed=1, bias=True, **prob_extra)
                bounds = [round(vocab * k / world) for k in range(world + 1)]
                start, stop = my_shard(bounds)
                local = shard(problem, start, stop)
                leaves = {n: getattr(local, n).detach().clone().requires_grad_(True) for n in ("hidden", "weight")}
                local = replace(local, **leaves)
                kw = dict(backend=backend, vocab_parallel=(None, start), entropy_coef=0.1, **loss_opts)
                with CollectiveLog() as fwd:
                    if loss == "logprobs":
                        kw.pop("entropy_coef"), kw.pop("kl_coef", None), kw.pop("kl_direction", None)
                        logp, entropy = pk.linear_logprobs(local.hidden, local.weight, local.targets, bias=local.bias,
                                                           **kw)
                        value = logp.sum() + entropy.sum()
                    else:
                        from helpers import loss_kwargs
                        args, lkw = loss_kwargs(loss, local, **kw)
                        value = FUNCTIONS[loss](*args, **lkw)
                with CollectiveLog() as bwd:
                    value.backward()
                n = problem.targets.numel()
                out[f"{variant}/V{vocab}/N{n}"] = dict(forward=fwd.calls, backward=bwd.calls, N=n, V=vocab,
                                                       D=problem.hidden.shape[-1],
                                                       itemsize=problem.hidden.element_size())
    return out


# ----------------------------------------------------------------------------------------------


def main(rank, world, out_dir):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    cases = list(matrix_cases(world)) + list(edge_cases(world)) + group_of_one_case()
    cases += module_and_dtensor_cases(world) + error_cases(world)
    failures, passed = [], 0
    for name, case in cases:
        try:
            case()
            passed += 1
        except Exception as exc:  # noqa: BLE001 - every failure is reported by the parent test
            failures.append(f"{name}: {type(exc).__name__}: {exc}\n{traceback.format_exc(limit=-3)}")
    counts = {be: count_collectives(world, be) for be in ("chunked", "native")}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(dict(passed=passed, failures=failures, cases=len(cases), counts=counts), f)
    dist.destroy_process_group()

