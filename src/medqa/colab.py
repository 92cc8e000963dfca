"""Colab support for the notebooks' first cell: cloning the repository, GPU-aware settings and a workdir on
Google Drive.

A Colab runtime disconnects and wipes its disk; with `drive_workdir` the data, checkpoints and outputs live on
Google Drive, and `train.resume=true` makes a re-run continue from the last checkpoint instead of starting over.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)


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
