"""Colab support for the notebooks' first cell: cloning the repository, GPU-aware settings and a workdir on
Google Drive.

A Colab runtime disconnects and wipes its disk; with `drive_workdir` the data, checkpoints and outputs live on
Google Drive, and `train.resume=true` makes a re-run continue from the last checkpoint instead of starting over.
"""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path

from medqa.errors import MedqaError

log = logging.getLogger(__name__)


class CloneError(MedqaError):
    """The repository could not be cloned. A notebook shows only its one-line message, no traceback (IPython
    displays what `_render_traceback_` returns instead of the traceback)."""

    def _render_traceback_(self) -> list[str]:
        return [str(self)]


def clone_repo(repo_url: str, dest: str | Path = "/content/medqa") -> Path:
    """Shallow-clone `repo_url` into `dest`, unless `dest` is already there (a re-run of the cell).

    A failed clone (the placeholder REPO_URL, a private or deleted repository, no network) raises `CloneError`
    with one line that says to set REPO_URL to your fork. Git's credential prompt is turned off: for a
    repository that does not exist GitHub asks for a password, which would hang a notebook cell."""
    dest = Path(dest)
    if dest.is_dir():
        return dest
    proc = subprocess.run(
        ["git", "clone", "--depth", "1", "--quiet", repo_url, str(dest)],
        capture_output=True,
        text=True,
        env={**os.environ, "GIT_TERMINAL_PROMPT": "0"},
    )
    if proc.returncode != 0:
        lines = [x.strip() for x in proc.stderr.splitlines() if x.strip()]
        why = lines[-1] if lines else f"git exited with status {proc.returncode}"
        raise CloneError(
            f"Could not clone {repo_url} ({why}): set REPO_URL in the notebook's first cell to your fork of medqa "
            "(https://github.com/<you>/medqa) and run the cell again."
        )
    return dest


def gpu_overrides(gpu_name: str | None) -> list[str]:
    """Settings for the GPU Colab gave us: fp16 on a T4 (no bf16), bf16 on Ampere or newer. Batch sizes are not
    set here: on CUDA the GPU config sizes its micro-batches and scoring batches from the card's free memory."""
    if not gpu_name:
        log.warning("No GPU in this runtime: Runtime > Change runtime type > T4 GPU. Running on the CPU.")
        return []
    name = gpu_name.upper()
    if "T4" in name or "V100" in name or "P100" in name:
        return ["train.mixed_precision=fp16"]
    if any(card in name for card in ("A100", "H100", "L4", "A10", "H200")):
        return ["train.mixed_precision=bf16"]
    return ["train.mixed_precision=auto"]


def colab_overrides(drive_workdir: str = "") -> list[str]:
    """Config overrides for this Colab runtime; mounts Google Drive when `drive_workdir` is given."""
    import torch

    overrides = gpu_overrides(torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
    if drive_workdir:
        from google.colab import drive  # only importable inside Colab

        drive.mount("/content/drive")
        Path(drive_workdir).mkdir(parents=True, exist_ok=True)
        overrides += [f"workdir={drive_workdir}", "train.resume=true", "tune.resume=true"]
    log.info("Colab overrides: %s", overrides)
    return overrides
