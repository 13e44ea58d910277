"""Tensor-parallel (vocabulary-sharded lm-head) benchmark: ``python -m bench.tp``.

R processes on gloo (CPU) each hold ``V / R`` rows of the head and run one PSFT training step
(forward + backward, ``old_logprobs`` given, mean reduction). Compared, each in fresh processes:

* ``unsharded``: one process with the full head and the same threads as one rank (the single-device
  run the sharding replaces);
* ``fused``: ``pk.linear_psft_loss(..., vocab_parallel=(group, start))`` on the rank's shard;
* ``gather_logits``: what a plain implementation does: the shard's logits, all-gathered to the full
  ``N x V`` on every rank, then the loss in eager PyTorch (autograd slices the gradient back).

Per rank: the median step time (wall, and CPU time of the process, less sensitive to other jobs
on the machine) over ``--repeats`` (after one warm-up), the peak resident memory
above what the process held before its first step (``ru_maxrss``: a high-water mark, so each mode
runs in its own processes), and the collectives and bytes of one step, counted by wrapping the gloo
ProcessGroup's methods (bytes: this rank's payload, what it puts into the collective; a ring
all-reduce moves about ``2 (R-1) / R`` times that over the wire). Rows are appended to
``bench/results/tp-cpu.csv``.

CPU timings on a shared machine are noisy: read the ratios of one run, not absolute times.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import resource
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import psft_kernels as pk  # noqa: E402
from psft_kernels import vocab_parallel as vp_mod  # noqa: E402

_PG_METHODS = ("allreduce", "allreduce_coalesced", "allgather", "allgather_coalesced", "allgather_into_tensor_coalesced",
               "all_gather_single", "all_to_all_single", "alltoall", "alltoall_base", "barrier", "broadcast",
               "gather", "reduce", "reduce_scatter", "reduce_scatter_single", "reduce_scatter_tensor_coalesced",
               "scatter", "send", "recv")
_OPS = ("SUM", "MAX", "MIN", "PRODUCT", "AVG")


def _bytes(x) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(_bytes(t) for t in x)
    return 0


class CollectiveLog:
    """While active, every collective of any ProcessGroup (the real gloo / NCCL one: its methods are
    wrapped, not mocked) is recorded as ``(method, reduce op or "", payload bytes)``; payload: the
    tensors this rank puts in (an all-gather's input, an all-reduce's buffer)."""

    def __init__(self):
        self.calls = []
        self._saved = {}

    def __enter__(self):
        pg_class = torch._C._distributed_c10d.ProcessGroup
        for name in _PG_METHODS:
            if name not in pg_class.__dict__:
                continue
            self._saved[name] = pg_class.__dict__[name]  # the descriptor itself, which binds self
            original = getattr(pg_class, name)

            def wrapped(pg, *args, _name=name, _original=original, **kwargs):
                op = next((a.reduceOp for a in args if hasattr(a, "reduceOp")), None)
                op = next((k for k in _OPS if op is not None and op == getattr(dist.ReduceOp, k)), "")
                payload = args[1] if _name.startswith("allgather") and len(args) > 1 else (args[0] if args else None)
                self.calls.append((_name, op, _bytes(payload)))
                return _original(pg, *args, **kwargs)

            setattr(pg_class, name, wrapped)
        return self

    def __exit__(self, *exc):
        pg_class = torch._C._distributed_c10d.ProcessGroup
        for name, original in self._saved.items():
            setattr(pg_class, name, original)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _inputs(N, D, V, start, stop, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=g)
    weight = torch.randn(V, D, generator=g).mul_(2.0 / D ** 0.5)[start:stop].clone()
    targets = torch.randint(0, V, (N,), generator=g)
    old = -torch.rand(N, generator=g) * 4.0
    return hidden.requires_grad_(True), weight.requires_grad_(True), targets, old


def _gather_logits_psft(hidden, weight, targets, old, vp, layout, eps_low=0.2, eps_high=0.28):
    """The plain vocabulary-parallel PSFT: full logits on every rank (verl's clamp and clip)."""
    local = hidden @ weight.T
    full = vp_mod._GatherRows.apply(local.T.contiguous(), vp, layout).T  # (N, V)
    logp = torch.log_softmax(full.float(), -1).gather(1, targets[:, None]).squeeze(1)
    ratio = (logp - old).clamp(-20, 20).exp()
    return torch.maximum(-ratio, -ratio.clamp(1 - eps_low, 1 + eps_high)).mean()


def _worker(rank, world, mode, backend, N, D, V, repeats, threads, out_dir):
    torch.set_num_threads(threads)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{out_dir}/rdv", rank=rank, world_size=world)
    bounds = [V * r // world for r in range(world + 1)]
    start, stop = bounds[rank], bounds[rank + 1]
    hidden, weight, targets, old = _inputs(N, D, V, start, stop)
    vp = pk.VocabParallel(None, start) if world > 1 else None
    layout = vp_mod._layout(vp, stop - start, weight.device) if mode == "gather_logits" else None

    def step():
        hidden.grad = weight.grad = None
        if mode == "gather_logits":
            loss = _gather_logits_psft(hidden, weight, targets, old, vp, layout)
        else:
            loss = pk.linear_psft_loss(hidden, weight, targets, old, backend=backend, vocab_parallel=vp)
        loss.backward()
        return loss

    rss0 = _rss_bytes()
    with CollectiveLog() as log:
        step()  # warm-up (and the native kernel's workspace)
    times, cpu = [], []
    for _ in range(repeats):
        if world > 1:
            dist.barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss0
    with open(os.path.join(out_dir, f"{mode}-{rank}.txt"), "w") as f:
        f.write(f"{statistics.median(times)} {statistics.median(cpu)} {peak} {len(log.calls)} "
                f"{sum(c[-1] for c in log.calls)}\n")
    if world > 1:
        dist.destroy_process_group()


def measure(mode, backend, world, N, D, V, repeats, threads):
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_worker, args=(world, mode, backend, N, D, V, repeats, threads, d), nprocs=world, join=True)
        rows = []
        for r in range(world):
            with open(os.path.join(d, f"{mode}-{r}.txt")) as f:
                t, cpu, peak, calls, nbytes = f.read().split()
                rows.append((float(t), int(peak), int(calls), int(nbytes), float(cpu)))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.tp", description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--N", type=int, default=1024)
    p.add_argument("--D", type=int, default=512)
    p.add_argument("--V", type=int, default=32000)
    p.add_argument("--backend", default="native", help="fused backend: native or chunked")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (rank)")
    p.add_argument("--out", default=os.path.join(HERE, "results", "tp-cpu.csv"))
    a = p.parse_args(argv)

    plan = [("unsharded", a.backend, 1), ("fused", a.backend, a.ranks), ("gather_logits", "-", a.ranks)]
    results, load = {}, {}
    for mode, backend, world in plan:
        results[mode] = measure(mode, backend, world, a.N, a.D, a.V, a.repeats, a.threads)
        load[mode] = round(os.getloadavg()[0], 2)  # other jobs on the machine make wall times noise
    base, base_cpu = results["unsharded"][0][0], results["unsharded"][0][4]
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    fields = ["date", "mode", "backend", "ranks", "threads_per_rank", "N", "D", "V", "time_ms_max_rank",
              "time_vs_unsharded", "cpu_ms_max_rank", "cpu_vs_unsharded", "load_avg_1min", "peak_extra_mib_max_rank", "collectives_per_step", "payload_bytes_per_step",
              "payload_bytes_per_token"]
    new = not os.path.exists(a.out)
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        if new:
            w.writeheader()
        for (mode, backend, world) in plan:
            rows = results[mode]
            t, c = max(r[0] for r in rows), max(r[4] for r in rows)
            row = dict(date=stamp, mode=mode, backend=backend, ranks=world, threads_per_rank=a.threads, N=a.N, D=a.D,
                       V=a.V, time_ms_max_rank=round(t * 1e3, 1), time_vs_unsharded=round(t / base, 3),
                       cpu_ms_max_rank=round(c * 1e3, 1), cpu_vs_unsharded=round(c / base_cpu, 3),
                       load_avg_1min=load[mode],
                       peak_extra_mib_max_rank=round(max(r[1] for r in rows) / 2 ** 20, 1),
                       collectives_per_step=rows[0][2], payload_bytes_per_step=rows[0][3],
                       payload_bytes_per_token=round(rows[0][3] / a.N, 1))
            w.writerow(row)
            print(" ".join(f"{k}={v}" for k, v in row.items() if k != "date"))
    print(f"appended to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
