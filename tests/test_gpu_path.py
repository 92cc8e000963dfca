"""What the first GPU run depends on, checked on CPU: the compiled step traces once, the dtypes the GPU path
holds weights and scores in, refused combinations, and that every optimisation falls back to the plain path
with one warning and a record when it fails (each failure injected here)."""

from __future__ import annotations

import json
import logging
import sys

import pytest
import torch
from conftest import copy_workdir, demo_config, prepare_demo

PACKED = ["train.packing=true", "train.tokens_per_batch=1024", "lora.dropout=0"]
QUICK = [
    "train.max_steps=2",
    "train.eval_steps=1000",
    "train.logging_steps=1",
    "scoring.bootstrap_samples=0",
    "scoring.max_examples=8",
    "train.report_to=[]",
]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return prepare_demo(tmp_path_factory.mktemp("gpu_path"))


def _warnings(caplog, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and text in r.getMessage()]


def _metrics(result) -> dict:
    return json.loads((result.out_dir / "metrics.json").read_text())


# ------------------------------------------------------------------------------------------ one graph


def test_compiled_step_is_one_graph_over_an_epoch_with_accumulation_and_a_partial_step(prepared, tmp_path):
    """train.compile=true on the tiny model, `medqa train`'s setup and fit, accumulation 2, an epoch (of 54 train
    examples, for time) whose last micro-batch is padded with empty rows and whose last optimizer step holds a
    single micro-batch: dynamo traces one graph, with no graph break and no recompile."""
    from torch._dynamo.utils import counters

    from medqa.modeling import build_lora_model, load_tokenizer
    from medqa.runplan import setup_training
    from medqa.train import fit
    from medqa.workdir import load_split

    cfg = demo_config(
        prepared,
        *PACKED,
        "train.compile=true",
        "train.grad_accum=2",
        "train.epochs=1",
        "train.eval_steps=1000",
        "train.report_to=[]",
    )
    tokenizer = load_tokenizer(cfg)
    model = build_lora_model(cfg)
    setup = setup_training(cfg, model, load_split(cfg, "train", tokenizer).select(range(54)), tokenizer.pad_token_id)
    rows, per_batch = len(setup.train_ds), setup.plan.rows_per_batch
    micro_batches = -(-rows // per_batch)
    assert per_batch == 4 and setup.plan.grad_accum == 2 and setup.fast_step.compiled
    assert rows % per_batch, "the last micro-batch should be partial in this test"
    assert micro_batches % 2, "the last optimizer step should hold one micro-batch in this test"
    torch._dynamo.reset()
    counters.clear()
    trainer, timer = fit(cfg, model, tokenizer, setup, load_split(cfg, "val").select(range(4)), tmp_path, trial=True)
    assert trainer.state.global_step == -(-micro_batches // 2) == len(timer.durations)
    assert counters["stats"]["unique_graphs"] == 1
    assert dict(counters["graph_break"]) == {}
    assert counters["frames"]["ok"] == 1  # a recompile would convert the frame again
    assert setup.describe()["compiled"] and setup.fallbacks.records == []


# ------------------------------------------------------------------------------------------ dtypes


def _packed_batch(cfg, n=6):
    """A few val examples packed into rows, without the collator's mask (the fast step builds it)."""
    from medqa.packing import PackedCollator, pack_examples
    from medqa.workdir import load_split

    ds = load_split(cfg, "val")
    packed = pack_examples([ds[i] for i in range(n)], cfg.data.max_length)
    batch = PackedCollator(1, pad_to_multiple_of=cfg.data.max_length, rows=len(packed))(packed)
    return {k: v for k, v in batch.items() if k != "attention_mask"}


def test_base_weights_are_held_in_the_compute_dtype_on_cuda_only(tmp_path, monkeypatch):
    from medqa import modeling

    cfg = demo_config(tmp_path)
    assert modeling.training_base_dtype(cfg, "cpu") == torch.float32  # CPU: nothing changes
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for half in (torch.bfloat16, torch.float16):  # Ampere and newer; a T4
        monkeypatch.setattr(modeling, "cuda_half_dtype", lambda half=half: half)
        assert modeling.training_base_dtype(cfg, torch.device("cuda", 0)) == half
        assert modeling.training_base_dtype(cfg, "cpu") == torch.float32  # model.device=cpu on a GPU machine
    no_mixed = demo_config(tmp_path, "train.mixed_precision='no'")
    assert modeling.training_base_dtype(no_mixed, "cuda") == torch.float32
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # FSDP flattens shards of one dtype
    assert modeling.training_base_dtype(cfg, "cuda") == torch.float32


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_lora_stays_fp32_on_a_half_precision_base_and_trains(prepared, monkeypatch, half):
    """The model as `build_lora_model` makes it on a GPU (the base in bf16, or fp16 on a T4; forced here on CPU):
    only the LoRA matrices are fp32. A step under autocast with a GradScaler (fp16 training's) unscales fp32
    gradients, updates LoRA and leaves the base as it was."""
    from medqa import modeling
    from medqa.faststep import FastStep

    monkeypatch.setattr(modeling, "training_base_dtype", lambda cfg, device: half)
    cfg = demo_config(prepared, *PACKED)
    model = modeling.build_lora_model(cfg)
    lora = {n: p for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p for n, p in model.named_parameters() if not p.requires_grad}
    assert lora and all("lora_" in n and p.dtype == torch.float32 for n, p in lora.items())
    assert frozen and all(p.dtype == half for p in frozen.values())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(lora.values(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu")
    with torch.autocast("cpu", dtype=half):
        loss = FastStep(model, mask_dtype=half)(_packed_batch(cfg))
    assert torch.isfinite(loss)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)  # raises "Attempting to unscale FP16 gradients" on half-precision parameters
    assert all(p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in lora.values())
    scaler.step(optimizer)
    scaler.update()
    assert any(not torch.equal(before[n], p) for n, p in lora.items())
    assert all(torch.equal(before[n], p) for n, p in frozen.items())


def test_in_training_evaluation_scores_in_the_scoring_dtype(prepared, tmp_path, monkeypatch):
    """The Trainer's evaluation runs under autocast to `pick_device_dtype`'s dtype, the one baseline and evaluate
    score in: bf16 when model.dtype says so (on a GPU, auto's choice), no autocast where it is fp32 (CPU)."""
    import warnings

    from medqa import trainer as trainer_mod
    from medqa.modeling import scoring_autocast
    from medqa.train import train

    seen = []
    real = trainer_mod.evaluate_answer_loss

    def spy(*args, **kwargs):
        seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else torch.float32)
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer_mod, "evaluate_answer_loss", spy)
    for dtype, expected in (("auto", torch.float32), ("bfloat16", torch.bfloat16)):
        seen.clear()
        cfg = demo_config(
            copy_workdir(prepared, tmp_path / dtype), *QUICK, "train.eval_steps=1", f"model.dtype={dtype}"
        )
        train(cfg, trial=True)
        assert seen and set(seen) == {expected}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "CUDA is not available": only the context's settings are looked at
        on_gpu = scoring_autocast(torch.device("cuda", 0), torch.bfloat16)
    assert isinstance(on_gpu, torch.autocast) and on_gpu.device == "cuda" and on_gpu.fast_dtype == torch.bfloat16
    assert not isinstance(scoring_autocast("cpu", torch.float32), torch.autocast)


def test_tf32_is_allowed_on_ampere_and_newer_only(monkeypatch):
    from medqa.modeling import allow_tf32

    before = torch.get_float32_matmul_precision()
    try:
        assert not allow_tf32()  # no GPU here
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))  # a T4
        assert not allow_tf32() and torch.get_float32_matmul_precision() == before
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))  # an H100
        assert allow_tf32() and torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(before)


# ------------------------------------------------------------------------------------------ refused


def test_cuda_graphs_with_gradient_accumulation_are_refused(prepared):
    from medqa.errors import ConfigError
    from medqa.modeling import build_lora_model, load_tokenizer
    from medqa.runplan import setup_training
    from medqa.workdir import load_split

    cfg = demo_config(prepared, *PACKED)
    tokenizer = load_tokenizer(cfg)
    train_ds, model = load_split(cfg, "train", tokenizer), build_lora_model(cfg)
    for mode in ("reduce-overhead", "max-autotune"):
        cfg = demo_config(
            prepared, *PACKED, "train.compile=true", f"train.compile_mode={mode}", "train.tokens_per_step=2048"
        )
        with pytest.raises(ConfigError) as refused:
            setup_training(cfg, model, train_ds, tokenizer.pad_token_id)
        message = str(refused.value)
        assert f"compile_mode={mode}" in message and "accumulates 2 micro-batches" in message
        assert "overwritten" in message and "max-autotune-no-cudagraphs" in message and "tokens_per_step" in message
    # accumulation 1, or compiled without CUDA graphs: accepted (compilation itself happens at the first step)
    for extra in (
        ["train.compile_mode=reduce-overhead", "train.tokens_per_step=1024"],
        ["train.compile_mode=max-autotune-no-cudagraphs", "train.tokens_per_step=2048"],
    ):
        cfg = demo_config(prepared, *PACKED, "train.compile=true", *extra)
        assert setup_training(cfg, model, train_ds, tokenizer.pad_token_id).fast_step.compiled


# ------------------------------------------------------------------------------------------ fallbacks


def test_missing_default_tracker_warns_once_and_training_runs(prepared, tmp_path, monkeypatch, caplog):
    from transformers.integrations import get_available_reporting_integrations

    from medqa.errors import ConfigError
    from medqa.train import _report_to, train

    for name in ("tensorboard", "tensorboardX"):
        monkeypatch.setitem(sys.modules, name, None)  # as on an image without them: find_spec finds nothing
    assert "tensorboard" not in get_available_reporting_integrations()
    cfg = demo_config(copy_workdir(prepared, tmp_path / "w"), *(q for q in QUICK if "report_to" not in q))
    assert cfg.train.report_to == ["tensorboard"]  # the default
    with caplog.at_level(logging.WARNING):
        result = train(cfg)
    assert len(_warnings(caplog, "not installed here")) == 1
    assert result.metrics["steps"] == 2 and (result.out_dir / "metrics.jsonl").exists()
    named = demo_config(tmp_path, "train.report_to=[tensorboard,mlflow]")  # named by the user: an error
    with pytest.raises(ConfigError, match="pip install tensorboard"):
        _report_to(named)


def _broken_compile(fn, **kwargs):
    def run(*args, **kw):
        raise RuntimeError("injected: inductor backend failed")

    return run


@pytest.mark.parametrize("mode, recorded", [("default", "compile"), ("reduce-overhead", "compile+cuda_graphs")])
def test_compile_failing_at_the_first_step_falls_back_to_eager(prepared, tmp_path, monkeypatch, caplog, mode, recorded):
    from medqa.train import train

    monkeypatch.setattr(torch, "compile", _broken_compile)
    cfg = demo_config(
        copy_workdir(prepared, tmp_path / "w"), *PACKED, *QUICK, "train.compile=true", f"train.compile_mode={mode}"
    )
    with caplog.at_level(logging.WARNING):
        result = train(cfg)
    assert len(_warnings(caplog, "injected: inductor backend failed")) == 1
    training = _metrics(result)["training"]
    assert training["fallbacks"] == [
        {
            "optimisation": recorded,
            "reason": "RuntimeError: injected: inductor backend failed",
            "instead": "the eager training step with SDPA attention",
        }
    ]
    assert training["compiled"] is False and training["compile_seconds"] == 0.0
    assert result.metrics["steps"] == 2 and len([r for r in result.history if "train_loss" in r]) == 2


def test_compile_refused_up_front_falls_back_to_eager(prepared, monkeypatch):
    from medqa.fallbacks import Fallbacks
    from medqa.faststep import FastStep
    from medqa.modeling import build_lora_model

    def refuse(fn, **kwargs):
        raise RuntimeError("injected: Dynamo is not supported on this Python")

    monkeypatch.setattr(torch, "compile", refuse)
    fallbacks = Fallbacks()
    step = FastStep(build_lora_model(demo_config(prepared, *PACKED)), compile=True, fallbacks=fallbacks)
    assert not step.compiled and step.proven
    assert [r["optimisation"] for r in fallbacks.records] == ["compile"]
    assert torch.isfinite(step(_packed_batch(demo_config(prepared, *PACKED))))


def test_an_error_of_the_plain_path_is_raised_not_hidden(prepared, tmp_path, monkeypatch, caplog):
    """Only the optimised path falls back: when the eager retry fails too, its own error stops the run."""
    from medqa import faststep
    from medqa.train import train

    def broken_loss(*args, **kwargs):
        raise ValueError("injected: a real bug in the loss")

    monkeypatch.setattr(torch, "compile", _broken_compile)
    monkeypatch.setattr(faststep, "lm_loss_sum", broken_loss)
    cfg = demo_config(copy_workdir(prepared, tmp_path / "w"), *PACKED, *QUICK, "train.compile=true")
    with caplog.at_level(logging.WARNING), pytest.raises(ValueError, match="a real bug in the loss"):
        train(cfg)
    assert len(_warnings(caplog, "injected: inductor backend failed")) == 1


def test_flex_attention_failing_falls_back_to_sdpa(prepared, tmp_path, monkeypatch, caplog):
    """FlexAttention chosen (as on a GPU); on CPU its backward does not exist, a real first-step failure."""
    from medqa import runplan
    from medqa.train import train

    monkeypatch.setattr(runplan, "_attention", lambda cfg: "flex")
    cfg = demo_config(copy_workdir(prepared, tmp_path / "w"), *PACKED, *QUICK, "train.attention=flex")
    with caplog.at_level(logging.WARNING):
        result = train(cfg)
    training = _metrics(result)["training"]
    assert [r["optimisation"] for r in training["fallbacks"]] == ["flex_attention"]
    assert "backward" in training["fallbacks"][0]["reason"] and training["attention"] == "sdpa"
    assert len(_warnings(caplog, "flex_attention failed")) == 1 and result.metrics["steps"] == 2


def test_fused_adamw_unavailable_falls_back_to_plain_adamw(prepared, tmp_path, monkeypatch, caplog):
    from medqa.fallbacks import Fallbacks
    from medqa.train import _training_args, train

    real = torch.optim.AdamW

    class NoFused(real):
        def __init__(self, params, *args, fused=None, **kwargs):
            if fused:
                raise RuntimeError("injected: fused AdamW is not supported on this device")
            super().__init__(params, *args, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", NoFused)
    cfg = demo_config(copy_workdir(prepared, tmp_path / "w"), *QUICK)
    fallbacks = Fallbacks()
    assert _training_args(cfg, tmp_path, True, None, fallbacks).optim == "adamw_torch"
    assert [r["optimisation"] for r in fallbacks.records] == ["fused_adamw"]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        result = train(cfg)  # the Trainer builds NoFused without fused=True
    assert [r["optimisation"] for r in _metrics(result)["training"]["fallbacks"]] == ["fused_adamw"]
    assert len(_warnings(caplog, "fused AdamW is not supported")) == 1 and result.metrics["steps"] == 2


def test_token_budget_failing_falls_back_to_the_plain_batch(prepared, tmp_path, monkeypatch, caplog):
    from medqa import runplan
    from medqa.train import train

    real, calls = runplan.plan_batches, []

    def flaky(*args, **kwargs):  # sizing from the card's memory fails once (a driver that cannot report it)
        calls.append(args)
        if len(calls) == 1:
            raise RuntimeError("injected: cudaMemGetInfo failed")
        return real(*args, **kwargs)

    monkeypatch.setattr(runplan, "plan_batches", flaky)
    cfg = demo_config(copy_workdir(prepared, tmp_path / "w"), "train.packing=true", "train.batch_size=3", *QUICK)
    with caplog.at_level(logging.WARNING):
        result = train(cfg)
    training = _metrics(result)["training"]
    assert [r["optimisation"] for r in training["fallbacks"]] == ["token_budget"]
    assert training["batch_plan"]["rows_per_batch"] == 3 and "train.batch_size=3" in training["fallbacks"][0]["instead"]
    assert len(_warnings(caplog, "cudaMemGetInfo failed")) == 1 and result.metrics["steps"] == 2


def test_static_cache_failure_falls_back_to_the_dynamic_cache(prepared, monkeypatch, caplog):
    """`medqa evaluate` with static-cache generation failing: every batch is answered with the dynamic cache (the
    same answers), one warning, and report.json says so."""
    from transformers import GenerationMixin

    from medqa.evaluate import evaluate
    from medqa.generate import generate_answers
    from medqa.modeling import load_model, load_tokenizer

    real, static_tries = GenerationMixin.generate, []

    def generate(self, *args, cache_implementation=None, **kwargs):
        if cache_implementation == "static":
            static_tries.append(1)
            raise RuntimeError("injected: static cache compile failed")
        return real(self, *args, cache_implementation=cache_implementation, **kwargs)

    monkeypatch.setattr(GenerationMixin, "generate", generate)
    settings = [
        "generate.max_new_tokens=8",
        "generate.batch_size=2",
        "evaluate.num_questions=5",
        "evaluate.pubmedqa_questions=0",
        "scoring.bootstrap_samples=0",
    ]
    cfg = demo_config(prepared, "generate.static_cache=true", *settings)
    with caplog.at_level(logging.WARNING):
        report = evaluate(cfg).report
    assert [r["optimisation"] for r in report["fallbacks"]] == ["static_cache"]
    assert static_tries == [1] and len(_warnings(caplog, "static cache compile failed")) == 1
    dynamic = demo_config(prepared, "generate.static_cache=false", *settings)
    questions = [s["question"] for s in report["samples"]]
    assert [s["base"] for s in report["samples"]] == generate_answers(
        load_model(dynamic), load_tokenizer(dynamic), dynamic, questions
    )
