"""More than one process: `torchrun --nproc_per_node 2 -m medqa train` (gloo DDP on CPU) against one process, a
killed two-process run resumed, and `medqa tune` on a Ray cluster this test starts and stops."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import REPO, SAMPLE, copy_workdir, demo_config

# One optimizer step = the same 8 examples either way: 1 process x 8, or 2 processes x 4 (random sampling, same
# seed: accelerate deals the sampler's batches of 4 out in turn, so step k holds the 8 examples one process takes).
# No dropout (here and in the model, see `prepared`): each process would draw its own masks. 36 steps stay in the
# first epoch (316 train examples = 39.5 steps of 8): at an epoch's end accelerate fills the last process's short
# batch with examples from the start (even_batches), which one process does not see.
QUICK = [
    "train.max_steps=36",
    "train.eval_steps=12",
    "train.logging_steps=4",
    "train.group_by_length=false",
    "lora.dropout=0",
    "scoring.bootstrap_samples=0",
    "train.report_to=[]",
]
# DDP adds the two halves' gradients in another order than one process sums 8 examples: measured differences are
# ~1e-8 in answer_loss. 1e-4 is far below what one step more or less, or a wrong denominator, changes (> 1e-2).
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Prepared once, by one process, before any run: every rank then only reads tokenized/ and the model."""
    from medqa.prepare import prepare

    workdir = tmp_path_factory.mktemp("ddp")
    prepare(demo_config(workdir, *QUICK))
    config = workdir / "models" / "tiny-biogpt" / "config.json"
    values = json.loads(config.read_text())
    values.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    config.write_text(json.dumps(values))
    return workdir


@pytest.fixture(scope="module")
def one_process(prepared, tmp_path_factory):
    from medqa.train import train

    return train(demo_config(copy_workdir(prepared, tmp_path_factory.mktemp("one")), *QUICK, "train.batch_size=8"))


def _torchrun(workdir: Path, log: Path, *overrides: str) -> subprocess.Popen:
    # --standalone: a rendezvous on a free local port, so parallel test runs never collide on 29500.
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "medqa",
        "train",
        "--config",
        str(REPO / "configs" / "demo.yaml"),
        f"workdir={workdir}",
        f"data.source={SAMPLE}",
        *QUICK,
        "train.batch_size=4",
        *overrides,
    ]
    return subprocess.Popen(
        cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )


def _children(pid: int) -> list[int]:
    """Every descendant of `pid` (torchrun starts each rank in its own session, so a process group kill misses
    them)."""
    parent = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent[int(stat.parent.name)] = int(fields[1])
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        out += kids
        todo += kids
    return out


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_two_processes_match_one_process_and_write_once(prepared, one_process, tmp_path):
    workdir = copy_workdir(prepared, tmp_path / "two")
    log = tmp_path / "torchrun.log"
    proc = _torchrun(workdir, log, "train.ddp_timeout=600")
    assert proc.wait(timeout=300) == 0, log.read_text()[-4000:]
    text = log.read_text()
    # train.ddp_timeout reaches the process group medqa creates (read back from the group, not from the config)
    assert "2 training processes (gloo backend, collectives time out after 600 s)" in text
    out = workdir / "outputs" / "finetune"
    two = json.loads((out / "metrics.json").read_text())
    one = one_process.metrics
    assert two["steps"] == one["steps"] == 36
    for split in ("val", "test"):
        assert two[split]["answer_loss"] == pytest.approx(one[split]["answer_loss"], abs=TOLERANCE)
        assert two[split]["answer_tokens"] == one[split]["answer_tokens"]  # the whole split, gathered
    # In-training evaluations: both ranks' NLL sums over all val tokens, the same numbers one process logs.
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(x) for x in (one_process.out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], "eval_answer_loss" in r) for r in rows] == [(r["step"], "eval_answer_loss" in r) for r in ref]
    for got, want in zip(rows, ref):
        key = "eval_answer_loss" if "eval_answer_loss" in want else "train_loss"
        assert got[key] == pytest.approx(want[key], abs=TOLERANCE)
    # Written once, by rank 0: one line per step in metrics.jsonl (two writers would repeat each), one row per
    # val and test example in per_example.jsonl, in the split's order, no temporary folder left, one table printed.
    ids = [json.loads(x)["id"] for x in (out / "per_example.jsonl").read_text().splitlines()]
    ref_ids = [json.loads(x)["id"] for x in (one_process.out_dir / "per_example.jsonl").read_text().splitlines()]
    assert ids == ref_ids and len(set(ids)) == len(ids)
    assert not [p for p in workdir.rglob("*") if ".tmp" in p.name]
    assert text.count(f"wrote {out}") == 1
    # Both ranks trained: each saved its RNG state in the checkpoints (rank 0 everything else).
    checkpoint = workdir / "outputs" / "finetune_checkpoints" / "checkpoint-36"
    assert (checkpoint / "rng_state_0.pth").exists() and (checkpoint / "rng_state_1.pth").exists()
    # ... and each checkpoint was marked complete only after both had (a barrier first), so it verifies as such
    from medqa.checkpoints import COMPLETE, problem

    for folder in (workdir / "outputs" / "finetune_checkpoints").glob("checkpoint-*"):
        assert json.loads((folder / COMPLETE).read_text())["processes"] == 2
        assert problem(folder, processes=2) is None
    (checkpoint / "rng_state_1.pth").unlink()
    assert problem(checkpoint, processes=2) == "rng_state_1.pth missing"
    run = json.loads((workdir / "outputs" / "finetune_checkpoints" / "run.json").read_text())
    assert run["finished"] is True and run["processes"] == 2
    # Throughput is the whole job's: 8 examples per optimizer step (2 processes x 4), as one process's 8; each
    # process's share is named as such.
    for r in (r for r in rows if "train_loss" in r):
        assert r["examples_per_s"] * r["step_seconds"] == pytest.approx(8)
        assert r["processes"] == 2 and r["tokens_per_s_per_process"] == pytest.approx(r["tokens_per_s"] / 2)
    for r in (r for r in ref if "train_loss" in r):
        assert r["examples_per_s"] * r["step_seconds"] == pytest.approx(8) and "processes" not in r


def test_resume_with_another_process_count_is_refused(prepared, tmp_path):
    """Checkpoints written by 2 processes, resumed by 1: the global batch would halve, so it is refused (unless
    train.tokens_per_step fixes the step)."""
    from medqa.errors import ConfigError
    from medqa.runrecord import check_process_count
    from medqa.train import train

    workdir = copy_workdir(prepared, tmp_path / "count")
    cfg = demo_config(workdir, *QUICK, "train.max_steps=12", "train.batch_size=4")
    train(cfg)
    run = workdir / "outputs" / "finetune_checkpoints" / "run.json"
    run.write_text(json.dumps({**json.loads(run.read_text()), "processes": 2}))  # as torchrun x 2 records it
    with pytest.raises(ConfigError, match=r"written by 2 training process\(es\) and this run has 1"):
        train(demo_config(workdir, *QUICK, "train.max_steps=12", "train.batch_size=4", "train.resume=true"))
    fixed = demo_config(workdir, *QUICK, "train.packing=true", "train.tokens_per_step=2048")
    check_process_count(fixed, {"processes": 2})  # a fixed optimizer step: any count may continue it


@pytest.mark.slow
def test_killed_two_process_run_resumes(prepared, one_process, tmp_path):
    """Slow (torchrun killed and started again): the only test of resuming a run of two processes; the fast set
    resumes one process (tests/test_crash_resume_and_stale_inputs.py) and runs two (test_two_processes_...).

    torchrun and both ranks are killed (SIGKILL, as a lost machine) after the first checkpoint; the same
    command with train.resume=true continues from the newest complete checkpoint to the uninterrupted result."""
    workdir = copy_workdir(prepared, tmp_path / "cut")
    log = tmp_path / "torchrun.log"
    proc = _torchrun(workdir, log)
    try:
        done = workdir / "outputs" / "finetune_checkpoints" / "checkpoint-12" / "medqa_complete.json"
        deadline = time.time() + 240
        while not done.exists():
            assert proc.poll() is None, "the run ended before the kill:\n" + log.read_text()[-3000:]
            assert time.time() < deadline, "timed out waiting for " + str(done)
            time.sleep(0.05)
        victims = [proc.pid, *_children(proc.pid)]
        assert len(victims) >= 3, victims  # torchrun and its two ranks
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    time.sleep(0.5)
    assert not [p for p in victims if _alive(p)]
    assert not (workdir / "outputs" / "finetune").exists()  # it was killed before finishing
    resumed = _torchrun(workdir, tmp_path / "resumed.log", "train.resume=true")
    assert resumed.wait(timeout=300) == 0, (tmp_path / "resumed.log").read_text()[-4000:]
    two = json.loads((workdir / "outputs" / "finetune" / "metrics.json").read_text())
    for split in ("val", "test"):
        assert two[split]["answer_loss"] == pytest.approx(one_process.metrics[split]["answer_loss"], abs=TOLERANCE)


def test_token_budgets_shard_over_processes():
    """train.tokens_per_step is the whole optimizer step on any number of processes (the learning rate is tuned
    for it): each of N processes takes 1/N of its rows; the micro-batch stays a per-process memory budget."""
    from medqa.batching import plan_batches
    from medqa.errors import ConfigError

    cfg = demo_config(Path("/tmp"), "train.packing=true", "train.tokens_per_batch=1024", "train.tokens_per_step=4096")
    one, two = plan_batches(cfg.train, 256), plan_batches(cfg.train, 256, world=2)
    assert (one.rows_per_batch, one.grad_accum) == (4, 4) and (two.rows_per_batch, two.grad_accum) == (4, 2)
    assert two.tokens_per_step * 2 == one.tokens_per_step == 4096
    with pytest.raises(ConfigError, match="do not split evenly over 3 processes"):
        plan_batches(cfg.train, 256, world=3)


def test_one_process_over_several_gpus_keeps_the_packing_mask(prepared, monkeypatch):
    """One process over N GPUs (a Tune trial with tune.gpus_per_trial=2): the Trainer wraps the model in
    DataParallel, whose forward trains; the fast step is off and the collator builds the block mask, so packed
    examples never attend to each other. One batch is collated for all N replicas."""
    import torch

    from medqa.modeling import build_lora_model, load_tokenizer
    from medqa.runplan import setup_training
    from medqa.workdir import load_split

    cfg = demo_config(prepared, *QUICK, "train.packing=true", "train.tokens_per_step=2048")
    tokenizer = load_tokenizer(cfg)
    train_ds, model = load_split(cfg, "train", tokenizer), build_lora_model(cfg)
    alone = setup_training(cfg, model, train_ds, tokenizer.pad_token_id)
    assert alone.fast_step is not None and not alone.collate.block_mask
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    two = setup_training(cfg, model, train_ds, tokenizer.pad_token_id)
    assert two.fast_step is None and two.collate.block_mask
    assert two.collate.rows == 2 * two.plan.rows_per_batch and two.plan.tokens_per_step * 2 == 2048


def test_every_rank_stops_when_one_is_asked(monkeypatch):
    """Ctrl-C reaching one process: all stop at the same step and each reports the stop (none waits at a barrier)."""
    from transformers import TrainerControl

    from medqa import distributed
    from medqa.trainer import GracefulStop

    stop = GracefulStop()
    monkeypatch.setattr(distributed, "any_rank", lambda flag: True)  # another rank was signalled, not this one
    control = TrainerControl()
    stop.callback().on_step_end(None, None, control)
    assert control.should_training_stop and control.should_save and stop.requested


def test_a_run_recorded_before_the_section_rename_still_resumes(tmp_path):
    """Runs started when `scoring` was called `eval` (run.json keys eval.*) resume; a real change still refuses."""
    from medqa.manifest import StaleArtifactError, check_resumable, run_record, write_run_record
    from medqa.runrecord import RUN_SECTIONS

    cfg = demo_config(tmp_path)
    record = run_record(cfg, RUN_SECTIONS, {"source": "x"})
    old_config = {k.replace("scoring.", "eval.", 1): v for k, v in record["config"].items()}
    assert old_config != record["config"]  # the record does hold scoring keys
    write_run_record(tmp_path / "run", {**record, "fingerprint": "from-an-older-release", "config": old_config})
    assert check_resumable(tmp_path / "run", record, "training run", "train.resume=false") is not None
    changed = run_record(demo_config(tmp_path, "scoring.max_examples=3"), RUN_SECTIONS, {"source": "x"})
    with pytest.raises(StaleArtifactError, match="scoring.max_examples"):
        check_resumable(tmp_path / "run", changed, "training run", "train.resume=false")


def test_fsdp_config_parses_as_accelerate_reads_it():
    """configs/accelerate/fsdp.yaml, read by accelerate's own loader (what `accelerate launch --config_file` does).
    FSDP itself needs GPUs: on CPU accelerate runs the same launch as plain DDP, so CI cannot train through it."""
    import transformers
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    path = REPO / "configs" / "accelerate" / "fsdp.yaml"
    cfg = load_config_from_file(str(path))
    assert cfg.distributed_type == DistributedType.FSDP and cfg.fsdp_config["fsdp_version"] == 2
    assert cfg.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"  # `train._as_scored` gathers the adapter
    assert hasattr(transformers.models.biogpt.modeling_biogpt, cfg.fsdp_config["fsdp_transformer_layer_cls_to_wrap"])
    assert path.read_text().startswith("# accelerate launch --config_file configs/accelerate/fsdp.yaml -m medqa train")


# ------------------------------------------------------------------------------------------- a Ray cluster

# Two trials of 80 steps, one after the other, so the search can be cut between them (as in test_tune_evaluate).
TUNE = [
    "train.epochs=2",
    "train.eval_steps=20",
    "train.logging_steps=10",
    "scoring.bootstrap_samples=0",
    "tune.num_samples=2",
    "tune.max_concurrent=1",
    "tune.grace_period=5",
    "train.report_to=[]",
]


def _free_ports(n: int) -> list[int]:
    import socket

    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _session_processes(sid: int) -> list[int]:
    """Live (not zombie) processes of session `sid`: everything the Ray head started, and nothing else."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            out.append(int(stat.parent.name))
    return out


@pytest.fixture
def ray_head(tmp_path_factory):
    """A one-node Ray cluster on 127.0.0.1, started as `ray start --head --block` in its own session, so stopping
    it (SIGTERM, then SIGKILL, to that session's process group) ends exactly its processes: never a bare
    `ray stop`, which stops every Ray of this user on the machine. Ray's temp dir is short (/tmp/rayXXXX): its
    Unix socket paths must stay under ~107 bytes."""
    import shutil
    import tempfile

    temp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    # Every port the head listens on is chosen free, so another Ray on this machine (CI, a notebook) is no obstacle.
    gcs, client, agent, grpc, env_agent, metrics, node, objects, dash = _free_ports(9)
    cmd = [
        str(Path(sys.executable).parent / "ray"),
        "start",
        "--head",
        "--block",
        "--port",
        str(gcs),
        "--node-ip-address",
        "127.0.0.1",
        "--temp-dir",
        str(temp),
        "--num-cpus",
        "2",
        "--include-dashboard",
        "false",
        "--disable-usage-stats",
        "--ray-client-server-port",
        str(client),
        "--dashboard-port",
        str(dash),
        "--dashboard-agent-listen-port",
        str(agent),
        "--dashboard-agent-grpc-port",
        str(grpc),
        "--runtime-env-agent-port",
        str(env_agent),
        "--metrics-export-port",
        str(metrics),
        "--node-manager-port",
        str(node),
        "--object-manager-port",
        str(objects),
    ]
    log = tmp_path_factory.mktemp("ray_head") / "head.log"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.time() + 120
        while "Ray runtime started" not in log.read_text():
            assert head.poll() is None and time.time() < deadline, "ray start failed:\n" + log.read_text()[-3000:]
            time.sleep(0.5)
        yield f"127.0.0.1:{gcs}"
    finally:
        for sig, wait in ((signal.SIGTERM, 3), (signal.SIGKILL, 5)):  # `ray start --block` is slow to end
            try:
                os.killpg(head.pid, sig)
            except ProcessLookupError:
                break
            deadline = time.time() + wait
            while _session_processes(head.pid) and time.time() < deadline:
                time.sleep(0.2)
            if not _session_processes(head.pid):
                break
        head.wait(timeout=10)
        shutil.rmtree(temp, ignore_errors=True)
        assert not _session_processes(head.pid), "Ray head processes left running"


@pytest.mark.slow
def test_tune_joins_a_ray_cluster_and_restores_there(prepared, ray_head, tmp_path):
    """Slow (a Ray head started and a search killed on it): the only test of a search on a running cluster.

    `medqa tune` joins the head by tune.address and runs its trials there; it is killed once the first trial has
    finished; the same search with tune.resume=true joins by RAY_ADDRESS, `Tuner.restore`s the experiment against
    the cluster and runs only the unfinished trial. Results land in workdir/outputs/ray_* as without a cluster."""
    from test_tune_evaluate import _ray_state

    from medqa.tune import ATTEMPTS, FINISHED

    workdir = copy_workdir(prepared, tmp_path / "w")
    base = [
        sys.executable,
        "-m",
        "medqa",
        "tune",
        "--config",
        str(REPO / "configs" / "demo.yaml"),
        f"workdir={workdir}",
        f"data.source={SAMPLE}",
        *TUNE,
    ]
    log = tmp_path / "tune.log"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen(
        [*base, f"tune.address={ray_head}"], stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, cwd=REPO
    )
    try:
        deadline = time.time() + 240
        while not list((workdir / "outputs").glob(f"ray_*/{FINISHED}")) or "TERMINATED" not in _ray_state(workdir):
            assert proc.poll() is None and time.time() < deadline, (
                "the search ended before it could be interrupted:\n" + log.read_text()[-3000:]
            )
            time.sleep(0.5)
        proc.kill()  # the driver is lost; the cluster ends its job's trial
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert f"joining the Ray cluster at {ray_head}" in log.read_text()
    experiment = next((workdir / "outputs").glob("ray_*"))
    finished_first = (experiment / FINISHED).read_text().split()
    assert len(finished_first) == 1
    resumed_log = tmp_path / "resumed.log"
    rc = subprocess.run(
        [*base, "tune.resume=true"],
        stdout=open(resumed_log, "w"),
        stderr=subprocess.STDOUT,
        env={**env, "RAY_ADDRESS": ray_head},
        cwd=REPO,
        timeout=300,
    ).returncode
    text = resumed_log.read_text()
    assert rc == 0, text[-4000:]
    assert f"joining the Ray cluster at {ray_head}" in text and f"restoring {experiment}" in text
    attempts = (experiment / ATTEMPTS).read_text().split()
    assert attempts.count(finished_first[0]) == 1  # the finished trial was not run again
    table = pd.read_csv(experiment / "results.csv")
    assert len(table) == 2 and (table["status"] == "completed").all()
    assert (workdir / "outputs" / "best" / "adapter_model.safetensors").exists()
