"""A crash mid-write keeps the previous artifact, manifests refuse stale inputs (another source, another base
model, changed settings on resume), a killed run resumes to the uninterrupted result, and the disk check stops
training before it starts."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, SAMPLE, copy_workdir, demo_config, prepare_demo

from medqa.errors import DataError, Interrupted, MedqaError
from medqa.manifest import StaleArtifactError

FAST = ["train.epochs=2", "train.eval_steps=20", "train.logging_steps=10", "scoring.bootstrap_samples=100"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return prepare_demo(tmp_path_factory.mktemp("reliable"), *FAST)


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_crash_while_writing_tokenized_keeps_the_previous_artifact(prepared, tmp_path, monkeypatch):
    import datasets

    from medqa.prepare import prepare

    workdir = copy_workdir(prepared, tmp_path)
    before = snapshot(workdir / "tokenized")
    calls = []
    real_save = datasets.Dataset.save_to_disk

    def crash_on_second_split(self, path, *a, **kw):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("simulated crash while writing")
        return real_save(self, path, *a, **kw)

    monkeypatch.setattr(datasets.Dataset, "save_to_disk", crash_on_second_split)
    with pytest.raises(OSError, match="simulated crash"):
        prepare(demo_config(workdir, *FAST, "data.seed=7"))
    assert snapshot(workdir / "tokenized") == before
    assert not [p for p in workdir.iterdir() if ".tmp-" in p.name]  # no half-written folder left behind


def test_crash_while_writing_baseline_keeps_the_previous_artifact(prepared, tmp_path, monkeypatch):
    import medqa.baseline as baseline_module

    workdir = copy_workdir(prepared, tmp_path)
    before = snapshot(workdir / "outputs" / "baseline")
    monkeypatch.setattr(baseline_module, "write_manifest", lambda *a, **k: (_ for _ in ()).throw(OSError("crash")))
    with pytest.raises(OSError, match="crash"):
        baseline_module.baseline(demo_config(workdir, *FAST))
    assert snapshot(workdir / "outputs" / "baseline") == before


def test_data_from_another_source_is_refused_unless_forced(prepared, tmp_path, caplog):
    from medqa.baseline import baseline

    workdir = copy_workdir(prepared, tmp_path)
    other = tmp_path / "other.json"
    other.write_text(json.dumps(json.loads(SAMPLE.read_text())[:50]))
    with pytest.raises(StaleArtifactError, match=r"the data it was prepared from differs.*`medqa prepare"):
        baseline(demo_config(workdir, *FAST, f"data.source={other}"))
    result = baseline(demo_config(workdir, *FAST, f"data.source={other}", "force=true"))
    assert result.metrics["test"]["examples"] > 0
    assert "force=true" in caplog.text


def test_a_source_is_read_once_per_stage_and_again_once_changed(prepared, tmp_path, monkeypatch):
    """evaluate checks tokenized/ and the adapter against the same source: its content is hashed once, not per
    check; a source rewritten since is hashed again (its fingerprint follows the new content)."""
    from medqa import manifest
    from medqa.modeling import load_tokenizer
    from medqa.workdir import adapter_inputs, check_tokenized

    source = tmp_path / "source.json"
    source.write_text(SAMPLE.read_text())
    cfg = demo_config(prepared, f"data.source={source}")
    reads = []
    monkeypatch.setattr(manifest, "_sha_file", lambda path, h: (reads.append(path), h.update(path.read_bytes())))
    manifest._hash_files.cache_clear()
    tokenizer = load_tokenizer(cfg)
    with pytest.raises(StaleArtifactError):  # prepared from the shipped sample: another file name
        check_tokenized(cfg, tokenizer)
    first = adapter_inputs(cfg, tokenizer)["source"]
    assert reads.count(source) == 1
    source.write_text(SAMPLE.read_text() + "\n")
    assert adapter_inputs(cfg, tokenizer)["source"] != first and reads.count(source) == 2
    # rewritten with the same size and its old modification time set back (as cp -p does): read again
    changed, stat = SAMPLE.read_text().replace("a", "b", 1) + "\n", source.stat()
    source.write_text(changed)
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert source.stat().st_size == stat.st_size
    adapter_inputs(cfg, tokenizer)
    assert reads.count(source) == 3


def test_adapter_trained_on_another_base_model_is_refused(prepared, tmp_path):
    from medqa.modeling import load_adapter_model
    from medqa.tiny import build_tiny_model
    from medqa.train import train

    workdir = copy_workdir(prepared, tmp_path)
    cfg = demo_config(workdir, *FAST, "train.max_steps=20")
    train(cfg)
    # Same architecture and vocabulary, other weights: the adapter would load, silently wrong.
    texts = [json.dumps(r) for r in json.loads((workdir / "data" / "train_data.json").read_text())]
    other = build_tiny_model(texts, cfg.model.tiny, tmp_path / "other-base", seed=123)
    other_cfg = demo_config(workdir, *FAST, f"model.name_or_path={other}")
    shutil.copy(workdir / "models" / "tiny-biogpt" / "vocab.json", other / "vocab.json")
    with pytest.raises(StaleArtifactError, match="its base model differs.*`medqa train"):
        load_adapter_model(other_cfg, workdir / "outputs" / "finetune")
    load_adapter_model(
        demo_config(workdir, *FAST, f"model.name_or_path={other}", "force=true"), workdir / "outputs" / "finetune"
    )


def test_disk_check_stops_before_training(prepared, tmp_path, monkeypatch):
    from medqa.train import train

    workdir = copy_workdir(prepared, tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 4096, 4096))
    with pytest.raises(MedqaError, match="Not enough disk space.*save_total_limit"):
        train(demo_config(workdir, *FAST))


def test_empty_test_split_is_a_clear_error(prepared, tmp_path):
    from medqa.baseline import baseline
    from medqa.prepare import prepare

    workdir = copy_workdir(prepared, tmp_path)
    cfg = demo_config(workdir, "data.train_fraction=0.9", "data.val_fraction=0.1", "data.test_fraction=0.0")
    prepare(cfg)
    with pytest.raises(DataError, match="tokenized_test is empty.*data.test_fraction"):
        baseline(cfg)


def _run_cli(args: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "medqa", *args],
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
        env=os.environ.copy(),
        cwd=REPO,
    )


def _wait_for(path_glob: Path, proc: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not list(path_glob.parent.glob(path_glob.name)):
        assert proc.poll() is None, "the run ended before the interruption:\n" + log.read_text()[-3000:]
        assert time.time() < deadline, "timed out waiting for " + str(path_glob)
        time.sleep(0.2)


@pytest.mark.parametrize(
    "sig",
    [signal.SIGKILL, pytest.param(signal.SIGINT, marks=pytest.mark.slow)],
    ids=["SIGKILL", "SIGINT"],
)
def test_train_killed_then_resumed_matches_uninterrupted(prepared, tmp_path, sig):
    """A `medqa train` process stopped after its first checkpoint, then resumed, ends where an uninterrupted run
    does. SIGKILL runs in the fast set; the SIGINT twin is slow and the only test that Ctrl-C's graceful stop
    (a checkpoint saved on purpose) resumes to the same numbers."""
    from medqa.train import train

    # 120 steps leave a wide window after the first checkpoint; resume picks the newest complete checkpoint, so
    # a kill that lands while a later one is being written is fine too.
    steps = [*FAST, "train.max_steps=120", "train.epochs=1"]
    full = train(demo_config(copy_workdir(prepared, tmp_path / "full"), *steps))
    workdir = copy_workdir(prepared, tmp_path / "cut")
    log = tmp_path / "train.log"
    proc = _run_cli(
        ["train", "--config", "configs/demo.yaml", f"workdir={workdir}", f"data.source={SAMPLE}", *steps], log
    )
    try:
        _wait_for(workdir / "outputs" / "finetune_checkpoints" / "checkpoint-20" / "medqa_complete.json", proc, log)
        proc.send_signal(sig)
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    if sig == signal.SIGINT:  # a clean stop: exit code 130, a checkpoint saved, no finished run
        assert rc == 130 and "train.resume=true" in log.read_text()
    assert not (workdir / "outputs" / "finetune").exists()
    resumed = train(demo_config(workdir, *steps, "train.resume=true"))
    for split in ("val", "test"):
        assert resumed.metrics[split]["answer_loss"] == pytest.approx(full.metrics[split]["answer_loss"], abs=1e-4)


def test_interrupted_in_process_raises_interrupted(prepared, tmp_path):
    """The notebook stop button sends SIGINT to the kernel: the stage stops after a checkpoint."""
    from transformers import TrainerCallback

    from medqa.train import train

    class PressStop(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 5:
                os.kill(os.getpid(), signal.SIGINT)

    workdir = copy_workdir(prepared, tmp_path)
    with pytest.raises(Interrupted, match="resume=true"):
        train(demo_config(workdir, *FAST), callbacks=[PressStop()])
    assert list((workdir / "outputs" / "finetune_checkpoints").glob("checkpoint-*"))


def test_eval_max_examples_never_shrinks_training(prepared):
    from medqa.workdir import load_split

    cfg = demo_config(prepared, "scoring.max_examples=5")
    assert len(load_split(cfg, "val")) == 5
    assert len(load_split(cfg, "train")) > 100


def test_resume_under_changed_settings_refuses_and_never_relabels(prepared, tmp_path):
    """Train, then "resume" with another learning rate: refused with the changed key named; the finished run's
    adapter and metrics are untouched. Resuming with the same settings continues (here: rewrites the same run),
    and train.resume=false starts fresh."""
    from medqa.manifest import StaleArtifactError
    from medqa.train import train

    steps = [*FAST, "train.max_steps=20", "train.epochs=1", "scoring.bootstrap_samples=0"]
    workdir = copy_workdir(prepared, tmp_path / "w")
    first = train(demo_config(workdir, *steps))
    adapter = (workdir / "outputs" / "finetune" / "adapter_model.safetensors").read_bytes()
    metrics = (workdir / "outputs" / "finetune" / "metrics.json").read_text()
    run = json.loads((workdir / "outputs" / "finetune_checkpoints" / "run.json").read_text())
    assert run["finished"] is True and run["config"]["train.learning_rate"] == pytest.approx(1e-2)
    with pytest.raises(StaleArtifactError) as info:
        train(demo_config(workdir, *steps, "train.resume=true", "train.learning_rate=0.05"))
    message = str(info.value)
    assert "train.learning_rate: 0.01 -> 0.05" in message and "train.resume=false" in message
    assert (workdir / "outputs" / "finetune" / "adapter_model.safetensors").read_bytes() == adapter
    assert (workdir / "outputs" / "finetune" / "metrics.json").read_text() == metrics
    # Settings that change no result (evaluation, compile) do not block a resume.
    again = train(demo_config(workdir, *steps, "train.resume=true", "scoring.batch_size=3"))
    assert again.metrics["test"]["answer_loss"] == pytest.approx(first.metrics["test"]["answer_loss"], abs=1e-6)
    fresh = train(demo_config(workdir, *steps, "train.learning_rate=0.05"))
    assert fresh.metrics["config"]["train"]["learning_rate"] == 0.05
    assert fresh.metrics["test"]["answer_loss"] != pytest.approx(first.metrics["test"]["answer_loss"], abs=1e-6)


def test_checkpoints_without_a_run_record_are_not_resumed(prepared, tmp_path):
    from medqa.manifest import StaleArtifactError
    from medqa.train import train

    workdir = copy_workdir(prepared, tmp_path / "w")
    steps = [*FAST, "train.max_steps=20", "train.epochs=1", "scoring.bootstrap_samples=0"]
    train(demo_config(workdir, *steps))
    (workdir / "outputs" / "finetune_checkpoints" / "run.json").unlink()  # as an older medqa left them
    with pytest.raises(StaleArtifactError, match="no run.json"):
        train(demo_config(workdir, *steps, "train.resume=true"))


def test_early_stopping_patience_survives_a_resume(prepared, tmp_path, monkeypatch):
    """Stop (Ctrl-C) after two evaluations without improvement, resume with the same settings: the patience counter
    continues from the checkpoint instead of restarting at 0 (restore_callback_states_from_checkpoint)."""
    import transformers
    from transformers import TrainerCallback

    from medqa.train import train

    counters: list[int] = []

    class EarlyStoppingCallback(transformers.EarlyStoppingCallback):  # same name: Trainer restores by class name
        def on_step_begin(self, args, state, control, **kw):
            counters.append(self.early_stopping_patience_counter)

    monkeypatch.setattr(transformers, "EarlyStoppingCallback", EarlyStoppingCallback)
    # In-training evaluations that only get worse (1, 2, 3, ...), so the counter's value is known at every step.
    import medqa.trainer

    evaluations = []

    def worse_each_time(*args, **kwargs):
        evaluations.append(1)
        loss = float(len(evaluations))
        return {"answer_loss": loss, "answer_perplexity": 2.718281828**loss}, None

    monkeypatch.setattr(medqa.trainer, "evaluate_answer_loss", worse_each_time)

    class PressStop(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 15:
                os.kill(os.getpid(), signal.SIGINT)

    workdir = copy_workdir(prepared, tmp_path / "w")
    steps = [
        *FAST,
        "train.epochs=1",
        "train.max_steps=30",
        "train.eval_steps=5",
        "train.early_stopping_patience=50",
        "scoring.bootstrap_samples=0",
    ]
    with pytest.raises(Interrupted):
        train(demo_config(workdir, *steps), callbacks=[PressStop()])
    state = json.loads(
        (workdir / "outputs" / "finetune_checkpoints" / "checkpoint-15" / "trainer_state.json").read_text()
    )
    saved = state["stateful_callbacks"]["EarlyStoppingCallback"]["attributes"]["early_stopping_patience_counter"]
    assert saved == 2  # evaluations at 5 (the best), 10 and 15
    counters.clear()
    train(demo_config(workdir, *steps, "train.resume=true"))
    assert counters[0] == saved  # the first step after the resume sees the saved counter, not 0
    assert counters[-1] == 4  # and it keeps counting: evaluations at 20 and 25 added to it
