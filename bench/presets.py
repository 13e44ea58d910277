"""The lm-head shapes the benchmark knows: real models' heads, a CPU-sized one and a tiny one."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple


@dataclass(frozen=True)
class Preset:
    name: str
    D: int  # hidden size
    V: int  # vocabulary size
    softcap: Optional[float] = None  # final-logit softcapping (Gemma-2)
    N: Tuple[int, ...] = (1024, 2048, 4096, 8192, 16384)  # token counts swept by default


_GPU_N = (1024, 2048, 4096, 8192, 16384)

PRESETS = {
    p.name: p
    for p in (
        Preset("qwen2.5-7b", D=3584, V=152064, N=_GPU_N),
        Preset("llama-3.1-8b", D=4096, V=128256, N=_GPU_N),
        Preset("gemma-2-2b", D=2304, V=256000, softcap=30.0, N=_GPU_N),
        # A small model's head (a Llama-2-sized vocabulary): big enough that the logits dominate
        # the memory, small enough for a sweep of a few minutes on a 2-core CPU.
        Preset("cpu", D=1024, V=32000, N=(512, 1024, 2048)),
        # For smoke tests of the harness itself; numbers from it mean nothing.
        Preset("tiny", D=64, V=1000, N=(64, 128)),
    )
}

GPU_DEFAULT = ("qwen2.5-7b", "llama-3.1-8b", "gemma-2-2b")
CPU_DEFAULT = ("cpu",)


def preset_name(D: int, V: int) -> str:
    """The preset a (D, V) pair came from, for labelling results; ``D{D}-V{V}`` when none."""
    for p in PRESETS.values():
        if (p.D, p.V) == (D, V):
            return p.name
    return f"D{D}-V{V}"
