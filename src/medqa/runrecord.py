"""The record of a training run, kept beside its checkpoints (`outputs/finetune_checkpoints/`, or a trial's folder):
what determines the run (the config's `RUN_SECTIONS` and the checkpoint rule's `SELECTION` fields, its inputs and
process count; `medqa.manifest.run_record`), written by `open_run` and marked finished by `close_run` (which reads
back the run's history and timing), so a resume continues the same run or is refused. Also what must hold before
training starts: the same process count on resume (`check_process_count`) and disk space for the checkpoints
(`check_disk`). `medqa tune` records its search on the same `RUN_SECTIONS`.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from medqa import distributed as dist
from medqa import schema
from medqa.checkpoints import resumable_checkpoint, set_aside
from medqa.errors import ConfigError, MedqaError
from medqa.manifest import check_resumable, run_record, write_run_record
from medqa.runplan import Setup
from medqa.schema import Config
from medqa.trainer import StepTimer
from medqa.workdir import HISTORY, adapter_inputs

log = logging.getLogger(__name__)

RUN_SECTIONS = ("data", "prompt", "model", "lora", "train", "scoring")  # the config sections a training run depends on
# and the rule that picks its best checkpoint (`medqa.selection`): the tune fields declared to affect a run
SELECTION = tuple(k for k in schema.keys("train", path=False) if k.startswith("tune."))


def open_run(cfg: Config, work: Path, tokenizer) -> tuple[dict, Path | None]:
    """The run's record and the checkpoint to resume from (None: a fresh run). What determines this run (settings
    and inputs) is kept beside its checkpoints: a resume must continue the same run, never report another run's
    adapter under this config's name. A fresh run removes the folder's old checkpoints and history."""
    record = {
        **run_record(cfg, RUN_SECTIONS, adapter_inputs(cfg, tokenizer), also=SELECTION),
        "processes": dist.world_size(),
    }
    choice = resumable_checkpoint(work, dist.world_size()) if cfg.train.resume else None
    checkpoint = choice.checkpoint if choice else None
    if cfg.train.resume and checkpoint is not None:
        stored = check_resumable(work, record, "training run", "train.resume=false")
        check_process_count(cfg, stored)
        if stored and stored.get("finished"):
            log.info(
                "train.resume=true: the run in %s already finished with these settings; its outputs are written again.",
                work,
            )
    elif cfg.train.resume:
        log.warning("train.resume=true but no checkpoint in %s; starting from scratch.", work)
    dist.barrier()  # every process has read the checkpoints before rank 0 may remove them
    if dist.is_main():
        if (not cfg.train.resume or checkpoint is None) and work.exists():
            shutil.rmtree(work)  # a fresh run must not mix its history with an old one
        elif choice is not None:
            set_aside(choice)  # damaged newer checkpoints: renamed, so their steps are trained and saved again
        write_run_record(work, record)
    dist.barrier()
    return record, checkpoint


def close_run(work: Path, record: dict, setup: Setup, timer: StepTimer) -> tuple[list[dict], dict]:
    """After fitting: the run marked finished, its history (metrics.jsonl's lines) and its timing."""
    dist.barrier()  # rank 0 has written the last line of metrics.jsonl
    if dist.is_main():
        write_run_record(work, {**record, "finished": True})
    history = [json.loads(x) for x in (work / HISTORY).read_text().splitlines()]
    timing = timer.summary(setup.describe()["compiled"])
    if timing.get("compile_seconds"):
        log.info(
            "torch.compile took about %.1f s (first step %.1f s, then %.3f s per step)",
            timing["compile_seconds"],
            timing["first_step_seconds"],
            timing["median_step_seconds"],
        )
    return history, timing


def check_process_count(cfg: Config, stored: dict | None) -> None:
    """A resume must run as many processes as the run it continues, unless train.tokens_per_step fixes the
    optimizer step: otherwise the global batch (examples per step, hence the learning-rate schedule's meaning)
    would change halfway."""
    before, now = (stored or {}).get("processes", 1), dist.world_size()
    if before == now or (cfg.train.packing and cfg.train.tokens_per_step):
        return
    raise ConfigError(
        f"Cannot resume: the checkpoints were written by {before} training process(es) and this run has {now}, "
        f"which changes the global batch ({before} x {now} micro-batches per step are not the same step). Resume "
        f"with the same count (torchrun --nproc_per_node {before} -m medqa train ..., or plain `medqa train` for 1), "
        "or, with train.packing=true, set train.tokens_per_step so every process count takes the same optimizer "
        "step, or start fresh with train.resume=false."
    )


def check_disk(cfg: Config, folder: Path, trainable: int, total_steps: int) -> None:
    """Stop before training when the disk cannot hold the checkpoints and logs.

    A checkpoint holds the adapter plus AdamW's two moments (3 x 4 bytes per trainable parameter) and small state
    files; `save_total_limit` of them, plus the best, plus the final adapter, plus logs of ~1 KB per step."""
    per_checkpoint = 12 * trainable + (1 << 20)
    need = (cfg.train.save_total_limit + 2) * per_checkpoint + 4 * trainable + 1024 * total_steps + (20 << 20)
    free = shutil.disk_usage(folder).free
    if free < need:
        raise MedqaError(
            f"Not enough disk space in {folder}: training needs about {need / 2**20:,.0f} MiB for "
            f"{cfg.train.save_total_limit} checkpoints, the adapter and logs, and {free / 2**20:,.0f} MiB "
            "are free. Free some space, lower train.save_total_limit, or set workdir to a larger disk."
        )
