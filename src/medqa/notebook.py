"""The stage notebooks' shared setup cell, as one function: `cfg = setup(CONFIG, OVERRIDES, stage="train", ...)`.

Each notebook's parameters cell sets CONFIG, OVERRIDES and SMOKE; `setup` runs from the repository root (so
configs/ and data/ resolve), turns on INFO logging, keeps inline figures small, and loads the config with the
Colab overrides, then the notebook's overrides, then (SMOKE) the stage's quick-run overrides, in that order.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

from medqa.config import load_config
from medqa.schema import Config

# Quick-run overrides per stage: what the notebooks' SMOKE = True adds (CI runs the notebooks this way on the demo).
# Every stage keeps the data override, so a smoke run of a later notebook reads what notebook 1's smoke run wrote.
SMOKE_DATA = ("data.max_records=120",)
SMOKE_OVERRIDES: dict[str, tuple[str, ...]] = {
    "prepare": SMOKE_DATA,
    "baseline": (*SMOKE_DATA, "scoring.max_examples=16", "scoring.bootstrap_samples=200"),
    "train": (*SMOKE_DATA, "train.epochs=1", "scoring.bootstrap_samples=200"),
    "tune": (
        *SMOKE_DATA,
        "tune.num_samples=2",
        "train.epochs=1",
        "train.eval_steps=20",
        "scoring.bootstrap_samples=200",
        "evaluate.num_questions=4",
    ),
}

FIGURE_DPI = 80  # inline figures: a 11 x 3.6 inch plot is a PNG of about 30 KB, small enough to commit
# Warnings that say nothing about the run (as pyproject.toml's pytest filters): tqdm without ipywidgets, peft
# calling a deprecated transformers property.
QUIET_WARNINGS = ("IProgress not found", "`is_gradient_checkpointing` is deprecated")


def setup(
    config: str | os.PathLike,
    overrides: Sequence[str] = (),
    *,
    stage: str,
    smoke: bool = False,
    colab_overrides: Sequence[str] = (),
) -> Config:
    """Prepare a notebook session (working folder, logging, figures, warnings) and return its config.

    `stage` is one of SMOKE_OVERRIDES' keys ("prepare", "baseline", "train", "tune"); with `smoke` its quick-run
    overrides come last, so they win. A notebook started in notebooks/ moves to the repository root first.
    """
    if stage not in SMOKE_OVERRIDES:
        raise ValueError(f"Unknown stage {stage!r}: use one of {', '.join(SMOKE_OVERRIDES)}.")
    cwd = Path.cwd()
    if cwd.name == "notebooks" and (cwd.parent / "configs").is_dir():
        os.chdir(cwd.parent)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for message in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    import matplotlib

    matplotlib.rcParams["figure.dpi"] = FIGURE_DPI
    cfg = load_config(config, [*colab_overrides, *overrides, *(SMOKE_OVERRIDES[stage] if smoke else ())])
    print(
        f"config {config}{' (smoke run)' if smoke else ''}: model {cfg.resolve(cfg.model.name_or_path)}, "
        f"data {cfg.data.source} -> workdir {cfg.workdir}"
    )
    return cfg
