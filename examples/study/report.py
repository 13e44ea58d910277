"""Aggregate the runs (mean and spread over seeds), apply the pre-registered selection rules,
write results.json / results.md and the plots."""

from __future__ import annotations

import json
import math
import os
import re
from collections import defaultdict
from typing import Dict, List, Optional, Sequence

from .config import METHODS

LABELS = {"sft": "SFT", "psft": "PSFT (K=8)", "psft_warmup": "PSFT + SFT warm-up", "dft": "DFT",
          "asft": "ASFT (ref = base)"}
COLORS = {"sft": "#1f77b4", "psft": "#d62728", "psft_warmup": "#ff7f0e", "dft": "#2ca02c", "asft": "#9467bd"}
TIE_POINTS = 0.005  # best-lr rule: accuracies within half a point count as tied; then lower OOD loss wins


def logs_to_columns(rows: List[dict]) -> Dict[str, list]:
    """Per-step log rows -> one list per metric (None where a step lacks it): compact JSON."""
    keys = sorted({k for r in rows for k in r}, key=lambda k: (k != "step", k))
    return {k: [r.get(k) for r in rows] for k in keys}


def columns_to_logs(cols: Dict[str, list]) -> List[dict]:
    n = len(cols.get("step", []))
    return [{k: v[i] for k, v in cols.items() if v[i] is not None} for i in range(n)]


def _stats(values: Sequence[float]) -> dict:
    vals = [float(v) for v in values]
    n = len(vals)
    mean = sum(vals) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "sd": sd, "n": n, "values": vals}


def _final_eval(run: dict) -> dict:
    return run["evals"][-1]


def _eval_after_epoch(run: dict, epoch: float) -> Optional[dict]:
    for e in run["evals"]:
        if e["epoch"] >= epoch - 1e-9:
            return e
    return None


def _mean_curve(runs: List[dict], source: str, key: str) -> dict:
    """Mean and sd over seeds at each step where every seed has ``key``."""
    per_step = defaultdict(list)
    for r in runs:
        for row in r[source]:
            if key in row:
                per_step[row["step"]].append(row[key])
    steps = sorted(s for s, v in per_step.items() if len(v) == len(runs))
    stats = [_stats(per_step[s]) for s in steps]
    return {"step": steps, "mean": [s["mean"] for s in stats], "sd": [s["sd"] for s in stats]}


def aggregate(runs: List[dict], base_meta: dict) -> dict:
    groups: Dict[tuple, List[dict]] = defaultdict(list)
    for r in runs:
        groups[(r["method"], r["lr"])].append(r)
    base0 = [r["evals"][0] for r in runs]
    base = {k: _stats([e[k] for e in base0])["mean"] for k in
            ("accuracy", "ood_loss", "entropy_train_probe", "entropy_heldout_probe")}

    cells = []
    for (method, lr), rs in sorted(groups.items(), key=lambda kv: (METHODS.index(kv[0][0]), kv[0][1])):
        rs = sorted(rs, key=lambda r: r["seed"])
        finals = [_final_eval(r) for r in rs]
        after1 = [_eval_after_epoch(r, 1.0) for r in rs]
        last_epoch = [[row["entropy"] for row in r["logs"] if row["step"] > r["steps"] - r["steps_per_epoch"]
                       and "entropy" in row] for r in rs]
        cell = {
            "method": method, "lr": lr, "seeds": [r["seed"] for r in rs],
            "accuracy": _stats([f["accuracy"] for f in finals]),
            "ood_loss": _stats([f["ood_loss"] for f in finals]),
            "ood_rise": _stats([f["ood_loss"] - r["evals"][0]["ood_loss"] for f, r in zip(finals, rs)]),
            "entropy_train_probe": _stats([f["entropy_train_probe"] for f in finals]),
            "entropy_heldout_probe": _stats([f["entropy_heldout_probe"] for f in finals]),
            "entropy_train_probe_epoch1": _stats([e["entropy_train_probe"] for e in after1 if e]),
            # final / after-epoch-1 entropy on the training answers: < 1 means it kept falling
            "entropy_ratio_end_vs_epoch1": _stats([f["entropy_train_probe"] / e["entropy_train_probe"]
                                                   for f, e in zip(finals, after1) if e]),
            "entropy_logged_last_epoch": _stats([sum(v) / len(v) for v in last_epoch if v]),
            "seconds_per_run": _stats([r["seconds"] for r in rs]),
            "curves": {
                "entropy_logged": _mean_curve(rs, "logs", "entropy"),
                "nll_logged": _mean_curve(rs, "logs", "nll"),
                "clip_fraction": _mean_curve(rs, "logs", "clip_fraction"),
                "accuracy": _mean_curve(rs, "evals", "accuracy"),
                "ood_loss": _mean_curve(rs, "evals", "ood_loss"),
                "entropy_train_probe": _mean_curve(rs, "evals", "entropy_train_probe"),
                "entropy_heldout_probe": _mean_curve(rs, "evals", "entropy_heldout_probe"),
            },
        }
        cells.append(cell)

    best = {}
    for method in METHODS:
        mine = [c for c in cells if c["method"] == method]
        if not mine:
            continue
        top = max(c["accuracy"]["mean"] for c in mine)
        tied = [c for c in mine if c["accuracy"]["mean"] >= top - TIE_POINTS]
        best[method] = min(tied, key=lambda c: c["ood_loss"]["mean"])["lr"]

    # Pareto front over every (method, lr) cell on the means: no other cell has accuracy >= and
    # OOD loss <= with one of them strict.
    def dominated(c):
        a, o = c["accuracy"]["mean"], c["ood_loss"]["mean"]
        return any((d["accuracy"]["mean"] >= a and d["ood_loss"]["mean"] <= o)
                   and (d["accuracy"]["mean"] > a or d["ood_loss"]["mean"] < o) for d in cells)

    frontier = [{"method": c["method"], "lr": c["lr"]} for c in cells if not dominated(c)]
    frontier.sort(key=lambda p: next(c["ood_loss"]["mean"] for c in cells
                                     if c["method"] == p["method"] and c["lr"] == p["lr"]))
    return {"base": base, "base_model": {k: v for k, v in base_meta.items() if k != "curve"},
            "pretrain_curve": base_meta.get("curve", []), "cells": cells, "best_lr": best, "frontier": frontier,
            "comparisons": _comparisons(cells, best)}


def _cell(cells, method, lr):
    return next((c for c in cells if c["method"] == method and c["lr"] == lr), None)


def _diff(a: dict, b: dict) -> dict:
    """Difference of means a - b with a Welch standard error (seeds are independent runs)."""
    se = math.sqrt(a["sd"] ** 2 / a["n"] + b["sd"] ** 2 / b["n"])
    return {"diff": a["mean"] - b["mean"], "se": se}


def _comparisons(cells: List[dict], best: Dict[str, float]) -> dict:
    """The numbers the README's pre-registered criteria read, each method at its best lr vs SFT at its."""
    out = {}
    if "sft" not in best:
        return out
    sft = _cell(cells, "sft", best["sft"])
    for method, lr in best.items():
        c = _cell(cells, method, lr)
        out[method] = {
            "lr": lr,
            "accuracy_vs_sft": _diff(c["accuracy"], sft["accuracy"]),
            "ood_loss_vs_sft": _diff(c["ood_loss"], sft["ood_loss"]),
            "entropy_ratio_end_vs_epoch1": c["entropy_ratio_end_vs_epoch1"]["mean"],
        }
    return out


# ----------------------------------------------------------------------------------------------
# Markdown
# ----------------------------------------------------------------------------------------------

def _pm(s: dict, scale: float = 1.0, digits: int = 3) -> str:
    return f"{s['mean'] * scale:.{digits}f} ± {s['sd'] * scale:.{digits}f}"


def markdown(summary: dict, meta: dict) -> str:
    b = summary["base"]
    bm = summary["base_model"]
    lines = [
        f"# Study results ({meta['preset']} preset)",
        "",
        "Generated by `python -m examples.study` (see README.md for the protocol and the reading). "
        f"Mean ± sample sd over seeds {meta['seeds']}; accuracy is exact match on {meta['eval_problems']} "
        "held-out problems, in percent; OOD loss is the token-mean NLL (nats) on held-out general text; "
        "entropies are token means (nats) over solution tokens, final = after the last step.",
        "",
        f"Base model: {bm.get('params', '?'):,} parameters, OOD loss {b['ood_loss']:.3f}, accuracy "
        f"{100 * b['accuracy']:.1f}%, entropy on training answers {b['entropy_train_probe']:.3f}, on held-out "
        f"answers {b['entropy_heldout_probe']:.3f}.",
        "",
        "| method | lr | accuracy % | OOD loss | OOD rise | entropy train answers (epoch 1 → final) | "
        "final / epoch 1 | entropy held-out answers | s / run |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    best = summary["best_lr"]
    front = {(p["method"], p["lr"]) for p in summary["frontier"]}
    for c in summary["cells"]:
        tag = " **best**" if best.get(c["method"]) == c["lr"] else ""
        tag += " (front)" if (c["method"], c["lr"]) in front else ""
        lines.append(
            f"| {LABELS[c['method']]}{tag} | {c['lr']:g} | {_pm(c['accuracy'], 100, 1)} | {_pm(c['ood_loss'])} | "
            f"{_pm(c['ood_rise'])} | {c['entropy_train_probe_epoch1']['mean']:.3f} → "
            f"{_pm(c['entropy_train_probe'])} | {_pm(c['entropy_ratio_end_vs_epoch1'], 1, 2)} | "
            f"{_pm(c['entropy_heldout_probe'])} | {c['seconds_per_run']['mean']:.0f} |")
    lines += ["", "**best** = the method's best learning rate by the pre-registered rule (highest mean accuracy; "
              "within 0.5 points, lower OOD loss). (front) = on the Pareto front of all (method, lr) cells "
              "(accuracy up, OOD loss down, on the means).", "",
              "## Each method at its best lr vs SFT at its best lr", "",
              "| method | lr | Δ accuracy (points) | Δ OOD loss | entropy final / epoch 1 |", "|---|---|---|---|---|"]
    for method, c in summary["comparisons"].items():
        da, do = c["accuracy_vs_sft"], c["ood_loss_vs_sft"]
        lines.append(f"| {LABELS[method]} | {c['lr']:g} | {100 * da['diff']:+.1f} ± {100 * da['se']:.1f} | "
                     f"{do['diff']:+.3f} ± {do['se']:.3f} | {c['entropy_ratio_end_vs_epoch1']:.2f} |")
    lines += ["", "Δ = difference of means ± its standard error (Welch, seeds independent).", "",
              "## Run", "",
              f"- Wall time {meta['wall_seconds']:.0f} s (pretraining {meta['pretrain_wall_seconds']:.0f} s, "
              f"{'loaded from cache' if meta['base_cached'] else 'cold'}; "
              f"fine-tuning {meta['finetune_wall_seconds']:.0f} s "
              f"for {meta['runs']} runs on {meta['workers']} worker(s) x {meta['threads_per_worker']} thread(s)).",
              f"- CPU time {meta['cpu_seconds']:.0f} s; load average before / after: {meta['loadavg_start']} / "
              f"{meta['loadavg_end']} on {meta['cpu_count']} cores (other jobs share the machine).",
              f"- torch {meta['versions']['torch']}, transformers {meta['versions']['transformers']}, "
              f"Python {meta['versions']['python']}, loss backend `{meta['loss_backend']}`.", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------

def plots(summary: dict, out_dir: str, steps_per_epoch: int) -> List[str]:
    """PNG files written (empty, with a note printed, when matplotlib is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib)")
        return []
    cells = summary["cells"]
    lrs = sorted({c["lr"] for c in cells})
    written = []

    def grid(curve_key: str, ylabel: str, fname: str, title: str, scale: float = 1.0, log: bool = False,
             extra_key: Optional[str] = None, base_key: Optional[str] = None):
        fig, axes = plt.subplots(1, len(lrs), figsize=(4.2 * len(lrs), 3.4), sharey=True, squeeze=False)
        for ax, lr in zip(axes[0], lrs):
            for c in (c for c in cells if c["lr"] == lr):
                for key, style in ((curve_key, "-"), (extra_key, ":")):
                    if key is None:
                        continue
                    cur = c["curves"][key]
                    if not cur["step"]:
                        continue
                    m = [v * scale for v in cur["mean"]]
                    s = [v * scale for v in cur["sd"]]
                    ax.plot(cur["step"], m, style, color=COLORS[c["method"]], lw=1.4,
                            label=LABELS[c["method"]] if style == "-" else None,
                            marker="o" if len(cur["step"]) < 20 else None, ms=3)
                    if style == "-":
                        low = [a - b for a, b in zip(m, s)]
                        if log:  # a band reaching zero would stretch a log axis to nothing
                            low = [max(lo, a / 3) for lo, a in zip(low, m)]
                        ax.fill_between(cur["step"], low, [a + b for a, b in zip(m, s)],
                                        color=COLORS[c["method"]], alpha=0.15, lw=0)
            top = max(c["curves"][curve_key]["step"][-1] for c in cells if c["curves"][curve_key]["step"])
            for e in range(steps_per_epoch, top + 1, steps_per_epoch):
                ax.axvline(e, color="0.85", lw=0.8, zorder=0)
            if base_key is not None:
                ax.axhline(summary["base"][base_key] * scale, color="0.3", lw=0.9, ls="--",
                           label="base model" if lr == lrs[0] else None)
            ax.set_title(f"lr = {lr:g}")
            ax.set_xlabel("optimizer step (grey: epoch ends)")
            if log:
                ax.set_yscale("log")
        axes[0][0].set_ylabel(ylabel)
        axes[0][0].legend(fontsize=7)
        fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        path = os.path.join(out_dir, fname)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    grid("entropy_logged", "token-mean entropy (nats)", "entropy_vs_step.png",
         "Entropy on the fine-tuning batch at each step (solid), on a fixed set of training answers at evals "
         "(dotted); mean ± sd over seeds", log=True, extra_key="entropy_train_probe",
         base_key="entropy_train_probe")
    grid("ood_loss", "held-out general-text NLL (nats)", "ood_loss_vs_step.png",
         "Out-of-domain loss (forgetting = its rise); mean ± sd over seeds", base_key="ood_loss")
    grid("accuracy", "exact-match accuracy (%)", "accuracy_vs_step.png",
         "In-domain accuracy on held-out problems (greedy); mean ± sd over seeds", scale=100.0,
         base_key="accuracy")

    # The frontier on the OOD loss RISE, log scale: forgetting spans 0.05 to 10 nats across the grid.
    fig, ax = plt.subplots(figsize=(8.4, 4.8))
    markers = {lr: m for lr, m in zip(lrs, "os^Dvp")}
    for c in cells:
        x = max(c["ood_rise"]["mean"], 1e-3)
        ax.errorbar(x, 100 * c["accuracy"]["mean"], xerr=min(c["ood_rise"]["sd"], 0.9 * x),
                    yerr=100 * c["accuracy"]["sd"], fmt=markers[c["lr"]], color=COLORS[c["method"]], ms=6, capsize=2,
                    alpha=0.9)
    front = [next(c for c in cells if c["method"] == p["method"] and c["lr"] == p["lr"]) for p in summary["frontier"]]
    ax.plot([max(c["ood_rise"]["mean"], 1e-3) for c in front], [100 * c["accuracy"]["mean"] for c in front], "k--",
            lw=0.8, marker="o", mfc="none", ms=12, label="Pareto front (circled)")
    ax.axhline(100 * summary["base"]["accuracy"], color="0.3", lw=0.9, ls="--", label="base model accuracy")
    ax.set_xscale("log")
    for m in METHODS:
        if any(c["method"] == m for c in cells):
            ax.plot([], [], "o", color=COLORS[m], label=LABELS[m])
    for lr in lrs:
        ax.plot([], [], markers[lr], color="0.4", label=f"lr {lr:g}")
    ax.set_xlabel("final out-of-domain loss minus the base model's (nats, log scale; lower = less forgetting)")
    ax.set_ylabel("final in-domain accuracy (%)")
    ax.set_title("Trade-off after fine-tuning (mean ± sd over seeds)", fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    path = os.path.join(out_dir, "frontier.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    return written


def write_json(path: str, obj) -> None:
    """Indented JSON with floats at 4 significant digits and every list of numbers on one line
    (the per-step logs would otherwise take a line per number)."""
    def clean(x):
        if isinstance(x, float):
            if not math.isfinite(x):
                return None
            return int(x) if x.is_integer() and abs(x) < 2 ** 53 else float(f"{x:.4g}")
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    text = json.dumps(clean(obj), indent=1)
    text = re.sub(r"\[\s*((?:-?[\d.eE+-]+|null)(?:,\s*(?:-?[\d.eE+-]+|null))*)\s*\]",
                  lambda m: "[" + re.sub(r"\s+", "", m.group(1)).replace(",", ", ") + "]", text)
    with open(path, "w") as f:
        f.write(text + "\n")
