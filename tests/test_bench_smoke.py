"""The GPU benchmark's CPU smoke tests (CI has no GPU): gpu.py runs the same code paths on a tiny model and writes
its JSON; bench/gpu_check.sh parses, and (slow) runs end to end in its CPU dry-run mode."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from conftest import REPO


@pytest.mark.slow
def test_gpu_bench_runs_tiny_on_cpu(tmp_path):
    """Slow (bench/gpu.py end to end in a subprocess): the only run of the GPU benchmark's own script."""
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
    headline's JSON and the CLI run's metrics.jsonl come back under $OUT. Slow (minutes on 2 shared cores): the only
    run of bench/gpu_check.sh itself."""
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


def _fake_bench_results() -> dict:
    """bench.py's results JSON in shape only (every figure made up), enough to write its markdown section."""
    s = {"median": 1.0, "min": 0.9, "max": 1.1}
    sizes = ("1x", "2x", "4x")
    return {
        "meta": {
            "date": "2026-01-02T03:04:05",
            "quick": True,
            "repeats": 2,
            "seconds": 60.0,
            "machine": {"cores": 2, "cpu": "cpu", "torch": "t", "torch_threads": 1, "transformers": "v"},
        },
        "padding_efficiency": {"examples": 10, "padded_512": 0.2, "grouped": s, "packed": s, "ours": 0.99},
        "train": {
            "examples": 8,
            "model": "tiny",
            "packed_rows_per_batch": 2,
            "strategies": {
                k: {"examples_per_s": s, "answer_tokens_per_s": s} for k in ("padded_512", "grouped", "packed")
            },
            "speedup": {"packed": s, "grouped": s},
        },
        "eval": {
            "examples": 4,
            "tokens": 100,
            "answer_nll_max_difference": 1e-6,
            "tokens_per_s": {k: s for k in ("padded_512", "one_at_a_time", "length_batched")},
            "speedup_vs_padded_512": s,
            "speedup_vs_one_at_a_time": s,
        },
        "prepare": {
            "records": 100,
            "cached_rerun_seconds": s,
            "records_per_s": {f"{p}-{n}": s for p in ("fast", "slow") for n in (1, 2)},
            "fast_over_slow": s,
            "identical_token_ids": True,
        },
        "scaling": {
            **{
                f: {
                    "records": 1,
                    "prepare_seconds_per_1k_records": s,
                    "train_examples": 1,
                    "train_seconds_per_1k_tokens": s,
                    "train_seconds_per_example": s,
                }
                for f in sizes
            },
            "prepare_seconds_per_1k_records_4x_over_1x": 0.5,
            "train_seconds_per_1k_tokens_4x_over_1x": 0.9,
            "train_seconds_per_example_4x_over_1x": 0.9,
        },
    }


def test_bench_docs_writes_only_the_results_section(tmp_path):
    """`make bench-docs` (bench.py --from-json) replaces BENCHMARKS.md's results section from a run's JSON and
    leaves the rest of the file as it was; without the JSON it says to run `make bench` first."""
    results, md = tmp_path / "bench.json", tmp_path / "BENCHMARKS.md"
    md.write_text((REPO / "BENCHMARKS.md").read_text())
    cmd = [sys.executable, str(REPO / "bench" / "bench.py"), "--from-json", str(results), "--markdown", str(md)]
    missing = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert missing.returncode == 1 and "run `make bench` first" in missing.stdout
    results.write_text(json.dumps(_fake_bench_results()))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    before, after = (REPO / "BENCHMARKS.md").read_text(), md.read_text()
    assert "## Results (2026-01-02T03:04:05, --quick)" in after

    def outside(text):
        head, rest = text.split("<!-- bench:start -->")
        return head, rest.split("<!-- bench:end -->")[1]

    assert outside(after) == outside(before)

    # a run's JSON from before pad-to-512 had one name (bench.py's `original`) documents the same section
    old = _fake_bench_results()
    old["padding_efficiency"]["original"] = old["padding_efficiency"].pop("padded_512")
    old["train"]["strategies"]["original"] = old["train"]["strategies"].pop("padded_512")
    results.write_text(json.dumps(old))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert md.read_text() == after


def test_hand_loop_batches_each_example_once_and_trains_only_lora(tmp_path):
    """bench/hand_loop.py, the loop bench.py and gpu.py both time: every strategy's epoch holds every answer token
    once (padding carries no label), padded_512 rows are 512 wide and grouped ones as wide as their longest; one
    epoch changes the LoRA weights and leaves the base's as they were."""
    import random

    import torch

    sys.path.insert(0, str(REPO / "bench"))
    import gpu
    import hand_loop

    rng = random.Random(0)
    rows = []
    for _ in range(12):
        n = rng.randint(20, 200)
        prompt = rng.randint(5, n - 5)
        ids = [rng.randrange(3, 1000) for _ in range(n)]
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    answer = sum(hand_loop.answer_tokens(r) for r in rows)
    per_batch = hand_loop.packed_rows_per_batch([len(r["input_ids"]) for r in rows], 4)
    epochs = {}
    for strategy in hand_loop.STRATEGIES:
        groups = hand_loop.make_batches(rows, strategy, 4, rows_per_batch=per_batch, seed=0)
        epochs[strategy] = [hand_loop.collate(g, strategy, gpu.PAD) for g in groups]
        assert sum(int((b["labels"][:, 1:] != -100).sum()) for b in epochs[strategy]) == answer, strategy
        if strategy != "packed":
            widths = [max(len(r["input_ids"]) for r in g) for g in groups]
            assert [b["input_ids"].shape[1] for b in epochs[strategy]] == (
                [512] * len(groups) if strategy == "padded_512" else widths
            )
    base = gpu.build_model(gpu.TINY, torch.device("cpu"), torch.float32)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model, optimizer, n_lora = hand_loop.add_lora(base)
    assert n_lora == sum(p.numel() for n, p in model.named_parameters() if "lora_" in n) > 0
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert hand_loop.train_epoch(model, optimizer, epochs["packed"], max_grad_norm=1.0) > 0
    assert all(not torch.equal(p, lora[n]) for n, p in model.named_parameters() if n in lora and "lora_B" in n)
    merged = {k.replace("base_model.model.", "").replace(".base_layer", ""): v for k, v in model.state_dict().items()}
    assert all(torch.equal(merged[k], v) for k, v in before.items())


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_make_bench_changes_no_tracked_file():
    """`make bench` writes only under outputs/ (ignored); BENCHMARKS.md changes only with `make bench-docs`."""

    def recipe(target):
        out = subprocess.run(["make", "-n", target], capture_output=True, text=True, cwd=REPO, check=True).stdout
        return [line for line in out.splitlines() if "bench/bench.py" in line]

    (bench,) = recipe("bench")
    assert "--markdown" not in bench and "outputs/bench/" in bench
    (docs,) = recipe("bench-docs")
    assert "--from-json outputs/bench/bench.json" in docs and "--markdown BENCHMARKS.md" in docs
