"""The Colab helpers pick settings by GPU and say in one line when the repository cannot be cloned; outside Colab
the notebooks' first cell does nothing (the notebook tests execute it)."""

import subprocess
import sys
import types

import nbformat
import pytest
from conftest import REPO

from medqa.colab import gpu_overrides
from medqa.config import load_config


def test_gpu_overrides_by_card():
    assert "train.mixed_precision=fp16" in gpu_overrides("Tesla T4")
    assert "train.mixed_precision=bf16" in gpu_overrides("NVIDIA A100-SXM4-40GB")
    assert "train.mixed_precision=bf16" in gpu_overrides("NVIDIA H100 80GB HBM3")
    assert gpu_overrides(None) == []
    for card in ("Tesla T4", "NVIDIA L4", "Unknown GPU"):
        load_config(REPO / "configs" / "biogpt.yaml", gpu_overrides(card))  # every suggestion is a valid override


def test_a_failed_clone_says_in_one_line_to_set_repo_url(tmp_path, monkeypatch):
    """The notebooks' Colab cell itself, run as in Colab with a REPO_URL that names no repository (a local path,
    so no network is needed): it stops with one line naming the URL and the fix, before installing anything, and
    leaves nothing at the destination. Git's credential prompt is off (GitHub asks for a password for a
    repository that does not exist, which would hang the cell)."""
    nb = nbformat.read(REPO / "notebooks" / "data_preparation.ipynb", as_version=4)
    cell = next(c for c in nb.cells if c.cell_type == "code").source
    url, dest = tmp_path / "no-such-repo", tmp_path / "medqa"
    assert "GIT_TERMINAL_PROMPT" in cell
    cell = cell.replace('"/content/medqa"', repr(str(dest))).replace(
        'REPO_URL = "https://github.com/medqa-project/medqa"', f"REPO_URL = {str(url)!r}"
    )
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    ran = []
    monkeypatch.setattr(
        subprocess, "run", lambda cmd, **kw: ran.append(cmd) or real_run(cmd, capture_output=True, **kw)
    )
    with pytest.raises(SystemExit) as info:
        exec(compile(cell, "colab-cell", "exec"), {})
    message = str(info.value)
    assert "\n" not in message and str(url) in message and "set REPO_URL" in message and "your fork" in message
    assert len(ran) == 1 and ran[0][:2] == ["git", "clone"]  # stopped before pip
    assert not dest.exists()


real_run = subprocess.run


def _recording(ran: list):
    def run(cmd, **kw):
        ran.append(cmd)
        return real_run(cmd, capture_output=True, **kw)

    return run
