"""One writer per workdir stage: a file lock (the `filelock` package) under `<workdir>/.locks/`.

The rule: every stage that writes (benchmark too) holds the lock named after itself for its whole run, and only
that one.

    stage      lock                        what it writes (medqa.workdir)
    prepare    .locks/prepare.lock         data/, tokenized/, .cache/prepare/ (and the tiny demo model)
    baseline   .locks/baseline.lock        outputs/baseline/
    train      .locks/train.lock           outputs/finetune_checkpoints/, outputs/finetune/
    tune       .locks/tune.lock            outputs/ray_*/, outputs/best/
    benchmark  .locks/benchmark.lock       outputs/benchmarks/
    evaluate   .locks/evaluate.lock        outputs/report.{json,md}, outputs/external/
    export     .locks/export.lock          outputs/merged/

So a second run of one stage on one workdir is refused at once (it would remove the first one's checkpoints, or
replace its outputs under it), with one paragraph naming the holder (pid, host, command, since when) and what to
do. Different stages write different folders and run side by side. A stage that reads another's artifacts (train
reading tokenized/, evaluate reading outputs/finetune/), and `ask`, take no lock and never wait: every artifact is
replaced atomically (`medqa.artifacts`) and checked against its manifest, so a reader sees the previous complete
version or the new one. A Ray Tune search holds the tune lock; its trials (`train(..., trial=True)`, each in its own
folder) take none. Under torchrun / accelerate launch only rank 0 holds the lock; the other ranks learn from it
whether it was refused, so all stop alike.

Who holds a lock is written beside it, `<stage>.lock.json` (pid, host, command, since), after acquiring, and
removed on release. The lock itself is `filelock.FileLock`: flock(2), which the kernel releases when its process
ends, however it ends. A holder record found on acquiring is therefore one whose process died without releasing
(killed, or crashed): the lock is taken over with a warning naming it. On a filesystem without flock, filelock
falls back to its soft lock (a marker file with the holder's pid). Over NFS, flock works between hosts through the
server's lock manager (Linux NFS clients map it to POSIX locks); if a holder on another host died and its lock
was not freed, the message says to delete the lock file.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import logging
import os
import shlex
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from medqa import distributed as dist
from medqa.artifacts import write_json
from medqa.errors import MedqaError
from medqa.faults import guard
from medqa.schema import Config
from medqa.workdir import paths

log = logging.getLogger(__name__)

STAGES = ("prepare", "baseline", "train", "tune", "benchmark", "evaluate", "export")


class LockedError(MedqaError):
    """Another process is running the same stage on this workdir."""


def holder_record(stage: str) -> dict:
    """Who holds the lock: this process."""
    program = Path(sys.argv[0]).name if sys.argv and sys.argv[0] not in ("", "-", "-c") else "python"
    if program == "__main__.py":  # python -m medqa
        program = f"python -m {Path(sys.argv[0]).parent.name}"
    return {
        "stage": stage,
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": " ".join([program, *(shlex.quote(a) for a in sys.argv[1:])]),
        "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "since_epoch": time.time(),
    }


def _read_holder(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        return True
    return True


def _describe(holder: dict | None) -> str:
    if not holder:
        return "a process that has not recorded itself yet (it is just starting)"
    age = time.time() - float(holder.get("since_epoch", time.time()))
    ago = f"{age / 3600:.1f} h ago" if age >= 3600 else f"{age / 60:.0f} min ago" if age >= 60 else f"{age:.0f} s ago"
    return (
        f"pid {holder.get('pid')} on host {holder.get('host')}, command `{holder.get('command')}`, since "
        f"{holder.get('since')} ({ago})"
    )


def _refusal(stage: str, lock: Path, record: Path, holder: dict | None) -> str:
    pid, host = (holder or {}).get("pid", "?"), (holder or {}).get("host", "its host")
    return (
        f"Another `medqa {stage}` is running on this workdir: {lock} is held by {_describe(holder)}. Two "
        f"{stage} runs on one workdir would overwrite each other's outputs, so this one stops before writing "
        f"anything. Wait until it finishes, or stop it (e.g. `kill {pid}` on {host}); if it is no longer running "
        f"on {host} (a crashed host on a shared filesystem), delete {lock} and {record} and run again. Reading "
        "(`medqa ask`, other stages) is not blocked."
    )


def _takeover_warning(stage: str, previous: dict) -> None:
    if previous.get("host") == socket.gethostname():
        state = "is no longer running" if not _alive(int(previous.get("pid", 0))) else "no longer holds it"
        log.warning(
            "Took over the %s lock of %s: that process %s (killed or crashed without releasing it), so "
            "what it was writing may be incomplete; medqa's atomic artifacts and complete-checkpoint checks "
            "keep only finished work.",
            stage,
            _describe(previous),
            state,
        )
    else:
        log.warning(
            "Took over the %s lock recorded for %s: it ended without releasing it, or this filesystem does "
            "not share locks between hosts (then do not run one stage on two hosts at once).",
            stage,
            _describe(previous),
        )


@contextlib.contextmanager
def hold(cfg: Config, stage: str) -> Iterator[Path | None]:
    """Hold `stage`'s lock on `cfg.workdir` for the block, or raise LockedError at once (no waiting). Yields the
    lock file (None on ranks other than 0, which hold nothing)."""
    from filelock import FileLock, Timeout

    if stage not in STAGES:
        raise ValueError(f"no lock for stage {stage!r}; stages: {', '.join(STAGES)}")
    # several processes: join the group first (train.ddp_timeout), so rank 0 can tell the others whether it got it
    dist.init(cfg.train.ddp_timeout)
    if not dist.is_main():
        if dist.any_rank(False):  # pairs with rank 0's any_rank below
            raise LockedError(
                f"Rank 0 was refused the {stage} lock on {paths(cfg).root} (its message says by whom); "
                "this process stops too."
            )
        yield None
        return
    lock_path, record_path = paths(cfg).lock(stage), paths(cfg).lock_holder(stage)
    lock = FileLock(lock_path, timeout=0)
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        lock.acquire(blocking=False)
    except Timeout:
        dist.any_rank(True)
        raise LockedError(_refusal(stage, lock_path, record_path, _read_holder(record_path))) from None
    except OSError as exc:
        dist.any_rank(True)
        raise MedqaError(
            f"Cannot create the {stage} lock {lock_path}: {exc.strerror or exc}. Every stage that "
            "writes needs a writable workdir; make it writable or set workdir to a folder that is."
        ) from None
    try:
        dist.any_rank(False)
        previous = _read_holder(record_path)
        if previous and previous.get("pid") != os.getpid():
            _takeover_warning(stage, previous)
        write_json(record_path, holder_record(stage))
        yield lock_path
    finally:
        # The record goes first: once the lock is free, the file may already be the next holder's.
        with contextlib.suppress(OSError):
            record_path.unlink()
        lock.release()


def locked(stage: str, unless: str | None = None) -> Callable:
    """Decorate a stage's entry function `fn(cfg, ...)` to run under `hold(cfg, stage)` and `faults.guard`. `unless`:
    the name of a boolean parameter that, when true, runs without the lock (train's `trial`: a Ray trial under the
    search's lock)."""

    def wrap(fn: Callable) -> Callable:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def run(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            cfg = bound.arguments["cfg"]
            # A write the OS refuses (disk full, read-only...) becomes one paragraph (medqa.faults), in every stage.
            with guard(stage, cfg.workdir):
                if unless and bound.arguments[unless]:
                    return fn(*args, **kwargs)
                with hold(cfg, stage):
                    return fn(*args, **kwargs)

        return run

    return wrap
