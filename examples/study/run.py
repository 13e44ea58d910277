"""The study's command line. From the repository root:

    python -m examples.study            # the default protocol; writes results into examples/study/
    python -m examples.study --quick    # about a minute, every method and code path, tiny sizes
    python examples/study/run.py ...    # the same

Options: --out DIR (where results.json, results.md and the PNGs go), --cache-dir DIR (pretrained
base models; default ~/.cache/psft_kernels_study or $PSFT_STUDY_CACHE), --workers N (parallel
fine-tuning processes, one torch thread each; pretraining always uses 2 threads).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing as mp
import os
import platform
import resource
import sys
import tempfile
import time

if __package__ in (None, ""):  # run as a script: make "examples.study" importable from the repo root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    __package__ = "examples.study"

import torch  # noqa: E402

from examples.study import report  # noqa: E402
from examples.study.base import ensure_base  # noqa: E402
from examples.study.config import default_config, quick_config  # noqa: E402
from examples.study.finetune import eval_steps, run_one, steps_per_epoch  # noqa: E402

STUDY_DIR = os.path.dirname(os.path.abspath(__file__))
PRETRAIN_THREADS = 2


def _cpu_seconds() -> float:
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _loadavg() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m examples.study", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny preset (~1 minute), for smoke tests")
    p.add_argument("--out", help="output folder (default: examples/study for the default preset, a new "
                                 "temporary folder for --quick)")
    p.add_argument("--cache-dir", help="where pretrained base models are cached")
    p.add_argument("--loss-backend", choices=["chunked", "auto", "native", "reference"],
                   help="psft_kernels backend for every loss (default: chunked, available everywhere, so the "
                        "numbers do not depend on the machine having a compiler)")
    p.add_argument("--report-only", action="store_true",
                   help="no training: rebuild results.md, the plots and the summary from OUT/results.json")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                   help="parallel fine-tuning processes, one torch thread each (default: min(2, cores))")
    return p.parse_args(argv)


def _job_order(cfg):
    """Every (method, lr, seed); the ASFT runs (slowest: two models) first so the pool ends balanced."""
    ft = cfg.finetune
    jobs = [(m, lr, s) for m in ft.methods for lr in ft.lrs for s in ft.seeds]
    return sorted(jobs, key=lambda j: j[0] != "asft")


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.report_only:
        return report_only(args.out or STUDY_DIR)
    cfg = quick_config() if args.quick else default_config()
    if args.loss_backend:
        cfg = dataclasses.replace(cfg, loss_backend=args.loss_backend)
    out = args.out or (tempfile.mkdtemp(prefix="psft-study-quick-") if args.quick else STUDY_DIR)
    os.makedirs(out, exist_ok=True)
    workers = max(1, args.workers)
    cores = os.cpu_count() or 1
    # Fixed thread counts: CPU matmuls round differently with a different thread count, and the
    # pretrained base (hence every number) would then depend on the machine's core count.
    threads = 1
    t0, cpu0, load0 = time.perf_counter(), _cpu_seconds(), _loadavg()
    print(f"study preset={cfg.name}: {len(cfg.finetune.methods)} methods x {len(cfg.finetune.lrs)} lrs x "
          f"{len(cfg.finetune.seeds)} seeds; {workers} worker(s) x {threads} thread(s); load average {load0}",
          flush=True)

    torch.set_num_threads(PRETRAIN_THREADS)  # pretraining has the machine to itself
    base_path, base_meta, cached = ensure_base(cfg, args.cache_dir, log=lambda s: print(s, flush=True))
    t_base = time.perf_counter() - t0
    print(f"base model: {base_meta['params']:,} parameters, held-out loss {base_meta['heldout_loss']:.3f} "
          f"({'cached' if cached else f'pretrained in {t_base:.0f}s'}: {base_path})", flush=True)

    jobs = [dict(config=cfg, base_path=base_path, method=m, lr=lr, seed=s, threads=threads)
            for m, lr, s in _job_order(cfg)]
    t1 = time.perf_counter()
    runs = []

    def done(r):
        runs.append(r)
        f = r["evals"][-1]
        print(f"[{len(runs):2d}/{len(jobs)}] {r['method']:<11} lr={r['lr']:<7g} seed={r['seed']}: accuracy "
              f"{100 * f['accuracy']:5.1f}%  OOD loss {f['ood_loss']:.3f}  entropy(train answers) "
              f"{f['entropy_train_probe']:.3f}  ({r['seconds']:.0f}s; {time.perf_counter() - t0:.0f}s total)",
              flush=True)

    if workers == 1:
        for job in jobs:
            done(run_one(job))
    else:
        # spawn: a fresh interpreter per worker (forking a process that holds torch threads can hang)
        with mp.get_context("spawn").Pool(workers, maxtasksperchild=None) as pool:
            for r in pool.imap_unordered(run_one, jobs):
                done(r)
    t_ft = time.perf_counter() - t1
    runs.sort(key=lambda r: (cfg.finetune.methods.index(r["method"]), r["lr"], r["seed"]))

    import transformers

    import psft_kernels as pk

    summary = report.aggregate(runs, base_meta)
    meta = {
        "preset": cfg.name, "seeds": list(cfg.finetune.seeds), "eval_problems": cfg.task.eval_problems,
        "runs": len(runs), "workers": workers, "threads_per_worker": threads, "cpu_count": cores,
        "base_cached": cached, "base_path": base_path, "pretrain_wall_seconds": t_base,
        "finetune_wall_seconds": t_ft, "wall_seconds": time.perf_counter() - t0,
        "cpu_seconds": _cpu_seconds() - cpu0, "loadavg_start": load0, "loadavg_end": _loadavg(),
        "loss_backend": cfg.loss_backend if cfg.loss_backend != "auto" else pk.auto_backend_name("cpu"),
        "psft_kernels": pk.__version__,
        "steps_per_epoch": steps_per_epoch(cfg), "eval_steps": eval_steps(cfg),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
    }
    pngs = report.plots(summary, out, steps_per_epoch(cfg))
    meta["plots"] = [os.path.basename(p) for p in pngs]
    meta["wall_seconds"] = time.perf_counter() - t0
    meta["cpu_seconds"] = _cpu_seconds() - cpu0
    stored = [dict(r, logs=report.logs_to_columns(r["logs"])) for r in runs]
    result = {"meta": meta, "config": cfg.to_dict(), "summary": summary, "runs": stored}
    report.write_json(os.path.join(out, "results.json"), result)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(report.markdown(summary, meta))
    print(f"done in {meta['wall_seconds']:.0f}s wall, {meta['cpu_seconds']:.0f}s CPU: results in {out}", flush=True)
    return result


def report_only(out: str) -> dict:
    """Rebuild the summary, results.md and the plots from the runs stored in ``out/results.json``
    (after a change to the report code; no training)."""
    with open(os.path.join(out, "results.json")) as f:
        result = json.load(f)
    runs = [dict(r, logs=report.columns_to_logs(r["logs"])) for r in result["runs"]]
    old = result["summary"]
    summary = report.aggregate(runs, dict(old["base_model"], curve=old.get("pretrain_curve", [])))
    meta = result["meta"]
    pngs = report.plots(summary, out, meta["steps_per_epoch"])
    meta["plots"] = [os.path.basename(p) for p in pngs]
    result["summary"] = summary
    report.write_json(os.path.join(out, "results.json"), result)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(report.markdown(summary, meta))
    print(f"rewrote the report from {len(runs)} stored runs in {out}")
    return result


if __name__ == "__main__":
    main()
