"""The GPU fast path, checked on CPU with the tiny model: token budgets and static shapes, the compiled step, the
chunked loss, FlexAttention's document mask, and the GPU config's defaults."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import REPO, copy_workdir, demo_config, prepare_demo

from medqa.batching import (
    BatchPlan,
    budget_from_memory,
    length_budget_batches,
    optimizer_steps,
    plan_batches,
    train_bytes_per_token,
)
from medqa.config import load_config

PACKED = ["train.packing=true", "train.tokens_per_batch=1024", "lora.dropout=0"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return prepare_demo(tmp_path_factory.mktemp("fast"))


def _no_dropout(workdir):
    """The tiny model without dropout: compiled and eager steps draw dropout masks from different RNG streams, so
    only a dropout-free model can show that they compute the same losses."""
    path = workdir / "models" / "tiny-biogpt" / "config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({k: (0.0 if "dropout" in k else v) for k, v in config.items()}))


def _biogpt_config():
    from transformers import BioGptConfig

    return BioGptConfig(
        vocab_size=42384,
        hidden_size=1024,
        num_hidden_layers=24,
        num_attention_heads=16,
        intermediate_size=4096,
        max_position_embeddings=1024,
    )


# ------------------------------------------------------------------------------------------ budgets


def test_auto_budget_differs_by_card_but_step_does_not():
    cfg = load_config(REPO / "configs" / "biogpt.yaml")
    big = plan_batches(cfg.train, 512, _biogpt_config(), free_bytes=78 * 2**30)  # an H100 after loading
    small = plan_batches(cfg.train, 512, _biogpt_config(), free_bytes=13 * 2**30)  # a T4 (15 GB) after loading
    assert big.rows_per_batch > small.rows_per_batch >= 1
    assert big.tokens_per_step == small.tokens_per_step == cfg.train.tokens_per_step == 32768
    assert "auto" in big.how and "GiB free" in big.how
    for plan in (big, small):
        assert plan.rows_per_batch * plan.grad_accum * 512 == 32768
    # An independent count for BioGPT-347M, LoRA on all linear layers, bf16 autocast (a review's, per layer and
    # token: 33 x hidden + 5 x feed-forward bytes of saved activations = 1.30 MB over 24 layers): the estimate is
    # within 15% of it, and what either card was given fits its memory by that count too, with the loss chunk's
    # 16 bytes per vocabulary entry.
    per_token = train_bytes_per_token(_biogpt_config(), cfg.train.loss_chunk_tokens)
    independent = (33 * 1024 + 5 * 4096) * 24
    assert abs(per_token - independent) / independent < 0.15
    for plan, free in ((big, 78 * 2**30), (small, 13 * 2**30)):
        assert plan.tokens_per_batch * independent + 16 * 42384 * cfg.train.loss_chunk_tokens < 0.8 * free
    assert (big.rows_per_batch, small.rows_per_batch) == (64, 4)


def test_budget_from_config_and_cpu_fallback():
    cfg = load_config(
        REPO / "configs" / "demo.yaml", ["train.packing=true", "train.tokens_per_batch=2048", "train.grad_accum=3"]
    )
    assert plan_batches(cfg.train, 256) == BatchPlan(8, 256, 3, "train.tokens_per_batch=2048")
    cfg = load_config(
        REPO / "configs" / "demo.yaml", ["train.packing=true", "train.batch_size=5", "train.tokens_per_step=2560"]
    )
    plan = plan_batches(cfg.train, 256)  # no GPU: batch_size rows, the largest divisor of the step's 10 rows
    assert (plan.rows_per_batch, plan.grad_accum, plan.tokens_per_step) == (5, 2, 2560)
    assert budget_from_memory(10, 10**6, 512) == 512  # never less than one row


def test_length_budget_batches_respect_tokens():
    lengths = [5, 50, 17, 33, 8, 49, 2, 40]
    batches = length_budget_batches(lengths, batch_size=3, max_tokens=100)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) * max(lengths[i] for i in b) <= 100 or len(b) == 1
    assert length_budget_batches(lengths, 3) == [[1, 5, 7], [3, 2, 4], [0, 6]]


# ------------------------------------------------------------------------------------------ static shapes


def test_packed_epoch_has_one_shape_and_respects_the_budget(prepared, tmp_path):
    from medqa.modeling import build_lora_model, load_tokenizer
    from medqa.runplan import setup_training
    from medqa.train import _training_args
    from medqa.trainer import AnswerLossTrainer
    from medqa.workdir import load_split

    cfg = demo_config(prepared, *PACKED, "train.tokens_per_batch=1300")  # not a multiple of 256: 5 rows
    tokenizer = load_tokenizer(cfg)
    train_ds = load_split(cfg, "train", tokenizer)
    model = build_lora_model(cfg)
    setup = setup_training(cfg, model, train_ds, tokenizer.pad_token_id)
    assert setup.plan.rows_per_batch == 5 and setup.plan.tokens_per_batch == 1280 <= 1300
    trainer = AnswerLossTrainer(
        model=model,
        args=_training_args(cfg, tmp_path, True, setup.plan),
        train_dataset=setup.train_ds,
        eval_dataset=load_split(cfg, "val"),
        data_collator=setup.collate,
        processing_class=tokenizer,
    )
    shapes, labelled, examples = set(), 0, 0
    for batch in trainer.get_train_dataloader():
        shapes.add(tuple(batch["input_ids"].shape))
        assert batch["position_ids"].shape == (5, 256)
        assert "attention_mask" not in batch  # the fast step builds the block mask on the device
        labelled += int((batch["labels"] != -100).sum())
        examples += int((batch["position_ids"] == 0).sum())
    assert shapes == {(5, 256)}
    assert len(setup.train_ds) % 5, "the last batch should be partial (padded with empty rows) in this test"
    # Every answer token of the train split is trained on exactly once per epoch (first labels of each example
    # are -100 anyway in prepared data, so packing changes no count).
    assert labelled == sum(sum(x != -100 for x in row) for row in train_ds["labels"])


def test_wider_packed_rows_fill_better_and_train_every_answer_token_once(prepared, tmp_path):
    """train.pack_row_tokens = 2 x data.max_length: fewer, fuller rows of the one wider shape; the same labelled
    tokens per epoch; planned steps still equal the Trainer's."""
    from medqa.errors import ConfigError
    from medqa.modeling import build_lora_model, load_tokenizer
    from medqa.packing import pack_stats
    from medqa.runplan import planned_steps, setup_training
    from medqa.train import train
    from medqa.workdir import load_split

    narrow = demo_config(prepared, *PACKED)
    wide = demo_config(prepared, *PACKED, "train.pack_row_tokens=512", "train.tokens_per_batch=2048")
    tokenizer = load_tokenizer(wide)
    train_ds = load_split(wide, "train", tokenizer)
    model = build_lora_model(wide)
    rows = {}
    for name, cfg in (("narrow", narrow), ("wide", wide)):
        setup = setup_training(cfg, model, train_ds, tokenizer.pad_token_id)
        batch = setup.collate([setup.train_ds[i] for i in range(setup.plan.rows_per_batch)])
        assert batch["input_ids"].shape == (4, 256 if name == "narrow" else 512)
        assert sum(setup.train_ds["length"]) == sum(train_ds["length"])  # every example packed once
        rows[name] = len(setup.train_ds)
    lengths = list(train_ds["length"])
    assert pack_stats(lengths, 512, 4)["fill"] >= pack_stats(lengths, 256, 4)["fill"]
    assert rows["wide"] < rows["narrow"]
    cfg = demo_config(
        copy_workdir(prepared, tmp_path / "wide"),
        *PACKED,
        "train.pack_row_tokens=512",
        "train.tokens_per_batch=2048",
        "train.epochs=1",
        "train.eval_steps=1000",
        "scoring.max_examples=4",
        "scoring.bootstrap_samples=0",
    )
    assert train(cfg, trial=True).metrics["steps"] == planned_steps(cfg, load_split(cfg, "train"))
    with pytest.raises(ConfigError, match="shorter than data.max_length"):
        demo_config(prepared, *PACKED, "train.pack_row_tokens=128")
    with pytest.raises(ConfigError, match="wider than the model's 1024 positions"):
        setup_training(
            demo_config(prepared, *PACKED, "train.pack_row_tokens=2048"), model, train_ds, tokenizer.pad_token_id
        )


def test_planned_steps_equal_the_trainers(prepared, tmp_path):
    from medqa.runplan import planned_steps
    from medqa.train import train
    from medqa.workdir import load_split

    for extra in (
        ["train.packing=false", "train.batch_size=7", "train.grad_accum=3", "train.epochs=1.5"],
        [*PACKED, "train.tokens_per_step=3072", "train.epochs=1"],
    ):
        cfg = demo_config(
            copy_workdir(prepared, tmp_path / str(len(extra))),
            "train.eval_steps=1000",
            "scoring.max_examples=4",
            "scoring.bootstrap_samples=0",
            *extra,
        )
        expected = planned_steps(cfg, load_split(cfg, "train"))
        assert train(cfg, trial=True).metrics["steps"] == expected


def test_optimizer_steps_arithmetic():
    assert optimizer_steps(10, 4, 2.0) == 6  # ceil(10/4) = 3 per epoch, the Trainer's count (not ceil(10/4*2) = 5)
    assert optimizer_steps(10, 4, 1.5) == 5
    assert optimizer_steps(10, 4, 1.0, max_steps=9) == 9


# ------------------------------------------------------------------------------------------ equal losses


def _packed_batch(cfg, n=6):
    from medqa.packing import PackedCollator, pack_examples
    from medqa.workdir import load_split

    ds = load_split(cfg, "val")
    rows = [ds[i] for i in range(n)]
    packed = pack_examples(rows, cfg.data.max_length)
    return rows, PackedCollator(1, pad_to_multiple_of=cfg.data.max_length, rows=len(packed) + 1)(packed)


def test_fast_step_loss_and_gradients_equal_the_unpacked_models(prepared):
    """The packed fast step (chunked loss) gives the same loss and LoRA gradients as the model's own forward on
    each example alone, summed over answer tokens: packing and chunking change no number."""
    from medqa.faststep import FastStep
    from medqa.metrics import pad_batch
    from medqa.modeling import build_lora_model

    cfg = demo_config(prepared, *PACKED)
    model = build_lora_model(cfg).eval()  # no dropout (gradients still flow): both passes see the same network
    rows, batch = _packed_batch(cfg)
    n_items = int((batch["labels"][:, 1:] != -100).sum())
    fast = FastStep(model, loss_chunk_tokens=100)
    # the mask from the collator, or built from the position ids inside the step: the same loss
    without_mask = {k: v for k, v in batch.items() if k != "attention_mask"}
    assert fast(without_mask, torch.tensor(n_items)).item() == pytest.approx(
        fast(batch, torch.tensor(n_items)).item(), rel=1e-6
    )
    loss = fast(without_mask, torch.tensor(n_items))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    total = 0.0
    for row in rows:
        single = pad_batch([row], pad_id=1)
        out = model(**single)
        tokens = int((single["labels"][:, 1:] != -100).sum())
        total = total + out.loss * tokens
    reference = total / n_items
    reference.backward()
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-7)


def test_chunked_loss_equals_whole(prepared):
    from medqa.faststep import lm_loss_sum
    from medqa.modeling import build_lora_model

    cfg = demo_config(prepared, *PACKED)
    model = build_lora_model(cfg)
    _, batch = _packed_batch(cfg)
    base = model.get_base_model()
    hidden = base.base_model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"]
    ).last_hidden_state
    whole = lm_loss_sum(hidden, batch["labels"], base.get_output_embeddings())
    for chunk in (1, 97, 256, 10_000):
        assert lm_loss_sum(hidden, batch["labels"], base.get_output_embeddings(), chunk).item() == pytest.approx(
            whole.item(), rel=1e-6
        )


@pytest.mark.slow
def test_compiled_and_eager_training_losses_agree(prepared, tmp_path):
    """torch.compile (inductor, on CPU here) trains to the same losses as eager, step by step.

    Slow (inductor compiles the step on CPU): the only test of a compiled run's losses; the fast set checks the
    compiled step's graph (tests/test_gpu_path.py)."""
    from medqa.train import train

    histories = {}
    for compile_ in ("false", "true"):
        work = copy_workdir(prepared, tmp_path / compile_)
        _no_dropout(work)
        cfg = demo_config(
            work,
            *PACKED,
            f"train.compile={compile_}",
            "train.max_steps=6",
            "train.logging_steps=1",
            "train.eval_steps=3",
            "train.loss_chunk_tokens=300",
            "scoring.bootstrap_samples=0",
        )
        result = train(cfg)
        histories[compile_] = [r["train_loss"] for r in result.history if "train_loss" in r]
        training = result.metrics["training"]
        assert training["compiled"] is (compile_ == "true")
        assert training["batch_plan"]["tokens_per_batch"] == 1024
        if compile_ == "true":
            assert training["compile_seconds"] > 0 and training["first_step_seconds"] > training["median_step_seconds"]
    assert len(histories["true"]) == 6
    assert histories["true"] == pytest.approx(histories["false"], rel=1e-4)


def test_flex_document_mask_matches_the_block_mask(prepared):
    """FlexAttention with the document BlockMask (inference: torch has no flex backward on CPU) gives the logits
    of SDPA with the dense block-diagonal mask."""
    from medqa.faststep import document_block_mask
    from medqa.modeling import load_model

    cfg = demo_config(prepared)
    _, batch = _packed_batch(cfg)
    model = load_model(cfg).eval()
    with torch.no_grad():
        dense = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"]
        ).logits
        model.set_attn_implementation("flex_attention")
        flex = model(
            input_ids=batch["input_ids"],
            attention_mask=document_block_mask(batch["position_ids"]),
            position_ids=batch["position_ids"],
        ).logits
    real = batch["labels"] != -100
    torch.testing.assert_close(flex[real], dense[real], rtol=1e-4, atol=1e-4)


def test_flex_needs_cuda():
    from medqa.errors import ConfigError
    from medqa.runplan import _attention

    cfg = load_config(REPO / "configs" / "demo.yaml", ["train.attention=flex"])
    with pytest.raises(ConfigError, match="CUDA"):
        _attention(cfg)


# ------------------------------------------------------------------------------------------ config


def test_gpu_config_defaults_are_the_fast_path():
    cfg = load_config(REPO / "configs" / "biogpt.yaml")
    t = cfg.train
    assert t.packing is True and t.compile == "auto" and t.tokens_per_batch == 0 and t.tokens_per_step > 0
    assert t.loss_chunk_tokens > 0 and cfg.scoring.tokens_per_batch == 0 and cfg.generate.static_cache == "auto"
    assert cfg.generate.batch_size >= 32
    # auto means: compiled and budgeted by memory on CUDA
    from unittest import mock

    from medqa import runplan

    with mock.patch("torch.cuda.is_available", return_value=True):
        assert runplan._use_compile(cfg)
    assert not runplan._use_compile(cfg)  # and not on this CPU machine


def test_compile_true_without_packing_is_refused():
    from medqa.errors import ConfigError

    with pytest.raises(ConfigError, match="train.packing=true"):
        load_config(REPO / "configs" / "demo.yaml", ["train.compile=true", "train.packing=false"])


def test_scoring_by_token_budget_gives_the_same_numbers(prepared):
    from medqa.metrics import score_examples
    from medqa.modeling import load_model
    from medqa.workdir import load_split

    cfg = demo_config(prepared)
    ds = load_split(cfg, "val")
    model = load_model(cfg)
    one = score_examples(model, ds, 1, batch_size=1)
    budget = score_examples(model, ds, 1, batch_size=1, tokens_per_batch=2000)
    assert budget.ids == one.ids
    assert budget.answer_nll == pytest.approx(one.answer_nll, rel=1e-5)
    assert (budget.answer_tokens == one.answer_tokens).all()


def test_static_cache_generation_gives_the_same_answers(prepared):
    """Greedy answers with the static KV cache (the CUDA default, forced here on CPU; prompts left-padded to a
    multiple of 64) equal those of the dynamic cache."""
    from medqa.generate import generate_answers
    from medqa.modeling import load_model, load_tokenizer

    questions = [
        "I have had a dry cough and a mild fever for three days, what should I do?",
        "My knee hurts when I climb stairs.",
        "Is it safe to take ibuprofen with my blood pressure tablets every day?",
    ]
    answers = {}
    for static in ("false", "true"):
        cfg = demo_config(
            prepared, f"generate.static_cache={static}", "generate.max_new_tokens=12", "generate.batch_size=2"
        )
        answers[static] = generate_answers(load_model(cfg), load_tokenizer(cfg), cfg, questions)
    assert answers["true"] == answers["false"]
    assert all(answers["true"])


def test_fast_step_trains_like_the_models_own_forward_in_the_trainer(prepared, tmp_path):
    """Inside transformers' Trainer (accumulation 2): the packed fast step logs the same training losses as the
    model's own forward on the same packed batches, in fp32 and under bf16 autocast (on CPU here), and it really
    runs in bf16 there (its losses differ from the fp32 ones)."""
    from transformers import TrainingArguments

    from medqa.modeling import build_lora_model, load_tokenizer
    from medqa.packing import PackedCollator
    from medqa.runplan import setup_training
    from medqa.trainer import AnswerLossTrainer
    from medqa.workdir import load_split

    work = copy_workdir(prepared, tmp_path / "w")
    _no_dropout(work)  # both paths must see the same network (dropout draws differ between them)
    cfg = demo_config(work, *PACKED, "train.tokens_per_batch=768", "train.grad_accum=2")
    tokenizer = load_tokenizer(cfg)
    losses = {}
    for precision in ("fp32", "bf16"):
        for path in ("fast", "model"):
            model = build_lora_model(cfg)
            setup = setup_training(cfg, model, load_split(cfg, "train", tokenizer), tokenizer.pad_token_id)
            collate = setup.collate
            if path == "model":  # the same rows, with the mask from the collator, through model(**batch)
                collate = PackedCollator(
                    1,
                    mask_dtype=torch.bfloat16 if precision == "bf16" else torch.float32,
                    pad_to_multiple_of=256,
                    rows=setup.plan.rows_per_batch,
                )
            elif precision == "bf16":
                setup.fast_step.mask_dtype = torch.bfloat16  # as _compute_dtype gives it on a bf16 GPU
            args = TrainingArguments(
                output_dir=str(tmp_path / path),
                max_steps=3,
                learning_rate=1e-2,
                seed=0,
                per_device_train_batch_size=setup.plan.rows_per_batch,
                gradient_accumulation_steps=2,
                logging_steps=1,
                report_to=[],
                remove_unused_columns=False,
                use_cpu=True,
                bf16=precision == "bf16",
                save_strategy="no",
                eval_strategy="no",
                train_sampling_strategy="random",
                disable_tqdm=True,
            )
            trainer = AnswerLossTrainer(
                model=model,
                args=args,
                train_dataset=setup.train_ds,
                data_collator=collate,
                processing_class=tokenizer,
                fast_step=setup.fast_step if path == "fast" else None,
            )
            trainer.train()
            losses[precision, path] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses["fp32", "fast"]) == 3
    assert losses["fp32", "fast"] == pytest.approx(losses["fp32", "model"], rel=1e-5)
    assert losses["bf16", "fast"] == pytest.approx(losses["bf16", "model"], rel=2e-4)
    assert losses["bf16", "fast"] != pytest.approx(losses["fp32", "fast"], rel=2e-5)


def test_report_to_reaches_the_trainer(tmp_path):
    from medqa.errors import ConfigError
    from medqa.train import _training_args

    cfg = load_config(REPO / "configs" / "demo.yaml", [f"workdir={tmp_path}"])
    assert _training_args(cfg, tmp_path, False, None).report_to == ["tensorboard"]
    cfg = load_config(REPO / "configs" / "demo.yaml", [f"workdir={tmp_path}", "train.report_to=[]"])
    assert _training_args(cfg, tmp_path, False, None).report_to in ([], ["none"], "none")
    for tracker, message in (("wandb", "pip install wandb"), ("not-a-tracker", "not a tracker")):
        cfg = load_config(REPO / "configs" / "demo.yaml", [f"workdir={tmp_path}", f"train.report_to=[{tracker}]"])
        if tracker == "wandb":
            pytest.importorskip("transformers.integrations")
            from transformers.integrations import get_available_reporting_integrations

            if "wandb" in get_available_reporting_integrations():
                continue  # installed here: nothing to refuse
        with pytest.raises(ConfigError, match=message):
            _training_args(cfg, tmp_path, False, None)
