"""Fault injection, stage by stage, through the real CLI (`medqa.cli.main`, in this process): a write the OS refuses
(ENOSPC, EIO raised at the stage's first artifact write by patching), an artifact medqa wrote found damaged
(truncated, or filled with garbage, before the stage reads it) and SIGTERM in the middle of the stage. Each asserts:
a non-zero exit code (2: an error to fix; 143: SIGTERM), no traceback on stderr, a message naming the file (and the
command that rebuilds it), the workdir's earlier artifacts byte-identical, and a plain re-run afterwards that
succeeds. The table in README.md's "Reliability" section is this file's parametrisation.

The process-level cases (a real SIGTERM sent to `medqa train` and `medqa tune` in a subprocess; a really full disk, a
small tmpfs, under `medqa export` and `medqa feedback`) are in the slow set at the end. `medqa tune`'s writes and its
experiment's damage are in test_faults_search.py."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO, SAMPLE, demo_config, prepare_demo

CONFIG = REPO / "configs" / "demo.yaml"
FAST = [
    "train.max_steps=12",
    "train.eval_steps=6",
    "train.logging_steps=3",
    "scoring.bootstrap_samples=20",
    "scoring.knowledge_questions=0",
    "generate.max_new_tokens=8",
    "evaluate.num_questions=2",
    "evaluate.pubmedqa_questions=2",
    "evaluate.benchmark_questions=2",
]
# What a stage may change even when it fails: locks, caches, train's checkpoints (a fresh run replaces them) and
# benchmark's generated task files (outputs/benchmarks/tasks/, its input, written again on every run).
VOLATILE = (".locks", ".cache", "finetune_checkpoints", "tasks")


@pytest.fixture(scope="module")
def done(tmp_path_factory) -> Path:
    """A workdir where prepare, baseline, train and evaluate have run: the earlier artifacts every fault keeps."""
    from medqa.evaluate import evaluate
    from medqa.train import train

    work = prepare_demo(tmp_path_factory.mktemp("faults"), *FAST)
    cfg = demo_config(work, *FAST)
    train(cfg)
    evaluate(cfg)
    return work


@pytest.fixture
def work(done, tmp_path) -> Path:
    shutil.copytree(done, tmp_path / "w", symlinks=True)
    return tmp_path / "w"


@pytest.fixture(autouse=True)
def sigterm_kept_from_pytest():
    """A SIGTERM that medqa does not handle fails the test here instead of killing pytest."""

    def unhandled(signum, frame):
        raise AssertionError("SIGTERM reached the default handler: medqa did not handle it")

    previous = signal.signal(signal.SIGTERM, unhandled)
    yield
    signal.signal(signal.SIGTERM, previous)


def run(capsys, work: Path, stage: str, *extra: str) -> tuple[int, str]:
    """`medqa <stage> --config configs/demo.yaml workdir=... data.source=... <FAST> <extra>`: (exit code, stderr)."""
    from medqa.cli import main

    capsys.readouterr()
    try:
        rc = main([stage, "--config", str(CONFIG), f"workdir={work}", f"data.source={SAMPLE}", *FAST, *extra])
    except BaseException as exc:  # what the person would see: a traceback
        import traceback

        return -1, capsys.readouterr().err + "Traceback (most recent call last):\n" + traceback.format_exc() + str(exc)
    return rc, capsys.readouterr().err


def snapshot(work: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(work)): p.read_bytes()
        for p in work.rglob("*")
        if p.is_file() and not any(part in VOLATILE for part in p.relative_to(work).parts)
    }


def assert_kept(before: dict[str, bytes], work: Path) -> None:
    """Every earlier artifact is still there, byte for byte (a stage may have completed new ones before the fault)."""
    now = snapshot(work)
    changed = sorted(k for k, v in before.items() if now.get(k) != v)
    assert not changed, f"earlier artifacts changed or removed: {changed[:10]}"


def assert_failed_well(rc: int, err: str, names: str | Path, expect_rc: int = 2) -> None:
    assert rc == expect_rc, f"exit code {rc}, expected {expect_rc}:\n{err[-3000:]}"
    assert "Traceback" not in err and "Stack trace" not in err, err[-3000:]
    assert str(names) in err, f"the message does not name {names}:\n{err[-3000:]}"


def no_leftovers(work: Path) -> None:
    left = [p for p in work.rglob("*") if ".tmp-" in p.name or ".old-" in p.name]
    assert not left, f"half-written artifacts left behind: {left}"
    assert not list((work / ".locks").glob("*.lock.json")), "a lock holder record was left behind"


# ------------------------------------------------------------------------------------------ writes refused by the OS

# stage -> the artifact its first atomic write replaces (what the message must name)
FIRST_WRITE = {
    "prepare": "data",
    "baseline": "outputs/baseline",
    "train": "outputs/finetune",
    "evaluate": "outputs/report.json",
    "benchmark": "outputs/benchmarks",
    "export": "outputs/merged",
}


def is_artifact(dst) -> bool:
    """A rename that puts an artifact in place: not a lock's holder record, not a cache entry (.cache/)."""
    return not str(dst).endswith(".lock.json") and f"{os.sep}.cache{os.sep}" not in str(dst)


def refuse_renames(monkeypatch, code: int, matches, once: bool = False) -> list:
    """Make the renames that put an artifact `matches(path)` accepts in place fail with `code` (only the first one
    with `once`); the refused targets are returned, in order."""
    calls = []

    def replace(src, dst, *a, **kw):
        if matches(Path(dst)) and not (once and calls):
            calls.append(dst)
            raise OSError(code, os.strerror(code), str(src))
        return os.replace(src, dst, *a, **kw)

    patch_artifact_renames(monkeypatch, replace)
    return calls


def refuse_first_write(monkeypatch, code: int) -> list:
    """Make the first rename that would put an artifact in place fail with `code`, as a full disk does at that
    moment (the data were written into the temporary sibling; the OS refuses the last of it)."""
    return refuse_renames(monkeypatch, code, is_artifact, once=True)


class _OS:
    """`os` as medqa.artifacts sees it, with another `replace`: the fault lands on medqa's artifact writes only,
    never on a rename inside datasets, torch or pytest."""

    def __init__(self, replace):
        self.replace = replace

    def __getattr__(self, name):
        return getattr(os, name)


def patch_artifact_renames(monkeypatch, replace) -> None:
    import medqa.artifacts

    monkeypatch.setattr(medqa.artifacts, "os", _OS(replace))


def test_a_previous_artifact_that_cannot_be_moved_back_is_named_where_it_is(monkeypatch, tmp_path):
    """The rename that puts the new artifact in place fails, and so does the one that would move the previous one
    back (the disk went read-only between them): the previous artifact is whole under its temporary name, and the
    paragraph says where and what to rename, instead of claiming it is in place."""
    from medqa.artifacts import atomic_dir
    from medqa.faults import write_paragraph

    target = tmp_path / "finetune"
    target.mkdir()
    (target / "adapter.bin").write_text("previous")

    refuse_renames(monkeypatch, errno.EROFS, lambda dst: dst == target)  # the new one in place, and the old one back
    with pytest.raises(OSError) as caught, atomic_dir(target) as tmp:
        (tmp / "adapter.bin").write_text("new")
    kept = caught.value.kept_at
    assert not target.exists() and (kept / "adapter.bin").read_text() == "previous"
    said = write_paragraph("train", caught.value)
    assert f"it is {kept}; rename it to {target}" in said and "if any, is intact" not in said
    assert not list(tmp_path.glob(".finetune.tmp-*"))


@pytest.mark.parametrize(
    "stage, code",
    [(s, errno.ENOSPC) for s in FIRST_WRITE] + [(s, errno.EIO) for s in ("prepare", "baseline", "export")],
    ids=lambda v: errno.errorcode[v] if isinstance(v, int) else v,
)
def test_write_refused_by_the_os_is_one_paragraph_and_keeps_the_previous_artifact(
    capsys, monkeypatch, work, stage, code
):
    """Fails on the code before issue 34 with `OSError: [Errno 28] No space left on device` as a traceback."""
    before = snapshot(work)
    calls = refuse_first_write(monkeypatch, code)
    rc, err = run(capsys, work, stage)
    assert calls, f"{stage} made no atomic write"
    assert_failed_well(rc, err, work / FIRST_WRITE[stage])
    assert errno.errorcode[code] in err and "workdir=" in err and f"medqa {stage}" in err
    assert_kept(before, work)
    no_leftovers(work)
    monkeypatch.undo()
    rc, err = run(capsys, work, stage)
    assert rc == 0, err[-3000:]


def test_each_write_errno_has_its_own_advice():
    from medqa.faults import REASONS, write_paragraph

    for code in REASONS:
        exc = OSError(code, os.strerror(code), "/w/outputs/.baseline.tmp-1/metrics.json")
        exc.artifact = Path("/w/outputs/baseline")
        text = write_paragraph("baseline", exc, "/w")
        assert errno.errorcode[code] in text and "/w/outputs/baseline" in text and "medqa baseline" in text
    # torch and safetensors wrap the OS error in their own exception, spelled out
    wrapped = RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: ... })")
    assert "disk is full" in write_paragraph("export", wrapped)
    assert "disk is full" in write_paragraph("export", RuntimeError("file write failed: No space left on device"))


# ------------------------------------------------------------------------------------------ damaged artifacts read


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def garbage(path: Path) -> None:
    path.write_bytes(b"\x00\xff garbage \xfe" * max(1, path.stat().st_size // 13))


def _arrow(work: Path, split: str) -> Path:
    return next((work / "tokenized" / f"tokenized_{split}").glob("*.arrow"))


# (stage, the artifact damaged, how, what the message names, the command that rebuilds it)
DAMAGED = [
    ("train", lambda w: _arrow(w, "train"), truncate, "tokenized/tokenized_train", "medqa prepare"),
    ("baseline", lambda w: _arrow(w, "val"), garbage, "tokenized/tokenized_val", "medqa prepare"),
    ("evaluate", lambda w: w / "data" / "test_data.json", truncate, "data/test_data.json", "medqa prepare"),
    ("train", lambda w: w / "outputs/baseline/metrics.json", garbage, "outputs/baseline/metrics.json", "baseline"),
    ("export", lambda w: w / "outputs/finetune/adapter_model.safetensors", truncate, "outputs/finetune", "medqa train"),
    ("benchmark", lambda w: w / "outputs/finetune/adapter_model.safetensors", garbage, "outputs/finetune", "train"),
]


@pytest.mark.parametrize(
    "stage, target, damage, names, rebuild",
    DAMAGED,
    ids=[f"{d[0]}-{d[3].rsplit('/', 1)[-1]}-{d[2].__name__}" for d in DAMAGED],
)
def test_damaged_artifact_is_named_with_its_rebuild_command(capsys, work, stage, target, damage, names, rebuild):
    """Fails on the code before issue 34 with a traceback from pyarrow, json or safetensors."""
    path = target(work)
    original = path.read_bytes()
    damage(path)
    before = snapshot(work)
    rc, err = run(capsys, work, stage)
    assert_failed_well(rc, err, work / names)
    assert rebuild in err
    assert_kept(before, work)  # the damaged file too: left for the person to see
    no_leftovers(work)
    path.write_bytes(original)  # what the rebuild command would write again; then a plain re-run succeeds
    rc, err = run(capsys, work, stage)
    assert rc == 0, err[-3000:]


def test_damaged_split_is_rebuilt_by_the_command_the_message_names(capsys, work):
    damage = _arrow(work, "train")
    truncate(damage)
    rc, err = run(capsys, work, "train")
    assert_failed_well(rc, err, damage.parent)
    rc, err = run(capsys, work, "prepare")  # `medqa prepare`, as the message says
    assert rc == 0, err[-3000:]
    rc, err = run(capsys, work, "train")
    assert rc == 0, err[-3000:]


# ------------------------------------------------------------------------------------------ SIGTERM


def sigterm_at_first_write(monkeypatch) -> None:
    """SIGTERM to this process just before the stage's first artifact would be put in place."""

    def replace(src, dst, *a, **kw):
        if is_artifact(dst):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.5)  # the handler runs at the next bytecode
        return os.replace(src, dst, *a, **kw)

    patch_artifact_renames(monkeypatch, replace)


@pytest.mark.parametrize("stage", ["prepare", "baseline", "evaluate", "benchmark", "export"])
def test_sigterm_leaves_the_previous_outputs(capsys, monkeypatch, work, stage):
    """Fails on the code before issue 34: SIGTERM reaches Python's default action (the process dies where it is,
    its temporary folders and lock record left behind)."""
    before = snapshot(work)
    sigterm_at_first_write(monkeypatch)
    rc, err = run(capsys, work, stage)
    assert_failed_well(rc, err, "SIGTERM", expect_rc=143)
    assert "intact" in err
    assert_kept(before, work)
    no_leftovers(work)
    monkeypatch.undo()
    rc, err = run(capsys, work, stage)
    assert rc == 0, err[-3000:]


def test_sigterm_during_training_saves_a_checkpoint_and_says_how_to_resume(capsys, monkeypatch, work):
    """Fails on the code before issue 34: training handled SIGINT only."""
    from medqa.trainer import StopOnRequest

    real = StopOnRequest.on_step_end

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == 4:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, args, state, control, **kw)

    monkeypatch.setattr(StopOnRequest, "on_step_end", on_step_end)
    before = snapshot(work)
    rc, err = run(capsys, work, "train")
    assert_failed_well(rc, err, "train.resume=true", expect_rc=143)
    assert "SIGTERM" in err
    assert (work / "outputs/finetune_checkpoints/checkpoint-4/medqa_complete.json").exists()
    assert_kept(before, work)  # outputs/finetune/: the previous run's, untouched
    monkeypatch.undo()
    rc, err = run(capsys, work, "train", "train.resume=true")
    assert rc == 0, err[-3000:]


# ------------------------------------------------------------------------------------------ feedback and ratings

PREFERENCES = "outputs/chat/dpo.jsonl"  # where the tests export the preference pairs (inside the workdir: kept too)


@pytest.fixture(scope="module")
def rated(tmp_path_factory) -> Path:
    """A workdir with the tiny model, three ratings written by the chat page's writer, and their summary and
    preference pairs from one `medqa feedback`: what a refused write must keep."""
    from test_feedback import _rate

    from medqa.feedback import feedback
    from medqa.prepare import make_tiny_model

    work = tmp_path_factory.mktemp("rated")
    cfg = demo_config(work)
    make_tiny_model(cfg)
    for n, (first, side, rating) in enumerate([("fine-tuned", "A", "better"), ("base", "A", "better")]):
        _rate(cfg, n, first, side, rating)
    feedback(cfg, work / PREFERENCES)
    return work


@pytest.fixture
def rated_work(rated, tmp_path) -> Path:
    shutil.copytree(rated, tmp_path / "w", symlinks=True)
    return tmp_path / "w"


def run_feedback(capsys, work: Path) -> tuple[int, str]:
    return run(capsys, work, "feedback", "--export-preferences", str(work / PREFERENCES))


def refuse_rename_of(monkeypatch, code: int, name: str) -> list:
    """The rename that puts the file called `name` in place fails with `code`."""
    return refuse_renames(monkeypatch, code, lambda dst: dst.name == name)


@pytest.mark.parametrize(
    "code, name",
    [(errno.ENOSPC, "dpo.jsonl"), (errno.EIO, "feedback_summary.json")],
    ids=["ENOSPC-preferences", "EIO-summary"],
)
def test_feedback_write_refused_keeps_the_ratings_and_the_previous_summary(capsys, monkeypatch, rated_work, code, name):
    """`medqa feedback` when the OS refuses its preference file (its first write) or its summary: one paragraph
    naming the file, feedback.jsonl and the previous summary and pairs byte-identical, nothing half-written."""
    work = rated_work
    before = snapshot(work)
    calls = refuse_rename_of(monkeypatch, code, name)
    rc, err = run_feedback(capsys, work)
    assert calls, f"feedback did not write {name}"
    assert_failed_well(rc, err, next(work.rglob(name)))
    assert errno.errorcode[code] in err and "medqa feedback" in err
    assert_kept(before, work)
    no_leftovers(work)
    monkeypatch.undo()
    rc, err = run_feedback(capsys, work)
    assert rc == 0, err[-3000:]


def test_sigterm_during_feedback_keeps_the_ratings_and_the_previous_summary(capsys, monkeypatch, rated_work):
    """SIGTERM as `medqa feedback` puts its first file in place: exit 143, one paragraph, nothing changed."""
    before = snapshot(rated_work)
    sigterm_at_first_write(monkeypatch)
    rc, err = run_feedback(capsys, rated_work)
    assert_failed_well(rc, err, "SIGTERM", expect_rc=143)
    assert "intact" in err
    assert_kept(before, rated_work)
    no_leftovers(rated_work)
    monkeypatch.undo()
    rc, err = run_feedback(capsys, rated_work)
    assert rc == 0, err[-3000:]


class _HalfWrite:
    """A file whose write puts half of its bytes on disk, then fails as a disk that filled up midway does."""

    def __init__(self, fh):
        self._fh = fh

    def write(self, data):
        self._fh.write(data[: len(data) // 2])
        self._fh.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self._fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._fh.close()


def test_a_rating_cut_off_by_a_full_disk_leaves_no_partial_line(monkeypatch, rated_work):
    """The chat page's append (`record_feedback`) failing midway: the error is raised and feedback.jsonl is back to
    its earlier ratings, so the next rating is a whole line. Before: the half line stayed, and the next rating was
    appended onto it, so both were lost (one damaged line)."""
    from test_feedback import _rate

    import medqa.ratings
    from medqa.ratings import read_feedback

    cfg = demo_config(rated_work)
    path = rated_work / "outputs/chat/feedback.jsonl"
    before = path.read_bytes()
    monkeypatch.setattr(medqa.ratings, "open", lambda *a, **kw: _HalfWrite(open(*a, **kw)), raising=False)
    with pytest.raises(OSError):
        _rate(cfg, 2, "base", "B", "worse")
    assert path.read_bytes() == before
    monkeypatch.undo()
    _rate(cfg, 3, "base", "B", "worse")
    ratings, problems = read_feedback(path)
    assert (len(ratings), problems) == (3, [])


def test_the_chat_page_says_a_rating_was_not_saved_and_stays_up(monkeypatch, rated_work):
    """The chat page's rating handler when the OS refuses the append (disk full): the page's status says the rating
    was not saved, names feedback.jsonl, says the earlier ratings are intact and what to do; nothing is raised into
    gradio (before: the raw OSError, shown as a bare "Error"). The next rating, once the disk has room, is saved."""
    import types

    import medqa.chat
    from medqa.chat import Handlers, Side

    cfg = demo_config(rated_work)
    path = rated_work / "outputs/chat/feedback.jsonl"
    before = path.read_bytes()
    sides = [Side(n, None, None, {"label": n}) for n in ("base", "fine-tuned")]
    handlers = Handlers(cfg, sides, {}, types.SimpleNamespace(status="status"), True, False)
    shown = {"question": "q", "answers": {"base": "a", "fine-tuned": "b"}, "order": {"A": "base", "B": "fine-tuned"}}

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(medqa.chat, "record_feedback", full)
    said = handlers.rate("A", "better", shown, "")["status"]
    assert "not saved" in said and "outputs/chat/feedback.jsonl" in said and "No space left on device" in said
    assert "intact" in said and "Free some space" in said
    assert path.read_bytes() == before
    monkeypatch.undo()
    assert handlers.rate("A", "better", shown, "")["status"].startswith("Saved your rating of A")
    assert len(path.read_bytes().splitlines()) == len(before.splitlines()) + 1


def test_a_rating_after_a_line_cut_by_a_kill_starts_its_own_line(rated_work):
    """A line cut short where no handler could mend it (kill -9, power loss mid-append): the next rating starts a
    line of its own, so only the cut line is reported and skipped. Before: the rating was glued onto it and lost."""
    from test_feedback import _rate

    from medqa.ratings import read_feedback

    path = rated_work / "outputs/chat/feedback.jsonl"
    with open(path, "a", encoding="utf-8") as fh:
        fh.write('{"question": "cut off wh')
    _rate(demo_config(rated_work), 2, "base", "B", "worse")
    ratings, problems = read_feedback(path)
    assert len(ratings) == 3 and [number for number, _ in problems] == [3]


# ------------------------------------------------------------------------------------------ real signals (slow)


def _cli(work: Path, stage: str, *extra: str, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "medqa", stage, "--config", str(CONFIG), f"workdir={work}", f"data.source={SAMPLE}"]
        + [*FAST, *extra],
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
        env={**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"},
        cwd=REPO,
    )


def _wait_for(pattern: str, root: Path, proc: subprocess.Popen, log: Path, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while not list(root.glob(pattern)):
        assert proc.poll() is None, "the run ended before the signal:\n" + log.read_text()[-3000:]
        assert time.time() < deadline, f"timed out waiting for {root}/{pattern}"
        time.sleep(0.2)


@pytest.mark.slow
def test_sigterm_to_a_training_process_exits_143_and_resumes(work, tmp_path):
    """A real SIGTERM to `medqa train` in its own process (as kill, systemd or SLURM send it), which the in-process
    test above only imitates with os.kill from inside the Trainer: the process exits 143 with one line saying how to
    resume, no traceback, and `train.resume=true` finishes the run. Before issue 34: killed at once, exit -15.
    Slow: a real process and a real signal."""
    log = tmp_path / "train.log"
    shutil.rmtree(work / "outputs" / "finetune_checkpoints")  # the fixture's: wait for this run's own checkpoint
    proc = _cli(work, "train", "train.max_steps=200", log=log)
    try:
        _wait_for("outputs/finetune_checkpoints/checkpoint-6/medqa_complete.json", work, proc, log)
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = log.read_text()
    assert rc == 143, out[-3000:]
    assert "Traceback" not in out and "train.resume=true" in out
    no_leftovers(work)
    log = tmp_path / "train-resumed.log"
    proc = _cli(work, "train", "train.max_steps=200", "train.resume=true", log=log)
    assert proc.wait(timeout=900) == 0, log.read_text()[-3000:]


@pytest.mark.slow
def test_sigterm_to_a_search_stops_it_through_ray_and_resumes(work, tmp_path):
    """A real SIGTERM to `medqa tune` while its trials run: Ray Tune stops the trials and keeps the experiment
    state (Tune's own Ctrl-C path), the process exits 143 naming `tune.resume=true`, with no Python traceback and
    no native stack dump; then `tune.resume=true` finishes the search. Before issue 34: Ray's driver SIGTERM handler
    ended it with a native stack dump (exit 134). Slow: needs Ray and about two minutes of 2 CPU cores."""
    log = tmp_path / "tune.log"
    steps = ["train.max_steps=60", "tune.num_samples=2", "tune.max_concurrent=1"]
    proc = _cli(work, "tune", *steps, log=log)
    try:
        _wait_for("outputs/ray_*/*/checkpoint_*", work, proc, log)
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = log.read_text()
    assert rc == 143, out[-3000:]
    for crash in ("Traceback", "Stack trace", "*** SIG", "core dumped"):
        assert crash not in out, out[-3000:]
    assert "tune.resume=true" in out
    log = tmp_path / "tune-resumed.log"  # the stopped run's log stays for a person to read
    proc = _cli(work, "tune", *steps, "tune.resume=true", log=log)
    assert proc.wait(timeout=1200) == 0, log.read_text()[-3000:]
    assert (work / "outputs" / "best" / "adapter_config.json").exists()


@pytest.fixture
def small_disk(tmp_path) -> Iterator[Path]:
    """A 128 MiB tmpfs at tmp_path/disk, unmounted afterwards. Mounting needs root (CAP_SYS_ADMIN): skipped
    without."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=128m", "tmpfs", str(disk)]
    if shutil.which("mount") is None or subprocess.run(mount, capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root): the really-full-disk cases are not checked")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def fill(disk: Path, leave: int) -> Path:
    """Write a filler file until `leave` bytes are free on `disk` (tmpfs allocates what is written)."""
    stat = os.statvfs(disk)
    todo = stat.f_bavail * stat.f_frsize - leave
    filler = disk / "filler"
    chunk = b"\0" * (1 << 20)
    with open(filler, "wb") as fh:
        while todo > 0:
            todo -= fh.write(chunk[: min(len(chunk), todo)])
    return filler


@pytest.mark.slow
@pytest.mark.parametrize(
    "fixture, stage, artifact, leave",
    [("done", "export", "outputs/merged", 64 << 10), ("rated", "feedback", PREFERENCES, 0)],
    ids=["export", "feedback"],
)
def test_a_really_full_disk_is_one_paragraph_and_a_rerun_after_freeing_space_succeeds(
    request, small_disk, tmp_path, fixture, stage, artifact, leave
):
    """The disk really full (a small tmpfs filled up; `leave` bytes free so that export's lock record still fits and
    its merged model does not), in a `medqa` process of its own. Slow; what no patched test checks: the OS's own
    ENOSPC as the writing library raises it (safetensors and torch wrap it in their own error), and the temporary
    files removed on a disk with no room left. Exit 2, one paragraph naming the artifact, no traceback, the earlier
    artifacts byte-identical; once space is freed, the same command succeeds."""
    work = small_disk / "w"
    shutil.copytree(request.getfixturevalue(fixture), work, symlinks=True)
    before = snapshot(work)
    filler = fill(small_disk, leave)
    extra = ("--export-preferences", str(work / PREFERENCES)) if stage == "feedback" else ()
    log = tmp_path / f"{stage}.log"
    rc = _cli(work, stage, *extra, log=log).wait(timeout=900)
    out = log.read_text()
    assert_failed_well(rc, out, work / artifact)
    assert "ENOSPC" in out
    assert_kept(before, work)
    no_leftovers(work)
    filler.unlink()  # "free space on that disk", as the paragraph says
    log = tmp_path / f"{stage}-again.log"
    assert _cli(work, stage, *extra, log=log).wait(timeout=900) == 0, log.read_text()[-3000:]
