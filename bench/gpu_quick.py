"""Quick timing of the Triton backend against the dense-GEMM floor (issue 3's bars). Not a test.

    python bench/gpu_quick.py [--tokens 8192 --dim 4096 --vocab 131072 --dtype bfloat16] [--out x.json]

On fresh seeded inputs, each time the median of CUDA-event timings (``triton.testing.do_bench``):

* floor: the three cuBLAS GEMMs an unfused head needs, ``h @ W.T``, ``dZ @ W``, ``dZ.T @ h``, and
  the four-GEMM floor (plus the recomputation ``h @ W.T`` a fused exact loss cannot avoid);
* triton: PSFT forward+backward, exact with the gradient GEMMs on torch.mm and on the Triton
  kernels (``config.GRAD_GEMM``), and with ``filter_eps=2**-12``; the forward-only log-prob pass
  (the pi_old pass) against one GEMM ``h @ W.T``; beside each exact run, what the performance
  MODEL (``python -m bench.model``, run in a subprocess) predicted for this GPU and shape;
* the chunked PyTorch backend and the eager reference as peers (skipped if they run out of memory);

on a realistic input (a Zipf-like prior over a frequency-sorted vocabulary plus a contextual
Gaussian term, tuned to ``--entropy`` nats) and on a flat, high-entropy one. Also the peak
memory beyond inputs and gradients, and the share of backward tiles whose ``|p - onehot|`` is
below 2^-12 everywhere (what filtering can skip). Prints a table; ``--out`` saves JSON; ``--csv`` appends one row per measurement (device,
versions, commit, date) to a CSV (bench/gpu_check.sh: bench/results/gpu_quick.csv).
``--device cpu`` (with TRITON_INTERPRET=1 and tiny sizes) only smoke-tests the script.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import psft_kernels as pk  # noqa: E402

FILTER_EPS = 2.0 ** -12


def bench_ms(fn, device, grads=()):
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=200, grad_to_none=list(grads), return_mode="median")
    times = []
    for _ in range(3):
        for g in grads:
            g.grad = None
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def logits_of(h, w, rows):
    return (h[rows] @ w.T).float()


def mean_entropy(h, w, rows):
    lp = torch.log_softmax(logits_of(h, w, rows), -1)
    return float(-(lp.exp() * lp).sum(-1).mean())


def make_inputs(n, d, v, kind, entropy, zipf, dtype, device, seed=0):
    """hidden (N, D), weight (V, D), targets sampled from the model itself, old log-probs."""
    g = torch.Generator(device=device).manual_seed(seed)
    h = torch.randn(n, d, generator=g, device=device)
    w = torch.randn(v, d, generator=g, device=device) / d ** 0.5
    sample = torch.arange(min(n, 256), device=device)
    if kind == "realistic":
        # Column 0 carries the prior (h[:, 0] = 1): logits = -zipf * log(rank) + s * context.
        h[:, 0] = 1.0
        w[:, 0] = 0.0
        prior = -zipf * torch.log1p(torch.arange(v, device=device, dtype=torch.float32))
        context = w.clone()
        lo, hi = 0.0, 30.0
        for _ in range(30):  # bisection on the context scale: entropy falls as it grows
            s = (lo + hi) / 2
            w = context * s
            w[:, 0] = prior
            lo, hi = (s, hi) if mean_entropy(h, w, sample) > entropy else (lo, s)
    else:  # flat: logits ~ N(0, 1), entropy close to log V
        pass
    targets = torch.empty(n, dtype=torch.long, device=device)
    for r in range(0, n, 1024):
        rows = torch.arange(r, min(n, r + 1024), device=device)
        targets[rows] = torch.multinomial(torch.softmax(logits_of(h, w, rows), -1), 1, generator=g)[:, 0]
    h, w = h.to(dtype), w.to(dtype)
    with torch.no_grad():
        logp, ent = pk.linear_logprobs(h, w, targets, backend="chunked")
    old = (logp + 0.3 * torch.randn(n, generator=g, device=device)).clamp(max=0.0)  # log-probs: <= 0
    return h, w, targets, old, float(ent.mean())


def filterable_share(h, w, targets, tile_m, tile_v, eps=FILTER_EPS):
    """Share of (tile_m x tile_v) tiles whose every |p - onehot| is below eps (exact SFT dz)."""
    n, v = h.shape[0], w.shape[0]
    small = total = 0
    for r in range(0, n, tile_m):
        rows = torch.arange(r, min(n, r + tile_m), device=h.device)
        p = torch.softmax(logits_of(h, w, rows), -1)
        p[torch.arange(len(rows), device=h.device), targets[rows]] -= 1.0
        pad = (-v) % tile_v
        peak = torch.nn.functional.pad(p.abs(), (0, pad)).view(len(rows), -1, tile_v).amax(dim=(0, 2))
        small += int((peak < eps).sum())
        total += peak.numel()
    return small / total


def peak_extra_mib(fn, grads, device):
    """Peak allocation during ``fn`` beyond what was allocated before and the gradients left after."""
    if device.type != "cuda":
        return None
    for g in grads:
        g.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    grad_bytes = sum(g.grad.numel() * g.grad.element_size() for g in grads if g.grad is not None)
    return (torch.cuda.max_memory_allocated() - base - grad_bytes) / 2 ** 20


def model_predictions(args, device) -> dict:
    """The performance model's fwd+bwd prediction for this GPU and shape, per gradient-GEMM path
    (``python -m bench.model`` in a subprocess: it swaps the kernels for recorders while it runs)."""
    name = torch.cuda.get_device_name(device).upper() if device.type == "cuda" else ""
    key = next((k for k, tag in (("h200", "H200"), ("h100", "H100"), ("a100", "A100"), ("l40s", "L40S"))
                if tag in name), None)
    dt = {"bfloat16": "bf16", "float16": "fp16"}.get(args.dtype)
    out = {}
    if key is None or dt is None:
        return out
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for gemm in ("torch", "triton"):
        cmd = [sys.executable, "-m", "bench.model", "--gpu", key, "--tokens", str(args.tokens), "--dim",
               str(args.dim), "--vocab", str(args.vocab), "--dtype", dt, "--grad-gemm", gemm]
        res = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600)
        for line in res.stdout.splitlines():
            if "forward+backward" in line and "predicted forward" in line:
                out[gemm] = float(line.split("forward+backward")[1].split("ms")[0])
        if gemm not in out:
            print(f"  (model failed for {gemm}: {res.stderr[-400:]})")
    return out


predicted: dict = {}


def run_case(kind, args, device, dtype, rows_out):
    h, w, y, old, entropy = make_inputs(args.tokens, args.dim, args.vocab, kind, args.entropy, args.zipf, dtype,
                                        device)
    h.requires_grad_(True)
    w.requires_grad_(True)
    from psft_kernels.triton import config

    t = config.tiles(device, dtype)
    share = filterable_share(h.detach(), w.detach(), y, t.bwd_m, t.bwd_v)
    print(f"\n[{kind}] mean token entropy {entropy:.2f} nats; tiles below 2^-12: {100 * share:.1f}% "
          f"({t.bwd_m}x{t.bwd_v} tiles)")

    hd, wd = h.detach(), w.detach()
    dz = torch.randn(args.tokens, args.vocab, device=device, dtype=dtype)
    floor = {
        "h@W.T": bench_ms(lambda: hd @ wd.T, device),
        "dZ@W": bench_ms(lambda: dz @ wd, device),
        "dZ.T@h": bench_ms(lambda: dz.T @ hd, device),
    }
    del dz
    floor_ms = sum(floor.values())
    floor4_ms = floor_ms + floor["h@W.T"]

    def psft(backend, filter_eps=None, gemm=None):
        def step():
            saved = config.GRAD_GEMM
            config.GRAD_GEMM = gemm or saved
            try:
                pk.linear_psft_loss(h, w, y, old, backend=backend, filter_eps=filter_eps).backward()
            finally:
                config.GRAD_GEMM = saved
        return step

    def forward_only():
        with torch.no_grad():
            pk.linear_logprobs(hd, wd, y, backend="triton")

    cases = [("triton psft fwd+bwd (exact, torch.mm)", psft("triton", gemm="torch"), floor_ms),
             ("triton psft fwd+bwd (exact, triton GEMMs)", psft("triton", gemm="triton"), floor_ms),
             ("triton psft fwd+bwd (filter 2^-12)", psft("triton", FILTER_EPS), floor_ms),
             ("triton logprobs forward-only", forward_only, floor["h@W.T"]),
             ("chunked psft fwd+bwd", psft("chunked"), floor_ms),
             ("reference psft fwd+bwd", psft("reference"), floor_ms)]
    print(f"  floor: {floor_ms:.2f} ms = " + " + ".join(f"{k} {v:.2f}" for k, v in floor.items())
          + f"; four-GEMM floor {floor4_ms:.2f} ms")
    rows_out.append(dict(input=kind, entropy=entropy, filterable_share=share, name="floor (3 GEMMs)", ms=floor_ms,
                         ratio=1.0, floor=floor))
    rows_out.append(dict(input=kind, entropy=entropy, filterable_share=share, name="floor (4 GEMMs)", ms=floor4_ms,
                         ratio=floor4_ms / floor_ms))
    for name, fn, against in cases:
        try:
            ms = bench_ms(fn, device, grads=(h, w))
            mem = peak_extra_mib(fn, (h, w), device)
        except torch.cuda.OutOfMemoryError:
            print(f"  {name:<38} out of memory")
            torch.cuda.empty_cache()
            continue
        ratio = ms / against
        base = "1 GEMM" if "forward-only" in name else "floor"
        mem_txt = f", peak extra {mem:.0f} MiB" if mem is not None else ""
        pred = predicted.get("torch" if "torch.mm" in name else "triton" if "triton GEMMs" in name else "")
        pred_txt = f", {ms / floor4_ms:.2f}x 4-GEMM floor; MODEL predicted {pred:.1f} ms" if pred else ""
        print(f"  {name:<42} {ms:9.2f} ms  {ratio:5.2f}x {base}{mem_txt}{pred_txt}")
        rows_out.append(dict(input=kind, entropy=entropy, filterable_share=share, name=name, ms=ms, ratio=ratio,
                             ratio_to=base, peak_extra_mib=mem, ratio_floor4=ms / floor4_ms, predicted_ms=pred))
    del h, w


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=131072)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--entropy", type=float, default=2.0, help="target mean entropy of the realistic input (nats)")
    ap.add_argument("--zipf", type=float, default=1.1, help="exponent of the realistic input's prior")
    ap.add_argument("--inputs", default="realistic,flat")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=None)
    ap.add_argument("--csv", default=None, help="append the measurements to this CSV")
    ap.add_argument("--no-model", action="store_true", help="skip the performance model's predictions")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    import triton

    meta = dict(gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
                torch=torch.__version__, triton=triton.__version__, commit=commit or "unknown",
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                tokens=args.tokens, dim=args.dim, vocab=args.vocab, dtype=args.dtype)
    print(json.dumps(meta))
    if not args.no_model:
        predicted.update(model_predictions(args, device))
        print(f"MODEL predictions (fwd+bwd, exact, ms): {predicted}")
    rows = []
    for kind in args.inputs.split(","):
        run_case(kind, args, device, dtype, rows)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(meta=meta, results=rows), f, indent=1)
        print(f"\nsaved {args.out}")
    if args.csv:
        import csv

        cols = ["date", "gpu", "torch", "triton", "commit", "tokens", "dim", "vocab", "dtype", "input", "entropy",
                "filterable_share", "name", "ms", "ratio", "ratio_floor4", "predicted_ms", "peak_extra_mib"]
        new = not os.path.exists(args.csv)
        os.makedirs(os.path.dirname(os.path.abspath(args.csv)), exist_ok=True)
        with open(args.csv, "a", newline="") as f:
            wr = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
            if new:
                wr.writeheader()
            for row in rows:
                wr.writerow({**meta, **row})
        print(f"appended {len(rows)} rows to {args.csv}")


if __name__ == "__main__":
    main()
