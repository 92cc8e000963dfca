"""Resume checks what it resumes: a damaged newest checkpoint (truncated weights, missing optimizer, missing RNG
file) is named, set aside, and the run continues from the intact one before it to the same result as an
uninterrupted run; with none intact it refuses in one paragraph."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
from conftest import copy_workdir, demo_config, prepare_demo

# 6 steps, a checkpoint every 2, all kept: checkpoint-4 is the one before the newest.
RUN = [
    "train.max_steps=6",
    "train.eval_steps=2",
    "train.logging_steps=1",
    "train.save_total_limit=5",
    "scoring.bootstrap_samples=0",
    "train.report_to=[]",
]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One uninterrupted run: its workdir (checkpoints 2, 4, 6) and its metrics."""
    from medqa.train import train

    workdir = prepare_demo(tmp_path_factory.mktemp("ckpt"), *RUN)
    result = train(demo_config(workdir, *RUN))
    return workdir, result.metrics


def _checkpoints(workdir):
    return workdir / "outputs" / "finetune_checkpoints"


def _truncate_weights(folder):
    w = folder / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])


DAMAGE = {
    "truncated weights": _truncate_weights,
    "missing optimizer": lambda folder: (folder / "optimizer.pt").unlink(),
    "missing RNG file": lambda folder: (folder / "rng_state.pth").unlink(),
}


@pytest.mark.parametrize(
    "damage",
    [d if d == "truncated weights" else pytest.param(d, marks=pytest.mark.slow) for d in DAMAGE],
)
def test_damaged_newest_checkpoint_resumes_from_the_one_before(finished, tmp_path, damage, caplog):
    """The newest checkpoint damaged is set aside and the run resumes from the one before, to the uninterrupted
    result. Truncated weights run in the fast set; the missing optimizer and RNG file twins are slow and the only
    tests that those files' absence is found before resuming."""
    from medqa.train import train

    source, full = finished
    workdir = copy_workdir(source, tmp_path / "w")
    shutil.copytree(_checkpoints(source), _checkpoints(workdir))
    newest = _checkpoints(workdir) / "checkpoint-6"
    DAMAGE[damage](newest)
    with caplog.at_level(logging.WARNING):
        resumed = train(demo_config(workdir, *RUN, "train.resume=true"))
    warned = [r.getMessage() for r in caplog.records if "checkpoint-6 is damaged" in r.getMessage()]
    assert len(warned) == 1 and "resuming from checkpoint-4" in warned[0], caplog.text
    assert (_checkpoints(workdir) / "damaged-checkpoint-6").is_dir()  # kept for inspection, out of the way
    # Steps 5-6 trained again from checkpoint-4: the same numbers as the run that was never damaged.
    assert resumed.metrics["steps"] == 6
    for split in ("val", "test"):
        assert resumed.metrics[split]["answer_loss"] == pytest.approx(full[split]["answer_loss"], abs=1e-4)
    history = [json.loads(x) for x in (_checkpoints(workdir) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in history] == sorted(r["step"] for r in history)  # no step logged twice


def test_no_intact_checkpoint_refuses_clearly(finished, tmp_path):
    from medqa.checkpoints import CheckpointError
    from medqa.train import train

    source, _ = finished
    workdir = copy_workdir(source, tmp_path / "w")
    shutil.copytree(_checkpoints(source), _checkpoints(workdir))
    for folder in _checkpoints(workdir).glob("checkpoint-*"):
        _truncate_weights(folder)
    with pytest.raises(CheckpointError) as caught:
        train(demo_config(workdir, *RUN, "train.resume=true"))
    message = str(caught.value)
    assert "none of the 3 checkpoints" in message and "train.resume=false" in message
    assert "checkpoint-2: adapter_model.safetensors does not load" in message
    assert len(list(_checkpoints(workdir).glob("checkpoint-*"))) == 3  # nothing removed by the refusal


def test_refusal_on_the_command_line_is_one_paragraph(finished, tmp_path):
    import subprocess
    import sys

    from conftest import REPO, SAMPLE

    source, _ = finished
    workdir = copy_workdir(source, tmp_path / "w")
    shutil.copytree(_checkpoints(source), _checkpoints(workdir))
    for folder in _checkpoints(workdir).glob("checkpoint-*"):
        (folder / "optimizer.pt").unlink()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "medqa",
            "train",
            "--config",
            "configs/demo.yaml",
            f"workdir={workdir}",
            f"data.source={SAMPLE}",
            *RUN,
            "train.resume=true",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode != 0
    assert "Traceback" not in done.stderr and "optimizer.pt missing" in done.stderr, done.stderr[-2000:]


def test_a_checkpoint_without_the_completion_mark_is_not_resumed(tmp_path):
    """trainer_state.json alone (rank 0's last file) proves nothing about the other ranks' writes."""
    from medqa.checkpoints import COMPLETE, problem, resumable_checkpoint

    for step in (20, 40):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "trainer_state.json").write_text("{}")
    assert problem(tmp_path / "checkpoint-40").startswith(f"no {COMPLETE}")
    assert resumable_checkpoint(tmp_path / "none").checkpoint is None
