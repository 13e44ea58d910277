"""``python -m psft_kernels``: every loss on an lm-head, fused vs eager PyTorch, in about a minute.

Inputs: seeded hidden states and lm-heads whose logits have a mean token entropy of about 3 nats
(a typical LLM's; the head's scale is calibrated for that, and the value is printed), targets
sampled from the model's own distribution, pi_old log-probs near the current ones.

For each backend (eager PyTorch, i.e. the reference, and the fused backend ``backend="auto"``
picks here, or those named by ``--backends``) one fresh process runs every loss twice, forward
and backward: the first call is weighed (its peak memory beyond the inputs and gradients: the
CUDA allocator's, or the resident set with glibc returning large frees at once, so that it counts
live memory), the second timed (kernels loaded, as on every training step but the first). The
parent checks each fused loss and gradient against eager PyTorch's, prints a table, and ends with
a one-line summary. Defaults: 4 x 256 tokens, D=512, V=32000 (a 125 MiB fp32 logit tensor for
eager PyTorch), fp32, on the CPU (``--device cuda`` where there is one), chosen to keep a first
run near a minute on 2 idle cores. That first run on a CPU also compiles the native kernel
(about 20 s, cached for later runs).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import time

import torch

import psft_kernels as pk

LOSSES = ("sft", "dft", "psft", "asft")
TARGET_ENTROPY = 3.0  # nats: what the docstring promises and the calibration aims at


def _logits_scale(hidden: torch.Tensor, weight: torch.Tensor, entropy: float) -> float:
    """The factor on ``hidden @ weight.T`` that gives mean entropy ``entropy`` on a sample of rows
    (bisection on the log scale: entropy falls monotonically as the logits grow)."""
    with torch.no_grad():
        z = hidden[:128] @ weight.T
        lo, hi = -4.0, 4.0  # a factor in [e^-4, e^4], found to 8 / 2^16 on the log scale
        for _ in range(16):
            mid = (lo + hi) / 2
            lp = torch.log_softmax(z * math.exp(mid), -1)
            h = -(lp.exp() * lp).sum(-1).mean().item()
            lo, hi = (mid, hi) if h > entropy else (lo, mid)
        return math.exp((lo + hi) / 2)


def make_inputs(tokens: int, dim: int, vocab: int, dtype: torch.dtype, device: str, seed: int = 0):
    """Seeded inputs (see the module doc); returns them and the mean token entropy in nats."""
    g = torch.Generator().manual_seed(seed)
    batch = (max(1, tokens // 256), min(tokens, 256))
    hidden = torch.randn(*batch, dim, generator=g)
    weight = torch.randn(vocab, dim, generator=g)
    weight *= _logits_scale(hidden.reshape(-1, dim), weight, TARGET_ENTROPY)
    ref_weight = weight + torch.randn(vocab, dim, generator=g) * (weight.std() * 0.15)
    targets = torch.empty(batch, dtype=torch.long)
    logp, entropy = torch.empty(batch), torch.empty(batch)
    flat_h = hidden.reshape(-1, dim)
    with torch.no_grad():
        for i in range(0, flat_h.shape[0], 256):  # targets sampled from the model: a realistic NLL
            lp = torch.log_softmax(flat_h[i:i + 256] @ weight.T, -1)
            y = torch.multinomial(lp.exp(), 1, generator=g)
            targets.view(-1)[i:i + 256] = y[:, 0]
            logp.view(-1)[i:i + 256] = lp.gather(1, y)[:, 0]
            entropy.view(-1)[i:i + 256] = -(lp.exp() * lp).sum(-1)
    targets[:, :16] = -100  # a prompt: ignored
    old = (logp + 0.3 * torch.randn(batch, generator=g)).clamp(max=0.0)  # log-probabilities are <= 0
    cast = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    inputs = dict(hidden=cast(hidden), weight=cast(weight), targets=targets.to(device),
                  old_logprobs=old.to(device), ref_hidden=cast(hidden), ref_weight=cast(ref_weight))
    valid = targets != -100
    return inputs, float(entropy[valid].mean())


def loss_call(loss: str, inputs: dict, backend: str):
    h, w, y = inputs["hidden"], inputs["weight"], inputs["targets"]
    if loss == "psft":
        return pk.linear_psft_loss(h, w, y, inputs["old_logprobs"], backend=backend)
    if loss == "asft":
        return pk.linear_asft_loss(h, w, y, inputs["ref_hidden"], inputs["ref_weight"], backend=backend)
    return getattr(pk, f"linear_{loss}_loss")(h, w, y, backend=backend)


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"{field} not in /proc/self/status")


def _glibc():
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return None


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters


def _reset_peak_rss() -> float:
    """Return freed heap memory to the system (glibc ``malloc_trim``), reset the resident
    high-water mark (Linux: clear_refs 5) and return the current RSS."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:  # not Linux, or not allowed: the peak then includes setup
        pass
    return _status_mib("VmRSS")


def _sync(on_cuda: bool) -> None:
    if on_cuda:
        torch.cuda.synchronize()


def child(args) -> None:
    """Every loss on one backend in this process; one JSON line per loss on stdout, as it is done."""
    dtype = getattr(torch, args.dtype)
    inputs, entropy = make_inputs(args.tokens, args.dim, args.vocab, dtype, args.device)
    print(json.dumps(dict(entropy=entropy)), flush=True)
    h = inputs["hidden"].requires_grad_(True)
    w = inputs["weight"].requires_grad_(True)
    grad_bytes = (h.numel() * h.element_size() + w.numel() * w.element_size()) / 2**20
    on_cuda = args.device.startswith("cuda")
    losses = args.losses.split(",")
    # Weigh every loss first: on CUDA the allocator's peak; on the CPU the peak RSS. The parent
    # starts this process with MALLOC_MMAP_THRESHOLD_ set, so that glibc serves every allocation
    # above 128 KiB with its own mmap and returns it when freed: by default it raises that
    # threshold up to 32 MiB as blocks are freed and keeps such frees in its heap, and the RSS
    # peak would then count memory already freed or miss memory reused from the input setup.
    peaks = {}
    for loss in losses:
        h.grad = w.grad = None
        pk.empty_cache()  # the native backend keeps its blocks between calls: weigh each loss from scratch
        if on_cuda:
            _sync(True)
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated() / 2**20
        else:
            base = _reset_peak_rss()
        loss_call(loss, inputs, args.backend).backward()
        _sync(on_cuda)
        peak = (torch.cuda.max_memory_allocated() / 2**20) if on_cuda else _status_mib("VmHWM")
        peaks[loss] = max(0.0, peak - base - grad_bytes)
    # Then time each, as a training loop's every step after the first would run: kernels loaded,
    # and glibc's thresholds where its own adjustment takes them once blocks have been freed.
    libc = None if on_cuda else _glibc()
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, 32 * 2**20)
        libc.mallopt(M_TRIM_THRESHOLD, 64 * 2**20)
    for loss in losses:
        h.grad = w.grad = None
        start = time.perf_counter()
        out = loss_call(loss, inputs, args.backend)
        out.backward()
        _sync(on_cuda)
        seconds = time.perf_counter() - start
        path = os.path.join(args.out, f"{loss}-{args.backend}.pt")
        torch.save(dict(loss=out.detach().cpu(), hidden=h.grad.cpu(), weight=w.grad.cpu()), path)
        print(json.dumps(dict(loss=loss, seconds=seconds, peak_extra_mib=peaks[loss])), flush=True)


def _run_child(backend: str, args, out: str, on_result):
    """One backend's process; ``on_result(result)`` as each loss finishes (the progress)."""
    cmd = [sys.executable, "-m", "psft_kernels.demo", "--child", "--losses", args.losses, "--backend", backend,
           "--out", out, "--tokens", str(args.tokens), "--dim", str(args.dim), "--vocab", str(args.vocab),
           "--dtype", args.dtype, "--device", args.device]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(128 * 1024))  # see child()
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
        for line in proc.stdout:
            if line.startswith("{"):
                on_result(json.loads(line))  # {"entropy": ...} first, then one per loss
        if proc.wait() != 0:
            err.seek(0)
            raise RuntimeError(f"the {backend} run failed:\n{err.read()}")


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-30)).item()


def _say(text: str = "", end: str = "\n") -> None:
    print(text, end=end, flush=True)


def _prepare_native(fused):
    """Build the native kernel now, saying so, instead of silently inside the first timed process.
    Returns the backends to run (chunked in native's place if the build fails)."""
    if "native" not in fused:
        return fused
    from . import _native_build

    if _native_build.is_built():
        return fused
    _say("compiling the native kernel (first run only, ~20 s)...", end=" ")
    start = time.perf_counter()
    log = logging.getLogger("psft_kernels")
    level = log.level
    log.setLevel(logging.ERROR)  # its "compiling" notice would repeat what was just said
    try:
        _native_build.build()
    except RuntimeError as exc:
        _say(f"failed ({exc}); running the chunked backend in its place")
        return list(dict.fromkeys("chunked" if b == "native" else b for b in fused))
    finally:
        log.setLevel(level)
    _say(f"done in {time.perf_counter() - start:.0f} s")
    return fused


def _geomean(values) -> float:
    values = [v for v in values if v > 0 and math.isfinite(v)]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else float("nan")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m psft_kernels", description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--losses", default=",".join(LOSSES))
    ap.add_argument("--backends", default=None,
                    help="comma-separated fused backends (see pk.available_backends); default: the one "
                         "backend='auto' picks here")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--backend", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args)
        return 0

    started = time.perf_counter()
    # Default: the backend "auto" picks (native on a CPU with a compiler, Triton on CUDA), which
    # keeps the demo under a minute on 2 cores; --backends chunked,native shows more.
    fused = args.backends.split(",") if args.backends else [pk.auto_backend_name(args.device)]
    losses = args.losses.split(",")
    _say(f"psft_kernels {pk.__version__} | torch {torch.__version__} | device {args.device} | "
         f"N={args.tokens} D={args.dim} V={args.vocab} {args.dtype} | "
         f"full logits would be {args.tokens * args.vocab * 4 / 2**20:.0f} MiB in fp32")
    _say(f"each of {', '.join(losses)}: forward + backward on eager PyTorch (the reference) and on "
         f"{', '.join(fused)}, one process per backend; checking every result against the reference")
    fused = _prepare_native(fused)

    results = {}
    order = ["reference"] + fused
    with tempfile.TemporaryDirectory() as tmp:
        for i, backend in enumerate(order, 1):
            label = "eager PyTorch (reference)" if backend == "reference" else backend
            _say(f"[{i}/{len(order)}] {label}:", end="")

            def on_result(r, backend=backend):
                if "entropy" in r:  # the inputs, made in the child: said once
                    if backend == "reference":
                        _say(f" inputs ready (mean token entropy {r['entropy']:.2f} nats);", end="")
                    return
                results[(r["loss"], backend)] = r
                _say(f" {r['loss']} {1e3 * r['seconds']:.0f} ms", end="")

            _run_child(backend, args, tmp, on_result)
            _say()
        _say()
        _say(f"{'loss':6} {'backend':10} {'fwd+bwd ms':>10} {'peak extra MiB':>15} {'loss rel err':>13} "
             f"{'grad_h rel err':>15} {'grad_W rel err':>15}")
        ok = True
        tol = 1e-4 if args.dtype in ("float32", "float64") else 5e-2
        for loss in losses:
            ref = torch.load(os.path.join(tmp, f"{loss}-reference.pt"))
            r = results[(loss, "reference")]
            _say(f"{loss:6} {'reference':10} {1e3 * r['seconds']:10.1f} {r['peak_extra_mib']:15.0f} {'-':>13} "
                 f"{'-':>15} {'-':>15}")
            for backend in fused:
                got = torch.load(os.path.join(tmp, f"{loss}-{backend}.pt"))
                errs = [_rel_err(got[k], ref[k]) for k in ("loss", "hidden", "weight")]
                agree = all(e <= tol for e in errs)
                ok &= agree
                r = results[(loss, backend)]
                _say(f"{loss:6} {backend:10} {1e3 * r['seconds']:10.1f} {r['peak_extra_mib']:15.0f} {errs[0]:13.1e} "
                     f"{errs[1]:15.1e} {errs[2]:15.1e}{'' if agree else '  DISAGREES'}")
    _say("all fused backends agree with the reference" if ok else "SOME BACKEND DISAGREES WITH THE REFERENCE")
    # The summary: the backend "auto" picks here (else the first one run), against eager PyTorch.
    best = pk.auto_backend_name(args.device)
    best = best if best in fused else fused[0]
    speed = _geomean([results[(x, "reference")]["seconds"] / results[(x, best)]["seconds"] for x in losses])
    memory = _geomean([results[(x, "reference")]["peak_extra_mib"] / max(results[(x, best)]["peak_extra_mib"], 1.0)
                       for x in losses])
    pace = f"{speed:.1f}x faster than" if speed >= 1 else f"{1 / speed:.1f}x slower than"
    _say(f"summary: {best} is {pace} eager PyTorch with {memory:.1f}x less extra memory "
         f"(geometric mean over {len(losses)} loss{'es' if len(losses) > 1 else ''}; "
         f"{'results agree' if ok else 'RESULTS DISAGREE'}; {time.perf_counter() - started:.0f} s in all)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
