"""Results as data: one CSV row per measurement, appended to ``<results-dir>/<device-name>.csv``."""

from __future__ import annotations

import csv
import datetime as _dt
import os
import platform
import re
import subprocess
from typing import Dict, Iterable, List, Optional

import torch

COLUMNS = (
    "date", "commit", "device", "torch", "triton", "provider", "loss", "mode", "N", "D", "V", "dtype",
    "input_entropy", "clip_fraction", "ms_median", "ms_p20", "ms_p80", "peak_mem_mib", "floor_ms",
    "max_abs_err_vs_reference",
)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def commit(repo: str) -> str:
    """Short commit of ``repo``; ``+dirty`` when the package or the benchmark has local changes."""
    try:
        head = subprocess.run(["git", "-C", repo, "rev-parse", "--short=10", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", repo, "status", "--porcelain", "--", "psft_kernels", "bench",
                                ":(exclude)bench/results"], capture_output=True, text=True, check=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except Exception:  # noqa: BLE001 - absent or broken: the benchmark runs without it
        return "none"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_label(device: str) -> str:
    """What the ``device`` column holds: the GPU's name, or the CPU's model and thread count."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    n = torch.get_num_threads()
    return f"{_cpu_model()} ({n} thread{'s' if n > 1 else ''})"


def device_slug(device: str) -> str:
    """The results file's name: ``nvidia-h100-80gb-hbm3``, ``cpu-intel-xeon-processor``."""
    if device == "cuda":
        name = torch.cuda.get_device_name()
    else:  # drop trademarks, a repeated "CPU" and the clock: "Intel(R) Core(TM) i7 CPU @ 3GHz" -> cpu-intel-core-i7
        name = "cpu " + re.sub(r"\((r|tm)\)|\bcpu\b|@.*$", " ", _cpu_model(), flags=re.IGNORECASE)
    return re.sub(r"[^a-z0-9.]+", "-", name.lower()).strip("-")


def fmt(x: Optional[float], spec: str) -> str:
    return "" if x is None else format(x, spec)


def append(path: str, rows: Iterable[Dict[str, object]]) -> int:
    """Append ``rows`` (dicts with exactly COLUMNS) to the CSV at ``path``, writing a header if new."""
    rows = list(rows)
    if not rows:
        return 0
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    if not new:
        with open(path, newline="") as f:
            header = next(csv.reader(f), None)
        if tuple(header or ()) != COLUMNS:
            raise ValueError(f"{path} has columns {header}, expected {list(COLUMNS)}: move it away or pick another "
                             "--results-dir")
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            w.writeheader()
        for r in rows:
            if set(r) != set(COLUMNS):
                raise ValueError(f"row has columns {sorted(r)}, expected {list(COLUMNS)}")
            w.writerow(r)
    return len(rows)


def read(path: str) -> List[Dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))
