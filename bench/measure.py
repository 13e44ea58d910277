"""How one provider is run, checked, timed and weighed; and the dense-GEMM floor.

The protocol for one (provider, case, N), the same on every device:

1. build the provider's function; call it once (warm-up: imports, autotuning, torch.compile);
2. compare that call's outputs with the truth (our reference's outputs on the same inputs): the
   loss, and for ``fwd_bwd`` the gradients of hidden and weight, or the per-token log-probs and
   entropies for ``logprobs``. A provider whose error, relative to the largest magnitude of the
   output, exceeds ``rtol`` in any output disagrees: it is reported and not timed;
3. peak memory of a call, beyond what was allocated before it, minus the outputs it returns
   (loss, gradients, log-probs): what the loss needs on top of its inputs and results. GPU:
   ``torch.cuda.max_memory_allocated`` over one more call. CPU: the process's peak resident set
   (``VmHWM``, reset through ``/proc/self/clear_refs`` after returning freed heap pages with
   ``malloc_trim``) over the first timed call; with one process per provider (the CPU default)
   that number is then replaced by :func:`weigh`'s, measured in a second process whose glibc maps
   every allocation above 128 KiB on its own and unmaps it when freed, so that it counts live
   memory and not what glibc keeps in its heap after frees (timings stay with the default
   allocator). Either way ``psft_kernels.empty_cache()`` runs first, so
   the memory our native backend keeps between calls (its logit blocks) is counted, not hidden in
   what "was allocated before"; the other timed calls find it warm, as a training loop's would;
4. time: GPU, CUDA events through ``triton.testing.do_bench`` (median, 20th and 80th
   percentiles); CPU, wall-clock of ``repeats`` calls (same statistics).
"""

from __future__ import annotations

import ctypes
import gc
import math
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
from torch import Tensor

import psft_kernels as pk

from .inputs import Problem
from .providers import PROVIDERS, Case


@dataclass
class Settings:
    device: str = "cpu"
    repeats: int = 5  # CPU: timed calls per measurement
    warmup_ms: float = 25.0  # GPU: do_bench's warm-up and repetition budgets (raised for slow calls)
    rep_ms: float = 100.0
    min_reps: int = 5  # GPU: at least this many timed calls, however slow
    rtol: Optional[float] = None  # None: by dtype (DEFAULT_RTOL)


# Agreement threshold: max |provider - truth| / max |truth|, per output. Large enough for rounding
# (a bf16 logit's last bit, CCE's filtered gradient entries), small enough that a provider set up
# for another loss (DFT vs SFT, another clip range, another reduction) fails by a wide margin.
DEFAULT_RTOL = {torch.float64: 1e-6, torch.float32: 1e-3, torch.float16: 5e-2, torch.bfloat16: 1e-1}


@dataclass
class Outcome:
    N: int
    status: str  # ok | disagree | oom | error | truth (outputs kept as the truth, not timed)
    message: str = ""
    ms_median: Optional[float] = None
    ms_p20: Optional[float] = None
    ms_p80: Optional[float] = None
    peak_mem_mib: Optional[float] = None
    max_abs_err: Optional[float] = None
    max_rel_err: Optional[float] = None

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# one call
# ---------------------------------------------------------------------------------------------
def leaves(prob: Problem, mode: str):
    """Aliases of the inputs that collect gradients (the problem's own tensors stay untouched)."""
    grad = mode != "logprobs"
    return prob.hidden.detach().requires_grad_(grad), prob.weight.detach().requires_grad_(grad)


def run_once(fn: Callable, h: Tensor, w: Tensor, mode: str) -> List[Tensor]:
    """One call in ``mode``; returns what it produced: loss [, grad_hidden, grad_weight] or (logp, H)."""
    if mode == "logprobs":
        with torch.no_grad():
            return list(fn(h, w))
    h.grad = w.grad = None
    loss = fn(h, w)
    if mode == "fwd":
        return [loss.detach()]
    loss.backward()
    return [loss.detach(), h.grad, w.grad]


OUTPUT_NAMES = {"fwd": ("loss",), "fwd_bwd": ("loss", "grad_hidden", "grad_weight"),
                "logprobs": ("logprobs", "entropy")}


def _max_abs(x: Tensor, rows: int = 4096) -> float:
    if x.dim() == 0:
        return float(x.float().abs())
    return max(float(x[i:i + rows].float().abs().max()) for i in range(0, x.shape[0], rows)) if x.numel() else 0.0


def _max_abs_diff(a: Tensor, b: Tensor, rows: int = 4096) -> float:
    """max |a - b| in fp32, a block of rows at a time (a V x D gradient upcast at once is GBs)."""
    if a.dim() == 0:
        return float((a.float() - b.to(a.device).float()).abs())
    return max(float((a[i:i + rows].float() - b[i:i + rows].to(a.device).float()).abs().max())
               for i in range(0, a.shape[0], rows))


def compare(outs: List[Tensor], truth: List[Tensor], mode: str) -> Dict[str, tuple]:
    """{output name: (max abs error, max abs error / max |truth|)}; NaN where shapes or values are bad."""
    errs = {}
    for name, a, b in zip(OUTPUT_NAMES[mode], outs, truth):
        if a is None or tuple(a.shape) != tuple(b.shape):
            errs[name] = (math.nan, math.nan)
            continue
        err = _max_abs_diff(a, b)  # the truth may live on the host: it moves a block at a time
        scale = _max_abs(b)
        errs[name] = (err, err / scale if scale > 0 else (0.0 if err == 0 else math.inf))
    return errs


# ---------------------------------------------------------------------------------------------
# memory
# ---------------------------------------------------------------------------------------------
def _nbytes(outs: List[Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in outs if t is not None)


def _proc_status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _trim_heap() -> None:
    pk.empty_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def peak_mib(call: Callable[[], List[Tensor]], device: str) -> Optional[float]:
    """Peak memory of ``call()`` beyond what was allocated before, minus what it returns (MiB)."""
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        outs = call()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        _trim_heap()
        if not _reset_peak_rss() or _proc_status_kib("VmRSS") is None:
            return None  # no way to measure a peak here (not Linux)
        base = _proc_status_kib("VmRSS") * 1024
        outs = call()
        peak = _proc_status_kib("VmHWM") * 1024 - base
    peak -= _nbytes(outs)
    del outs
    return max(0.0, peak / 2 ** 20)


# ---------------------------------------------------------------------------------------------
# time
# ---------------------------------------------------------------------------------------------
def _quantiles(ms: List[float]) -> tuple:
    q = np.percentile(np.asarray(ms, dtype=np.float64), [50, 20, 80])
    return float(q[0]), float(q[1]), float(q[2])


def _cuda_events(call, n: int) -> List[float]:
    out = []
    for _ in range(n):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        torch.cuda.synchronize()
        out.append(start.elapsed_time(end))
    return out


def time_ms(call: Callable, settings: Settings, estimate_ms: float) -> tuple:
    """(median, p20, p80) milliseconds of ``call()``."""
    if settings.device == "cuda":
        rep = max(settings.rep_ms, settings.min_reps * estimate_ms)
        warmup = max(settings.warmup_ms, 2 * estimate_ms)
        try:
            from triton.testing import do_bench
        except ImportError:  # CUDA without triton: the same events, without the L2 flush
            for _ in range(max(1, int(warmup / max(estimate_ms, 1e-3)))):
                call()
            return _quantiles(_cuda_events(call, max(settings.min_reps, int(rep / max(estimate_ms, 1e-3)))))
        return tuple(float(x) for x in do_bench(call, warmup=warmup, rep=rep, quantiles=[0.5, 0.2, 0.8]))
    ms = []
    for _ in range(settings.repeats):
        t0 = time.perf_counter()
        call()
        ms.append((time.perf_counter() - t0) * 1e3)
    return _quantiles(ms)


def _cpu_time_and_peak(call: Callable[[], List[Tensor]], repeats: int):
    """Wall-clock (median, p20, p80) of ``repeats`` calls, and the peak RSS of the first (MiB)."""
    ms, peak = [], None
    for r in range(repeats):
        gc.collect()
        if r == 0:
            _trim_heap()
            base = _proc_status_kib("VmRSS") if _reset_peak_rss() else None
        t0 = time.perf_counter()
        outs = call()
        ms.append((time.perf_counter() - t0) * 1e3)
        if r == 0 and base is not None:
            peak = max(0.0, (_proc_status_kib("VmHWM") * 1024 - base * 1024 - _nbytes(outs)) / 2 ** 20)
        del outs
    return _quantiles(ms), peak


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, (MemoryError, getattr(torch.cuda, "OutOfMemoryError", MemoryError))) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())


def _free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# one provider over a list of token counts
# ---------------------------------------------------------------------------------------------
def measure(provider_name: str, case: Case, prob: Problem, truth_get, truth_put, settings: Settings,
            role: str = "compare") -> Outcome:
    """Check then weigh then time one provider on one problem.

    ``role``: ``"compare"`` (check against ``truth_get()``), ``"provide"`` (this call's outputs
    become the truth, then timed: the reference), ``"provide_only"`` (become the truth, untimed:
    a fallback when the reference did not fit).
    """
    N = prob.hidden.shape[0]
    dev = settings.device
    provider = PROVIDERS[provider_name]
    rtol = settings.rtol if settings.rtol is not None else DEFAULT_RTOL[prob.weight.dtype]
    fn = outs = None
    try:
        fn = provider.build(case, prob)
        h, w = leaves(prob, case.mode)
        t0 = time.perf_counter()
        outs = run_once(fn, h, w, case.mode)
        _sync(dev)
        first_ms = (time.perf_counter() - t0) * 1e3
        if role.startswith("provide"):
            truth_put(outs)
            abs_err, rel_err = 0.0, 0.0
        else:
            truth = truth_get()
            if truth is None:
                return Outcome(N, "error", "no truth to compare with (the reference did not run)")
            errs = compare(outs, truth, case.mode)
            del truth
            abs_err = max(e[0] for e in errs.values())
            rel_err = max(e[1] for e in errs.values())
            if not rel_err <= rtol:  # NaN disagrees too
                detail = ", ".join(f"{k} {v[1]:.2e}" for k, v in errs.items())
                return Outcome(N, "disagree", f"relative error {detail} > rtol {rtol:.0e}",
                               max_abs_err=abs_err, max_rel_err=rel_err)
        outs = None
        if role == "provide_only":
            return Outcome(N, "truth", max_abs_err=0.0, max_rel_err=0.0)
        call = lambda: run_once(fn, h, w, case.mode)  # noqa: E731
        h.grad = w.grad = None
        if dev == "cuda":
            # A second untimed call (torch.compile specializes on the first; allocators warm up),
            # whose time tells do_bench's budget how many calls fit; then one call to weigh.
            t0 = time.perf_counter()
            run_once(fn, h, w, case.mode)
            _sync(dev)
            estimate = min(first_ms, (time.perf_counter() - t0) * 1e3)
            h.grad = w.grad = None
            mem = peak_mib(call, dev)
            h.grad = w.grad = None
            med, p20, p80 = time_ms(call, settings, estimate)
        else:  # CPU calls are slow: the first timed call is also the one weighed
            (med, p20, p80), mem = _cpu_time_and_peak(call, settings.repeats)
        return Outcome(N, "ok", ms_median=med, ms_p20=p20, ms_p80=p80, peak_mem_mib=mem, max_abs_err=abs_err,
                       max_rel_err=rel_err)
    except Exception as exc:  # noqa: BLE001 - reported per provider, the sweep goes on
        if _is_oom(exc):
            return Outcome(N, "oom", "out of memory")
        first_line = (str(exc).strip().splitlines() or [""])[0]
        return Outcome(N, "error", f"{type(exc).__name__}: {first_line}"[:300])
    finally:
        del fn, outs
        _free(dev)


def weigh(provider_name: str, case: Case, prob: Problem, settings: Settings) -> Optional[float]:
    """Peak memory of one call after a warm-up call, nothing else (no check, no timing): the CPU
    runner calls it in a process of its own whose allocator returns large frees at once
    (``runner.IsolatedRunner``). None if the provider fails here."""
    fn = None
    try:
        fn = PROVIDERS[provider_name].build(case, prob)
        h, w = leaves(prob, case.mode)
        run_once(fn, h, w, case.mode)
        h.grad = w.grad = None
        return peak_mib(lambda: run_once(fn, h, w, case.mode), settings.device)
    except Exception:  # noqa: BLE001 - the timing worker has already reported this provider
        return None
    finally:
        del fn
        _free(settings.device)


def floor_ms(prob: Problem, settings: Settings) -> Dict[str, float]:
    """Median ms of the three dense GEMMs of the shapes: ``h W^T``, ``dZ W``, ``dZ^T h`` (dZ random)."""
    h, w = prob.hidden, prob.weight
    N, D, V = prob.shape
    gen = torch.Generator(device=h.device).manual_seed(12345)
    dz = torch.randn(N, V, device=h.device, dtype=h.dtype, generator=gen)  # never zeros: they can run faster
    z, gh, gw = torch.empty(N, V, dtype=h.dtype, device=h.device), torch.empty_like(h), torch.empty_like(w)
    gemms = {"logits": lambda: torch.mm(h, w.T, out=z), "grad_hidden": lambda: torch.mm(dz, w, out=gh),
             "grad_weight": lambda: torch.mm(dz.T, h, out=gw)}
    out = {}
    for name, g in gemms.items():
        t0 = time.perf_counter()
        g()
        _sync(settings.device)
        estimate = (time.perf_counter() - t0) * 1e3
        g()
        out[name] = time_ms(g, settings, estimate)[0]
    del dz, z, gh, gw
    _free(settings.device)
    return out


def floor_for(gemm_ms: Dict[str, float], loss: str, mode: str) -> float:
    """The floor of one case: the logits GEMM, plus the two gradient GEMMs with a backward; ASFT
    adds its reference model's logits GEMM (same shapes: it shares the lm-head here)."""
    ms = gemm_ms["logits"]
    if mode == "fwd_bwd":
        ms += gemm_ms["grad_hidden"] + gemm_ms["grad_weight"]
    if loss == "asft":
        ms += gemm_ms["logits"]
    return ms
