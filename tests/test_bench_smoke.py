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
    assert results, "no results written"
