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


def record(full: bool, tiles: str):
    from psft_kernels import backends
    from psft_kernels.triton import backend, backward, config, epilogue, forward

    launches = {}
    for mod, names in ((forward, ["_head_stats_kernel"]), (epilogue, ["_head_epilogue_kernel"]),
                       (backward, ["_head_dz_kernel", "_grad_hidden_kernel", "_grad_weight_kernel"])):
        for name in names:
            setattr(mod, name, Recorder(getattr(mod, name), launches, full))
    config.arch = lambda device: tiles  # the GPU's tile sizes, not the CPU's
    backend.TritonBackend.unavailable_reason = lambda self, device: None
    backend.TritonBackend.skips_host_target_check = lambda self, device: True
    backends._INSTANCES.pop("triton", None)

    def call(loss, dtype, **opts):
        bias = opts.pop("bias", False)
        prob = make_problem(ref=loss == "asft", dtype=dtype, bias=bias, batch=(5, 27), V=300,
                            advantages=opts.pop("advantages", None))
        run(loss, "triton", prob, **opts)

    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    # Every constexpr flag is on in at least one call and off in another.
    call("asft", bf16, bias=True, softcap=3.0, entropy_coef=0.1, filter_eps=1e-4, kl_direction="reverse")
    call("asft", bf16, reduction="none", temperature=0.7)
    call("psft", fp16, reduction="none", advantages=0.5, clip_ratio_c=3.0)
    call("sft", fp32, bias=True)
    prob = make_problem(dtype=bf16)
    logp, ent = pk.linear_logprobs(prob.hidden.requires_grad_(True), prob.weight, prob.targets, backend="triton")
    (logp.sum() + ent.sum()).backward()
    # split-K (atomics) and several backward slices (first / middle / last)
    config.target_programs = lambda device: 1 << 20
    config.DZ_SLICE_BYTES = 135 * 2 * 128
    call("dft", bf16, bias=True)
    if full:
        for dtype in (bf16, fp16, fp32):
            for loss in ("sft", "dft", "psft", "asft"):
                call(loss, dtype, bias=True, softcap=2.0, filter_eps=1e-3)
                call(loss, dtype, reduction="none", entropy_coef=0.2)
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--tiles", default="hopper", help="which entry of config._TILES to launch with")
    ap.add_argument("--full", action="store_true",
                    help="every loss x dtype and every argument-type variant, not only one per constexpr set")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: the kernels must be JIT functions", file=sys.stderr)
        return 2
    start = time.time()
    launches = record(args.full, args.tiles)
    if not args.full:
        launches = flag_cover(launches)
    failures = compile_all(launches, args.arch)
    print(f"compiled {len(launches) - failures}/{len(launches)} kernel variants for sm_{args.arch} "
          f"in {time.time() - start:.0f}s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
