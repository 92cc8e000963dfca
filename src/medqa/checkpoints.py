"""Which training checkpoint a resume may continue from: complete, and intact.

A checkpoint folder (`outputs/finetune_checkpoints/checkpoint-<step>/`, written by transformers' Trainer) is
**complete** when medqa's mark `medqa_complete.json` is in it. `MarkComplete` writes the mark after a barrier that
follows every process's writes (rank 0 writes the weights, optimizer, scheduler and trainer_state.json; every rank
writes its own `rng_state_<rank>.pth`), so a run killed while any process was still saving leaves no mark, and
trainer_state.json alone (written by rank 0, possibly before another rank's RNG file) proves nothing.

A complete checkpoint is **intact** when what the Trainer will read back loads: trainer_state.json parses; the
adapter weights load (safetensors); optimizer.pt and scheduler.pt load (tensors only, `weights_only=True`); and the
RNG file of every process of the run is there and loads. `resumable_checkpoint` picks the newest intact one; a
newer damaged one is named in a warning and set aside as `damaged-checkpoint-<step>` (kept for inspection, out of
the Trainer's sight); when checkpoints exist but none is intact, it refuses in one paragraph.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from transformers import TrainerCallback

from medqa import distributed as dist
from medqa.errors import MedqaError

log = logging.getLogger(__name__)

COMPLETE = "medqa_complete.json"  # written last, after every process has saved its part
PREFIX = "checkpoint-"
DAMAGED_PREFIX = "damaged-"


class CheckpointError(MedqaError):
    """No checkpoint to resume from is intact."""


def _step(folder: Path) -> int:
    try:
        return int(folder.name[len(PREFIX) :])
    except ValueError:
        return -1


def checkpoints(work: Path) -> list[Path]:
    """The Trainer's checkpoint folders under `work`, newest first."""
    if not work.is_dir():
        return []
    found = [p for p in work.glob(PREFIX + "*") if p.is_dir() and _step(p) >= 0]
    return sorted(found, key=_step, reverse=True)


def _load_tensors(path: Path) -> None:
    """torch.load with tensors (and numpy's RNG arrays) only: a checkpoint file is never unpickled as code."""
    import torch
    from transformers.trainer_pt_utils import safe_globals

    with safe_globals():
        torch.load(path, weights_only=True, map_location="cpu")


def problem(folder: Path, processes: int = 1) -> str | None:
    """Why `folder` cannot be resumed from (None when it is complete and intact). `processes`: how many wrote it
    (one RNG file each; `rng_state.pth` for a single process)."""
    if not (folder / COMPLETE).is_file():
        return f"no {COMPLETE} (cut short while saving, or written by an older medqa)"
    try:
        json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return f"trainer_state.json unreadable ({type(exc).__name__})"
    weights = sorted(folder.glob("adapter_model.*")) or sorted(folder.glob("model*.safetensors"))
    if not weights:
        return "no adapter weights (adapter_model.safetensors)"
    try:
        from safetensors.torch import load_file

        for w in weights:
            load_file(w)
    except Exception as exc:  # truncated or corrupted: safetensors raises its own error types
        return f"{weights[0].name} does not load ({type(exc).__name__}: {str(exc)[:80]})"
    rng = ["rng_state.pth"] if processes == 1 else [f"rng_state_{r}.pth" for r in range(processes)]
    for name in ("optimizer.pt", "scheduler.pt", *rng):
        path = folder / name
        if not path.is_file():
            return f"{name} missing"
        try:
            _load_tensors(path)
        except Exception as exc:
            return f"{name} does not load ({type(exc).__name__}: {str(exc)[:80]})"
    return None


@dataclass
class Choice:
    """The checkpoint to resume from (None: there is none) and the newer ones that were damaged, with why."""

    checkpoint: Path | None
    damaged: dict[Path, str] = field(default_factory=dict)


def resumable_checkpoint(work: Path, processes: int = 1) -> Choice:
    """The newest intact checkpoint under `work`; the damaged newer ones are returned, named in a warning. Raises
    CheckpointError when checkpoints exist and none is intact: resuming from scratch would silently throw away a
    run the user asked to continue."""
    found = checkpoints(work)
    damaged: dict[Path, str] = {}
    for folder in found:
        why = problem(folder, processes)
        if why is None:
            if damaged:
                log.warning(
                    "train.resume: %s; resuming from %s instead.",
                    "; ".join(f"{p.name} is damaged ({w})" for p, w in damaged.items()),
                    folder.name,
                )
            return Choice(folder, damaged)
        damaged[folder] = why
    if damaged:
        listed = "; ".join(f"{p.name}: {w}" for p, w in damaged.items())
        raise CheckpointError(
            f"Cannot resume: none of the {len(damaged)} checkpoints in {work} is intact ({listed}). Start the run "
            "again with train.resume=false (the damaged checkpoints are then removed), or restore an intact "
            "checkpoint folder from a backup and run again with train.resume=true."
        )
    return Choice(None)


def set_aside(choice: Choice) -> None:
    """Rename the damaged checkpoints newer than the chosen one to damaged-checkpoint-<step> (rank 0 only), so the
    Trainer neither resumes from nor rotates them, and the steps they held are written again."""
    for folder in choice.damaged:
        target = folder.with_name(DAMAGED_PREFIX + folder.name)
        if target.exists():
            target = folder.with_name(f"{DAMAGED_PREFIX}{folder.name}-{int(time.time())}")
        folder.rename(target)
        log.warning("Set aside the damaged %s as %s.", folder.name, target.name)


class MarkComplete(TrainerCallback):
    """After each checkpoint save: wait for every process (each has written its RNG file by now; rank 0 the rest),
    then rank 0 marks the checkpoint complete. Only a marked checkpoint is ever resumed from."""

    def on_save(self, args, state, control, **kwargs):
        dist.barrier()
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"{PREFIX}{state.global_step}"
            if folder.is_dir():
                tmp = folder / (COMPLETE + ".tmp")
                tmp.write_text(json.dumps({"step": state.global_step, "processes": args.world_size}) + "\n")
                tmp.replace(folder / COMPLETE)
        dist.barrier()  # no process moves on (or is killed by a launcher) believing a save finished before it is marked
