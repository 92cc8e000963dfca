"""The plan of a training run, decided before the Trainer starts: the rows (packed or not), the batch shape, and how
the step runs (compiled or eager, SDPA or FlexAttention, CUDA graphs refused with accumulation). `setup_training`
builds it for `medqa train` and bench/gpu.py; `planned_steps` counts the optimizer steps of the same plan without
building it (ASHA's max_t in `medqa tune`).

Batches: unpacked, train.batch_size x train.grad_accum examples per optimizer step (e.g. 8 x 4 = 32 examples x ~225
tokens = ~7,200 tokens on HealthCareMagic with BioGPT's tokenizer); packed (the GPU default), a token budget of rows
of data.max_length tokens, one static shape, compiled on CUDA (`medqa.batching`, `medqa.faststep`). A speed-up that
fails here (compile, CUDA graphs, FlexAttention, the memory-sized token budget) gives way to the plain path with one
warning, recorded in `Setup.fallbacks` (metrics.json `training.fallbacks`, `medqa.fallbacks`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import partial

from medqa import distributed as dist
from medqa.batching import BatchPlan, cuda_free_bytes, optimizer_steps, plan_batches
from medqa.errors import ConfigError, MedqaError
from medqa.fallbacks import Fallbacks
from medqa.faststep import FAST_LOSS_MODEL_TYPES, FastStep, supports_fast_step
from medqa.metrics import pad_batch
from medqa.mixing import epoch_composition
from medqa.modeling import compute_dtype
from medqa.packing import PackedCollator, pack_dataset, plan_packs
from medqa.schema import Config, TrainConfig

log = logging.getLogger(__name__)

CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # torch.compile modes that capture CUDA graphs


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

    def steps(self, t: TrainConfig) -> int:
        """The optimizer steps the Trainer will run on these rows (`planned_steps` counts the same before setup)."""
        if self.plan is None:
            return _steps(t, len(self.train_ds), t.batch_size, t.grad_accum, dist.replicas())
        return _steps(t, len(self.train_ds), self.plan.rows_per_batch, self.plan.grad_accum, dist.replicas())


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
    fallbacks = Fallbacks()
    train_ds, composition = epoch_composition(cfg, train_ds)  # data.sources' weights (the split itself otherwise)
    if not cfg.train.packing:
        return _unpacked(cfg, model, train_ds, pad_id, fallbacks, composition)
    # ~data.max_length / mean length examples per row; the block mask keeps them from seeing each other.
    _check_row_width(cfg, model.config)
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
    fast, attention = _packed_step(cfg, model, plan, fallbacks)
    collate = _packed_collator(cfg, pad_id, plan, block_mask=fast is None)
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


def _unpacked(cfg: Config, model, train_ds, pad_id: int, fallbacks: Fallbacks, composition: dict) -> Setup:
    """Examples padded to the longest of their batch, train.batch_size x train.grad_accum per optimizer step."""
    t = cfg.train
    collate = partial(pad_batch, pad_id=pad_id)
    # The eager fast step on padded batches too: the same loss as the model's own forward, with the output
    # layer only at labelled positions (`lm_loss_sum`), not at every prompt and padding token.
    fast = None
    if supports_fast_step(model) and dist.replicas() == 1:
        fast = FastStep(model, loss_chunk_tokens=t.loss_chunk_tokens, fallbacks=fallbacks, kl_beta=t.kl_to_base)
    return Setup(train_ds, collate, None, fast, sum(train_ds["length"]) / len(train_ds), 1.0, fallbacks, composition)


def _check_row_width(cfg: Config, model_config) -> None:
    """A packed row must fit the model's positions: a row's padding takes positions 0.. up to its width."""
    window = getattr(model_config, "max_position_embeddings", None)
    if window and row_tokens(cfg) > window:
        raise ConfigError(
            f"train.pack_row_tokens={row_tokens(cfg)} is wider than the model's {window} positions. "
            f"Use at most {window} (or 0 for rows of data.max_length)."
        )


def _packed_step(cfg: Config, model, plan: BatchPlan, fallbacks: Fallbacks) -> tuple[FastStep | None, str]:
    """How a packed micro-batch trains: (the fast step, None for the model's own forward; the attention)."""
    t = cfg.train
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
    return fast, attention


def _packed_collator(cfg: Config, pad_id: int, plan: BatchPlan, block_mask: bool) -> PackedCollator:
    """Every batch: plan.rows_per_batch rows x data.max_length tokens (one shape for the compiled step). The fast
    step builds the attention mask on the device; only the model's own forward (`block_mask`) needs it from the
    collator. One process over several GPUs (torch DataParallel) collates one batch for all of them, then splits
    it."""
    per_collate = plan.rows_per_batch * (dist.replicas() if dist.world_size() == 1 else 1)
    return PackedCollator(
        pad_id,
        block_mask=block_mask,
        mask_dtype=compute_dtype(cfg),
        pad_to_multiple_of=row_tokens(cfg),
        rows=per_collate,
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


def planned_steps(cfg: Config, train_ds, model_config=None, replicas: int = 0) -> int:
    """The optimizer steps `medqa train` will run on this tokenized train split (as the Trainer counts them), for
    ASHA's max_t (`Setup.steps` counts the same once the rows are set up). With packing and an auto micro-batch on
    CUDA without train.tokens_per_step, the count depends on the card; it is then computed for this process's card.
    `replicas`: copies of the model that each take a micro-batch per step (0 = `medqa.distributed.replicas()`; a
    Tune trial with N GPUs: N)."""
    t = cfg.train
    replicas = replicas or dist.replicas()
    train_ds, _ = epoch_composition(cfg, train_ds)  # data.sources' weights change the epoch's size
    if not t.packing:
        return _steps(t, len(train_ds), t.batch_size, t.grad_accum, replicas)
    rows = len(plan_packs(list(train_ds["length"]), row_tokens(cfg)))
    plan = _plan(cfg, model_config, cuda_free_bytes, replicas)  # falls back as setup_training does, silently
    return _steps(t, rows, plan.rows_per_batch, plan.grad_accum, replicas)


def _steps(t: TrainConfig, items: int, per_batch: int, grad_accum: int, replicas: int) -> int:
    """Optimizer steps over `items` rows (examples, or packed rows) in micro-batches of `per_batch`: accelerate deals
    the ceil(items / per_batch) micro-batches out to the replicas in turn, each replica accumulating `grad_accum`."""
    batches = -(-items // per_batch)
    return optimizer_steps(-(-batches // replicas), grad_accum, t.epochs, t.max_steps)
