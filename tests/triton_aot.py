"""Compile the Triton kernels for a real GPU target on a machine without one.

    python tests/triton_aot.py [--arch 90] [--tiles hopper] [--full]

The interpreter (TRITON_INTERPRET=1) runs the kernels' Python, not Triton's compiler: errors that
only code generation sees (a non-constexpr global read in a kernel, a type mismatch between
branches, an unsupported op) would first show up on a GPU. Triton ships ``ptxas``, so the
kernels can be compiled to a cubin here. This script runs the public functions with every kernel
replaced by a recorder (no kernel executes; outputs are garbage and ignored), collects each
distinct launch (argument types and constexprs), and compiles it for ``sm_<arch>`` with the
launch's own ``num_warps`` / ``num_stages``. Exit status 1 on any failure. Must run without
TRITON_INTERPRET (the kernels must be real JIT functions).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import mangle_type  # noqa: E402

import psft_kernels as pk  # noqa: E402
from helpers import make_problem, run  # noqa: E402


class Recorder:
    """Stands in for a JIT kernel: ``kernel[grid](*args, **kw)`` records the launch."""

    def __init__(self, kernel, launches, every_dtype):
        self.kernel, self.launches, self.every_dtype = kernel, launches, every_dtype

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            names = [p.name for p in self.kernel.params]
            values = {**dict(zip(names, args)), **kwargs}
            # A variant is its constexprs (upper-case names, None pointers); with every_dtype
            # also its argument types (bf16 / fp16 / fp32 pointers give different code).
            key = (self.kernel.fn.__name__,) + tuple(
                (k, repr(v)) for k, v in sorted(values.items()) if v is None or k.isupper() or k.startswith("num_"))
            if self.every_dtype:
                key += tuple(mangle_type(v) for k, v in sorted(values.items()) if v is not None and not k.isupper()
                             and not k.startswith("num_"))
            self.launches.setdefault(key, (self.kernel, values))
        return launch


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "tf32": torch.float32}


def record(full: bool, tiles: str, dtypes=None, shape=None):
    """The launches (kernel, argument values) the public functions make on a GPU of ``tiles``.

    ``dtypes``: names of DTYPES to run the whole call set in ("tf32": fp32 under
    ``torch.set_float32_matmul_precision("high")``); default: the mixed set below. ``shape``:
    (rows, D, V) of the problems; the budget uses multiples of 16, as a real model's sizes are,
    so that the compiled specializations (vectorized, aligned loads) are the ones a GPU builds.
    """
    from psft_kernels import backends
    from psft_kernels.triton import backend, backward, config, epilogue, forward

    launches = {}
    for mod, names in ((forward, ["_head_stats_kernel"]), (epilogue, ["_head_epilogue_kernel"]),
                       (backward, ["_head_dz_kernel", "_grad_hidden_kernel", "_grad_weight_kernel"])):
        for name in names:
            kernel = getattr(mod, name)
            kernel = kernel.kernel if isinstance(kernel, Recorder) else kernel
            setattr(mod, name, Recorder(kernel, launches, full or dtypes is not None))
    config.arch = lambda device: tiles  # the GPU's tile sizes, not the CPU's
    backend.TritonBackend.unavailable_reason = lambda self, device: None
    backend.TritonBackend.skips_host_target_check = lambda self, device: True
    backends._INSTANCES.pop("triton", None)
    rows, dim, vocab = shape or (27 * 5, 24, 300)
    defaults = config.DZ_SLICE_COLUMNS, config.target_programs, config.sm_count, config.GRAD_GEMM
    config.sm_count = lambda device: 132  # an H100's, so the vocabulary splits are a GPU's

    def call(loss, dtype, **opts):
        bias = opts.pop("bias", False)
        prob = make_problem(ref=loss == "asft", dtype=dtype, bias=bias, batch=(5, rows // 5), D=dim, V=vocab,
                            advantages=opts.pop("advantages", None))
        run(loss, "triton", prob, **opts)

    def call_set(bf16, fp16, fp32):
        # Every constexpr flag is on in at least one call and off in another. The gradient GEMMs
        # run in the Triton kernels here, and on torch.mm (the dz kernel's DENSE mode) below.
        config.GRAD_GEMM = "triton"
        call("asft", bf16, bias=True, softcap=3.0, entropy_coef=0.1, filter_eps=1e-4, kl_direction="reverse")
        call("asft", bf16, reduction="none", temperature=0.7)
        call("psft", fp16, reduction="none", advantages=0.5, clip_ratio_c=3.0)
        call("sft", fp32, bias=True)
        prob = make_problem(dtype=bf16, batch=(5, rows // 5), D=dim, V=vocab)
        logp, ent = pk.linear_logprobs(prob.hidden.requires_grad_(True), prob.weight, prob.targets,
                                       backend="triton")
        (logp.sum() + ent.sum()).backward()
        # split-K (atomics) and several backward slices (first / middle / last)
        config.target_programs = lambda device: 1 << 20
        config.DZ_SLICE_COLUMNS = 256
        call("dft", bf16, bias=True)
        config.target_programs = defaults[1]
        call("sft", fp16, filter_eps=1e-3)
        config.GRAD_GEMM = "torch"
        call("psft", bf16, filter_eps=1e-3, bias=True)
        call("asft", fp32, entropy_coef=0.1)
        config.DZ_SLICE_COLUMNS, config.GRAD_GEMM = defaults[0], defaults[3]
        if full:
            for loss in ("sft", "dft", "psft", "asft"):
                for dtype in (bf16, fp16, fp32):
                    call(loss, dtype, bias=True, softcap=2.0, filter_eps=1e-3)
                    call(loss, dtype, reduction="none", entropy_coef=0.2)
                call(loss, bf16, filter_eps=1e-3)
                call(loss, bf16, entropy_coef=0.2, filter_eps=1e-3, kl_direction="reverse")

    precision = torch.get_float32_matmul_precision()
    try:
        if dtypes is None:
            call_set(torch.bfloat16, torch.float16, torch.float32)
        for name in dtypes or ():
            torch.set_float32_matmul_precision("high" if name == "tf32" else "highest")
            dt = DTYPES[name]
            call_set(dt, dt, dt)
    finally:
        torch.set_float32_matmul_precision(precision)
        config.DZ_SLICE_COLUMNS, config.target_programs, config.sm_count, config.GRAD_GEMM = defaults
    return launches


def flag_cover(launches):
    """Per kernel, a few launches in which every (constexpr, value) pair seen occurs at least once
    (greedy set cover): compile errors hide behind flags, rarely behind their combinations."""
    chosen = {}
    for kernel_name in sorted({key[0] for key in launches}):
        keys = [key for key in launches if key[0] == kernel_name]
        pairs = {key: {kv for kv in key[1:] if isinstance(kv, tuple)} for key in keys}
        todo = set().union(*pairs.values())
        while todo:
            best = max(keys, key=lambda k: len(pairs[k] & todo))
            todo -= pairs[best]
            chosen[best] = launches[best]
    return chosen


def compile_all(launches, arch: int) -> int:
    target = GPUTarget("cuda", arch, 32)
    failures = 0
    for key, (kernel, values) in launches.items():
        values = dict(values)
        options = dict(num_warps=values.pop("num_warps", 4), num_stages=values.pop("num_stages", 3))
        signature, constants = {}, {}
        for p in kernel.params:
            v = values[p.name]
            if p.is_constexpr or v is None:
                signature[p.name], constants[p.name] = "constexpr", v
            else:
                signature[p.name] = mangle_type(v)
        try:
            triton.compile(ASTSource(kernel, signature, constants), target=target, options=options)
        except Exception as exc:  # report every failing variant, not only the first
            failures += 1
            flags = {k: v for k, v in constants.items() if k.isupper()}
            print(f"FAILED {key[0]} {flags}\n{exc}\n", file=sys.stderr)
    return failures


# The budget's problem: sizes that divide by 16 like a real model's (D=4096, V=131072), so the
# compiled specializations are the ones a GPU run builds; 80 rows = one partial row block.
BUDGET_SHAPE = (80, 64, 768)
SPILL_LIMIT = 512  # bytes per thread, sm_90, dtypes other than bf16
GEMM_KERNELS = ("_head_stats_kernel", "_head_dz_kernel", "_grad_hidden_kernel", "_grad_weight_kernel")


def flags_of(values):
    return {k: v for k, v in values.items() if k.isupper() and k not in ("N_BUCKET", "D", "DQ", "V", "N")}


def heaviest(launches):
    """Per kernel and loop kind (FILTER / DENSE on or off), the launch with the most flags on: the
    most live values (register pressure), and each kind of main loop (pipelining)."""
    best = {}
    for key, (kernel, values) in launches.items():
        flags = flags_of(values)
        on = sum(1 for v in flags.values() if v is True)
        kind = (key[0], flags.get("FILTER"), flags.get("DENSE"))
        if kind not in best or on > best[kind][0]:
            best[kind] = (on, key)
    return {key: launches[key] for _, key in best.values()}


def budget(archs, dtypes, every_variant_on=(), cover=False, shape=BUDGET_SHAPE):
    """Compile and measure the launches of every (arch, dtype); one dict per variant.

    Every distinct variant for the (arch, dtype) pairs in ``every_variant_on`` (e.g. sm_90 bf16);
    elsewhere each kernel's heaviest variant per loop kind, plus (``cover``) a flag cover.
    """
    from psft_kernels.triton import resources

    rows = []
    for arch in archs:
        for dt in dtypes:
            launches = record(False, resources.ARCH_TILES[arch], [dt], shape=shape)
            if (arch, dt) not in every_variant_on:
                launches = {**(flag_cover(launches) if cover else {}), **heaviest(launches)}
            for key, (kernel, values) in launches.items():
                res = resources.resources(kernel, values, arch)
                rows.append(dict(res.as_dict(), dtype=dt, shape=list(shape), flags={k: v for k, v in flags_of(values).items()
                                                                  if v not in (False, None)}))
    return rows


def budget_failures(row):
    """What is wrong with one measured variant (empty: within budget)."""
    from psft_kernels.triton import resources

    bad = []
    arch, name = row["arch"], row["kernel"]
    if row["shared"] > resources.SMEM_LIMIT[arch]:
        bad.append(f"shared memory {row['shared']} B > {resources.SMEM_LIMIT[arch]} B (sm_{arch} per-block limit)")
    if row["programs_per_sm"] < 1:
        bad.append("cannot launch (registers / shared memory)")
    if name in GEMM_KERNELS:
        if not (row["cp_async"] or row["tma"]) or row["num_stages"] < 2:
            bad.append(f"main loop not pipelined (cp.async {row['cp_async']}, TMA {row['tma']}, "
                       f"{row['num_stages']} stages)")
        if arch >= 90 and row["dtype"] != "fp32" and not row["wgmma"]:
            bad.append("no wgmma on sm_90")
        if arch < 90 and row["dtype"] != "fp32" and not row["mma"]:
            bad.append("no tensor-core mma")
    # Spills: none in the default bf16 configurations on sm_90. Elsewhere on sm_90 a few hundred
    # bytes in the softmax epilogue stay in L1 and cost little; kilobytes (a 128x128 fp32 FMA
    # GEMM at 255 registers) are local-memory traffic in every iteration of a main loop.
    limit = 0 if row["dtype"] == "bf16" else SPILL_LIMIT
    if arch == 90 and row["stack"] > limit:
        bad.append(f"{row['stack']} B of register spills (> {limit} B)")
    return bad


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--tiles", default="hopper", help="which entry of config._TILES to launch with")
    ap.add_argument("--full", action="store_true",
                    help="every loss x dtype and every argument-type variant, not only one per constexpr set")
    ap.add_argument("--budget", metavar="ARCHS", help="resource budget of every variant on these comma-separated "
                    "targets (e.g. 90,80,89) for --dtypes; prints one JSON line per variant")
    ap.add_argument("--dtypes", default="bf16,fp16,fp32,tf32")
    ap.add_argument("--shape", default=",".join(map(str, BUDGET_SHAPE)),
                    help="rows,D,V of the recorded problems (sizes that do not divide by 16 compile to other, "
                         "unvectorized code)")
    ap.add_argument("--cover", action="store_true", help="elsewhere also a flag cover, not only the heaviest")
    ap.add_argument("--every-variant", default="90:bf16",
                    help="arch:dtype pairs compiled in every variant (elsewhere: a flag cover + the heaviest); "
                         "'all' for the whole matrix")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: the kernels must be JIT functions", file=sys.stderr)
        return 2
    start = time.time()
    if args.budget:
        import json

        archs = [int(a) for a in args.budget.split(",")]
        dtypes = args.dtypes.split(",")
        every = ({(a, d) for a in archs for d in dtypes} if args.every_variant == "all" else
                 {(int(p.split(":")[0]), p.split(":")[1]) for p in args.every_variant.split(",") if p})
        rows = budget(archs, dtypes, every, args.cover, tuple(int(x) for x in args.shape.split(",")))
        failures = 0
        for row in rows:
            row["failures"] = budget_failures(row)
            failures += bool(row["failures"])
            print(json.dumps(row))
        print(f"budget: {len(rows) - failures}/{len(rows)} variants within budget in {time.time() - start:.0f}s "
              f"(triton {triton.__version__})", file=sys.stderr)
        return 1 if failures else 0
    launches = record(args.full, args.tiles)
    if not args.full:
        launches = flag_cover(launches)
    failures = compile_all(launches, args.arch)
    print(f"compiled {len(launches) - failures}/{len(launches)} kernel variants for sm_{args.arch} "
          f"in {time.time() - start:.0f}s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
