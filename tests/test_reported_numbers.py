"""The numbers medqa reports stay true (the parts that need no long training run): one place decides precision (a T4
gets fp16, not emulated bf16), every metrics file names the one dtype models are scored in, throughput counts
examples and real tokens, step time leaves evaluation out, a model worse than uniform guessing is flagged, two
prepares of the demo are byte-identical, and the fingerprints make stale data and runs stale."""

from __future__ import annotations

import json
from unittest import mock

import pytest
import torch
from conftest import REPO

from medqa.config import load_config
from medqa.prepare import prepare
from medqa.workdir import paths

# ------------------------------------------------------------------------------------------ precision


def test_auto_precision_on_a_pre_ampere_card_is_fp16():
    """A T4 emulates bf16 (is_bf16_supported() is True by default there) but computes it slowly: every precision
    decision (training, scoring, QLoRA compute dtype) must pick fp16."""
    from medqa import modeling

    def t4_bf16(including_emulation: bool = True) -> bool:
        return including_emulation  # emulation only

    cfg = load_config(REPO / "configs" / "biogpt.yaml")
    with (
        mock.patch("torch.cuda.is_available", return_value=True),
        mock.patch("torch.cuda.is_bf16_supported", side_effect=t4_bf16),
    ):
        assert modeling.cuda_half_dtype() == torch.float16
        assert modeling.pick_device_dtype(cfg)[1] == torch.float16
        assert modeling.scoring_dtype(cfg) == "float16"
        assert modeling.precision(cfg) == {"bf16": False, "fp16": True}
        assert modeling.compute_dtype(cfg) == torch.float16
    with (
        mock.patch("torch.cuda.is_available", return_value=True),
        mock.patch("torch.cuda.is_bf16_supported", return_value=True),
    ):  # an A100/H100: native bf16
        assert modeling.pick_device_dtype(cfg)[1] == torch.bfloat16
        assert modeling.precision(cfg) == {"bf16": True, "fp16": False}


def test_one_place_decides_precision():
    import re

    sources = "".join(p.read_text() for p in (REPO / "src" / "medqa").glob("*.py"))
    assert len(re.findall(r"torch\.cuda\.is_bf16_supported\(", sources)) == 1


# ------------------------------------------------------------------------------------------ sanity gate


def test_perplexity_above_uniform_warns():
    from medqa.metrics import perplexity_warning

    assert perplexity_warning({"answer_perplexity": 1_960_000.0}, 42384) is not None
    text = perplexity_warning({"answer_perplexity": 1_960_000.0}, 42384, "fine-tuned test")
    assert "1,960,000.0" in text and "42,384" in text and "data.question_field" in text and "padding" in text
    assert perplexity_warning({"answer_perplexity": 42383.0}, 42384) is None
    assert perplexity_warning({"answer_perplexity": 12.5}, 42384) is None


# ------------------------------------------------------------------------------------------ reproducibility


def test_two_demo_prepares_in_two_folders_are_byte_identical(tmp_path):
    """Same config and seed: the same tiny model (weights, vocab.json, merges.txt), splits and tokenized data,
    byte for byte (manifests record the time and the folder, so they are left out)."""
    from conftest import demo_config

    for name in ("a", "b"):
        prepare(demo_config(tmp_path / name))

    def files(root):
        return {
            p.relative_to(root): p.read_bytes()
            for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "manifest.json" and ".cache" not in p.parts
        }

    a, b = files(tmp_path / "a"), files(tmp_path / "b")
    assert set(a) == set(b)
    for name in ("data/prepare_report.json", "tokenized/prepare_report.json"):  # they name their own folder
        key = next(p for p in a if str(p) == name)
        a[key] = a[key].replace(str(tmp_path / "a").encode(), b"WORKDIR")
        b[key] = b[key].replace(str(tmp_path / "b").encode(), b"WORKDIR")
    for must in (
        "models/tiny-biogpt/vocab.json",
        "models/tiny-biogpt/merges.txt",
        "models/tiny-biogpt/model.safetensors",
        "data/train_data.json",
    ):
        assert any(str(p) == must for p in a), must
    differ = sorted(str(p) for p in a if a[p] != b[p])
    assert not differ, differ


# ------------------------------------------------------------------------------------------ runs on the demo


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """prepare, baseline, train (packed, bf16 scoring) and evaluate on the demo, in one workdir."""
    from conftest import demo_config, prepare_demo

    from medqa.evaluate import evaluate
    from medqa.train import train

    extra = [
        "model.dtype=bfloat16",
        "train.packing=true",
        "train.tokens_per_batch=1024",
        "train.max_steps=24",
        "train.eval_steps=8",
        "train.logging_steps=4",
        "scoring.bootstrap_samples=0",
        "evaluate.num_questions=2",
        "generate.max_new_tokens=4",
    ]
    workdir = prepare_demo(tmp_path_factory.mktemp("reported_numbers"), *extra)
    cfg = demo_config(workdir, *extra)
    return cfg, train(cfg), evaluate(cfg)


def test_every_metrics_file_names_one_dtype_and_base_and_tuned_use_it(demo_run):
    """Scored in model.dtype (bf16 here, on CPU): baseline, the fine-tuned run and the report say so, and the
    fine-tuned test loss train reports is exactly what evaluate measures on the saved adapter."""
    cfg, trained, evaluated = demo_run
    baseline = json.loads((paths(cfg).baseline / "metrics.json").read_text())
    finetune = json.loads((paths(cfg).finetune / "metrics.json").read_text())
    report = json.loads(paths(cfg).report_json.read_text())
    assert baseline["dtype"] == finetune["dtype"] == report["dtype"] == "bfloat16"
    assert {m["dtype"] for m in report["models"].values()} == {"bfloat16"}
    tuned = report["models"]["fine-tuned"]["test"]["answer_loss"]
    assert finetune["test"]["answer_loss"] == pytest.approx(tuned, abs=1e-6)
    assert report["models"]["base"]["test"]["answer_loss"] == pytest.approx(baseline["test"]["answer_loss"], abs=1e-6)


def test_packed_throughput_counts_examples_and_real_tokens(demo_run):
    """metrics.jsonl on a packed run: examples (not rows) and real tokens (not padding) per second, so their ratio
    is the train split's mean example length; step time never includes evaluation."""
    import datasets

    cfg, trained, _ = demo_run
    rows = [json.loads(x) for x in (trained.out_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "train_loss" in r]
    lengths = datasets.load_from_disk(str(paths(cfg).tokenized_split("train")))["length"]
    for r in train_rows:
        assert r["tokens_per_s"] / r["examples_per_s"] == pytest.approx(sum(lengths) / len(lengths), rel=1e-6)
        assert r["step_seconds"] > 0
    training = trained.metrics["training"]
    assert training["steps_timed"] == 24 and training["batch_plan"]["rows_per_batch"] == 4


def test_step_time_excludes_evaluation(tmp_path, monkeypatch):
    """Evaluations that take 100 s (on a fake clock, so the test does not depend on the machine's load) never
    show up in the step times or the throughput."""
    import time as real_time
    import types

    from conftest import demo_config, prepare_demo

    import medqa.trainer
    from medqa.train import train

    offset = [0.0]
    monkeypatch.setattr(
        medqa.trainer, "time", types.SimpleNamespace(perf_counter=lambda: real_time.perf_counter() + offset[0])
    )
    real = medqa.trainer.evaluate_answer_loss

    def slow(*args, **kwargs):
        offset[0] += 100.0
        return real(*args, **kwargs)

    monkeypatch.setattr(medqa.trainer, "evaluate_answer_loss", slow)
    extra = ["train.max_steps=8", "train.eval_steps=2", "train.logging_steps=2", "scoring.bootstrap_samples=0"]
    workdir = prepare_demo(tmp_path, *extra)
    result = train(demo_config(workdir, *extra))
    assert offset[0] >= 400  # four evaluations happened
    steps = [r["step_seconds"] for r in result.history if "step_seconds" in r]
    assert steps and max(steps) < 50
    assert result.metrics["training"]["train_seconds"] < 100


def test_sanity_warning_in_the_cli_and_metrics(tmp_path, capsys):
    """A model worse than uniform guessing (the random tiny model, not flagged as the demo's) is reported loudly."""
    from conftest import demo_config

    from medqa.cli import main

    prepare(demo_config(tmp_path))
    capsys.readouterr()
    args = [
        "baseline",
        "--config",
        str(REPO / "configs" / "demo.yaml"),
        f"workdir={tmp_path}",
        f"data.source={REPO / 'data' / 'sample' / 'healthcaremagic_sample.json'}",
        "model.tiny.enabled=false",
        "scoring.bootstrap_samples=0",
    ]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "WARNING" in err and "worse than guessing uniformly" in err and "data.question_field" in err
    metrics = json.loads((tmp_path / "outputs" / "baseline" / "metrics.json").read_text())
    assert len(metrics["sanity_warnings"]) == 2  # val and test
    # The demo itself (the tiny model flagged as randomly initialised) records it as expected, quietly.
    assert main(args[:-2] + ["scoring.bootstrap_samples=0"]) == 0
    assert "worse than guessing" not in capsys.readouterr().err
    metrics = json.loads((tmp_path / "outputs" / "baseline" / "metrics.json").read_text())
    assert metrics["sanity_warnings"] == ["above uniform, expected: randomly initialised model"]


def test_run_fingerprint_covers_what_picks_the_checkpoint_and_ignores_paths():
    from medqa.manifest import determining_config

    base = load_config(REPO / "configs" / "demo.yaml")
    from medqa.runrecord import RUN_SECTIONS as sections

    def same(*overrides):
        return determining_config(
            load_config(REPO / "configs" / "demo.yaml", list(overrides)), sections
        ) == determining_config(base, sections)

    assert not same("scoring.max_examples=5")  # it sets the validation examples that choose the best checkpoint
    assert not same("train.learning_rate=0.5") and not same("lora.r=4") and not same("data.seed=1")
    assert same("scoring.batch_size=3", "train.compile=false", "train.save_total_limit=5", "data.num_proc=2")
    assert same("data.source=/elsewhere/same_file.json", "workdir=/moved")  # the content is in the inputs


def test_old_encoding_rule_makes_tokenized_data_stale():
    """The encoding rule's version is part of the prepared data's fingerprint (and so of prepare's cache key)."""
    from unittest import mock

    from conftest import demo_config

    from medqa import workdir as data_mod

    cfg = demo_config(REPO)
    tok = mock.Mock()
    with mock.patch.object(data_mod, "tokenizer_info", return_value={"vocab_sha256": "x"}):
        now = data_mod.prepared_inputs(cfg, tok)
        with mock.patch.object(data_mod, "ENCODE_VERSION", 1):
            old = data_mod.prepared_inputs(cfg, tok)
    assert now["prompt_and_split"] != old["prompt_and_split"]
