"""Failing well: the operating system's errors while a stage writes, damaged artifacts while it reads, and SIGTERM,
each turned into one paragraph (a `MedqaError`, which the CLI prints without a traceback) that says what happened,
to which file, what is intact and what to do.

    fault                                   where it is caught                  becomes
    OSError while writing (ENOSPC, EDQUOT,  `guard(stage)`: around every stage  WriteFailed: the artifact, what is
      EROFS, EFBIG, EIO), also when torch     entry (`locks.locked`, feedback)    intact, free space / `workdir=` /
      or safetensors wrap it in their own                                         the command that writes it again
      error
    a damaged artifact that medqa wrote     `damaged(path, rebuild)`: around    DamagedArtifact: the file and the
      (truncated, garbage, not UTF-8)         each read of one (medqa.workdir,    command that rebuilds it
                                              modeling, tune)
    SIGTERM (kill, systemd, SLURM, k8s)     `sigterm_as_ctrl_c()` (the CLI),    the Ctrl-C path: training saves a
                                              GracefulStop (training), tune's     checkpoint, tune stops through Ray,
                                              `stop_search_on_sigterm`            others leave the previous outputs;
                                                                                  exit 143

Why a guard per stage rather than try/except at each write: every artifact is written atomically
(`medqa.artifacts`), so whichever write fails, what is intact is the same (the previous artifact), and the
paragraph only needs the stage and the failing path, which the exception carries.
"""

from __future__ import annotations

import contextlib
import errno
import pickle
import re
import signal
from collections.abc import Iterator
from pathlib import Path

from medqa.errors import DataError, MedqaError

# errno -> (what happened, what to do about it). EIO is usually a failing disk or a network filesystem that dropped.
REASONS = {
    errno.ENOSPC: ("the disk is full", "free space on that disk (`df -h {where}` shows it)"),
    errno.EDQUOT: ("the disk quota is used up", "free space within your quota (`quota -s`) or ask for more"),
    errno.EROFS: ("the filesystem is read-only", "remount it read-write, or use a writable folder"),
    errno.EFBIG: ("a file grew over the filesystem's size limit", "use a filesystem without that limit"),
    errno.EIO: ("the disk reported an input/output error", "check the disk or the network mount (`dmesg`)"),
}
# How torch, safetensors and Rust-backed libraries spell these errors when they wrap them in their own exception.
_SPELLED = {
    "no space left on device": errno.ENOSPC,
    "disk quota exceeded": errno.EDQUOT,
    "read-only file system": errno.EROFS,
    "file too large": errno.EFBIG,
    "input/output error": errno.EIO,
}
_OS_ERROR = re.compile(r"os error (\d+)|os \{ code: (\d+)")  # Rust: "(os error 28)", "Os { code: 28, ..."

# stage -> (what it writes, which is replaced only when complete; the command that writes it again)
WRITES = {
    "prepare": ("the prepared data (data/ and tokenized/)", "medqa prepare"),
    "baseline": ("the baseline scores (outputs/baseline/)", "medqa baseline"),
    "train": (
        "the run (outputs/finetune/), and the checkpoints that were marked complete (a half-written one is never "
        "resumed from)",
        "medqa train train.resume=true",
    ),
    "tune": (
        "the search's experiment state (outputs/ray_*/, resumable) and outputs/best/",
        "medqa tune tune.resume=true",
    ),
    "benchmark": ("the benchmark results (outputs/benchmarks/)", "medqa benchmark"),
    "evaluate": ("the report (outputs/report.json, report.md) and tradeoff.png", "medqa evaluate"),
    "export": ("the merged model (outputs/merged/)", "medqa export"),
    "feedback": ("the ratings and their summary (outputs/chat/)", "medqa feedback"),
}


class WriteFailed(MedqaError):
    """The operating system refused a write (disk full, read-only, quota, file too large, I/O error)."""


class DamagedArtifact(DataError):
    """A file medqa wrote earlier cannot be read back (cut short, overwritten, not UTF-8)."""


def os_errno(exc: BaseException) -> int | None:
    """The errno of a write failure in `exc` or the exceptions it wraps (torch's RuntimeError, SafetensorError,
    Ray's task errors), when it is one of REASONS; else None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in REASONS:
            return exc.errno
        text = str(exc).lower()
        found = _OS_ERROR.search(text)
        if found and int(found.group(1) or found.group(2)) in REASONS:
            return int(found.group(1) or found.group(2))
        for spelled, code in _SPELLED.items():
            if spelled in text:
                return code
        exc = exc.__cause__ or exc.__context__
    return None


def _failing_path(exc: BaseException) -> tuple[Path | None, Path | None]:
    """(the artifact being written, as `medqa.artifacts` records it; the file the OS named)."""
    artifact, filename = None, None
    while exc is not None and (artifact is None or filename is None):
        artifact = artifact or getattr(exc, "artifact", None)
        if filename is None and isinstance(exc, OSError) and exc.filename:
            filename = Path(exc.filename)
        exc = exc.__cause__ or exc.__context__
    return artifact, filename


def write_paragraph(stage: str, exc: BaseException, workdir: str | Path | None = None) -> str:
    """One paragraph for a write the OS refused during `medqa <stage>`."""
    code = os_errno(exc)
    what, fix = REASONS[code]
    artifact, filename = _failing_path(exc)
    target = artifact or filename
    where = target or workdir or "."
    at = f" (at {filename})" if filename and artifact and filename != artifact else ""
    kept, again = WRITES.get(stage, ("its previous outputs", f"medqa {stage}"))
    kept_at = getattr(exc, "kept_at", None)
    intact = (
        f"the previous version is intact but could not be moved back: it is {kept_at}; rename it to {target} "
        "before anything else"
        if kept_at
        else "the previous version, if any, is intact"
    )
    return (
        f"`medqa {stage}` stopped: {what} ([Errno {code}] {errno.errorcode.get(code, '')}) while writing "
        f"{target or 'its outputs'}{at}. Nothing half-written is left where a later stage would read it: "
        f"{kept} is replaced only once complete, so {intact}. To go on: "
        f"{fix.format(where=where)}, or set `workdir=` to a folder on another disk, then run `{again} --config "
        "<your config>` again."
    )


@contextlib.contextmanager
def guard(stage: str, workdir: str | Path | None = None) -> Iterator[None]:
    """Around a stage: a write the OS refused becomes `WriteFailed` (one paragraph); other errors pass."""
    try:
        yield
    except MedqaError:
        raise
    except Exception as exc:
        if os_errno(exc) is None:
            raise
        raise WriteFailed(write_paragraph(stage, exc, workdir)) from None


def _is_damage(exc: BaseException) -> bool:
    """A parse or read error (not a bug in medqa): JSON, UTF-8, pyarrow, safetensors, pickle-free torch, pickle (Ray
    Tune's own state files), OS."""
    if isinstance(exc, MedqaError):
        return False
    # JSONDecodeError, ArrowInvalid: ValueErrors; a pickle cut short: EOFError or UnpicklingError
    if isinstance(exc, OSError | ValueError | EOFError | UnicodeError | pickle.UnpicklingError):
        return True
    module = type(exc).__module__ or ""
    return module.startswith(("pyarrow", "safetensors")) or type(exc).__name__ in ("SafetensorError", "HeaderTooLarge")


@contextlib.contextmanager
def damaged(path: str | Path, rebuild: str, writer: str = "medqa") -> Iterator[None]:
    """Around reading an artifact medqa wrote (or, `writer`, a library on its behalf: Ray Tune's experiment state):
    a parse or read error becomes `DamagedArtifact`, naming `path` and the command that rebuilds it."""
    try:
        yield
    except Exception as exc:
        if not _is_damage(exc):
            raise
        detail = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise DamagedArtifact(
            f"{path} is damaged and cannot be read ({type(exc).__name__}: {detail}). {writer} wrote it, so it was most "
            "likely cut short by a full disk, a killed copy or a crash. Nothing was changed; rebuild it with "
            f"`{rebuild}` (same config and workdir), then run this again."
        ) from None


# ------------------------------------------------------------------------------------------------ SIGTERM


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C raises KeyboardInterrupt, so every `finally` and atomic write unwinds alike."""


def _ctrl_c_instead(signum, frame):
    """SIGTERM: whatever Ctrl-C does at this moment (GracefulStop's handler while training, Ray Tune's while
    searching); where Ctrl-C would raise KeyboardInterrupt, raise Terminated."""
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler) and handler is not signal.default_int_handler:
        handler(signum, frame)
    else:
        raise Terminated


@contextlib.contextmanager
def sigterm_as_ctrl_c() -> Iterator[None]:
    """For the block, SIGTERM does what Ctrl-C does (the CLI: every stage). Without it Python dies at once on
    SIGTERM, leaving temporary folders and lock records behind."""
    try:
        previous = signal.signal(signal.SIGTERM, _ctrl_c_instead)
    except ValueError:  # not the main thread: signals are not ours to handle
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def keep_sigterm_handler() -> Iterator[None]:
    """Around `ray.init`: keep this process's SIGTERM handler. Ray's driver installs its own, which exits at once
    (mid-write, and after `ray.shutdown` with a bare exit status); medqa's stops gracefully and shuts Ray down in its
    own `finally`."""
    try:
        previous = signal.getsignal(signal.SIGTERM)
    except ValueError:
        previous = None
    try:
        yield
    finally:
        if previous is not None:
            with contextlib.suppress(ValueError, TypeError):  # not the main thread
                signal.signal(signal.SIGTERM, previous)


class SearchStop:
    """Around Ray Tune's `fit`: SIGTERM stops the search as Ctrl-C does (Tune's own stop handler, which stops the
    trials and saves the experiment state), instead of Ray's driver handler, which exits mid-write with a native
    stack dump. `signum` is set when a stop was requested."""

    def __init__(self):
        self.signum = None
        self.previous = None

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise Terminated  # a second SIGTERM: at once
        self.signum = signum
        # Tune's stop handler, which it installs for SIGUSR1 always (and for SIGINT unless told not to): it sets its
        # "interrupted" event; the run loop then stops the trials and saves the experiment state one last time.
        handler = signal.getsignal(signal.SIGUSR1)
        if callable(handler):
            handler(signal.SIGUSR1, frame)
        else:
            raise Terminated  # before Tune installed its handler: unwind (Ray is shut down by the caller)

    def __enter__(self) -> SearchStop:
        with contextlib.suppress(ValueError):  # not the main thread
            self.previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
