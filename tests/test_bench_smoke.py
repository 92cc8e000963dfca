"""The GPU benchmark's CPU smoke tests (CI has no GPU): gpu.py runs the same code paths on a tiny model and writes
its JSON; bench/gpu_check.sh parses, and (slow) runs end to end in its CPU dry-run mode."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from conftest import REPO


def test_gpu_bench_runs_tiny_on_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "gpu.py"),
            "--device",
            "cpu",
            "--tiny",
            "--sections",
            "trainer,eval,generate",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    results = json.loads(out.read_text())
    # the length distribution comes from `medqa prepare` on the shipped real records and tokenizer
    real = results["real_data"]
    assert real["tokenizer"] == "assets/biogpt-tokenizer" and real["read"] == 500
    assert 150 < real["train"]["median_tokens"] < 350 and 0.3 < real["train"]["prompt_share"] < 0.7
    assert results["eval"]["tokens_per_s"] > 0 and results["eval"]["token_budget"]["tokens_per_s"] > 0
    assert results["generate"]["batch_32"]["new_tokens_per_s"] > 0
    # the Trainer path (`medqa train`'s setup_training + fit), packed and unpacked, with its projection
    trainer = results["trainer"]
    for variant in ("unpacked_grouped", "packed_eager"):
        r = trainer[variant]
        assert r["steps"] == 3 and r["steps_timed"] == 3 and r["steady_steps"] == 2
        assert r["tokens_per_s"] > 0 and r["mean_step_seconds"] > 0 and r["median_step_seconds"] > 0
        assert r["dynamo"] == {
            "graph_breaks": 0,
            "unique_graphs": 0,
            "recompiles": 0,
            "graph_break_reasons": [],
            "recompile_reasons": [],
        }  # eager: nothing compiled
        p = r["projection"]
        assert p["eval_minutes"] > 0 and p["epoch_minutes"] == pytest.approx(p["train_minutes"] + p["eval_minutes"])
        assert r["projected_hcm100k_epoch_minutes"] == p["epoch_minutes"]
        assert p["optimizer_steps"] * r["rows_per_step"] >= p["rows"]  # the last step's empty rows cost time
    packed = trainer["packed_eager"]
    assert packed["batch_plan"]["tokens_per_batch"] == 1024
    # real tokens only: a packed row holds fewer real tokens than its 512 positions
    assert packed["real_tokens_per_step"] < packed["batch_plan"]["tokens_per_step"]
    assert "medqa train packed_eager" in proc.stdout


def test_gpu_check_script_parses_and_states_its_limits():
    script = (REPO / "bench" / "gpu_check.sh").read_text()
    assert subprocess.run(["bash", "-n", str(REPO / "bench" / "gpu_check.sh")]).returncode == 0
    limits = {name: int(t) for name, t in re.findall(r"^[^#\n]*\bstep (\w+) (\d+) ", script, re.MULTILINE)}
    assert list(limits) == ["install", "headline", "scoring", "model", "prepare", "train", "evaluate"]
    assert sum(limits.values()) < 420  # one device command of at most 7 minutes


@pytest.mark.slow
def test_gpu_check_dry_run_on_cpu(tmp_path):
    """Every step of the GPU check, in order, on CPU with the tiny model: each ends with status 0, and the
    headline's JSON and the CLI run's metrics.jsonl come back under $OUT. Minutes on 2 shared cores."""
    out = tmp_path / "out"
    env = {
        **os.environ,
        "GPU_CHECK_DRY": "1",
        "PYTHON": sys.executable,
        "OUT": str(out),
        "GPU_CHECK_WORK": str(tmp_path / "work"),
    }
    proc = subprocess.run(
        ["bash", str(REPO / "bench" / "gpu_check.sh")], capture_output=True, text=True, timeout=1800, cwd=REPO, env=env
    )
    steps = (out / "steps.txt").read_text()
    assert [line.split()[1] for line in steps.splitlines()] == ["headline", "scoring", "prepare", "train", "evaluate"]
    assert all(" rc=0 " in line for line in steps.splitlines()), steps + (out / "all.log").read_text()[-3000:]
    assert "packed_eager" in json.loads((out / "gpu.json").read_text())["trainer"]
    lines = [json.loads(x) for x in (out / "train_metrics.jsonl").read_text().splitlines()]
    assert any("train_loss" in x for x in lines)
    assert (out / "report.md").exists() and proc.returncode == 0
