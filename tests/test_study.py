"""Smoke test of the replication study (examples/study): the --quick preset runs end to end through
PSFTTrainer and writes its outputs. It checks that they are produced and well formed, not their
values (those are the study's findings, reported in examples/study/README.md)."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ["sft", "psft", "psft_warmup", "dft", "asft"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("study-out")
    cache = tmp_path_factory.mktemp("study-cache")  # cold: pretraining is part of the smoke test
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "examples.study", "--quick", "--out", str(out),
                           "--cache-dir", str(cache), "--workers", "2"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out / "results.json") as f:
        return out, json.load(f), proc.stdout


def test_results_json_has_every_method_and_metric(quick_run):
    _, res, _ = quick_run
    assert set(res) == {"meta", "config", "summary", "runs"}
    cfg = res["config"]["finetune"]
    n_runs = len(cfg["methods"]) * len(cfg["lrs"]) * len(cfg["seeds"])
    assert sorted(cfg["methods"]) == sorted(METHODS) and len(cfg["seeds"]) >= 2
    assert len(res["runs"]) == n_runs == res["meta"]["runs"]

    total_steps = res["meta"]["steps_per_epoch"] * res["config"]["finetune"]["epochs"]
    for run in res["runs"]:
        assert run["steps"] == total_steps
        assert [e["step"] for e in run["evals"]] == res["meta"]["eval_steps"]
        for e in run["evals"]:
            assert {"accuracy", "ood_loss", "entropy_train_probe", "entropy_heldout_probe"} <= set(e)
            assert 0.0 <= e["accuracy"] <= 1.0 and e["ood_loss"] > 0
        logs = run["logs"]  # one list per metric, one entry per optimizer step
        assert logs["step"] == list(range(1, total_steps + 1))
        for key in ("loss", "nll", "entropy", "tokens"):
            assert len(logs[key]) == total_steps and None not in logs[key], key
        if run["method"] in ("psft", "psft_warmup"):
            assert run["old_policy_refreshes"] > 0
            assert any(v is not None for v in logs["clip_fraction"]) and any(v is not None for v in logs["ratio_mean"])
        if run["method"] == "asft":
            assert None not in logs["kl"]

    summary = res["summary"]
    assert {c["method"] for c in summary["cells"]} == set(METHODS)
    for c in summary["cells"]:
        for key in ("accuracy", "ood_loss", "ood_rise", "entropy_train_probe", "entropy_ratio_end_vs_epoch1"):
            assert c[key]["n"] == len(cfg["seeds"]) and c[key]["mean"] is not None and c[key]["sd"] is not None
        assert c["curves"]["entropy_logged"]["step"] == list(range(1, total_steps + 1))
    assert set(summary["best_lr"]) == set(METHODS)
    assert summary["frontier"] and set(summary["comparisons"]) == set(METHODS)


def test_markdown_table_lists_every_method(quick_run):
    out, res, _ = quick_run
    text = (out / "results.md").read_text()
    for label in ("SFT", "PSFT (K=8)", "PSFT + SFT warm-up", "DFT", "ASFT"):
        assert f"| {label}" in text
    assert text.count("\n| ") >= len(res["summary"]["cells"]) + 2


def test_plots_are_written(quick_run):
    pytest.importorskip("matplotlib")
    out, res, _ = quick_run
    names = ["entropy_vs_step.png", "ood_loss_vs_step.png", "accuracy_vs_step.png", "frontier.png"]
    assert sorted(res["meta"]["plots"]) == sorted(names)
    for name in names:
        with open(out / name, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
