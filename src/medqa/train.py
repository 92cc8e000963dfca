"""Stage 3, `train(cfg)`: LoRA fine-tuning with transformers' Trainer, logged and evaluated on answer_loss.

Reads `tokenized/tokenized_{train,val,test}`. Checkpoints go to `outputs/finetune_checkpoints/` (kept for
`train.resume=true`); the finished run is written atomically to `outputs/finetune/`: the adapter
(adapter_model.safetensors + adapter_config.json), the tokenizer, `config.yaml`, `metrics.jsonl` (one line per
logging step and per evaluation), `metrics.json` (val and test, as the baseline's), `per_example.jsonl`,
`loss_curves.png` and `tensorboard/`.

`train` names its steps: setup (`open_run`: the run record and the checkpoint to resume; `setup_training`: pack,
plan the batch shape, build the step), fit (`fit`: the Trainer; `close_run`), score (`score_splits`, `run_metrics`)
and write (`write_run`).

Batches: unpacked, train.batch_size x train.grad_accum examples per optimizer step (e.g. 8 x 4 = 32 examples x ~225
tokens = ~7,200 tokens on HealthCareMagic with BioGPT's tokenizer); packed (the GPU default), a token budget of rows
of data.max_length tokens, one static shape, compiled on CUDA (`medqa.batching`, `medqa.trainer`). On CUDA the
frozen base is held in the compute dtype and LoRA in fp32. A speed-up that fails here (compile, CUDA graphs,
FlexAttention, fused AdamW, the memory-sized token budget) gives way to the plain path with one warning, recorded in
metrics.json `training.fallbacks` (`medqa.fallbacks`).
"""

from __future__ import annotations

import json
import logging
import shutil
import signal
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import yaml

from medqa import distributed as dist
from medqa import schema
from medqa.artifacts import atomic_dir, write_json
from medqa.batching import BatchPlan, cuda_free_bytes, eval_tokens_per_batch, optimizer_steps, plan_batches
from medqa.checkpoints import MarkComplete, resumable_checkpoint, set_aside
from medqa.errors import ConfigError, Interrupted, MedqaError
from medqa.fallbacks import Fallbacks
from medqa.knowledge import knowledge_probe
from medqa.locks import locked
from medqa.manifest import check_resumable, run_record, write_manifest, write_run_record
from medqa.metrics import EVAL_SPLITS, metrics_table, pad_batch, sanity_check, summarize
from medqa.mixing import by_source, epoch_composition
from medqa.modeling import (
    build_lora_model,
    compute_dtype,
    count_parameters,
    load_model,
    load_tokenizer,
    model_path,
    pick_device_dtype,
    precision,
    scoring_dtype,
)
from medqa.packing import PackedCollator, pack_dataset, plan_packs
from medqa.plots import plot_training
from medqa.schema import Config, TrainConfig
from medqa.selection import Rule, candidate, choose
from medqa.trainer import (
    FAST_LOSS_MODEL_TYPES,
    AnswerLossTrainer,
    FastStep,
    GracefulStop,
    History,
    StepTimer,
    supports_fast_step,
)
from medqa.workdir import (
    HISTORY,
    Workdir,
    adapter_inputs,
    load_split,
    paths,
    per_example_rows,
    read_metrics,
    write_per_example,
)

log = logging.getLogger(__name__)

GATHERED = "adapter_gathered"  # FSDP only: the final adapter gathered from the processes' shards
RUN_SECTIONS = ("data", "prompt", "model", "lora", "train", "scoring")  # the config sections a training run depends on
# and the rule that picks its best checkpoint (`medqa.selection`): the tune fields declared to affect a run
SELECTION = tuple(k for k in schema.keys("train", path=False) if k.startswith("tune."))
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # torch.compile modes that capture CUDA graphs


@dataclass
class TrainResult:
    metrics: dict
    out_dir: Path
    history: list[dict] = field(default_factory=list, repr=False)

    def table(self) -> str:
        return metrics_table({"fine-tuned": self.metrics})


def check_process_count(cfg: Config, stored: dict | None) -> None:
    """A resume must run as many processes as the run it continues, unless train.tokens_per_step fixes the
    optimizer step: otherwise the global batch (examples per step, hence the learning-rate schedule's meaning)
    would change halfway."""
    before, now = (stored or {}).get("processes", 1), dist.world_size()
    if before == now or (cfg.train.packing and cfg.train.tokens_per_step):
        return
    raise ConfigError(
        f"Cannot resume: the checkpoints were written by {before} training process(es) and this run has {now}, "
        f"which changes the global batch ({before} x {now} micro-batches per step are not the same step). Resume "
        f"with the same count (torchrun --nproc_per_node {before} -m medqa train ..., or plain `medqa train` for 1), "
        "or, with train.packing=true, set train.tokens_per_step so every process count takes the same optimizer "
        "step, or start fresh with train.resume=false."
    )


def check_disk(cfg: Config, folder: Path, trainable: int, total_steps: int) -> None:
    """Stop before training when the disk cannot hold the checkpoints and logs.

    A checkpoint holds the adapter plus AdamW's two moments (3 x 4 bytes per trainable parameter) and small state
    files; `save_total_limit` of them, plus the best, plus the final adapter, plus logs of ~1 KB per step."""
    per_checkpoint = 12 * trainable + (1 << 20)
    need = (cfg.train.save_total_limit + 2) * per_checkpoint + 4 * trainable + 1024 * total_steps + (20 << 20)
    free = shutil.disk_usage(folder).free
    if free < need:
        raise MedqaError(
            f"Not enough disk space in {folder}: training needs about {need / 2**20:,.0f} MiB for "
            f"{cfg.train.save_total_limit} checkpoints, the adapter and logs, and {free / 2**20:,.0f} MiB "
            "are free. Free some space, lower train.save_total_limit, or set workdir to a larger disk."
        )


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


def _use_compile(cfg: Config) -> bool:
    import torch

    c = cfg.train.compile
    return c is True or (c == "auto" and cfg.train.packing and torch.cuda.is_available())


def _attention(cfg: Config) -> str:
    """sdpa (block-diagonal 4D mask) or flex (FlexAttention document mask; CUDA only)."""
    import torch

    if cfg.train.attention != "flex":
        return "sdpa"  # auto: the measured path; flex is opt-in until the GPU table shows it pays (BENCHMARKS.md)
    if not torch.cuda.is_available():
        raise ConfigError(
            "train.attention=flex needs a CUDA GPU: torch's FlexAttention has no backward on CPU. "
            "Use train.attention=sdpa (or auto) here."
        )
    return "flex"


def _use_flex(model) -> None:
    """FlexAttention for training. transformers' flex path has no attention dropout, so it is set to 0 (BioGPT's
    default is 0.1), and said so."""
    base = model.get_base_model()
    base.set_attn_implementation("flex_attention")
    attention = [
        m
        for m in base.modules()
        if type(m).__name__.endswith("Attention") and isinstance(getattr(m, "dropout", None), float)
    ]
    dropped = {m.dropout for m in attention}
    for m in attention:
        m.dropout = 0.0
    if any(dropped):
        log.warning(
            "train.attention=flex: FlexAttention has no attention dropout; attention dropout %s -> 0 for "
            "this run (hidden-state dropout is unchanged).",
            sorted(dropped),
        )


@dataclass
class Setup:
    """Everything `fit` needs, built from the config: the training rows (packed or not), the collator, the batch
    plan (packed only) and how the step runs."""

    train_ds: object
    collate: object
    plan: BatchPlan | None
    fast_step: object | None
    tokens_per_row: float
    examples_per_row: float
    fallbacks: Fallbacks = field(default_factory=Fallbacks)  # optimisations that could not run here, and why
    composition: dict = field(default_factory=dict)  # data.sources: examples per source in one epoch

    def describe(self) -> dict:
        fs = self.fast_step
        return {
            "packing": self.plan is not None,
            "batch_plan": job_plan(self.plan) if self.plan else None,
            "compiled": bool(fs and fs.compiled),
            "attention": fs.attention if fs else "model default",
            "loss_chunk_tokens": fs.chunk if fs else 0,
            "train_rows": len(self.train_ds),
            "fallbacks": self.fallbacks.records,
            **(
                {
                    "epoch_by_source": self.composition,
                    "epoch_examples": sum(c["per_epoch"] for c in self.composition.values()),
                }
                if self.composition
                else {}
            ),
        }


def job_plan(plan: BatchPlan, replicas: int | None = None) -> dict:
    """The batch plan as metrics.json states it: `tokens_per_step` for the whole job (every replica's micro-batches
    of one optimizer step), one replica's share named as such (`tokens_per_batch` is always one replica's
    micro-batch: a memory budget)."""
    replicas = replicas or dist.replicas()
    d = plan.to_dict()
    return {
        **d,
        "replicas": replicas,
        "tokens_per_step": d["tokens_per_step"] * replicas,
        "tokens_per_step_per_replica": d["tokens_per_step"],
    }


def row_tokens(cfg: Config) -> int:
    """Tokens per packed row: train.pack_row_tokens, or data.max_length (every micro-batch is rows x this)."""
    return cfg.train.pack_row_tokens or cfg.data.max_length


def setup_training(cfg: Config, model, train_ds, pad_id: int) -> Setup:
    """Pack (or not) the tokenized train split and decide the batch shape and the training step."""
    t = cfg.train
    fallbacks = Fallbacks()
    train_ds, composition = epoch_composition(cfg, train_ds)  # data.sources' weights (the split itself otherwise)
    if not t.packing:
        collate = partial(pad_batch, pad_id=pad_id)
        # The eager fast step on padded batches too: the same loss as the model's own forward, with the output
        # layer only at labelled positions (`lm_loss_sum`), not at every prompt and padding token.
        fast = None
        if supports_fast_step(model) and dist.replicas() == 1:
            fast = FastStep(model, loss_chunk_tokens=t.loss_chunk_tokens, fallbacks=fallbacks, kl_beta=t.kl_to_base)
        return Setup(
            train_ds, collate, None, fast, sum(train_ds["length"]) / len(train_ds), 1.0, fallbacks, composition
        )
    # ~data.max_length / mean length examples per row; the block mask keeps them from seeing each other.
    window = getattr(model.config, "max_position_embeddings", None)
    if window and row_tokens(cfg) > window:  # a row's padding takes positions 0.. up to its width
        raise ConfigError(
            f"train.pack_row_tokens={row_tokens(cfg)} is wider than the model's {window} positions. "
            f"Use at most {window} (or 0 for rows of data.max_length)."
        )
    train_ds = pack_dataset(train_ds, row_tokens(cfg))
    examples_per_row = sum(train_ds["num_examples"]) / len(train_ds)
    device = next(model.parameters()).device
    # Several processes: every rank plans with the smallest free memory of all, so all run the same micro-batch
    # and the same number of gradient all-reduces per step.
    plan = _plan(
        cfg,
        model.config,
        lambda: dist.min_over_ranks(cuda_free_bytes(device)) if device.type == "cuda" else None,
        dist.replicas(),
        fallbacks,
    )
    attention = _attention(cfg)
    fast = None
    # Several replicas (processes, or GPUs in one process) train through the DDP/FSDP/DataParallel wrapper's
    # forward (AnswerLossTrainer), which needs the block mask from the collator: no fast step then.
    if supports_fast_step(model) and dist.replicas() == 1:
        compile_ = _use_compile(cfg) and not t.kl_to_base  # the KL's disabled-adapter forward stays eager
        if compile_:
            _check_cuda_graphs(cfg, plan)
        if attention == "flex":
            _use_flex(model)
        fast = FastStep(
            model,
            compile=compile_,
            compile_mode=t.compile_mode,
            loss_chunk_tokens=t.loss_chunk_tokens,
            attention=attention,
            mask_dtype=compute_dtype(cfg),
            fallbacks=fallbacks,
            kl_beta=t.kl_to_base,
        )
    else:
        attention = "sdpa"  # the model's own forward, with the block mask from the collator
    if fast is None and (t.compile is True or t.loss_chunk_tokens or cfg.train.attention == "flex"):
        log.warning(
            "train.compile, train.loss_chunk_tokens and train.attention=flex apply to %s only; model type "
            "%r trains through its own forward.",
            ", ".join(sorted(FAST_LOSS_MODEL_TYPES)),
            getattr(model.config, "model_type", "?"),
        )
    # Every batch: plan.rows_per_batch rows x data.max_length tokens (one shape for the compiled step). The fast
    # step builds the attention mask on the device; only the model's own forward needs it from the collator.
    # One process over several GPUs (torch DataParallel) collates one batch for all of them, then splits it.
    per_collate = plan.rows_per_batch * (dist.replicas() if dist.world_size() == 1 else 1)
    collate = PackedCollator(
        pad_id,
        block_mask=fast is None,
        mask_dtype=compute_dtype(cfg),
        pad_to_multiple_of=row_tokens(cfg),
        rows=per_collate,
    )
    msg = (
        f"packing: {len(train_ds):,} rows of up to {row_tokens(cfg)} tokens ({examples_per_row:.2f} examples "
        f"per row); {plan.describe()}{f' in each of {dist.replicas()} replicas' if dist.replicas() > 1 else ''}; "
        f"step: {'compiled' if fast and fast.compiled else 'eager'}, "
        f"attention {attention}"
    )
    log.info(msg)
    print(msg)
    return Setup(
        train_ds, collate, plan, fast, sum(train_ds["length"]) / len(train_ds), examples_per_row, fallbacks, composition
    )


def _plan(cfg: Config, model_config, free_bytes, world: int, fallbacks: Fallbacks | None = None) -> BatchPlan:
    """`plan_batches` for this card, `free_bytes()` giving its free memory (None off CUDA). When sizing the
    micro-batch from memory fails (a driver that cannot report it, a model config without the usual sizes), the
    micro-batch is train.batch_size rows, as off CUDA; train.tokens_per_step still fixes the optimizer step."""
    try:
        return plan_batches(cfg.train, row_tokens(cfg), model_config, free_bytes(), world=world)
    except MedqaError:
        raise
    except Exception as exc:  # noqa: BLE001 - the plain plan below needs neither the card nor the model's shape
        plain = plan_batches(cfg.train, row_tokens(cfg), None, None, world=world)
        if fallbacks is not None:
            fallbacks.record("token_budget", exc, plain.describe())
        return plain


def _check_cuda_graphs(cfg: Config, plan: BatchPlan) -> None:
    """CUDA graphs (compile modes reduce-overhead, max-autotune) cannot accumulate gradients: refuse, before
    training starts."""
    mode = cfg.train.compile_mode
    if mode not in CUDA_GRAPH_MODES or plan.grad_accum == 1:
        return
    raise ConfigError(
        f"train.compile_mode={mode} captures CUDA graphs, which cannot run with gradient accumulation, and this run "
        f"accumulates {plan.grad_accum} micro-batches of {plan.tokens_per_batch:,} tokens per optimizer step "
        f"({plan.tokens_per_step:,} tokens): a CUDA graph's outputs, the first micro-batch's gradients among them, "
        "are overwritten by the next micro-batch's replay, which PyTorch either refuses or turns into silently wrong "
        "gradients. Use train.compile_mode=default or max-autotune-no-cudagraphs (compiled, without CUDA graphs), or "
        "an accumulation of 1: train.tokens_per_step equal to train.tokens_per_batch (if the card holds that "
        "micro-batch), or train.grad_accum=1 without train.tokens_per_step."
    )


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


def planned_steps(cfg: Config, train_ds, model_config=None, replicas: int = 0) -> int:
    """The optimizer steps `medqa train` will run on this tokenized train split (as the Trainer counts them), for
    ASHA's max_t and the disk check. With packing and an auto micro-batch on CUDA without train.tokens_per_step,
    the count depends on the card; it is then computed for this process's card. `replicas`: copies of the model
    that each take a micro-batch per step (0 = `medqa.distributed.replicas()`; a Tune trial with N GPUs: N)."""
    t = cfg.train
    replicas = replicas or dist.replicas()
    train_ds, _ = epoch_composition(cfg, train_ds)  # data.sources' weights change the epoch's size

    def per_replica(items: int, per_batch: int) -> int:
        # micro-batches of one replica: accelerate deals the ceil(items / per_batch) batches out in turn
        batches = -(-items // per_batch)
        return -(-batches // replicas)

    if not t.packing:
        return optimizer_steps(per_replica(len(train_ds), t.batch_size), t.grad_accum, t.epochs, t.max_steps)
    rows = len(plan_packs(list(train_ds["length"]), row_tokens(cfg)))
    plan = _plan(cfg, model_config, cuda_free_bytes, replicas)  # falls back as setup_training does, silently
    return optimizer_steps(per_replica(rows, plan.rows_per_batch), plan.grad_accum, t.epochs, t.max_steps)


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
    check_disk(cfg, where.checkpoints, count_parameters(model)[0], cfg.train.max_steps or len(setup.train_ds))
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


def open_run(cfg: Config, work: Path, tokenizer) -> tuple[dict, Path | None]:
    """The run's record and the checkpoint to resume from (None: a fresh run). What determines this run (settings
    and inputs) is kept beside its checkpoints: a resume must continue the same run, never report another run's
    adapter under this config's name. A fresh run removes the folder's old checkpoints and history."""
    record = {
        **run_record(cfg, RUN_SECTIONS, adapter_inputs(cfg, tokenizer), also=SELECTION),
        "processes": dist.world_size(),
    }
    choice = resumable_checkpoint(work, dist.world_size()) if cfg.train.resume else None
    checkpoint = choice.checkpoint if choice else None
    if cfg.train.resume and checkpoint is not None:
        stored = check_resumable(work, record, "training run", "train.resume=false")
        check_process_count(cfg, stored)
        if stored and stored.get("finished"):
            log.info(
                "train.resume=true: the run in %s already finished with these settings; its outputs are written again.",
                work,
            )
    elif cfg.train.resume:
        log.warning("train.resume=true but no checkpoint in %s; starting from scratch.", work)
    dist.barrier()  # every process has read the checkpoints before rank 0 may remove them
    if dist.is_main():
        if (not cfg.train.resume or checkpoint is None) and work.exists():
            shutil.rmtree(work)  # a fresh run must not mix its history with an old one
        elif choice is not None:
            set_aside(choice)  # damaged newer checkpoints: renamed, so their steps are trained and saved again
        write_run_record(work, record)
    dist.barrier()
    return record, checkpoint


def close_run(work: Path, record: dict, setup: Setup, timer: StepTimer) -> tuple[list[dict], dict]:
    """After fitting: the run marked finished, its history (metrics.jsonl's lines) and its timing."""
    dist.barrier()  # rank 0 has written the last line of metrics.jsonl
    if dist.is_main():
        write_run_record(work, {**record, "finished": True})
    history = [json.loads(x) for x in (work / HISTORY).read_text().splitlines()]
    timing = timer.summary(setup.describe()["compiled"])
    if timing.get("compile_seconds"):
        log.info(
            "torch.compile took about %.1f s (first step %.1f s, then %.3f s per step)",
            timing["compile_seconds"],
            timing["first_step_seconds"],
            timing["median_step_seconds"],
        )
    return history, timing


def score_splits(cfg: Config, trainer, work: Path, evals: dict, tokenizer) -> tuple[dict, list[dict]]:
    """(metrics per split, and per source with data.sources; per-example rows) of the best checkpoint, which the
    Trainer has loaded (load_best_model_at_end). It is scored as `medqa baseline` and `medqa evaluate` score
    models: the base model loaded in model.dtype with the adapter on top, by the same function, so base and
    fine-tuned numbers never mix precisions (training held the base in the compute dtype and LoRA in fp32, under
    autocast)."""
    scored = _as_scored(cfg, trainer, work)
    results, rows = {}, []
    eval_tokens = eval_tokens_per_batch(cfg.scoring.tokens_per_batch, scored)
    for split, ds in evals.items():
        # Several processes: each scores a shard, every process gets all the scores (one process: all of them).
        scores = dist.gather_scores(scored, ds, tokenizer.pad_token_id, cfg.scoring.batch_size, True, eval_tokens)
        results[split] = summarize(scores, cfg.scoring.bootstrap_samples, cfg.seed)
        rows += per_example_rows(split, scores)
        if cfg.data.sources:
            results.setdefault("by_source", {})[split] = by_source(cfg, split, scores)
    return results, rows


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
