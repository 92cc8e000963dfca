"""The Colab helpers pick settings by GPU and say in one line when the repository cannot be cloned; outside Colab
the notebooks' first cell does nothing (the notebook tests execute it)."""

import subprocess

import pytest
from conftest import REPO

from medqa.colab import CloneError, clone_repo, gpu_overrides
from medqa.config import load_config


def test_gpu_overrides_by_card():
    assert "train.mixed_precision=fp16" in gpu_overrides("Tesla T4")
    assert "train.mixed_precision=bf16" in gpu_overrides("NVIDIA A100-SXM4-40GB")
    assert "train.mixed_precision=bf16" in gpu_overrides("NVIDIA H100 80GB HBM3")
    assert gpu_overrides(None) == []
    for card in ("Tesla T4", "NVIDIA L4", "Unknown GPU"):
        load_config(REPO / "configs" / "biogpt.yaml", gpu_overrides(card))  # every suggestion is a valid override


def test_a_failed_clone_says_in_one_line_to_set_repo_url(tmp_path):
    """A REPO_URL that names no repository (here a local path, so no network is needed) fails with one line that
    names the URL and the fix, and shows no traceback in a notebook; nothing is left at the destination."""
    url, dest = str(tmp_path / "no-such-repo"), tmp_path / "medqa"
    with pytest.raises(CloneError) as info:
        clone_repo(url, dest)
    message = str(info.value)
    assert "\n" not in message and url in message and "set REPO_URL" in message and "your fork" in message
    assert info.value._render_traceback_() == [message]  # what IPython shows instead of a traceback
    assert not dest.exists()


def test_clone_repo_clones_once(tmp_path):
    source = tmp_path / "source"
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "-C", str(source)]
    subprocess.run(["git", "init", "-q", str(source)], check=True)
    (source / "README.md").write_text("medqa\n")
    subprocess.run([*git, "add", "README.md"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "first"], check=True)
    dest = tmp_path / "medqa"
    assert clone_repo(f"file://{source}", dest) == dest and (dest / "README.md").read_text() == "medqa\n"
    assert clone_repo("file:///no/such/repo", dest) == dest  # already there (the cell run again): no clone
