"""Stage 3, `train(cfg)`: LoRA fine-tuning with transformers' Trainer, logged and evaluated on answer_loss.

Reads `tokenized/tokenized_{train,val,test}`. Checkpoints go to `outputs/finetune_checkpoints/` (kept for
`train.resume=true`); the finished run is written atomically to `outputs/finetune/`: the adapter
(adapter_model.safetensors + adapter_config.json), the tokenizer, `config.yaml`, `metrics.jsonl` (one line per
logging step and per evaluation), `metrics.json` (val and test, as the baseline's), `per_example.jsonl`,
`loss_curves.png` and `tensorboard/`.

Effective batch = train.batch_size x train.grad_accum; e.g. 8 x 4 = 32 examples x ~225 tokens = ~7,200 tokens
per optimizer step on HealthCareMagic with BioGPT's tokenizer.
"""

from __future__ import annotations

import json
import logging
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import yaml

from medqa.artifacts import atomic_dir, write_json
from medqa.baseline import EVAL_SPLITS, load_tokenized, metrics_table, per_example_rows
from medqa.config import Config
from medqa.errors import ConfigError, Interrupted, MedqaError
from medqa.manifest import fingerprint_model, write_manifest
from medqa.metrics import evaluate_answer_loss, pad_batch
from medqa.packing import PackedCollator, pack_dataset
from medqa.modeling import count_parameters, load_model, load_tokenizer, model_path, resolve_lora_targets

log = logging.getLogger(__name__)

HISTORY = "metrics.jsonl"


@dataclass
class TrainResult:
    metrics: dict
    out_dir: Path
    history: list[dict] = field(default_factory=list, repr=False)

    def table(self) -> str:
        return metrics_table({"fine-tuned": self.metrics})


def _precision(cfg: Config) -> dict:
    import torch

    mp = cfg.train.mixed_precision
    if mp == "auto":
        mp = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if torch.cuda.is_available() else "no"
    if mp != "no" and not torch.cuda.is_available():
        raise ConfigError(f"train.mixed_precision={mp} needs a CUDA GPU; use auto or no on this machine.")
    return {"bf16": mp == "bf16", "fp16": mp == "fp16"}


def _compute_dtype(cfg: Config):
    """The dtype attention runs in: the additive packing mask must match it."""
    import torch

    precision = _precision(cfg)
    return torch.bfloat16 if precision["bf16"] else (torch.float16 if precision["fp16"] else torch.float32)


def build_lora_model(cfg: Config):
    """The base model wrapped with peft LoRA (optionally 4-bit QLoRA on CUDA)."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import set_seed

    set_seed(cfg.seed)  # LoRA's A matrices are initialised randomly
    if cfg.train.qlora:
        model = _load_4bit(cfg)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.train.gradient_checkpointing)
    else:
        model = load_model(cfg, for_training=True)
    targets = resolve_lora_targets(model, cfg.lora.targets)
    lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=targets, task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    trainable, total = count_parameters(model)
    log.info("LoRA r=%d alpha=%d on %s: %s trainable of %s parameters (%.3f%%)", cfg.lora.r, cfg.lora.alpha,
             targets, f"{trainable:,}", f"{total:,}", 100 * trainable / total)
    print(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.3f}%), LoRA on {targets}")
    return model.to(torch.float32) if not cfg.train.qlora else model


def _load_4bit(cfg: Config):
    import torch

    if not torch.cuda.is_available():
        raise ConfigError("train.qlora=true needs a CUDA GPU (bitsandbytes 4-bit); set train.qlora=false here.")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError("train.qlora=true needs bitsandbytes: pip install 'medqa[gpu]'.") from None
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    compute = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute,
                               bnb_4bit_use_double_quant=True)
    return AutoModelForCausalLM.from_pretrained(model_path(cfg), quantization_config=quant, device_map={"": 0},
                                                trust_remote_code=cfg.model.trust_remote_code)


def _trainer_class():
    from transformers import Trainer

    class AnswerLossTrainer(Trainer):
        """Trainer whose evaluation is our `answer_loss` (summed over all answer tokens of the split, then
        divided by their count). Trainer's own eval loss is a mean of per-batch means, which depends on how
        the examples fall into batches, so it would not be comparable with the baseline."""

        def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict:
            ds = eval_dataset if eval_dataset is not None else self.eval_dataset
            m, _ = evaluate_answer_loss(self.model, ds, self.processing_class.pad_token_id,
                                        self.args.per_device_eval_batch_size, bootstrap_samples=0)
            metrics = {f"{metric_key_prefix}_answer_loss": m["answer_loss"],
                       f"{metric_key_prefix}_answer_perplexity": m["answer_perplexity"]}
            self.log(metrics)
            self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
            return metrics

    return AnswerLossTrainer


def _history_callback(path: Path, tokens_per_example: float):
    from transformers import TrainerCallback

    class History(TrainerCallback):
        """Appends one JSON line per logging step (train) and per evaluation to metrics.jsonl."""

        def __init__(self):
            self.last_time, self.last_step = None, 0

        def on_train_begin(self, args, state, control, **kw):
            # On resume, drop lines logged after the checkpoint we restart from, so no step appears twice.
            if path.exists():
                keep = [x for x in path.read_text().splitlines() if json.loads(x)["step"] <= state.global_step]
                path.write_text("".join(x + "\n" for x in keep))
            self.last_time, self.last_step = time.perf_counter(), state.global_step

        def on_log(self, args, state, control, logs=None, **kw):
            logs = logs or {}
            row = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4)}
            if "loss" in logs:
                now = time.perf_counter()
                steps = max(state.global_step - self.last_step, 1)
                secs = max(now - self.last_time, 1e-9)
                examples = steps * args.per_device_train_batch_size * args.gradient_accumulation_steps
                row.update(train_loss=logs["loss"], learning_rate=logs.get("learning_rate"),
                           grad_norm=logs.get("grad_norm"), examples_per_s=examples / secs,
                           tokens_per_s=examples * tokens_per_example / secs)
                self.last_time, self.last_step = now, state.global_step
            elif "eval_answer_loss" in logs:
                row.update(eval_answer_loss=logs["eval_answer_loss"],
                           eval_answer_perplexity=logs["eval_answer_perplexity"])
            else:
                return
            with open(path, "a") as f:
                f.write(json.dumps(row) + "\n")

    return History()


class _GracefulStop:
    """Ctrl-C (SIGINT) or a notebook's stop button: finish the current step, save a checkpoint, then stop.
    A second Ctrl-C interrupts at once."""

    def __init__(self):
        self.requested = False
        self.previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("Stopping after this step and saving a checkpoint (Ctrl-C again to abort at once).")

    def callback(self):
        from transformers import TrainerCallback

        stop = self

        class StopOnRequest(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                if stop.requested:
                    control.should_save = True
                    control.should_training_stop = True

        return StopOnRequest()


def last_complete_checkpoint(work: Path) -> Path | None:
    """The newest checkpoint that finished writing (its trainer_state.json is written last). A run killed while
    saving leaves a partial folder, which Trainer's own `resume_from_checkpoint=True` would pick."""
    done = [p for p in work.glob("checkpoint-*") if (p / "trainer_state.json").exists()] if work.is_dir() else []
    return max(done, key=lambda p: int(p.name.split("-")[-1]), default=None)


def check_disk(cfg: Config, folder: Path, trainable: int, total_steps: int) -> None:
    """Stop before training when the disk cannot hold the checkpoints and logs.

    A checkpoint holds the adapter plus AdamW's two moments (3 x 4 bytes per trainable parameter) and small state
    files; `save_total_limit` of them, plus the best, plus the final adapter, plus logs of ~1 KB per step."""
    per_checkpoint = 12 * trainable + (1 << 20)
    need = (cfg.train.save_total_limit + 2) * per_checkpoint + 4 * trainable + 1024 * total_steps + (20 << 20)
    free = shutil.disk_usage(folder).free
    if free < need:
        raise MedqaError(f"Not enough disk space in {folder}: training needs about {need / 2**20:,.0f} MiB for "
                         f"{cfg.train.save_total_limit} checkpoints, the adapter and logs, and {free / 2**20:,.0f} MiB "
                         "are free. Free some space, lower train.save_total_limit, or set workdir to a larger disk.")


def _training_args(cfg: Config, work: Path, trial: bool):
    """Trainer settings from the config. A Tune trial saves no Trainer checkpoints: it reports its adapter to
    Ray at each evaluation and Ray keeps the best one, so a search never fills the disk with optimizer states."""
    import torch
    from transformers import TrainingArguments

    t = cfg.train
    return TrainingArguments(
        output_dir=str(work), seed=cfg.seed, data_seed=cfg.seed,
        learning_rate=t.learning_rate, weight_decay=t.weight_decay, lr_scheduler_type=t.scheduler,
        warmup_steps=t.warmup_ratio, max_grad_norm=t.max_grad_norm,
        num_train_epochs=t.epochs, max_steps=t.max_steps if t.max_steps > 0 else -1,
        per_device_train_batch_size=t.batch_size, per_device_eval_batch_size=cfg.eval.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        train_sampling_strategy="group_by_length" if t.group_by_length else "random", length_column_name="length",
        eval_strategy="steps", eval_steps=t.eval_steps, save_strategy="no" if trial else "steps",
        save_steps=t.eval_steps, save_total_limit=t.save_total_limit, load_best_model_at_end=not trial,
        metric_for_best_model="eval_answer_loss", greater_is_better=False,
        logging_strategy="steps", logging_steps=t.logging_steps, logging_first_step=True,
        report_to=["tensorboard"], remove_unused_columns=False, dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        activation_checkpointing=t.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if t.gradient_checkpointing else None,
        disable_tqdm=False, **_precision(cfg),
    )


def train(cfg: Config, callbacks: list | None = None, run_dir: str | Path | None = None,
          trial: bool = False) -> TrainResult:
    """Fine-tune with LoRA; evaluate val answer_loss during training; keep the best checkpoint; write the run.

    `run_dir` (default `outputs/`) holds `finetune_checkpoints/` and `finetune/`. A Ray Tune trial passes its own
    folder and `trial=True`: it only trains and evaluates val (reported to Tune by a callback, with the adapter);
    the test split is not looked at while searching, and no run folder is written."""
    from transformers import EarlyStoppingCallback

    start = time.perf_counter()
    tokenizer = load_tokenizer(cfg)
    train_ds = load_tokenized(cfg, "train", tokenizer)
    evals = {s: load_tokenized(cfg, s) for s in EVAL_SPLITS}
    model = build_lora_model(cfg)

    outputs = Path(run_dir) if run_dir else Path(cfg.workdir) / "outputs"
    work = outputs / "finetune_checkpoints"
    checkpoint = last_complete_checkpoint(work)
    if not cfg.train.resume and work.exists():
        shutil.rmtree(work)  # a fresh run must not mix its history with an old one
    work.mkdir(parents=True, exist_ok=True)
    history_path = work / HISTORY
    if cfg.train.packing:
        # ~data.max_length / mean length examples per row; the block mask keeps them from seeing each other.
        train_ds = pack_dataset(train_ds, cfg.data.max_length)
        collate = PackedCollator(tokenizer.pad_token_id, mask_dtype=_compute_dtype(cfg))
        log.info("packing: %d rows of up to %d tokens", len(train_ds), cfg.data.max_length)
    else:
        collate = partial(pad_batch, pad_id=tokenizer.pad_token_id)
    tokens_per_example = sum(train_ds["length"]) / len(train_ds)
    extra = [_history_callback(history_path, tokens_per_example)] + list(callbacks or [])
    if cfg.train.early_stopping_patience:
        extra.append(EarlyStoppingCallback(early_stopping_patience=cfg.train.early_stopping_patience))
    trainable = count_parameters(model)[0]
    check_disk(cfg, work, trainable, cfg.train.max_steps or len(train_ds))
    stop = _GracefulStop()
    extra.append(stop.callback())
    trainer = _trainer_class()(
        model=model, args=_training_args(cfg, work, trial), train_dataset=train_ds,
        eval_dataset=evals["val"], data_collator=collate,
        processing_class=tokenizer, callbacks=extra)
    resume = cfg.train.resume and checkpoint is not None
    if cfg.train.resume and checkpoint is None:
        log.warning("train.resume=true but no checkpoint in %s; starting from scratch.", work)
    with stop:
        trainer.train(resume_from_checkpoint=str(checkpoint) if resume else None)
    if stop.requested:
        raise Interrupted(f"stopped at step {trainer.state.global_step} after saving a checkpoint in {work}; run "
                          "again with train.resume=true to continue.")
    history = [json.loads(x) for x in history_path.read_text().splitlines()]
    if trial:
        return TrainResult({"steps": trainer.state.global_step}, work, history)

    # The best checkpoint is loaded (load_best_model_at_end); score it with the baseline's function.
    results, rows = {}, []
    for split, ds in evals.items():
        results[split], scores = evaluate_answer_loss(trainer.model, ds, tokenizer.pad_token_id, cfg.eval.batch_size,
                                                      cfg.eval.bootstrap_samples, cfg.seed, progress=True)
        rows += per_example_rows(split, scores)
    trainable, total = count_parameters(trainer.model)
    metrics = {**results, "model": model_path(cfg), "adapter": str(outputs / "finetune"),
               "best_checkpoint": trainer.state.best_model_checkpoint, "best_val_answer_loss": trainer.state.best_metric,
               "steps": trainer.state.global_step, "trainable_parameters": trainable, "total_parameters": total,
               "seconds": round(time.perf_counter() - start, 2), "config": cfg.to_dict()}
    out_dir = outputs / "finetune"
    with atomic_dir(out_dir) as tmp:
        trainer.model.save_pretrained(tmp)  # adapter_model.safetensors + adapter_config.json
        tokenizer.save_pretrained(tmp)
        (tmp / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")
        shutil.copyfile(history_path, tmp / HISTORY)
        write_json(tmp / "metrics.json", metrics)
        (tmp / "per_example.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        write_manifest(tmp, "train", cfg, adapter_inputs(cfg, tokenizer))
        from medqa.plots import plot_training

        plot_training(history, baseline_loss=_baseline_val_loss(Path(cfg.workdir) / "outputs"),
                      path=tmp / "loss_curves.png")
        runs = work / "runs"
        if runs.is_dir():
            shutil.copytree(runs, tmp / "tensorboard")
    result = TrainResult(metrics, out_dir, history)
    log.info("train: %d steps in %.0fs; test answer_loss %.4f (perplexity %.2f)", metrics["steps"],
             metrics["seconds"], results["test"]["answer_loss"], results["test"]["answer_perplexity"])
    return result


def adapter_inputs(cfg: Config, tokenizer) -> dict[str, str]:
    """What an adapter depends on: the base model it was trained on, and the data it saw."""
    from medqa.data import prepared_inputs

    return {"base_model": fingerprint_model(model_path(cfg), cfg.model.revision), **prepared_inputs(cfg, tokenizer)}


def _baseline_val_loss(outputs: Path) -> float | None:
    path = outputs / "baseline" / "metrics.json"
    return json.loads(path.read_text())["val"]["answer_loss"] if path.exists() else None
