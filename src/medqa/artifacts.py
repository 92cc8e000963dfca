"""Atomic artifacts: a stage writes into a temporary folder beside its target and renames it into place only
when complete, so a crash at any moment leaves the previous complete artifact or none, never half of one."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary folder; on success it replaces `target`, on error it is removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        _name(exc, target, outer=True)
        raise
    # Two renames: between them only `old` exists; a crash there loses nothing complete.
    try:
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
    except BaseException as exc:  # a full disk or SIGTERM here: the previous one back, the new one removed
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not target.exists():
            try:
                os.replace(old, target)
            except OSError:  # the OS refuses this rename too: the previous one is whole, under its temporary name
                with contextlib.suppress(AttributeError, TypeError):
                    exc.kept_at = old
        _name(exc, target, outer=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write a file through a temporary sibling and os.replace (atomic on POSIX)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException as exc:  # a full disk mid-write: remove the partial sibling, keep the previous file
        tmp.unlink(missing_ok=True)
        _name(exc, path)
        raise


def _name(exc: BaseException, target: Path, outer: bool = False) -> None:
    """Record on the exception which artifact was being written, for `medqa.faults`' message: the OS names a file
    inside the temporary folder, the person needs the artifact it stands for (the outermost folder, else the file)."""
    if outer or getattr(exc, "artifact", None) is None:
        with contextlib.suppress(AttributeError, TypeError):
            exc.artifact = target


def write_json(path: str | Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n")


def replace_together(texts: dict[Path, str]) -> None:
    """Write each file through a temporary sibling, then rename them all into place; on any error the files already
    replaced get their previous version back (or are removed when there was none)."""
    tag = f"tmp-{os.getpid()}"
    temps = {path: path.parent / f".{path.name}.{tag}" for path in texts}
    olds = {path: path.parent / f".{path.name}.old-{os.getpid()}" for path in texts}
    replaced: list[Path] = []
    for old in olds.values():  # left by a crash of this process id
        old.unlink(missing_ok=True)
    try:
        for path, text in texts.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            temps[path].write_text(text, encoding="utf-8")
        for path in texts:
            if path.exists():
                shutil.copyfile(path, olds[path])  # the previous version, kept until every file is in place
            os.replace(temps[path], path)  # atomic: on failure `path` is still the previous version
            replaced.append(path)
    except BaseException as exc:
        for path in replaced:
            if olds[path].exists():
                os.replace(olds[path], path)
            else:
                path.unlink(missing_ok=True)
        for temp in temps.values():
            temp.unlink(missing_ok=True)
        _name(exc, next(iter(texts)))
        raise
    finally:
        for old in olds.values():
            old.unlink(missing_ok=True)
