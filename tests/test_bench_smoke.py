"""The GPU benchmark's CPU smoke test (CI has no GPU): the script runs and writes its JSON."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO


def test_gpu_bench_runs_tiny_on_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu.py"), "--device", "cpu", "--tiny",
                           "--out", str(out)], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    results = json.loads(out.read_text())
    assert results["eval"]["tokens_per_s"] > 0 and results["eval"]["token_budget"]["tokens_per_s"] > 0
    assert results["generate"]["batch_32"]["new_tokens_per_s"] > 0
    # the Trainer path (`medqa train`'s setup_training + fit), packed and unpacked, with its projection
    trainer = results["trainer"]
    for variant in ("unpacked_grouped", "packed_eager"):
        r = trainer[variant]
        assert r["steps"] == 3 and r["steps_timed"] == 3
        assert r["tokens_per_s"] > 0 and r["projected_hcm100k_epoch_minutes"] > 0
    assert trainer["packed_eager"]["batch_plan"]["tokens_per_batch"] == 1024
    assert "medqa train packed_eager" in proc.stdout
