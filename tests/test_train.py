"""Stage 3: LoRA fine-tuning on the tiny model."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import copy_workdir, demo_config, prepare_demo

from medqa.errors import ModelError
from medqa.workdir import paths

FAST = ["train.epochs=2", "train.eval_steps=20", "train.logging_steps=5", "scoring.bootstrap_samples=200"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return prepare_demo(tmp_path_factory.mktemp("train"), *FAST)


@pytest.fixture(scope="module")
def trained(prepared):
    from medqa.train import train

    cfg = demo_config(prepared, *FAST)
    return cfg, train(cfg)


def test_training_beats_baseline_on_val(trained):
    cfg, result = trained
    base = json.loads((paths(cfg).baseline / "metrics.json").read_text())
    assert result.metrics["val"]["answer_loss"] < base["val"]["answer_loss"] - 0.5
    assert result.metrics["test"]["answer_loss"] < base["test"]["answer_loss"]


def test_run_files(trained):
    cfg, result = trained
    out = result.out_dir
    for name in (
        "adapter_model.safetensors",
        "adapter_config.json",
        "tokenizer_config.json",
        "vocab.json",
        "config.yaml",
        "metrics.jsonl",
        "metrics.json",
        "loss_curves.png",
        "per_example.jsonl",
    ):
        assert (out / name).exists(), name
    assert any((out / "tensorboard").rglob("events.out.tfevents.*"))
    assert not list(out.glob("*.bin")) and not list(out.glob("*.pt"))  # safetensors only
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "train_loss" in r]
    eval_rows = [r for r in rows if "eval_answer_loss" in r]
    assert train_rows and eval_rows
    for r in train_rows:
        assert {"step", "epoch", "train_loss", "learning_rate", "grad_norm", "examples_per_s", "tokens_per_s"} <= set(r)
        assert r["examples_per_s"] > 0
    assert [r["step"] for r in eval_rows] == [20, 40, 60, 80]
    assert min(r["eval_answer_loss"] for r in eval_rows) == pytest.approx(result.metrics["best_val_answer_loss"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) >= {"val", "test", "model", "config"}
    assert metrics["val"]["answer_loss"] == pytest.approx(result.metrics["best_val_answer_loss"], abs=1e-6)


def test_base_frozen_and_adapter_changed(trained):
    from medqa.modeling import build_lora_model, load_model

    cfg, result = trained
    from medqa.modeling import load_adapter_model

    tuned = load_adapter_model(cfg, result.out_dir)
    fresh_base = load_model(cfg)
    init = build_lora_model(cfg)  # the same seed gives the adapter's initial weights
    base_sd = fresh_base.state_dict()
    tuned_sd = {k: v for k, v in tuned.state_dict().items()}
    init_sd = init.state_dict()
    n_base = n_lora = 0
    for key, value in tuned_sd.items():
        if "lora_" in key:
            assert not torch.allclose(value, init_sd[key]), key
            n_lora += 1
        else:
            plain = key.replace("base_model.model.", "").replace(".base_layer", "")
            assert torch.equal(value, base_sd[plain]), key
            n_base += 1
    assert n_lora == 2 * 6 * cfg.model.tiny.num_layers and n_base == len(base_sd)


@pytest.mark.parametrize("preset", ["qv", "attention", "all-linear"])
def test_trainable_count_matches_shapes(prepared, preset):
    from medqa.lora_targets import lora_parameter_count, resolve_lora_targets
    from medqa.modeling import build_lora_model, count_parameters, load_model

    cfg = demo_config(prepared, f"lora.targets={preset}", "lora.r=4")
    base = load_model(cfg)
    expected = lora_parameter_count(base, resolve_lora_targets(base, preset), 4)
    h, f, n = cfg.model.tiny.hidden_size, cfg.model.tiny.intermediate_size, cfg.model.tiny.num_layers
    by_hand = {"qv": 2 * 4 * 2 * h, "attention": 4 * 4 * 2 * h, "all-linear": 4 * 4 * 2 * h + 2 * 4 * (h + f)}
    assert expected == n * by_hand[preset]
    assert count_parameters(build_lora_model(cfg))[0] == expected


def test_reloaded_adapter_reproduces_test_loss(trained):
    import datasets

    from medqa.metrics import evaluate_answer_loss
    from medqa.modeling import load_adapter_model

    cfg, result = trained
    model = load_adapter_model(cfg, result.out_dir)
    ds = datasets.load_from_disk(str(paths(cfg).tokenized_split("test")))
    m, _ = evaluate_answer_loss(model, ds, 1, batch_size=3, bootstrap_samples=0)
    assert m["answer_loss"] == pytest.approx(result.metrics["test"]["answer_loss"], abs=1e-4)


def test_merged_export_matches_adapter(trained):
    from transformers import AutoModelForCausalLM

    from medqa.export import export
    from medqa.modeling import load_adapter_model

    cfg, result = trained
    out = export(cfg)
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert (out / "model.safetensors").exists() and not (out / "adapter_config.json").exists()
    adapted = load_adapter_model(cfg, result.out_dir)
    ids = torch.tensor([[2, 40, 41, 42, 43, 44, 100, 7, 9]])
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, adapted(input_ids=ids).logits, atol=1e-4)


def test_adapter_folder_without_adapter(trained, tmp_path):
    from medqa.modeling import load_adapter_model

    cfg, _ = trained
    with pytest.raises(ModelError, match="holds no LoRA adapter"):
        load_adapter_model(cfg, tmp_path)


def test_resume_after_interruption_matches_uninterrupted(prepared, tmp_path):
    from transformers import TrainerCallback

    from medqa.train import train

    class Crash(TrainerCallback):
        def on_save(self, args, state, control, **kw):
            if state.global_step == 40:
                raise RuntimeError("simulated crash after the checkpoint at step 40")

    steps = ["train.max_steps=60", "train.epochs=1"]
    full = train(demo_config(copy_workdir(prepared, tmp_path / "full"), *FAST, *steps))
    cut_dir = copy_workdir(prepared, tmp_path / "cut")
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(demo_config(cut_dir, *FAST, *steps), callbacks=[Crash()])

    class Count(TrainerCallback):
        steps_run = 0

        def on_step_end(self, args, state, control, **kw):
            Count.steps_run += 1

    resumed = train(demo_config(cut_dir, *FAST, *steps, "train.resume=true"), callbacks=[Count()])
    assert Count.steps_run == 20  # it continued from step 40 rather than starting over
    for split in ("val", "test"):
        assert resumed.metrics[split]["answer_loss"] == pytest.approx(full.metrics[split]["answer_loss"], abs=1e-4)
    steps_logged = [r["step"] for r in resumed.history if "eval_answer_loss" in r]
    assert steps_logged == [20, 40, 60]  # no step logged twice


def test_packed_training_learns_and_keeps_metrics_unpacked(prepared, tmp_path):
    from medqa.train import train

    result = train(demo_config(copy_workdir(prepared, tmp_path), *FAST, "train.packing=true", "train.batch_size=2"))
    base = json.loads((prepared / "outputs" / "baseline" / "metrics.json").read_text())
    assert result.metrics["val"]["answer_loss"] < base["val"]["answer_loss"] - 0.5
    assert result.metrics["test"]["answer_tokens"] == base["test"]["answer_tokens"]  # scored unpacked
