"""``python -m psft_kernels``: every loss on a realistic lm-head shape, fused vs the reference.

For each loss (sft, dft, psft, asft) and each backend (the reference, and every fused backend that
runs here), a fresh process makes two forward+backward calls: the first is weighed (its peak
memory beyond the inputs and gradients: the CUDA allocator's, or the resident set with glibc
returning large frees at once, so that it counts live memory), the second timed (kernels loaded, as on every training step but
the first); the parent checks the fused results against the
reference's (loss, every gradient) and prints a table. Defaults: 8 x 256 tokens, D=1024,
V=32000, fp32, on the CPU (``--device cuda`` where there is one).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

import psft_kernels as pk

LOSSES = ("sft", "dft", "psft", "asft")


def make_inputs(tokens: int, dim: int, vocab: int, dtype: torch.dtype, device: str, seed: int = 0):
    """Seeded hidden states and lm-heads whose logits have ~2-4 nats of entropy, and pi_old."""
    g = torch.Generator().manual_seed(seed)
    batch = (max(1, tokens // 256), min(tokens, 256))
    hidden = torch.randn(*batch, dim, generator=g)
    weight = torch.randn(vocab, dim, generator=g) * (3.5 / dim ** 0.5)
    ref_weight = weight + torch.randn(vocab, dim, generator=g) * (0.5 / dim ** 0.5)
    targets = torch.randint(0, vocab, batch, generator=g)
    targets[:, :16] = -100  # a prompt: ignored
    with torch.no_grad():
        logp, entropy = pk.linear_logprobs(hidden, weight, targets, backend="chunked")
    old = logp + 0.3 * torch.randn(batch, generator=g)
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


def child(args) -> None:
    """One loss x backend in this process: time, peak memory, results to ``args.out``."""
    dtype = getattr(torch, args.dtype)
    inputs, _ = make_inputs(args.tokens, args.dim, args.vocab, dtype, args.device)
    h = inputs["hidden"].requires_grad_(True)
    w = inputs["weight"].requires_grad_(True)
    grad_bytes = (h.numel() * h.element_size() + w.numel() * w.element_size()) / 2**20
    on_cuda = args.device.startswith("cuda")
    # Call 1 is weighed: on CUDA the allocator's peak; on the CPU the peak RSS. The parent starts
    # this process with MALLOC_MMAP_THRESHOLD_ set, so that glibc serves every allocation above
    # 128 KiB with its own mmap and returns it when freed: by default it raises that threshold up
    # to 32 MiB as blocks are freed and keeps such frees in its heap, and the RSS peak would then
    # count memory already freed (fragmentation) or miss memory reused from the input setup.
    if on_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    else:
        base = _reset_peak_rss()
    loss = loss_call(args.loss, inputs, args.backend)
    loss.backward()
    if on_cuda:
        torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() / 2**20) if on_cuda else _status_mib("VmHWM")
    # Call 2 is timed, as a training loop's every step after the first would run: kernels loaded,
    # and glibc's thresholds where its own adjustment takes them once blocks have been freed
    # (allocations up to 32 MiB recycled through its heap, up to 64 MiB of free heap top kept).
    libc = None if on_cuda else _glibc()
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, 32 * 2**20)
        libc.mallopt(M_TRIM_THRESHOLD, 64 * 2**20)
    h.grad = w.grad = None
    start = time.perf_counter()
    loss = loss_call(args.loss, inputs, args.backend)
    loss.backward()
    if on_cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    torch.save(dict(loss=loss.detach().cpu(), hidden=h.grad.cpu(), weight=w.grad.cpu()), args.out)
    print(json.dumps(dict(seconds=seconds, peak_extra_mib=max(0.0, peak - base - grad_bytes))))


def _run_child(loss, backend, args, out):
    cmd = [sys.executable, "-m", "psft_kernels.demo", "--child", "--loss", loss, "--backend", backend,
           "--out", out, "--tokens", str(args.tokens), "--dim", str(args.dim), "--vocab", str(args.vocab),
           "--dtype", args.dtype, "--device", args.device]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(128 * 1024))  # see child()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{loss}/{backend} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-30)).item()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m psft_kernels", description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--losses", default=",".join(LOSSES))
    ap.add_argument("--backends", default=None, help="comma-separated; default: every fused backend here")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--loss", help=argparse.SUPPRESS)
    ap.add_argument("--backend", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args)
        return 0

    fused = args.backends.split(",") if args.backends else [
        b for b in pk.available_backends(args.device) if b != "reference"]
    _, entropy = make_inputs(args.tokens, args.dim, args.vocab, torch.float32, "cpu")
    print(f"psft_kernels {pk.__version__} | torch {torch.__version__} | device {args.device} | "
          f"N={args.tokens} D={args.dim} V={args.vocab} {args.dtype} | mean token entropy {entropy:.2f} nats | "
          f"full logits would be {args.tokens * args.vocab * 4 / 2**20:.0f} MiB in fp32")
    print(f"{'loss':6} {'backend':10} {'fwd+bwd s':>10} {'peak extra MiB':>15} {'loss rel err':>13} "
          f"{'grad_h rel err':>15} {'grad_W rel err':>15}")
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        for loss in args.losses.split(","):
            ref_path = os.path.join(tmp, f"{loss}-reference.pt")
            r = _run_child(loss, "reference", args, ref_path)
            ref = torch.load(ref_path)
            print(f"{loss:6} {'reference':10} {r['seconds']:10.2f} {r['peak_extra_mib']:15.0f} {'-':>13} {'-':>15} {'-':>15}")
            for backend in fused:
                path = os.path.join(tmp, f"{loss}-{backend}.pt")
                r = _run_child(loss, backend, args, path)
                got = torch.load(path)
                errs = [_rel_err(got[k], ref[k]) for k in ("loss", "hidden", "weight")]
                tol = 1e-4 if args.dtype in ("float32", "float64") else 5e-2
                agree = all(e <= tol for e in errs)
                ok &= agree
                print(f"{loss:6} {backend:10} {r['seconds']:10.2f} {r['peak_extra_mib']:15.0f} {errs[0]:13.1e} "
                      f"{errs[1]:15.1e} {errs[2]:15.1e}{'' if agree else '  DISAGREES'}")
    print("all fused backends agree with the reference" if ok else "SOME BACKEND DISAGREES WITH THE REFERENCE")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
