"""A performance MODEL of the Triton backend (a prediction, not a measurement).

    python -m bench.model [--gpu h100] [--tokens 8192 --dim 4096 --vocab 131072] [--dtype bf16]
                          [--loss psft] [--filter-share 0.0] [--grad-gemm auto|torch|triton]

For a shape, a dtype and a GPU (H100 SXM, H200, A100 SXM, L40S) it compiles the kernels the
backend would launch for that GPU (Triton's compiler on the CPU, psft_kernels/triton/resources.py:
registers, shared memory, programs per SM, pipelining), sizes their grids with the backend's own
choices (vocabulary splits, slice width; config.py / forward.py / backward.py), and predicts each
kernel's time from its FLOPs, its DRAM bytes, its occupancy and its waves. It prints that beside
the three- and four-GEMM floors and the anchors' published numbers (docs: ANCHORS.md).

What the model assumes (read before trusting a number):
* Dense GEMM rate: ``GEMM_EFF`` (0.80) of the datasheet peak for cuBLAS and for a Triton main
  loop that is software-pipelined (cp.async / TMA, >= 2 stages) on tensor cores; 0.8 is what a
  large cuBLAS bf16 GEMM reaches on an H100 (~790 of 989 TFLOP/s, ANCHORS.md), and assuming the
  Triton loops match it is the model's most optimistic assumption. An unpipelined loop gets half.
* A tile's softmax epilogue (exp on the SFUs, ~a dozen fp32 ops per element on the FMA pipes) is
  added to the tile's MMA time when one program fills an SM (nothing to overlap it with) and
  hidden when two or more programs share the SM.
* Waves: a launch of P programs, each running up to ``longest`` tiles, takes ceil(P / slots)
  waves as long as its longest program (slots = SMs x compiled programs per SM).
* A kernel takes max(compute time, DRAM bytes / bandwidth); L2 reuse of W and h inside a wave is
  assumed perfect (each operand read from DRAM once per launch); dz and the fp32 grad_h carry are
  counted in full. Launch overheads and the O(N) PyTorch glue are ignored.
* ``--filter-share F`` removes F of every gradient-GEMM program's tiles, i.e. assumes the kept
  tiles are spread evenly; on a frequency-sorted vocabulary they cluster in the low ids, so the
  grad_W programs of those tiles keep all their rows and the real time is longer.
The first GPU run calibrates it: bench/gpu_check.sh prints measured beside predicted.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

GEMM_EFF = 0.80
UNPIPELINED_EFF = 0.5  # relative to GEMM_EFF, a loop that waits for each load
SFU_PER_CLK = 16  # exp / log per clock per SM (sm_80 / sm_89 / sm_90)
FMA_PER_CLK = 128  # fp32 ops per clock per SM


@dataclass(frozen=True)
class Gpu:
    name: str
    arch: int
    sms: int
    clock_ghz: float
    half_tflops: float  # dense bf16 / fp16, fp32 accumulation (datasheet)
    tf32_tflops: float
    fp32_tflops: float  # FMA
    hbm_tbs: float


GPUS = {
    "h100": Gpu("H100 SXM", 90, 132, 1.83, 989.0, 494.0, 67.0, 3.35),
    "h200": Gpu("H200", 90, 132, 1.83, 989.0, 494.0, 67.0, 4.8),
    "a100": Gpu("A100 SXM", 80, 108, 1.41, 312.0, 156.0, 19.5, 2.04),
    "l40s": Gpu("L40S", 89, 142, 2.52, 362.0, 181.0, 91.6, 0.864),
}

# Published numbers at the anchor shape (ANCHORS.md); printed beside the model where they apply.
ANCHORS = [
    ("h100", (8192, 4096, 131072), "Liger CuTe-DSL fused linear scaled CE (fwd+bwd; fwd 12.3, bwd 37.9)", 50.4),
    ("h200", (8192, 4096, 128256), "QuACK chunked linear CE (fwd+bwd, 6NDV)", 35.5),
]


@dataclass
class KernelTime:
    name: str
    launches: int
    programs: int
    per_sm: int
    regs: int
    shared: int
    pipelined: bool
    wave_eff: float
    flops: float
    bytes: float
    ms: float


def peak_tflops(gpu: Gpu, dtype: str) -> float:
    return {"bf16": gpu.half_tflops, "fp16": gpu.half_tflops, "tf32": gpu.tf32_tflops}.get(dtype, gpu.fp32_tflops)


def record_resources(gpu: Gpu, dtype: str, loss: str, filter_eps: Optional[float], grad_gemm: str):
    """Compile the variants one call of ``loss`` launches on ``gpu``; {kernel name: Resources}."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import torch
    import triton_aot
    from psft_kernels.triton import config, resources

    tiles = resources.ARCH_TILES[gpu.arch]
    dt = triton_aot.DTYPES[dtype]
    launches = {}
    saved = config.arch, config.sm_count, config.GRAD_GEMM, torch.get_float32_matmul_precision()
    try:
        triton_aot.record(False, tiles, [], shape=triton_aot.BUDGET_SHAPE)  # installs the recorders
        from psft_kernels.triton import backward, epilogue, forward

        launches_all = {}
        for mod in (forward, epilogue, backward):
            for name in dir(mod):
                rec = getattr(mod, name)
                if isinstance(rec, triton_aot.Recorder):
                    rec.launches = launches_all
        config.arch = lambda device: tiles
        config.sm_count = lambda device: gpu.sms
        config.GRAD_GEMM = grad_gemm
        torch.set_float32_matmul_precision("high" if dtype == "tf32" else "highest")
        rows, d, v = triton_aot.BUDGET_SHAPE
        prob = triton_aot.make_problem(ref=loss == "asft", dtype=dt, batch=(5, rows // 5), D=d, V=v)
        opts = dict(filter_eps=filter_eps)
        if loss == "asft":
            opts["kl_coef"] = 0.1
        triton_aot.run(loss, "triton", prob, **opts)
        for key, (kernel, values) in launches_all.items():
            launches.setdefault(key[0], (kernel, values))
    finally:
        config.arch, config.sm_count, config.GRAD_GEMM = saved[:3]
        torch.set_float32_matmul_precision(saved[3])
    return {name: resources.resources(k, vals, gpu.arch) for name, (k, vals) in launches.items()}, launches


def tile_epilogue_clks(m: int, v: int, exps: int, ops: int) -> float:
    return m * v * (exps / SFU_PER_CLK + ops / FMA_PER_CLK)


def predict(gpu: Gpu, n: int, d: int, v: int, dtype: str, loss: str, filter_share: float, grad_gemm: str,
            filter_eps: Optional[float] = None) -> List[KernelTime]:
    import torch
    import triton
    from psft_kernels.triton import backward, config, forward, resources

    filt = filter_eps is not None or filter_share > 0
    res, launches = record_resources(gpu, dtype, loss, 2.0 ** -12 if filt else None, grad_gemm)
    elem = 2 if dtype in ("bf16", "fp16") else 4
    peak = peak_tflops(gpu, dtype) * 1e12
    bw = gpu.hbm_tbs * 1e12
    clk = gpu.clock_ghz * 1e9
    saved = config.arch, config.sm_count
    config.arch = lambda device: resources.ARCH_TILES[gpu.arch]
    config.sm_count = lambda device: gpu.sms
    dev = torch.device("cuda")
    try:
        tdt = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype, torch.float32)
        prev = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("high" if dtype == "tf32" else "highest")
        tf = config.tiles(dev, tdt, ref=loss == "asft")
        tb = config.tiles(dev, tdt, heavy=int(loss == "asft"))
        splits = forward.num_splits(n, v, dev, tf)
        width = backward.slice_width(n, v, tb, dev)
        torch.set_float32_matmul_precision(prev)
    finally:
        config.arch, config.sm_count = saved
    ref_mult = 2 if loss == "asft" else 1
    out: List[KernelTime] = []

    def tc_kernel(name, launches_n, programs, longest, total_tiles, tile_m, tile_n, k_dim, exps, ops, nbytes,
                  skip=0.0):
        r = res[name]
        slots = gpu.sms * max(1, r.programs_per_sm)
        eff = GEMM_EFF * (1.0 if (r.cp_async or r.tma) and r.num_stages >= 2 else UNPIPELINED_EFF)
        per_sm_rate = peak * eff / gpu.sms  # FLOP/s of one SM
        tile_flops = 2.0 * tile_m * tile_n * k_dim
        tile_s = tile_flops / per_sm_rate
        if r.programs_per_sm < 2:
            tile_s += tile_epilogue_clks(tile_m, tile_n, exps, ops) / clk
        # Each program runs its tiles back to back; programs sharing an SM split its MMA rate.
        waves = math.ceil(programs / slots)
        wave_s = longest * (1.0 - skip) * tile_s * max(1, r.programs_per_sm)
        compute = launches_n * waves * wave_s
        flops = total_tiles * (1.0 - skip) * tile_flops * launches_n
        wave_eff = total_tiles / (waves * slots * longest) if longest else 1.0
        ms = max(compute, nbytes / bw) * 1e3
        out.append(KernelTime(name, launches_n, programs, r.programs_per_sm, r.regs, r.shared,
                              bool((r.cp_async or r.tma) and r.num_stages >= 2), wave_eff, flops, nbytes, ms))

    # forward: R x S programs, each over ~T/S vocabulary tiles, every tile a GEMM over D.
    rf, tvf = triton.cdiv(n, tf.fwd_m), triton.cdiv(v, tf.fwd_v)
    tc_kernel("_head_stats_kernel", 1, rf * splits, triton.cdiv(tvf, splits), rf * tvf, tf.fwd_m, tf.fwd_v,
              d * ref_mult, 1 * ref_mult, 12 * ref_mult, (v * d + n * d) * elem * ref_mult)
    # dz: per slice R x (width / bwd_v) programs of one tile each; writes dz.
    rb, slices = triton.cdiv(n, tb.bwd_m), triton.cdiv(v, width)
    nvt = triton.cdiv(width, tb.bwd_v)
    dz_k = d * (2 if loss == "asft" else 1)
    tc_kernel("_head_dz_kernel", slices, rb * nvt, 1, rb * nvt, tb.bwd_m, tb.bwd_v, dz_k, 1, 16,
              (v * d + n * d) * elem + n * width * elem * slices)
    saved_gemm, config.GRAD_GEMM = config.GRAD_GEMM, grad_gemm
    dense = backward.grad_gemm_backend(2.0 ** -12 if filt else None) == "torch"
    config.GRAD_GEMM = saved_gemm
    if dense:
        gemm_s = 2.0 * n * width * d / (peak * GEMM_EFF)
        carry = 16.0 * n * d if slices > 1 else 0.0  # fp32 product written, carry read and written
        for name, extra in (("torch.mm grad_W", 0.0), ("torch.mm grad_h (+ fp32 carry)", carry)):
            # The fp32 carry update is its own elementwise pass after the GEMM: added, not overlapped.
            nbytes = slices * ((n * width + n * d + width * d) * elem + extra)
            ms = slices * (max(gemm_s, (n * width + n * d + width * d) * elem / bw) + extra / bw) * 1e3
            out.append(KernelTime(name, slices, 0, 0, 0, 0, True, 1.0, 2.0 * n * v * d, nbytes, ms))
    else:
        bd = tb.bwd_d
        nd = triton.cdiv(d, bd)
        tc_kernel("_grad_hidden_kernel", slices, rb * nd, nvt, rb * nd * nvt, tb.bwd_m, bd, tb.bwd_v, 0, 0,
                  slices * ((n * width + width * d) * elem + (8.0 * n * d if slices > 1 else 0)), skip=filter_share)
        tc_kernel("_grad_weight_kernel", slices, nvt * nd, rb, nvt * nd * rb, tb.bwd_v, bd, tb.bwd_m, 0, 0,
                  slices * (n * width + n * d + width * d) * elem, skip=filter_share)
    out.append(KernelTime("_head_epilogue_kernel", 1, triton.cdiv(n, 256), res["_head_epilogue_kernel"].programs_per_sm,
                          res["_head_epilogue_kernel"].regs, 0, True, 1.0, 0.0, 7.0 * 4 * splits * n,
                          7.0 * 4 * splits * n / bw * 1e3))
    return out, dict(splits=splits, width=width, slices=slices, tiles_fwd=tf, tiles_bwd=tb)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Performance MODEL of the Triton backend (a prediction)")
    ap.add_argument("--gpu", default="h100", choices=sorted(GPUS) + ["all"])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=131072)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "tf32", "fp32"])
    ap.add_argument("--loss", default="psft", choices=["sft", "dft", "psft", "asft"])
    ap.add_argument("--filter-share", type=float, default=0.0,
                    help="share of backward tiles skipped by filtering (0: exact mode)")
    ap.add_argument("--grad-gemm", default="auto", choices=["auto", "torch", "triton"])
    ap.add_argument("--csv", help="append one row per GPU (predicted totals) to this CSV")
    args = ap.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)
    gpus = sorted(GPUS) if args.gpu == "all" else [args.gpu]
    n, d, v = args.tokens, args.dim, args.vocab
    for key in gpus:
        gpu = GPUS[key]
        kernels, plan = predict(gpu, n, d, v, args.dtype, args.loss, args.filter_share, args.grad_gemm)
        rate = peak_tflops(gpu, args.dtype) * 1e12 * GEMM_EFF
        floor3, floor4 = 6.0 * n * d * v / rate * 1e3, 8.0 * n * d * v / rate * 1e3
        fwd = sum(k.ms for k in kernels if k.name in ("_head_stats_kernel", "_head_epilogue_kernel"))
        total = sum(k.ms for k in kernels)
        print(f"\nMODEL (prediction, not a measurement): {gpu.name}, {args.loss} forward+backward, N={n} D={d} "
              f"V={v} {args.dtype}, {'exact' if args.filter_share == 0 else f'{args.filter_share:.0%} of tiles filtered'}, "
              f"gradient GEMMs: {args.grad_gemm}")
        print(f"  plan: {plan['splits']} vocabulary splits (forward), backward slices of {plan['width']} columns "
              f"x {plan['slices']}")
        print(f"  {'kernel':32s} {'launch':>6s} {'progs':>6s} {'/SM':>4s} {'regs':>4s} {'smem':>7s} {'pipe':>4s} "
              f"{'waves':>6s} {'TFLOP':>7s} {'GB':>6s} {'ms':>7s}")
        for k in kernels:
            print(f"  {k.name:32s} {k.launches:6d} {k.programs:6d} {k.per_sm:4d} {k.regs:4d} {k.shared:7d} "
                  f"{'yes' if k.pipelined else 'NO':>4s} {k.wave_eff:6.1%} {k.flops / 1e12:7.2f} {k.bytes / 1e9:6.2f} "
                  f"{k.ms:7.2f}")
        print(f"  predicted forward {fwd:.1f} ms, forward+backward {total:.1f} ms")
        print(f"  floors at {GEMM_EFF:.0%} of {peak_tflops(gpu, args.dtype):.0f} TFLOP/s: three GEMMs (6NDV) "
              f"{floor3:.1f} ms, four GEMMs (8NDV) {floor4:.1f} ms; predicted / four-GEMM floor = {total / floor4:.2f}x")
        for gk, shape, what, ms in ANCHORS:
            if gk == key:
                same = shape == (n, d, v)
                print(f"  anchor (published, {'same shape' if same else 'shape N,D,V=%s' % (shape,)}): {what}: {ms} ms")
        if args.csv:
            new = not os.path.exists(args.csv)
            with open(args.csv, "a") as f:
                if new:
                    f.write("gpu,loss,N,D,V,dtype,filter_share,grad_gemm,predicted_fwd_ms,predicted_fwdbwd_ms,"
                            "floor3_ms,floor4_ms\n")
                f.write(f"{gpu.name},{args.loss},{n},{d},{v},{args.dtype},{args.filter_share},{args.grad_gemm},"
                        f"{fwd:.3f},{total:.3f},{floor3:.3f},{floor4:.3f}\n")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    sys.exit(main())
