"""``python -m bench.accuracy``: each backend's largest error against the float64 truth, per dtype.

For every loss, option set and dtype, the loss and the gradients of hidden, weight and bias are
computed by each backend and by plain PyTorch (the reference) at that dtype, and compared with the
reference in float64. Errors are relative to the largest magnitude of the true output. The table
shows, per backend and dtype, the largest error over all cases next to plain PyTorch's largest
error on the same cases: the test suite's accuracy rule asks the first not to exceed twice the
second plus a small slack. Rows are also written to ``bench/results/accuracy-<device>.csv``.

The problems are the test suite's (tests/helpers.py), a little larger: batch (4, 32), D=64, V=257,
with PSFT's log-ratios kept 0.15 away from the clipping edges (a token on an edge may clip in one
precision and not in another, an O(1) jump in its gradient that is not an accuracy question).
``TRITON_INTERPRET=1 python -m bench.accuracy --backends chunked,native,triton`` adds the Triton
kernels as run by Triton's CPU interpreter (fp32 GEMMs in IEEE fp32, bf16 upcast: not the GPU's
arithmetic).
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from helpers import LOSSES, OPTION_SETS, make_problem, max_err, run, split_options  # noqa: E402

from bench.inputs import EPS_HIGH, EPS_LOW, off_clip_edges  # noqa: E402

import psft_kernels as pk  # noqa: E402

DTYPES = {"fp64": torch.float64, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _away_from_clip_edges(problem, margin: float = 0.15, **loss_opts):
    """Move PSFT's log-ratios (from the float64 log-probs) off both clipping edges, as the
    benchmark's inputs do (``bench.inputs.off_clip_edges``)."""
    with torch.no_grad():
        opts = {k: v for k, v in loss_opts.items() if k in ("temperature", "softcap")}
        logp, _ = pk.linear_logprobs(problem.hidden, problem.weight, problem.targets, bias=problem.bias,
                                     backend="reference", **opts)
    edges = (math.log1p(EPS_HIGH), math.log1p(-EPS_LOW))  # the losses' default eps
    problem.old_logprobs = logp - off_clip_edges(logp - problem.old_logprobs, margin, edges)
    return problem


def _rel(a: torch.Tensor, truth: torch.Tensor) -> float:
    return max_err(a, truth) / max(truth.double().abs().max().item(), 1e-30)


def _errors(result, truth):
    out = {"loss": _rel(result.loss, truth.loss)}
    out.update({f"grad_{k}": _rel(result.grads[k], truth.grads[k]) for k in truth.grads})
    return max(out.values())


def _ratio(row) -> float:
    return row["max_rel_err"] / max(row["plain_pytorch_max_rel_err"], 1e-30)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.accuracy", description=__doc__.splitlines()[0])
    ap.add_argument("--backends", default=None, help="default: every non-reference backend on the CPU")
    ap.add_argument("--dtypes", default=",".join(DTYPES))
    ap.add_argument("--results-dir", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args(argv)
    backends = args.backends.split(",") if args.backends else [b for b in pk.available_backends("cpu")
                                                                  if b != "reference"]
    rows = []
    for loss in LOSSES:
        for name, opts in OPTION_SETS.items():
            prob_opts, loss_opts = split_options(opts)
            if loss == "asft":
                loss_opts.setdefault("kl_coef", 0.3)
            problem = make_problem(batch=(4, 32), D=64, V=257, ref=loss == "asft", **{"bias": True, **prob_opts})
            if loss == "psft":
                problem = _away_from_clip_edges(problem, **loss_opts)
            truth = run(loss, "reference", problem, **loss_opts)
            for dname in args.dtypes.split(","):
                p = problem.to(DTYPES[dname])
                plain = _errors(run(loss, "reference", p, **loss_opts), truth) if dname != "fp64" else 0.0
                for be in backends:
                    rows.append(dict(backend=be, dtype=dname, loss=loss, options=name,
                                     max_rel_err=_errors(run(loss, be, p, **loss_opts), truth),
                                     plain_pytorch_max_rel_err=plain))

    out = Path(args.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "accuracy-cpu.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"{'backend':8} {'dtype':5} {'cases':>5} {'largest err':>12} {'plain, same case':>17} "
          f"{'plain, largest':>15}  {'worst case':28} {'largest err / plain':>20}")
    for be in backends:
        for dname in args.dtypes.split(","):
            sel = [r for r in rows if r["backend"] == be and r["dtype"] == dname]
            worst = max(sel, key=lambda r: r["max_rel_err"])
            plain = max(r["plain_pytorch_max_rel_err"] for r in sel)
            ratio = ""
            if dname != "fp64":  # fp64: plain PyTorch is the truth itself
                r = max(sel, key=_ratio)
                ratio = f"{_ratio(r):.2f} ({r['loss']}/{r['options']})"
            print(f"{be:8} {dname:5} {len(sel):5d} {worst['max_rel_err']:12.2e} "
                  f"{worst['plain_pytorch_max_rel_err']:17.2e} {plain:15.2e}  "
                  f"{worst['loss'] + '/' + worst['options']:28} {ratio}")
    print(f"rows written to {os.path.relpath(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
