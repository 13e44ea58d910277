"""``python -m bench``: sweep providers x losses x modes x token counts; append CSV rows; plot.

    python -m bench                         # this device's default sweep (see --help)
    python -m bench --preset cpu --loss psft,sft --mode fwd_bwd --providers reference,chunked
    python -m bench plot                    # PNGs from the CSVs in bench/results/
    python -m bench merge OTHER/*.csv       # append rows measured elsewhere (a lent GPU) to bench/results/
    python -m bench --list                  # presets and providers, and why some cannot run here
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from typing import Dict, List, Optional

import torch

from . import results
from .inputs import KINDS, make_problem, make_weight
from .measure import Outcome, Settings, floor_for
from .presets import CPU_DEFAULT, GPU_DEFAULT, PRESETS, Preset
from .providers import LOSS_MODES, LOSSES, MODES, PROVIDERS, Case, skip_reason
from .runner import REPO_ROOT, InProcessRunner, IsolatedRunner

DEFAULT_RESULTS = os.path.join(REPO_ROOT, "bench", "results")


def _csv_list(text: str, choices, what: str) -> List[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if items == ["all"]:
        return list(choices)
    bad = [t for t in items if t not in choices]
    if bad or not items:
        raise argparse.ArgumentTypeError(
            f"{what}: expected a comma-separated list of {', '.join(choices)}; got {text!r}")
    return items


def _int_list(text: str) -> List[int]:
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"--N: expected a comma-separated list of positive integers; got {text!r}")
    return sorted(set(values))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--list", action="store_true",
                   help="list presets and providers (with why any cannot run), then exit")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: cuda when available")
    p.add_argument("--preset", help=f"comma list of {', '.join(PRESETS)}; default: {','.join(CPU_DEFAULT)} on CPU, "
                                    f"{','.join(GPU_DEFAULT)} on CUDA")
    p.add_argument("--N", type=_int_list, help="token counts, e.g. 1024,4096 (default: the preset's)")
    p.add_argument("--D", type=int, help="custom hidden size (with --V; replaces --preset)")
    p.add_argument("--V", type=int, help="custom vocabulary size (with --D)")
    p.add_argument("--softcap", type=float, help="softcap for a custom shape")
    p.add_argument("--dtype", choices=tuple(results.DTYPES), help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--loss", default="all", help=f"comma list of {', '.join(LOSSES)} (default all)")
    p.add_argument("--mode", help="comma list of fwd (forward of the loss, inputs requiring grad), fwd_bwd "
                                  "(forward + backward), logprobs (forward-only log-probs and entropy under no_grad); "
                                  "default: all on CUDA, fwd_bwd,logprobs on CPU")
    p.add_argument("--providers", default="all", help=f"comma list of {', '.join(PROVIDERS)} (default all; the "
                                                     "reference always runs, untimed if not listed, as the truth)")
    p.add_argument("--inputs", help="zipf (realistic), flat (worst case); default: both on CUDA, zipf on CPU")
    p.add_argument("--entropy", type=float, default=2.0, help="target mean entropy of zipf inputs, nats (default 2)")
    p.add_argument("--context", type=float, default=2.0, help="zipf inputs: contextual term's std relative to the "
                                                             "log-rank prior (default 2)")
    p.add_argument("--old-noise", type=float, default=0.2, help="std of log pi_old - log pi (sets the clip fraction)")
    p.add_argument("--ignore-frac", type=float, default=0.0, help="share of tokens with target = -100 (default 0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=5, help="CPU: timed calls per measurement (default 5)")
    p.add_argument("--warmup-ms", type=float, default=25.0, help="GPU: do_bench warm-up budget")
    p.add_argument("--rep-ms", type=float, default=100.0, help="GPU: do_bench repetition budget (at least 5 calls)")
    p.add_argument("--rtol", type=float, help="agreement threshold, max |err| / max |truth| per output "
                                              "(default by dtype: fp32 1e-3, bf16 1e-1, fp16 5e-2)")
    p.add_argument("--isolate", choices=("auto", "yes", "no"), default="auto",
                   help="one process per provider (default: yes on CPU, for its peak RSS; no on CUDA)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--results-dir", "--out", dest="results_dir", default=DEFAULT_RESULTS,
                   help="where <device>.csv is appended and plots are written (default bench/results)")
    p.add_argument("--plot", action="store_true", help="write the plots after the sweep")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _presets(args, parser) -> List[Preset]:
    if (args.D is None) != (args.V is None):
        parser.error("--D and --V go together")
    if args.D is not None:
        if args.D < 2 or args.V < 2:
            parser.error(f"--D and --V must be >= 2; got D={args.D}, V={args.V}")
        if args.N is None:
            parser.error("a custom shape (--D/--V) needs --N")
        return [Preset("custom", args.D, args.V, args.softcap, tuple(args.N))]
    names = args.preset.split(",") if args.preset else list(GPU_DEFAULT if args.device == "cuda" else CPU_DEFAULT)
    bad = [n for n in names if n not in PRESETS]
    if bad:
        parser.error(f"--preset: unknown {bad}; known: {', '.join(PRESETS)}")
    out = []
    for n in names:
        p = PRESETS[n]
        out.append(Preset(p.name, p.D, p.V, p.softcap, tuple(args.N) if args.N else p.N))
    return out


def _cases(losses: List[str], modes: List[str]) -> List[tuple]:
    return [(loss, mode) for mode in modes if mode in LOSS_MODES for loss in losses] + (
        [("logprobs", "logprobs")] if "logprobs" in modes else [])


def list_providers(device: str) -> None:
    print("presets:")
    for p in PRESETS.values():
        cap = f", softcap {p.softcap:g}" if p.softcap else ""
        print(f"  {p.name:14s} D={p.D}, V={p.V}{cap}; N = {', '.join(map(str, p.N))}")
    print(f"providers (on {device}):")
    for p in PROVIDERS.values():
        reason = skip_reason(p, Case(p.losses[0], "fwd_bwd" if p.losses[0] != "logprobs" else "logprobs", device))
        status = "ok" if reason is None else f"cannot run: {reason}"
        print(f"  {p.name:14s} {'/'.join(p.losses):28s} {p.summary}  [{status}]")


class Sweep:
    """One run of the CLI: the fixed columns, the CSV, the console."""

    def __init__(self, args, device: str, dtype: torch.dtype, settings: Settings, write):
        self.args, self.device, self.dtype, self.settings, self.write = args, device, dtype, settings, write
        slug = results.device_slug(device)
        self.csv = os.path.join(args.results_dir, f"{slug}.csv")
        self.inputs_csv = os.path.join(args.results_dir, f"{slug}.inputs.csv")
        self.fixed = dict(date=results.now(), commit=results.commit(REPO_ROOT), device=results.device_label(device),
                          torch=torch.__version__, triton=results.triton_version(),
                          dtype=results.DTYPE_NAMES[dtype])
        self.rows = 0
        self.skipped = set()

    def skip(self, provider: str, reason: str) -> None:
        if (provider, reason) not in self.skipped:
            self.skipped.add((provider, reason))
            self.write(f"skip {provider}: {reason}")

    def row(self, provider: str, case: Case, preset: Preset, o: Outcome, info: dict, floor: float) -> dict:
        f = results.fmt
        return dict(self.fixed, provider=provider, loss=case.loss, mode=case.mode, N=o.N, D=preset.D, V=preset.V,
                    input_entropy=f(info["entropy"], ".3f"),
                    clip_fraction=f(info["clip_fraction"], ".4f") if case.loss == "psft" else "",
                    ms_median=f(o.ms_median, ".3f"), ms_p20=f(o.ms_p20, ".3f"), ms_p80=f(o.ms_p80, ".3f"),
                    peak_mem_mib=f(o.peak_mem_mib, ".1f"), floor_ms=f(floor, ".3f"),
                    max_abs_err_vs_reference=f(o.max_abs_err, ".3e"))

    def report(self, provider: str, case: Case, o: Outcome, floor: float) -> None:
        head = f"{provider:>13} {case.loss:>8} {case.mode:>8} N={o.N:<6}"
        if o.status == "ok":
            mem = "   n/a MiB" if o.peak_mem_mib is None else f"{o.peak_mem_mib:8.1f} MiB"
            self.write(f"{head} {o.ms_median:10.2f} ms [{o.ms_p20:.2f}, {o.ms_p80:.2f}] {mem}  "
                       f"{o.ms_median / floor:5.2f}x floor  err {o.max_abs_err:.1e} (rel {o.max_rel_err:.1e})")
        elif o.status == "disagree":
            self.write(f"{head} DISAGREES with the reference, not timed: {o.message}")
        elif o.status == "oom":
            self.write(f"{head} out of memory")
        elif o.status == "error":
            self.write(f"{head} failed: {o.message}")


def run(args, parser) -> int:
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    args.device = device
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.list:
        list_providers(device)
        return 0
    try:
        losses = _csv_list(args.loss, LOSSES, "--loss")
        # On the CPU, fwd costs what fwd_bwd costs for every fused provider (they form gradients in
        # the forward) and no provider skips negligible tiles, so flat inputs repeat zipf's numbers.
        cpu = device == "cpu"
        modes = _csv_list(args.mode or ("fwd_bwd,logprobs" if cpu else "all"), MODES, "--mode")
        providers = _csv_list(args.providers, tuple(PROVIDERS), "--providers")
        kinds = _csv_list(args.inputs or ("zipf" if cpu else "zipf,flat"), KINDS, "--inputs")
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    presets = _presets(args, parser)
    dtype = results.DTYPES[args.dtype or ("bf16" if device == "cuda" else "fp32")]
    settings = Settings(device=device, repeats=args.repeats, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms,
                        rtol=args.rtol)
    isolate = args.isolate == "yes" or (args.isolate == "auto" and device == "cpu")
    cases = [Case(loss, mode, device) for loss, mode in _cases(losses, modes)]

    try:
        from tqdm import tqdm
    except ImportError:  # the bar is a convenience: run without it
        tqdm = None
    bar = None
    total = 0
    for preset in presets:
        for case in cases:
            capped = Case(case.loss, case.mode, device, preset.softcap)
            total += len(preset.N) * sum(skip_reason(PROVIDERS[p], capped) is None for p in providers)
    total *= len(kinds)
    if tqdm is not None and not args.no_progress:  # disable=None: no bar when stderr is not a terminal
        bar = tqdm(total=total, unit="meas", dynamic_ncols=True, file=sys.stderr, disable=None)
    write = bar.write if bar is not None else print
    sweep = Sweep(args, device, dtype, settings, write)
    write(f"device: {sweep.fixed['device']} | torch {sweep.fixed['torch']} | triton {sweep.fixed['triton']} | "
          f"commit {sweep.fixed['commit']} | {'one process per provider' if isolate else 'in-process'}")
    try:
        for preset in presets:
            for kind in kinds:
                _sweep_inputs(sweep, preset, kind, cases, providers, isolate, bar)
    finally:
        if bar is not None:
            bar.close()
    print(f"{sweep.rows} rows appended to {sweep.csv}")
    if args.plot:
        from . import plot

        for path in plot.plot_dir(args.results_dir):
            print(f"wrote {path}")
    return 0


def _sweep_inputs(sweep: Sweep, preset: Preset, kind: str, cases: List[Case], providers: List[str], isolate: bool,
                  bar) -> None:
    args, device = sweep.args, sweep.device
    with tempfile.TemporaryDirectory(prefix="psft-bench-") as tmp:
        runner = IsolatedRunner(sweep.settings, tmp, args.threads) if isolate else InProcessRunner(sweep.settings)
        weight, winfo = make_weight(kind, preset.V, preset.D, sweep.dtype, device, seed=args.seed,
                                    entropy=args.entropy, context=args.context, softcap=preset.softcap)
        infos: Dict[int, dict] = {}
        input_rows = []
        for N in preset.N:
            prob = make_problem(weight, winfo, N, seed=args.seed, softcap=preset.softcap, old_noise=args.old_noise,
                                ignore_frac=args.ignore_frac)
            infos[N] = prob.info
            runner.add_problem(prob)
            del prob
            i = infos[N]
            sweep.write(f"inputs {preset.name} {kind} N={N}: mean entropy {i['entropy']:.3f} nats, NLL {i['nll']:.3f}, "
                        f"PSFT clip fraction {i['clip_fraction']:.3f}, negligible 64x128 tiles "
                        f"{100 * i['filterable_tiles']:.1f}% (p < 2^-12), prior scale {i['scale']:.3f}")
            measured = {k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in i.items() if k != "kind"}
            input_rows.append(dict(date=sweep.fixed["date"], commit=sweep.fixed["commit"],
                                   device=sweep.fixed["device"], preset=preset.name, inputs=kind, N=N, D=preset.D,
                                   V=preset.V, dtype=sweep.fixed["dtype"], **measured))
        del weight
        _append_inputs(sweep.inputs_csv, input_rows)
        gemm = runner.floor(list(preset.N))
        for N, g in gemm.items():
            sweep.write(f"floor {preset.name} N={N}: h W^T {g['logits']:.2f} ms, dZ W {g['grad_hidden']:.2f} ms, "
                        f"dZ^T h {g['grad_weight']:.2f} ms")
        for case in cases:
            case = Case(case.loss, case.mode, device, preset.softcap)
            todo = [p for p in providers if _applies(sweep, p, case)]
            _run_case(sweep, runner, preset, case, todo, infos, gemm, bar)
            runner.done_with(case)
        runner.close()


def _applies(sweep: Sweep, provider: str, case: Case) -> bool:
    reason = skip_reason(PROVIDERS[provider], case)
    if reason is not None and case.loss in PROVIDERS[provider].losses:  # another loss's provider: no news
        sweep.skip(provider, reason)
    return reason is None


def _run_case(sweep, runner, preset, case, todo, infos, gemm, bar) -> None:
    Ns = list(preset.N)
    floors = {N: floor_for(gemm[N], case.loss, case.mode) for N in Ns}

    def emit(provider: str, outcomes: List[Outcome]) -> None:
        rows = []
        for o in outcomes:
            if o.status != "truth":
                sweep.report(provider, case, o, floors[o.N])
            if o.status in ("ok", "disagree", "oom") and provider in todo:
                rows.append(sweep.row(provider, case, preset, o, infos[o.N], floors[o.N]))
        sweep.rows += results.append(sweep.csv, rows)
        if bar is not None and provider in todo:
            bar.update(len(outcomes))

    # The truth first: the reference (timed if asked for), then our chunked backend for any N the
    # reference could not hold in memory.
    timed_ref = "reference" in todo
    emit("reference", runner.run("reference", case, {N: "provide" if timed_ref else "provide_only" for N in Ns}))
    missing = [N for N in Ns if not runner.has_truth(case, N)]
    if missing:
        sweep.write(f"truth for {case.loss} {case.mode} N={missing} from the chunked backend "
                    "(the reference did not run)")
        emit("chunked-as-truth", runner.run("chunked", case, {N: "provide_only" for N in missing}))
    for provider in todo:
        if provider != "reference":
            emit(provider, runner.run(provider, case, {N: "compare" for N in Ns}))


def _append_inputs(path: str, rows: List[dict]) -> None:
    import csv

    if not rows:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        if new:
            w.writeheader()
        w.writerows(rows)


def merge(argv: List[str]) -> int:
    """Append the rows of CSVs written elsewhere (same file names) to the results directory."""
    p = argparse.ArgumentParser(prog="python -m bench merge", description=merge.__doc__)
    p.add_argument("sources", nargs="+", help="<device>.csv / <device>.inputs.csv files from another run")
    p.add_argument("--results-dir", "--out", dest="results_dir", default=DEFAULT_RESULTS)
    args = p.parse_args(argv)
    for src in args.sources:
        rows = results.read(src)
        dest = os.path.join(args.results_dir, os.path.basename(src))
        if src.endswith(".inputs.csv"):
            _append_inputs(dest, rows)
            n = len(rows)
        else:
            n = results.append(dest, rows)  # checks the columns
        print(f"{n} rows from {src} appended to {dest}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "plot":
        from . import plot

        return plot.main(argv[1:])
    if argv and argv[0] == "merge":
        return merge(argv[1:])
    if argv and argv[0] == "run":
        argv = argv[1:]
    parser = build_parser()
    args = parser.parse_args(argv)
    return run(args, parser)
