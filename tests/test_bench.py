"""The benchmark harness end to end on a tiny head: behaviour, not speed.

Rows land in a temporary results directory (never bench/results). One test runs the real CLI in a
subprocess with one provider per process, as a CPU sweep does; the others call ``bench.cli.main``
in-process (``--isolate no``) so that they can plant a wrong provider or hide a package.
"""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys

import pytest
import torch

import psft_kernels as pk

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench import cli, providers  # noqa: E402
from bench.inputs import EPS_HIGH, make_problem, make_weight  # noqa: E402
from bench.results import COLUMNS  # noqa: E402

TINY = ["--preset", "tiny", "--N", "32", "--inputs", "zipf", "--threads", "1", "--repeats", "2", "--no-progress"]


def _rows(results_dir):
    paths = [p for p in os.listdir(results_dir) if p.endswith(".csv") and not p.endswith(".inputs.csv")]
    assert len(paths) == 1, paths
    with open(os.path.join(results_dir, paths[0]), newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == COLUMNS
        return list(reader)


def test_cli_subprocess_writes_a_sane_row(tmp_path):
    out = tmp_path / "results"
    cmd = [sys.executable, "-m", "bench", *TINY, "--loss", "sft", "--mode", "fwd_bwd", "--providers", "chunked",
           "--results-dir", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = _rows(out)
    assert len(rows) == 1, rows  # the reference runs untimed (the truth) and writes no row
    r = rows[0]
    assert (r["provider"], r["loss"], r["mode"], r["N"], r["D"], r["V"], r["dtype"]) == (
        "chunked", "sft", "fwd_bwd", "32", "64", "1000", "fp32")
    assert r["torch"] == torch.__version__ and r["commit"] and r["device"]
    med, p20, p80 = float(r["ms_median"]), float(r["ms_p20"]), float(r["ms_p80"])
    assert 0 < p20 <= med <= p80
    assert float(r["floor_ms"]) > 0
    assert float(r["peak_mem_mib"]) >= 0
    assert float(r["max_abs_err_vs_reference"]) < 1e-4
    assert 0.5 < float(r["input_entropy"]) < math.log(1000)
    assert r["clip_fraction"] == ""  # only PSFT rows have one
    assert "1 rows appended" in proc.stdout
    # Rows measured elsewhere (a lent GPU) merge into a results directory, columns checked.
    other = tmp_path / "merged"
    sources = [str(out / p) for p in os.listdir(out) if p.endswith(".csv")]
    assert cli.main(["merge", *sources, "--results-dir", str(other)]) == 0
    assert _rows(other) == rows


def test_plot_draws_each_case_from_the_csv(tmp_path):
    pytest.importorskip("matplotlib")
    args = [*TINY, "--isolate", "no", "--loss", "sft", "--mode", "fwd_bwd,logprobs", "--providers", "reference",
            "--results-dir", str(tmp_path)]
    assert cli.main(args) == 0
    (tmp_path / "accuracy-cpu.csv").write_text("backend,dtype,loss\nchunked,fp32,sft\n")  # another table: ignored
    assert cli.main(["plot", "--results-dir", str(tmp_path)]) == 0
    pngs = sorted(p for p in os.listdir(tmp_path) if p.endswith(".png"))
    assert [p.split("__")[1] for p in pngs] == ["tiny_fp32_zipf_fwd_bwd.png", "tiny_fp32_zipf_logprobs.png"]
    assert all(os.path.getsize(tmp_path / p) > 10_000 for p in pngs)


def _wrong_sft(case, prob):
    y = prob.targets
    return lambda h, w: 1.05 * pk.linear_sft_loss(h, w, y, backend="chunked")  # 5% off: a misconfigured peer


def test_disagreeing_provider_is_reported_and_not_timed(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(providers.PROVIDERS, "wrong_sft",
                        providers.Provider("wrong_sft", "SFT scaled by 1.05", _wrong_sft, losses=("sft",)))
    args = [*TINY, "--isolate", "no", "--loss", "sft,psft", "--mode", "fwd_bwd", "--providers", "wrong_sft,reference",
            "--results-dir", str(tmp_path)]
    assert cli.main(args) == 0
    console = capsys.readouterr().out
    assert "wrong_sft" in console and "DISAGREES with the reference, not timed" in console
    rows = {(r["provider"], r["loss"]): r for r in _rows(tmp_path)}
    wrong = rows[("wrong_sft", "sft")]
    assert wrong["ms_median"] == wrong["ms_p20"] == wrong["ms_p80"] == wrong["peak_mem_mib"] == ""
    assert float(wrong["max_abs_err_vs_reference"]) > 1e-3  # 5% of a loss of ~2 nats
    assert float(rows[("reference", "sft")]["ms_median"]) > 0  # the reference is timed when asked for
    psft = rows[("reference", "psft")]
    assert 0 < float(psft["clip_fraction"]) < 1
    assert ("wrong_sft", "psft") not in rows  # a provider of another loss is silently not run


def test_missing_and_inapplicable_providers_are_skipped_with_a_message(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "cut_cross_entropy", None)  # as if not installed: import fails
    args = [*TINY, "--isolate", "no", "--loss", "sft", "--mode", "fwd_bwd",
            "--providers", "cce_compile,cce,chunked", "--results-dir", str(tmp_path)]
    assert cli.main(args) == 0
    console = capsys.readouterr().out
    assert "skip cce_compile: cut-cross-entropy cannot be imported" in console
    assert "pip install cut-cross-entropy" in console
    assert "skip cce: needs a CUDA GPU" in console
    provs = {r["provider"] for r in _rows(tmp_path)}
    assert provs == {"chunked"}


def test_bad_arguments_are_rejected_with_the_name(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--loss", "ppo"])
    assert "--loss" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["--providers", "nope"])
    assert "--providers" in capsys.readouterr().err


def test_inputs_have_the_structure_they_claim():
    V, D = 8192, 32
    zw, zi = make_weight("zipf", V, D, torch.float32, "cpu", seed=1, entropy=1.0)
    fw, fi = make_weight("flat", V, D, torch.float32, "cpu", seed=1)
    z = make_problem(zw, zi, 128, seed=1)
    f = make_problem(fw, fi, 128, seed=1)
    # Tuned to ~1 nat (on a probe, so not exactly); the flat worst case sits near log V.
    assert 0.7 < z.info["entropy"] < 1.4
    assert f.info["entropy"] > math.log(V) - 1.0
    # The shared prior leaves whole tiles negligible; i.i.d. logits leave none.
    assert z.info["filterable_tiles"] > 0.05 and f.info["filterable_tiles"] == 0.0
    # Realizable as (hidden, weight): the measured stats are those of the actual logits.
    logp, entropy = pk.linear_logprobs(z.hidden, z.weight, z.targets, backend="reference")
    assert abs(float(entropy.mean()) - z.info["entropy"]) < 1e-4
    # Old log-probs: some tokens clip, none sits within the margin of the clip threshold.
    log_ratio = logp - z.old_logprobs
    assert 0.02 < z.info["clip_fraction"] < 0.5
    assert float((log_ratio > math.log1p(EPS_HIGH)).float().mean()) == pytest.approx(z.info["clip_fraction"])
    assert float((log_ratio - math.log1p(EPS_HIGH)).abs().min()) > 0.04


def test_accuracy_table_holds_the_rule(tmp_path, capsys):
    """``python -m bench.accuracy``: each case's fused error within 2x plain PyTorch's + 1e-6 (fp32)."""
    from bench import accuracy
    from helpers import LOSSES, OPTION_SETS

    assert accuracy.main(["--backends", "chunked", "--dtypes", "fp32", "--results-dir", str(tmp_path)]) == 0
    rows = list(csv.DictReader(open(tmp_path / "accuracy-cpu.csv")))
    assert len(rows) == len(LOSSES) * len(OPTION_SETS) and "chunked" in capsys.readouterr().out
    for r in rows:
        err, plain = float(r["max_rel_err"]), float(r["plain_pytorch_max_rel_err"])
        assert 0 < err <= 2 * plain + 1e-6, r
