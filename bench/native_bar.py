"""The issue-8 bar for the native CPU backend, measured the way the issue states it.

PSFT forward + backward (reduction="mean", r = 1 so no row is skipped), fp32, 8 x 256 tokens,
V = 32000, at D = 256 / 1024 / 4096. Providers: ``floor`` (the three dense GEMMs h W^T, dZ W,
dZ^T h of the same shapes), ``reference`` (eager, materialized logits), ``chunked``, ``native``.
Every (provider, D) runs in a fresh process, once for time (median of --reps after a warm-up)
and once for memory (peak RSS of one step, VmHWM, minus the RSS before it and the size of
the gradients).

    python bench/native_bar.py                      # all providers, D = 256 1024 4096
    python bench/native_bar.py --dims 1024 --reps 7

Appends to bench/results/native_bar.csv and prints the bar's three ratios. The bar is on wall
time on a quiet machine; process CPU time is recorded too, being steadier on a shared one.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROVIDERS = ("floor", "reference", "chunked", "native")
N_BATCH, N_SEQ, VOCAB = 8, 256, 32000
RESULTS = Path(__file__).parent / "results" / "native_bar.csv"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's package, installed or not


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak_rss() -> None:
    """Start the peak (VmHWM) afresh, so building the inputs does not count (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _worker(provider: str, D: int, mode: str, reps: int) -> dict:
    import torch

    import psft_kernels as pk

    g = torch.Generator().manual_seed(0)
    N = N_BATCH * N_SEQ
    hidden = torch.randn(N_BATCH, N_SEQ, D, generator=g)
    weight = torch.randn(VOCAB, D, generator=g).div_(D ** 0.5)
    targets = torch.randint(0, VOCAB, (N_BATCH, N_SEQ), generator=g)
    if provider == "floor":
        dz = torch.randn(N, VOCAB, generator=g)
        h2 = hidden.reshape(N, D)

        def step():
            h2 @ weight.T
            dz @ weight
            dz.T @ h2
    else:
        if provider == "native":  # build (or load) outside the timed region
            from psft_kernels import _native_build

            assert _native_build.load_ops() is not None, _native_build.unavailable_reason()

        def step():
            h = hidden.detach().requires_grad_(True)
            w = weight.detach().requires_grad_(True)
            pk.linear_psft_loss(h, w, targets, backend=provider).backward()
            return h.grad, w.grad

    if mode == "mem":
        grad_bytes = 0 if provider == "floor" else (hidden.numel() + weight.numel()) * 4
        _reset_peak_rss()
        before = _status_bytes("VmRSS")
        step()
        peak = _status_bytes("VmHWM")
        return {"extra_rss_mib": max(0, peak - before - grad_bytes) / 2 ** 20}
    step()  # warm-up: thread pools, first-touch of the weights, the native library
    times, cpu = [], []
    for _ in range(reps):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {"median_s": statistics.median(times), "min_s": min(times), "median_cpu_s": statistics.median(cpu)}


def _run(provider: str, D: int, mode: str, reps: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", provider, str(D), mode, str(reps)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dims", type=int, nargs="+", default=[256, 1024, 4096])
    ap.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        provider, D, mode, reps = args.worker
        print(json.dumps(_worker(provider, int(D), mode, int(reps))))
        return

    import torch

    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    rows = []
    for D in args.dims:
        res = {}
        for p in args.providers:
            res[p] = {**_run(p, D, "time", args.reps), **_run(p, D, "mem", 1)}
            print(f"D={D:5d} {p:10s} median {res[p]['median_s']:7.3f} s  min {res[p]['min_s']:7.3f} s  "
                  f"cpu {res[p]['median_cpu_s']:7.3f} s  extra RSS {res[p]['extra_rss_mib']:8.1f} MiB", flush=True)
            rows.append(dict(timestamp=stamp, cpu=cpu, threads=torch.get_num_threads(), torch=torch.__version__,
                             N=N_BATCH * N_SEQ, V=VOCAB, D=D, provider=p, reps=args.reps,
                             median_s=f"{res[p]['median_s']:.4f}", min_s=f"{res[p]['min_s']:.4f}",
                             median_cpu_s=f"{res[p]['median_cpu_s']:.4f}", load_avg=f"{os.getloadavg()[0]:.1f}",
                             extra_rss_mib=f"{res[p]['extra_rss_mib']:.1f}"))
        if "native" in res:
            nat, nat_cpu = res["native"]["median_s"], res["native"]["median_cpu_s"]
            for other, what, bar in (("floor", "native / floor  ", "at D=1024: <= 1.10"),
                                     ("chunked", "chunked / native", "at D=256: >= 1.5")):
                if other in res:
                    o, o_cpu = res[other]["median_s"], res[other]["median_cpu_s"]
                    wall, cpu = (nat / o, nat_cpu / o_cpu) if other == "floor" else (o / nat, o_cpu / nat_cpu)
                    print(f"  {what} = {wall:.3f} wall, {cpu:.3f} cpu time  (bar {bar})")
            if "reference" in res and res["reference"]["extra_rss_mib"] > 0:
                ratio = res["native"]["extra_rss_mib"] / res["reference"]["extra_rss_mib"]
                print(f"  native / reference extra RSS = {ratio:.3f}  (bar: <= 0.25)")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    new = not RESULTS.exists()
    with RESULTS.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        if new:
            w.writeheader()
        w.writerows(rows)
    print(f"appended {len(rows)} rows to {RESULTS} ({platform.node()})")


if __name__ == "__main__":
    main()
