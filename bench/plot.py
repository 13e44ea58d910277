"""``python -m bench plot``: time and peak memory vs N from the CSVs, as PNGs beside them.

One figure per (device, lm-head shape, dtype, input kind, mode); one row of panels per loss, time
on the left, memory on the right. Providers are bars side by side at each N; the dense-GEMM floor
of the same shapes is the black line across each group of time bars, and each time bar is labelled
with its ratio to that floor. Only the latest
measurement of each (provider, loss, mode, N, shape, dtype, input kind) is drawn. Log scales.
"""

from __future__ import annotations

import argparse
import glob
import math
import os
from collections import defaultdict
from typing import Dict, List

from . import results
from .presets import preset_name

ORDER = ("reference", "compile", "chunked", "native", "triton", "triton_filter", "liger_grpo", "liger_flce", "cce", "cce_compile",
         "torch_lce", "torch_lce_ar4")
LOSS_ORDER = ("psft", "sft", "dft", "asft", "logprobs")


def input_kind(row: Dict[str, str]) -> str:
    """The CSV has no input column: the inputs are told apart by their entropy. ``flat`` inputs sit
    near ``log V`` nats, ``zipf`` ones at the few nats they were tuned to."""
    return "flat" if float(row["input_entropy"]) > 0.6 * math.log(int(row["V"])) else "zipf"


def _num(x: str):
    return float(x) if x not in ("", None) else None


def latest(rows: List[Dict[str, str]]) -> List[Dict[str, str]]:
    keep = {}
    for r in rows:  # later rows of the file win ties of date: appended later
        key = (r["device"], r["provider"], r["loss"], r["mode"], r["N"], r["D"], r["V"], r["dtype"], input_kind(r))
        if key not in keep or r["date"] >= keep[key]["date"]:
            keep[key] = r
    return list(keep.values())


def _colors(providers):
    import matplotlib.pyplot as plt

    cmap = plt.get_cmap("tab20")
    return {p: cmap(i % 20) for i, p in enumerate(list(ORDER) + sorted(set(providers) - set(ORDER)))}


def plot_csv(path: str, out_dir: str) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = latest(results.read(path))
    slug = os.path.splitext(os.path.basename(path))[0]
    groups = defaultdict(list)
    for r in rows:
        groups[(r["device"], r["D"], r["V"], r["dtype"], input_kind(r), r["mode"])].append(r)
    colors = _colors({r["provider"] for r in rows})
    written = []
    for (device, D, V, dtype, kind, mode), grp in sorted(groups.items()):
        losses = [l for l in LOSS_ORDER if any(r["loss"] == l for r in grp)]
        fig, axes = plt.subplots(len(losses), 2, figsize=(13, 3.6 * len(losses)), squeeze=False)
        entropy = sum(float(r["input_entropy"]) for r in grp) / len(grp)
        preset = preset_name(int(D), int(V))
        fig.suptitle(f"{device}: {preset} (D={D}, V={V}), {dtype}, {kind} inputs (mean entropy {entropy:.2f} nats), "
                     f"mode {mode}", fontsize=11)
        for ax_t, ax_m, loss in ((axes[i, 0], axes[i, 1], l) for i, l in enumerate(losses)):
            _panel(ax_t, ax_m, [r for r in grp if r["loss"] == loss], loss, colors)
        handles, labels = [], []
        for ax in axes.flat:
            for h, lab in zip(*ax.get_legend_handles_labels()):
                if lab not in labels:
                    handles.append(h)
                    labels.append(lab)
        fig.legend(handles, labels, loc="lower center", ncol=min(6, len(labels)), fontsize=9, frameon=False)
        fig.tight_layout(rect=(0, 0.06 if len(losses) > 1 else 0.1, 1, 0.96))
        name = f"{slug}__{preset}_{dtype}_{kind}_{mode}.png"
        out = os.path.join(out_dir, name)
        fig.savefig(out, dpi=110)
        plt.close(fig)
        written.append(out)
    return written


def _panel(ax_t, ax_m, rows, loss, colors) -> None:
    Ns = sorted({int(r["N"]) for r in rows})
    provs = [p for p in ORDER if any(r["provider"] == p for r in rows)]
    provs += sorted({r["provider"] for r in rows} - set(provs))
    width = 0.8 / max(1, len(provs))
    by = {(r["provider"], int(r["N"])): r for r in rows}
    seen = {ax_t: [], ax_m: []}  # plotted values, for the log axes' limits
    for j, p in enumerate(provs):
        xs, ts, ms = [], [], []
        for i, N in enumerate(Ns):
            r = by.get((p, N))
            if r is None:
                continue
            x = i - 0.4 + width * (j + 0.5)
            t, m = _num(r["ms_median"]), _num(r["peak_mem_mib"])
            if t is None:  # not timed: say why where the bar would be
                label = "OOM" if _num(r["max_abs_err_vs_reference"]) is None else "≠ref"
                for ax in (ax_t, ax_m):
                    ax.annotate(label, (x, 0), xycoords=("data", "axes fraction"), xytext=(0, 3),
                                textcoords="offset points", ha="center", fontsize=7, rotation=90, color="red")
                continue
            xs.append(x)
            ts.append(t)
            ms.append(max(m or 0.0, 0.01))
            seen[ax_t].append(t)
            seen[ax_m].append(ms[-1])
        ax_t.bar(xs, ts, width, label=p, color=colors[p])
        ax_m.bar(xs, ms, width, label=p, color=colors[p])
        for x, t, r in zip(xs, ts, (by[(p, N)] for N in Ns if (p, N) in by and _num(by[(p, N)]["ms_median"]))):
            floor = _num(r["floor_ms"])
            if floor:  # time / floor above each bar: the ratio the numbers are read by
                ratio = t / floor
                ax_t.annotate(f"{ratio:.2g}x" if ratio < 100 else f"{ratio:.0f}x", (x, t), xytext=(0, 2),
                              textcoords="offset points", ha="center", va="bottom", fontsize=6, rotation=90)
    for i, N in enumerate(Ns):
        floors = [_num(by[(p, N)]["floor_ms"]) for p in provs if (p, N) in by and _num(by[(p, N)]["floor_ms"])]
        if floors:
            f = sorted(floors)[len(floors) // 2]
            ax_t.hlines(f, i - 0.45, i + 0.45, colors="black", linestyles="--", linewidth=1.5,
                        label="dense GEMM floor" if i == 0 else None)
            seen[ax_t].append(f)
    for ax, what in ((ax_t, "time, ms (median)"), (ax_m, "peak memory beyond inputs/outputs, MiB")):
        ax.set_xticks(range(len(Ns)))
        ax.set_xticklabels([f"N={N}" for N in Ns])
        ax.set_yscale("log")
        if seen[ax]:  # log-scale bars need a bottom well below the shortest one, and room for labels
            ax.set_ylim(min(seen[ax]) / 3, max(seen[ax]) * 4)
        ax.set_ylabel(what, fontsize=9)
        ax.set_title(loss, fontsize=10, loc="left")
        ax.grid(axis="y", which="both", alpha=0.3)


def _is_measurement_csv(path: str) -> bool:
    """The sweep's CSVs, not the others that share the folder (``*.inputs.csv``, ``accuracy-*.csv``)."""
    with open(path, newline="") as f:
        header = f.readline().strip().split(",")
    return set(results.COLUMNS) <= set(header)


def plot_dir(results_dir: str) -> List[str]:
    written = []
    for path in sorted(glob.glob(os.path.join(results_dir, "*.csv"))):
        if _is_measurement_csv(path):
            written += plot_csv(path, results_dir)
    return written


def main(argv=None) -> int:
    from .cli import DEFAULT_RESULTS

    p = argparse.ArgumentParser(prog="python -m bench plot", description=__doc__)
    p.add_argument("--results-dir", "--out", dest="results_dir", default=DEFAULT_RESULTS)
    args = p.parse_args(argv)
    paths = plot_dir(args.results_dir)
    if not paths:
        print(f"no results in {args.results_dir}")
    for path in paths:
        print(f"wrote {path}")
    return 0
