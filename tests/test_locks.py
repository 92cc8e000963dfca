"""One writer per workdir stage (medqa.locks): a second `medqa train` on one workdir is refused in one paragraph
while the first runs to a correct end; a lock left by a killed process is taken over with a warning; readers, Ray
trials and ranks other than 0 take no lock."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, SAMPLE, demo_config

from medqa import locks
from medqa.errors import MedqaError
from medqa.workdir import paths

QUICK = [
    "train.max_steps=4",
    "train.eval_steps=2",
    "train.logging_steps=2",
    "scoring.bootstrap_samples=20",
    "generate.max_new_tokens=4",
]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from medqa.prepare import prepare

    workdir = tmp_path_factory.mktemp("locks")
    prepare(demo_config(workdir, *QUICK))  # no baseline: nothing here reads it
    return workdir


def _medqa(args: list[str], out: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "medqa", *args],
        stdout=open(out, "w"),
        stderr=subprocess.STDOUT,
        env=os.environ.copy(),
        cwd=REPO,
    )


def _train_args(workdir: Path) -> list[str]:
    return ["train", "--config", "configs/demo.yaml", f"workdir={workdir}", f"data.source={SAMPLE}", *QUICK]


@pytest.fixture(scope="module")
def raced(prepared, tmp_path_factory):
    """Two `medqa train` on one workdir. The first is paused (SIGSTOP) as soon as its lock record appears, so the
    second certainly starts while the first holds the lock; then the first continues to its end."""
    logs = tmp_path_factory.mktemp("race")
    holder = paths(demo_config(prepared)).lock_holder("train")
    first = _medqa(_train_args(prepared), logs / "first.log")
    try:
        deadline = time.time() + 120
        while not holder.exists():
            assert first.poll() is None, (logs / "first.log").read_text()[-3000:]
            assert time.time() < deadline, "the first training never took the lock"
            time.sleep(0.02)
        first.send_signal(signal.SIGSTOP)
        assert json.loads(holder.read_text())["pid"] == first.pid
        second = _medqa(_train_args(prepared), logs / "second.log")
        second_rc = second.wait(timeout=180)
        first.send_signal(signal.SIGCONT)
        first_rc = first.wait(timeout=300)
    finally:
        if first.poll() is None:
            first.send_signal(signal.SIGCONT)
            first.kill()
    return {
        "workdir": prepared,
        "first": (first_rc, (logs / "first.log").read_text(), first.pid),
        "second": (second_rc, (logs / "second.log").read_text()),
    }


def test_second_training_is_refused_in_one_paragraph(raced):
    rc, out = raced["second"]
    first_pid = raced["first"][2]
    assert rc == 2, out[-3000:]
    assert "Traceback" not in out
    [line] = [x for x in out.splitlines() if x.startswith("medqa train: error:")]  # one paragraph, one line
    assert "Another `medqa train` is running on this workdir" in line
    assert f"pid {first_pid} on host {socket.gethostname()}" in line and "-m medqa train" in line
    assert "since" in line and f"kill {first_pid}" in line and "train.lock" in line


def test_the_surviving_training_rescores_to_its_reported_loss(raced):
    from medqa.batching import eval_tokens_per_batch
    from medqa.metrics import EVAL_SPLITS, evaluate_answer_loss
    from medqa.modeling import load_adapter_model, load_tokenizer
    from medqa.workdir import load_split

    rc, out, _ = raced["first"]
    assert rc == 0 and "Traceback" not in out, out[-3000:]
    cfg = demo_config(raced["workdir"], *QUICK)
    folder = paths(cfg).finetune
    reported = json.loads((folder / "metrics.json").read_text())
    assert reported["steps"] == 4
    model = load_adapter_model(cfg, folder)
    pad = load_tokenizer(cfg).pad_token_id
    for split in EVAL_SPLITS:
        metrics, _ = evaluate_answer_loss(
            model,
            load_split(cfg, split),
            pad,
            cfg.scoring.batch_size,
            0,
            tokens_per_batch=eval_tokens_per_batch(cfg.scoring.tokens_per_batch, model),
        )
        assert metrics["answer_loss"] == pytest.approx(reported[split]["answer_loss"], abs=1e-6)
    assert not paths(cfg).lock_holder("train").exists()  # released: the record is gone


def test_readers_are_not_blocked_by_a_held_lock(raced):
    from medqa.ask import ask
    from medqa.modeling import load_adapter_model

    cfg = demo_config(raced["workdir"], *QUICK)
    with locks.hold(cfg, "train"), locks.hold(cfg, "evaluate"):
        answers = ask(cfg, ["I have a headache and a fever since yesterday, what should I do?"], paths(cfg).finetune)
        assert len(answers) == 1 and answers[0]
        load_adapter_model(cfg, paths(cfg).finetune)


def test_lock_of_a_killed_process_is_taken_over_with_a_warning(prepared, caplog):
    cfg = demo_config(prepared)
    code = (
        "import os, sys\nfrom medqa.config import load_config\nfrom medqa import locks\n"
        f"cfg = load_config(None, ['workdir={prepared}'])\n"
        "with locks.hold(cfg, 'prepare'):\n    os.kill(os.getpid(), 9)\n"
    )
    killed = subprocess.run([sys.executable, "-c", code], env=os.environ.copy(), cwd=REPO, capture_output=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-2000:]
    record = paths(cfg).lock_holder("prepare")
    left = json.loads(record.read_text())  # the killed holder never removed its record
    assert left["pid"] != os.getpid() and left["host"] == socket.gethostname()
    with caplog.at_level(logging.WARNING, logger="medqa.locks"):
        with locks.hold(cfg, "prepare"):
            assert json.loads(record.read_text())["pid"] == os.getpid()
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert f"Took over the prepare lock of pid {left['pid']}" in warning and "no longer running" in warning
    assert not record.exists()


def test_refusal_names_the_holder_and_what_to_do(prepared):
    cfg = demo_config(prepared)
    with locks.hold(cfg, "baseline") as lock:
        with pytest.raises(locks.LockedError) as info:
            with locks.hold(cfg, "baseline"):
                pass
        with locks.hold(cfg, "export"):  # another stage writes other folders: not blocked
            pass
    message = str(info.value)
    assert "\n" not in message and f"pid {os.getpid()} on host {socket.gethostname()}" in message
    assert str(lock) in message and "Wait until it finishes" in message and "delete" in message
    with locks.hold(cfg, "baseline"):  # released on leaving the block
        pass


def test_a_ray_trial_trains_under_a_held_train_lock(prepared, tmp_path):
    from medqa.train import train

    cfg = demo_config(prepared, *QUICK, "train.max_steps=2")
    with locks.hold(cfg, "train"):
        result = train(cfg, run_dir=tmp_path / "trial", trial=True)
        with pytest.raises(locks.LockedError):
            train(cfg)  # an ordinary training is still refused
    assert result.metrics["steps"] == 2


def test_only_rank_0_holds_the_lock(prepared, monkeypatch):
    cfg = demo_config(prepared)
    with locks.hold(cfg, "train"):
        monkeypatch.setenv("RANK", "1")  # another process of the same torchrun job: it holds nothing
        with locks.hold(cfg, "train") as held:
            assert held is None
        monkeypatch.setenv("RANK", "0")
        with pytest.raises(locks.LockedError):
            with locks.hold(cfg, "train"):
                pass


def test_a_lock_that_cannot_be_created_is_one_clear_error(tmp_path):
    cfg = demo_config(tmp_path)
    (tmp_path / ".locks").write_text("a file where the lock folder should be")
    with pytest.raises(MedqaError, match="Cannot create the prepare lock.*writable workdir") as info:
        with locks.hold(cfg, "prepare"):
            pass
    assert not isinstance(info.value, locks.LockedError)


def test_torchrun_refused_on_every_rank_without_a_hang(prepared, tmp_path):
    """Rank 0 is refused; it tells rank 1 (which holds nothing), so both stop with the message, none waits."""
    cfg = demo_config(prepared)
    log = tmp_path / "torchrun.log"
    outputs = paths(cfg).outputs

    def state():
        return {p: p.stat().st_mtime_ns for p in outputs.rglob("*")} if outputs.exists() else {}

    before = state()
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "medqa",
        *_train_args(prepared),
    ]
    with locks.hold(cfg, "train"):
        proc = subprocess.run(
            cmd,
            stdout=open(log, "w"),
            stderr=subprocess.STDOUT,
            cwd=REPO,
            timeout=240,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
    text = log.read_text()
    assert proc.returncode != 0
    assert text.count("Another `medqa train` is running on this workdir") == 1, text[-3000:]  # rank 0
    assert "Rank 0 was refused the train lock" in text  # rank 1
    assert state() == before  # nothing written, nothing removed
