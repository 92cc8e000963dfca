"""Stage 3, `train(cfg)`: LoRA fine-tuning with transformers' Trainer, logged and evaluated on answer_loss.

Reads `tokenized/tokenized_{train,val,test}`. Checkpoints go to `outputs/finetune_checkpoints/` (kept for
`train.resume=true`); the finished run is written atomically to `outputs/finetune/`: the adapter
(adapter_model.safetensors + adapter_config.json), the tokenizer, `config.yaml`, `metrics.jsonl` (one line per
logging step and per evaluation), `metrics.json` (val and test, as the baseline's), `per_example.jsonl`,
`loss_curves.png` and `tensorboard/`.

`train` names its steps: setup (`open_run`: the run record and the checkpoint to resume; `setup_training`: pack,
plan the batch shape, build the step; `check_disk`), fit (`fit`: the Trainer and its settings; `close_run`), score
(`score_splits`, `run_metrics`) and write (`write_run`). The plan is `medqa.runplan`'s, the run record (`open_run`,
`check_disk`, `close_run`) `medqa.runrecord`'s; this module holds the stage.

On CUDA the frozen base is held in the compute dtype and LoRA in fp32. A speed-up that fails here (compile, CUDA
graphs, FlexAttention, fused AdamW, the memory-sized token budget) gives way to the plain path with one warning,
recorded in metrics.json `training.fallbacks` (`medqa.fallbacks`).
"""

from __future__ import annotations

import logging
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from medqa import distributed as dist
from medqa.artifacts import atomic_dir, write_json
from medqa.batching import BatchPlan, eval_tokens_per_batch
from medqa.checkpoints import MarkComplete
from medqa.errors import ConfigError, Interrupted
from medqa.fallbacks import Fallbacks
from medqa.knowledge import knowledge_probe
from medqa.locks import locked
from medqa.manifest import write_manifest
from medqa.metrics import EVAL_SPLITS, metrics_table, sanity_check
from medqa.modeling import (
    build_lora_model,
    count_parameters,
    load_model,
    load_tokenizer,
    model_path,
    pick_device_dtype,
    precision,
    scoring_dtype,
)
from medqa.plots import plot_training
from medqa.runplan import Setup, setup_training
from medqa.runrecord import check_disk, close_run, open_run
from medqa.schema import Config, TrainConfig
from medqa.scoring import Scoring, split_results
from medqa.selection import Rule, candidate, choose
from medqa.trainer import AnswerLossTrainer, GracefulStop, History, StepTimer
from medqa.workdir import (
    HISTORY,
    Workdir,
    adapter_inputs,
    load_split,
    paths,
    read_metrics,
    write_per_example,
)

log = logging.getLogger(__name__)

GATHERED = "adapter_gathered"  # FSDP only: the final adapter gathered from the processes' shards


@dataclass
class TrainResult:
    metrics: dict
    out_dir: Path
    history: list[dict] = field(default_factory=list, repr=False)

    def table(self) -> str:
        return metrics_table({"fine-tuned": self.metrics})


@locked("train", unless="trial")  # a Ray trial runs under the search's tune lock
def train(
    cfg: Config, callbacks: list | None = None, run_dir: str | Path | None = None, trial: bool = False
) -> TrainResult:
    """Fine-tune with LoRA; evaluate val answer_loss during training; keep the best checkpoint; write the run.

    `run_dir` (default `outputs/`) holds `finetune_checkpoints/` and `finetune/`. A Ray Tune trial passes its own
    folder and `trial=True`: it only trains and evaluates val (reported to Tune by a callback, with the adapter);
    the test split is not looked at while searching, and no run folder is written."""
    start = time.perf_counter()
    dist.init(cfg.train.ddp_timeout)  # torchrun / accelerate launch: join the process group first (rank 0 writes)
    tokenizer = load_tokenizer(cfg)
    train_ds = load_split(cfg, "train", tokenizer)
    evals = {s: load_split(cfg, s) for s in EVAL_SPLITS}
    model = build_lora_model(cfg)
    where = Workdir.of(cfg, run_dir)
    record, checkpoint = open_run(cfg, where.checkpoints, tokenizer)
    setup = setup_training(cfg, model, train_ds, tokenizer.pad_token_id)
    check_disk(cfg, where.checkpoints, count_parameters(model)[0], setup.steps(cfg.train))
    trainer, timer = fit(cfg, model, tokenizer, setup, evals["val"], where.checkpoints, callbacks, trial, checkpoint)
    history, timing = close_run(where.checkpoints, record, setup, timer)
    if trial:
        return TrainResult({"steps": trainer.state.global_step, "timing": timing}, where.checkpoints, history)
    results, rows = score_splits(cfg, trainer, where.checkpoints, evals, tokenizer)
    metrics = run_metrics(cfg, trainer, where, results, history, setup.describe(), timing, start)
    if dist.is_main():
        sanity_check(metrics, len(tokenizer), "fine-tuned")
        write_run(cfg, trainer, tokenizer, where, metrics, rows, history)
    dist.barrier()  # the others wait until rank 0 has written the run, then return the same metrics
    return TrainResult(metrics, where.finetune, history)


def fit(
    cfg: Config,
    model,
    tokenizer,
    setup: Setup,
    eval_ds,
    work: Path,
    callbacks: list | None = None,
    trial: bool = False,
    resume_from: Path | None = None,
    pad_id: int | None = None,
):
    """Run transformers' Trainer on the set-up rows; returns (trainer, timer). Used by `train` and by
    bench/gpu.py, which times exactly this path (with `tokenizer=None` and the `pad_id` of its synthetic rows)."""
    from transformers import EarlyStoppingCallback

    timer = StepTimer()
    history = History(work / HISTORY, setup.tokens_per_row, setup.examples_per_row, timer)
    extra = [timer, history, MarkComplete()] + list(callbacks or [])
    if cfg.train.early_stopping_patience:
        extra.append(EarlyStoppingCallback(early_stopping_patience=cfg.train.early_stopping_patience))
    stop = GracefulStop(sigterm=not trial)
    extra.append(stop.callback())
    trainer = AnswerLossTrainer(
        model=model,
        args=_training_args(cfg, work, trial, setup.plan, setup.fallbacks),
        train_dataset=setup.train_ds,
        eval_dataset=eval_ds,
        data_collator=setup.collate,
        processing_class=tokenizer,
        callbacks=extra,
        fast_step=setup.fast_step,
        eval_tokens_per_batch=cfg.scoring.tokens_per_batch,
        pad_id=pad_id,
        score_dtype=pick_device_dtype(cfg)[1],
        rule=Rule.of(cfg),
        kl_beta=cfg.train.kl_to_base,
        knowledge=knowledge_probe(cfg, tokenizer, scoring_dtype(cfg)) if tokenizer else None,
    )
    if setup.fast_step is not None and trainer.fast_step is None:
        setup.fast_step = None  # several processes: the model's own forward trains (describe() says so)
    with stop:
        try:
            trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        finally:
            if setup.fast_step is not None and setup.fast_step.attention == "flex":
                setup.fast_step.base.set_attn_implementation("sdpa")  # later scoring: padded batches, SDPA
    if stop.requested:
        raise Interrupted(
            f"stopped ({signal.Signals(stop.signum).name}) at step {trainer.state.global_step} after saving a "
            f"checkpoint in {work}; run again with train.resume=true to continue.",
            stop.signum,
        )
    return trainer, timer


def _training_args(cfg: Config, work: Path, trial: bool, plan: BatchPlan | None, fallbacks: Fallbacks | None = None):
    """Trainer settings from the config. A Tune trial saves no Trainer checkpoints: it reports its adapter to
    Ray at each evaluation and Ray keeps the best one, so a search never fills the disk with optimizer states.
    With packing, `plan` sets the micro-batch (rows) and the accumulation."""
    import torch
    from transformers import TrainingArguments

    t = cfg.train
    cuda = torch.cuda.is_available()
    return TrainingArguments(
        output_dir=str(work),
        seed=cfg.seed,
        data_seed=cfg.seed,
        learning_rate=t.learning_rate,
        weight_decay=t.weight_decay,
        lr_scheduler_type=t.scheduler,
        warmup_steps=t.warmup_ratio,  # transformers 5 has no warmup_ratio: a float < 1 here is a share of steps
        max_grad_norm=t.max_grad_norm,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps if t.max_steps > 0 else -1,
        per_device_train_batch_size=plan.rows_per_batch if plan else t.batch_size,
        per_device_eval_batch_size=cfg.scoring.batch_size,
        gradient_accumulation_steps=plan.grad_accum if plan else t.grad_accum,
        # Packed rows are all ~data.max_length tokens: grouping them by length would only remove randomness.
        train_sampling_strategy="group_by_length" if t.group_by_length and not plan else "random",
        length_column_name="length",
        eval_strategy="steps",
        eval_steps=t.eval_steps,
        save_strategy="no" if trial else "steps",
        save_steps=t.eval_steps,
        save_total_limit=t.save_total_limit,
        load_best_model_at_end=not trial,
        # tune.objective (`medqa.selection`): val answer_loss, or it and what the adapter kept; equal to
        # eval_answer_loss under the default rule.
        metric_for_best_model="eval_objective",
        greater_is_better=False,
        # Early stopping's patience counter (and the other stateful callbacks) continue from the checkpoint.
        restore_callback_states_from_checkpoint=True,
        logging_strategy="steps",
        logging_steps=t.logging_steps,
        logging_first_step=True,
        report_to=_report_to(cfg),
        remove_unused_columns=False,
        # On a GPU, collate the next batches (padding, the 4D mask) in two worker processes while the GPU computes.
        dataloader_num_workers=2 if cuda else 0,
        dataloader_pin_memory=cuda,
        optim=_optimizer(fallbacks if fallbacks is not None else Fallbacks()),
        activation_checkpointing=t.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if t.gradient_checkpointing else None,
        disable_tqdm=False,
        **precision(cfg),
        # Several processes (medqa.distributed): on CPU, use_cpu is what makes accelerate use gloo DDP instead of
        # one process; LoRA uses every trainable parameter, so DDP need not search for unused ones each step.
        use_cpu=dist.world_size() > 1 and not cuda,
        ddp_find_unused_parameters=False if dist.world_size() > 1 else None,
        ddp_timeout=t.ddp_timeout,  # the group already exists (dist.init); kept equal so both say the same
    )


def _optimizer(fallbacks: Fallbacks) -> str:
    """Fused AdamW (one kernel for all LoRA tensors instead of several per tensor) where torch runs it on this
    device, tried on a one-element tensor; else torch's plain AdamW, recorded as a fallback."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        probe = torch.zeros(1, device=device, requires_grad=True)
        probe.grad = torch.ones_like(probe)
        torch.optim.AdamW([probe], fused=True).step()
    except Exception as exc:  # noqa: BLE001 - any failure of the fused kernel: the plain optimizer does the same
        fallbacks.record("fused_adamw", exc, "torch's AdamW without fusing (optim=adamw_torch)")
        return "adamw_torch"
    return "adamw_torch_fused"


def _report_to(cfg: Config) -> list[str]:
    """train.report_to, checked: every tracker must be one transformers knows and be installed here. The default
    (TensorBoard) missing is a warning, not an error: training without a tracker loses nothing medqa reports
    (metrics.jsonl and loss_curves.png are written either way); a tracker the user named must be there."""
    from transformers.integrations import get_available_reporting_integrations
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    wanted = [r for r in cfg.train.report_to if r != "none"]
    unknown = [r for r in wanted if r not in INTEGRATION_TO_CALLBACK]
    if unknown:
        raise ConfigError(
            f"train.report_to: {unknown[0]!r} is not a tracker transformers supports; choose from "
            f"{', '.join(sorted(INTEGRATION_TO_CALLBACK))}, or [] for none."
        )
    missing = [r for r in wanted if r not in get_available_reporting_integrations()]
    if missing and cfg.train.report_to == TrainConfig().report_to:
        log.warning(
            "train.report_to: %s (the default) is not installed here; training without a tracker "
            "(metrics.jsonl and loss_curves.png are written as always). pip install %s for its logs, or set "
            "train.report_to=[] to silence this.",
            missing[0],
            missing[0],
        )
        return ["none"]
    if missing:
        raise ConfigError(
            f"train.report_to: {missing[0]} is not installed here (pip install {missing[0].replace('_', '-')}"
            f"), or remove it from train.report_to (tensorboard is installed with medqa)."
        )
    return wanted or ["none"]


def score_splits(cfg: Config, trainer, work: Path, evals: dict, tokenizer) -> tuple[dict, list[dict]]:
    """(metrics per split, and per source with data.sources; per-example rows) of the best checkpoint, which the
    Trainer has loaded (load_best_model_at_end). It is scored as `medqa baseline` and `medqa evaluate` score
    models: the base model loaded in model.dtype with the adapter on top, by the same function, so base and
    fine-tuned numbers never mix precisions (training held the base in the compute dtype and LoRA in fp32, under
    autocast)."""
    scored = _as_scored(cfg, trainer, work)
    scoring = Scoring.of(cfg, evals)
    eval_tokens = eval_tokens_per_batch(cfg.scoring.tokens_per_batch, scored)
    out = {}
    for split, ds in evals.items():
        # Several processes: each scores a shard, every process gets all the scores (one process: all of them).
        scores = dist.gather_scores(scored, ds, tokenizer.pad_token_id, cfg.scoring.batch_size, True, eval_tokens)
        out[split] = scoring.summarize(scores, split)
    return split_results(out)


def _as_scored(cfg: Config, trainer, work: Path):
    """The trained adapter on a fresh base model in the scoring dtype (`modeling.pick_device_dtype`), exactly as
    `medqa evaluate` will load it from outputs/finetune."""
    import tempfile

    from peft import PeftModel

    if trainer.is_fsdp_enabled:
        # FSDP (configs/accelerate/fsdp.yaml): each process holds a shard of the adapter. The Trainer gathers it
        # (every process calls save_model; with FULL_STATE_DICT rank 0 writes one ordinary adapter), then every
        # process loads it whole. Not run in CI: accelerate runs FSDP on GPUs only (on CPU it falls back to DDP).
        trainer.save_model(str(work / GATHERED))
        dist.barrier()
        base = load_model(cfg)
        return PeftModel.from_pretrained(base, work / GATHERED).to(next(base.parameters()).device).eval()
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        trainer.model.save_pretrained(tmp)
        base = load_model(cfg)
        model = PeftModel.from_pretrained(base, tmp)
        return model.to(next(base.parameters()).device).eval()


def run_metrics(
    cfg: Config,
    trainer,
    where: Workdir,
    results: dict,
    history: list[dict],
    training: dict,
    timing: dict,
    start: float,
) -> dict:
    """metrics.json: the scores, how the checkpoint was chosen, the parameter counts, how training ran (`training`:
    `Setup.describe()`, then `timing`) and the config."""
    trainable, total = count_parameters(trainer.model)
    chosen = selection(cfg, history, trainer)
    return {
        **results,
        "dtype": scoring_dtype(cfg),
        "model": model_path(cfg),
        "adapter": str(where.finetune),
        # the in-training evaluation of the kept checkpoint (`val` above: the adapter re-scored as evaluate does)
        "best_checkpoint": trainer.state.best_model_checkpoint,
        "best_val_answer_loss": chosen.get("checkpoint", {}).get("answer_loss"),
        "selection": chosen,
        "steps": trainer.state.global_step,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "training": {**training, **timing},
        "seconds": round(time.perf_counter() - start, 2),
        "config": cfg.to_dict(),
    }


def selection(cfg: Config, history: list[dict], trainer) -> dict:
    """How the kept checkpoint was chosen (`medqa.selection`, the rule the Trainer applied through eval_objective):
    the rule, whether the kept checkpoint is eligible (warned when none was), and under `checkpoint` its step, val
    answer_loss, PubMedQA dev scores and objective."""
    rule = Rule.of(cfg)
    evals = [r for r in history if "eval_answer_loss" in r]
    out = {**rule.to_dict(), "rule": rule.describe()}
    best = trainer.state.best_model_checkpoint
    if not evals or not best:
        return out
    step = int(Path(best).name.rsplit("-", 1)[-1])
    row = next((r for r in evals if r["step"] == step), None)
    if rule.uses_knowledge:
        choice = choose([candidate(r, prefix="eval_") for r in evals], rule, "checkpoint")
        out.update(eligible=choice.eligible, message=choice.message)
    if row is not None:
        out["checkpoint"] = {"step": step, **{k[len("eval_") :]: v for k, v in row.items() if k.startswith("eval_")}}
    return out


def write_run(
    cfg: Config, trainer, tokenizer, where: Workdir, metrics: dict, rows: list[dict], history: list[dict]
) -> None:
    """Write outputs/finetune/ atomically (rank 0 only): the adapter, the tokenizer, config.yaml, metrics.jsonl,
    metrics.json, per_example.jsonl, the manifest, loss_curves.png and tensorboard/."""
    work = where.checkpoints
    with atomic_dir(where.finetune) as tmp:
        if trainer.is_fsdp_enabled:  # the adapter `_as_scored` gathered from the shards
            for f in (work / GATHERED).iterdir():
                if f.name.startswith("adapter_") or f.name == "README.md":
                    shutil.copy2(f, tmp / f.name)
        else:
            trainer.model.save_pretrained(tmp)  # adapter_model.safetensors + adapter_config.json
        tokenizer.save_pretrained(tmp)
        (tmp / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")
        shutil.copyfile(work / HISTORY, tmp / HISTORY)
        write_json(tmp / "metrics.json", metrics)
        write_per_example(tmp / "per_example.jsonl", rows)
        write_manifest(tmp, "train", cfg, adapter_inputs(cfg, tokenizer))
        baseline = read_metrics(paths(cfg).baseline)
        plot_training(
            history,
            baseline_loss=baseline["val"]["answer_loss"] if baseline else None,
            path=tmp / "loss_curves.png",
            max_knowledge_drop=Rule.of(cfg).drop_limit,
        )
        runs = work / "runs"
        if runs.is_dir():
            shutil.copytree(runs, tmp / "tensorboard")
    log.info(
        "train: %d steps in %.0fs; test answer_loss %.4f (perplexity %.2f)",
        metrics["steps"],
        metrics["seconds"],
        metrics["test"]["answer_loss"],
        metrics["test"]["answer_perplexity"],
    )
