"""What a kernel variant costs on a real GPU, read from Triton's compiler on a machine without one.

Triton compiles for any NVIDIA target on the CPU and its wheel ships ``ptxas`` and
``cuobjdump``. For one launch (a kernel, its argument values and meta-parameters) this module
compiles the exact specialization the JIT would build on the GPU (same binder, so the same
divisibility / alignment attributes), and reads:

* ``shared``: shared memory per block (``metadata.shared``), against :data:`SMEM_LIMIT`;
* ``regs``, ``stack``: registers per thread and spill stack bytes (``cuobjdump
  --dump-resource-usage`` on the cubin);
* ``wgmma``, ``mma``: tensor-core instructions in the PTX (Hopper's warpgroup MMA, Ampere's mma);
* ``cp_async``, ``tma``: asynchronous global->shared copies, i.e. a software-pipelined main loop;
* ``programs_per_sm``: occupancy from registers, shared memory and warps.

Used by the static budget test (tests/test_triton_budget.py) and the performance model
(``python -m bench.model``). Nothing here needs a GPU; ``record`` swaps kernels for recorders,
so the public functions can be called to find out which variants they launch.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, asdict
from typing import Any, Dict, Tuple

# Per-block opt-in shared memory and per-SM limits of each target (CUDA programming guide,
# "Compute capabilities"): (max shared per block, shared per SM, registers per SM, max warps per SM).
SM_LIMITS = {
    80: (166_912, 167_936, 65_536, 64),
    86: (101_376, 102_400, 65_536, 48),
    89: (101_376, 102_400, 65_536, 48),
    90: (232_448, 233_472, 65_536, 64),
}
SMEM_LIMIT = {k: v[0] for k, v in SM_LIMITS.items()}
# The tile table of config.py each target uses (config.arch of a device of that capability).
ARCH_TILES = {80: "ampere", 86: "consumer", 89: "consumer", 90: "hopper"}


@dataclass(frozen=True)
class Resources:
    kernel: str
    arch: int
    num_warps: int
    num_stages: int
    shared: int
    regs: int
    stack: int
    wgmma: bool
    mma: bool
    cp_async: bool
    tma: bool
    # Programs one SM can hold at once (registers, shared memory, warps); 0 = cannot launch.
    programs_per_sm: int

    def as_dict(self) -> Dict[str, Any]:
        return asdict(self)


def occupancy(arch: int, num_warps: int, regs: int, shared: int) -> int:
    """Resident programs per SM: the tightest of registers, shared memory and warps.

    Registers are allocated per warp in units of 256 (regs rounded up to 8 per thread); each
    block also reserves 1 KiB of shared memory for the system.
    """
    per_block, per_sm, regfile, max_warps = SM_LIMITS[arch]
    if shared > per_block:
        return 0
    regs_per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = regfile // (regs_per_warp * num_warps)
    by_smem = per_sm // (shared + 1024) if shared else 32
    by_warps = max_warps // num_warps
    return max(0, min(by_regs, by_smem, by_warps, 32))


def _tool(name: str) -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return path if os.path.exists(path) else name


def cubin_usage(cubin: bytes) -> Tuple[int, int]:
    """(registers per thread, spill stack bytes) of the only function in ``cubin``."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", f.name], capture_output=True,
                             text=True, check=True).stdout
    regs = re.search(r"REG:(\d+)", out)
    stack = re.search(r"STACK:(\d+)", out)
    if regs is None or stack is None:
        raise RuntimeError(f"cannot read the resource usage from cuobjdump:\n{out}")
    return int(regs.group(1)), int(stack.group(1))


def _binder(kernel, target):
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(target)
    return backend, create_function_from_signature(kernel.signature, kernel.params, backend)


def compile_launch(kernel, values: Dict[str, Any], arch: int):
    """Compile the specialization a GPU launch with these argument values would build."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", arch, 32)
    values = dict(values)
    options = dict(num_warps=values.pop("num_warps", 4), num_stages=values.pop("num_stages", 3))
    backend, binder = _binder(kernel, target)
    args = [values[p.name] for p in kernel.params]
    bound, specialization, opts = binder(*args, **options)
    opts, signature, constexprs, attrs = kernel._pack_args(backend, options, bound, specialization, opts)
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=opts.__dict__)


def measure(compiled, name: str, arch: int) -> Resources:
    ptx = compiled.asm["ptx"]
    regs, stack = cubin_usage(compiled.asm["cubin"])
    md = compiled.metadata
    warps, stages, shared = md.num_warps, md.num_stages, md.shared
    return Resources(
        kernel=name, arch=arch, num_warps=warps, num_stages=stages, shared=shared, regs=regs, stack=stack,
        wgmma="wgmma.mma_async" in ptx, mma=bool(re.search(r"\bmma\.sync", ptx)),
        cp_async="cp.async.cg" in ptx or "cp.async.ca" in ptx,
        tma="cp.async.bulk.tensor" in ptx,
        programs_per_sm=occupancy(arch, warps, regs, shared),
    )


_CACHE: Dict[Any, Resources] = {}


def launch_key(kernel_name: str, values: Dict[str, Any]) -> Tuple:
    """A launch's identity for compilation: its constexprs, meta-parameters and argument types /
    specialization-relevant facts (pointer dtypes, which ints divide by 16 or equal 1)."""
    import torch

    def fact(v):
        if isinstance(v, torch.Tensor):
            return ("tensor", str(v.dtype), v.data_ptr() % 16 == 0)
        if isinstance(v, bool) or v is None or isinstance(v, str):
            return v
        if isinstance(v, int):
            return ("int", v % 16 == 0, v == 1, abs(v) >= 2 ** 31)
        if isinstance(v, float):
            return "float"
        return repr(v)

    return (kernel_name,) + tuple((k, fact(v) if not k.isupper() else v) for k, v in sorted(values.items()))


def resources(kernel, values: Dict[str, Any], arch: int) -> Resources:
    """Compile (cached per process) and measure one launch."""
    name = kernel.fn.__name__ if hasattr(kernel, "fn") else kernel.__name__
    key = (arch,) + launch_key(name, values)
    if key not in _CACHE:
        _CACHE[key] = measure(compile_launch(kernel, values, arch), name, arch)
    return _CACHE[key]
