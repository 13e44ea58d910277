"""Resident memory and time as a user sees them: ``python -m bench.rss``.

Each measurement is a fresh Python process with glibc's default allocator (any ``MALLOC_*``
tuning removed from its environment) that loads the inputs, builds one provider's function and
calls it ``--calls`` times, with nothing else in between: no warm-up call, no ``malloc_trim``,
no ``psft_kernels.empty_cache()``. Reported per process:

* ``peak_mem_mib``: the process's peak resident set (``VmHWM``) over all its calls, minus its
  resident set before the first call, minus the outputs of one call (loss and gradients, or
  log-probs and entropies): what the loss costs on top of its inputs and results, including
  whatever the allocator kept of the memory it freed (the main sweep, ``python -m bench``,
  weighs live memory instead: bench/README.md, "What is measured");
* ``first_peak_mib``: the same over the first call only;
* ``ms_first``, ``ms_last``: wall time of the first and the last call; ``cpu_ms_last``: the
  process CPU time of the last call (steadier than wall time on a shared machine).

Providers are run in alternation, ``--pairs`` times (the order reversed every other round), so
that each round compares them under the same machine load; the summary prints per provider the
median and range over rounds and, against the first provider listed, the median of the per-round
ratios. Rows are appended to ``bench/results/rss-<device>.csv``.

    python -m bench.rss --N 4000 --D 8 --V 152064 --loss sft --mode fwd_bwd \\
        --providers reference,chunked,native --pairs 6
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from typing import Dict, List, Optional

import torch

from . import results
from .inputs import make_problem, make_weight
from .providers import PROVIDERS, Case
from .runner import REPO_ROOT, DiskStore

COLUMNS = ("date", "commit", "device", "torch", "provider", "loss", "mode", "N", "D", "V", "dtype", "inputs",
           "round", "calls", "peak_mem_mib", "first_peak_mib", "ms_first", "ms_last", "cpu_ms_last")
DEFAULT_OUT = os.path.join(REPO_ROOT, "bench", "results")


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM <- VmRSS (Linux >= 4.0)


def child(job: dict) -> dict:
    """One process's measurement (see the module doc)."""
    from .measure import _nbytes, leaves, run_once

    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    case = Case(**job["case"])
    prob = DiskStore(job["store"]).problem(job["N"])
    fn = PROVIDERS[job["provider"]].build(case, prob)
    h, w = leaves(prob, case.mode)
    out: Dict[str, float] = {}
    base = _status_mib("VmRSS")
    _reset_peak()
    for i in range(job["calls"]):
        t0, c0 = time.perf_counter(), time.process_time()
        outs = run_once(fn, h, w, case.mode)
        ms, cpu_ms = (time.perf_counter() - t0) * 1e3, (time.process_time() - c0) * 1e3
        outputs_mib = _nbytes(outs) / 2 ** 20
        del outs
        peak = _status_mib("VmHWM") - base - outputs_mib
        if i == 0:
            out.update(first_peak_mib=peak, ms_first=ms)
        out.update(peak_mem_mib=peak, ms_last=ms, cpu_ms_last=cpu_ms)
        h.grad = w.grad = None
    return out


def _default_env() -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES", "LD_PRELOAD"))}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, os.environ.get("PYTHONPATH")) if p)
    return env


def _spawn(job: dict, root: str) -> Optional[dict]:
    path = os.path.join(root, "job.json")
    with open(path, "w") as f:
        json.dump(job, f)
    proc = subprocess.run([sys.executable, "-m", "bench.rss", "--child", path], cwd=REPO_ROOT, env=_default_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines or not lines[-1].startswith("{"):
        print(f"  {job['provider']}: process failed (status {proc.returncode}): {' | '.join(lines[-3:])}")
        return None
    return json.loads(lines[-1])


def _append(path: str, rows: List[dict]) -> None:
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            w.writeheader()
        w.writerows(rows)


def _summary(rows: List[dict], providers: List[str]) -> None:
    by = {p: [r for r in rows if r["provider"] == p] for p in providers}
    base = providers[0]
    base_by_round = {r["round"]: r for r in by[base]}
    for key, what in (("peak_mem_mib", "peak RSS beyond inputs and outputs, MiB"), ("ms_last", "wall ms, last call"),
                      ("cpu_ms_last", "CPU ms, last call")):
        print(f"{what}:")
        for p in providers:
            vals = [float(r[key]) for r in by[p]]
            if not vals:
                continue
            line = f"  {p:10s} median {statistics.median(vals):10.1f}  range {min(vals):.1f} - {max(vals):.1f}"
            if p != base:
                pairs = [(a, base_by_round.get(a["round"])) for a in by[p]]
                ratios = [float(a[key]) / float(b[key]) for a, b in pairs if b is not None and float(b[key]) > 0]
                if ratios:
                    line += f"  ratio to {base}: median {statistics.median(ratios):.3f}" \
                            f" ({', '.join(f'{x:.2f}' for x in ratios)})"
            print(line)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.rss", description=__doc__.split("\n\n")[0])
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--N", type=int, required=False)
    p.add_argument("--D", type=int)
    p.add_argument("--V", type=int)
    p.add_argument("--loss", default="sft", choices=("sft", "psft", "dft", "asft", "logprobs"))
    p.add_argument("--mode", default="fwd_bwd", choices=("fwd_bwd", "logprobs"))
    p.add_argument("--providers", default="reference,chunked,native")
    p.add_argument("--pairs", type=int, default=6, help="rounds, each running every provider once (default 6)")
    p.add_argument("--calls", type=int, default=2, help="calls per process (default 2)")
    p.add_argument("--inputs", default="flat", choices=("flat", "zipf"))
    p.add_argument("--dtype", default="fp32", choices=tuple(results.DTYPES))
    p.add_argument("--threads", type=int)
    p.add_argument("--results-dir", "--out", dest="results_dir", default=DEFAULT_OUT)
    args = p.parse_args(argv)
    if args.child:
        with open(args.child) as f:
            print(json.dumps(child(json.load(f))))
        return 0
    if None in (args.N, args.D, args.V):
        p.error("--N, --D and --V are required")
    if (args.loss == "logprobs") != (args.mode == "logprobs"):
        p.error("--loss logprobs goes with --mode logprobs and only with it")
    providers = args.providers.split(",")
    case = Case(args.loss, args.mode, "cpu")
    dtype = results.DTYPES[args.dtype]
    if args.threads:
        torch.set_num_threads(args.threads)
    fixed = dict(date=results.now(), commit=results.commit(REPO_ROOT), device=results.device_label("cpu"),
                 torch=torch.__version__, loss=args.loss, mode=args.mode, N=args.N, D=args.D, V=args.V,
                 dtype=args.dtype, inputs=args.inputs, calls=args.calls)
    out_path = os.path.join(args.results_dir, f"rss-{results.device_slug('cpu')}.csv")
    rows = []
    with tempfile.TemporaryDirectory(prefix="psft_rss_") as root:
        weight, info = make_weight(args.inputs, args.V, args.D, dtype, "cpu")
        DiskStore(root).put_problem(make_problem(weight, info, args.N))
        del weight
        for r in range(args.pairs):
            for name in providers if r % 2 == 0 else providers[::-1]:
                job = dict(provider=name, case=asdict(case), N=args.N, store=root, calls=args.calls,
                           threads=args.threads)
                res = _spawn(job, root)
                if res is None:
                    continue
                row = dict(fixed, provider=name, round=r, **{k: f"{v:.1f}" for k, v in res.items()})
                rows.append(row)
                print(f"round {r} {name:10s} peak {res['peak_mem_mib']:8.1f} MiB (first call "
                      f"{res['first_peak_mib']:.1f})  wall {res['ms_last']:9.1f} ms  cpu {res['cpu_ms_last']:9.1f} ms",
                      flush=True)
                _append(out_path, [row])
    _summary(rows, providers)
    print(f"rows appended to {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
