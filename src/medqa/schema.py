"""The configuration schema: one dataclass per concern. The defaults live here and only here.

Every field carries a `help` string; `medqa <stage> --help` prints them and `medqa <stage> --print-config`
prints the resolved whole. The YAML files under configs/ hold only what differs from these defaults; the loader
is `medqa.config`.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medqa.errors import ConfigError

# How an adapter is chosen (`medqa.selection`): the checkpoint of a run, the trial of a search, what ASHA prunes on.
OBJECTIVES = ("answer_loss", "answer_loss_within_knowledge", "weighted")
KNOWLEDGE_DEV_SIZE = 500  # PubMedQA dev questions shipped in data/pubmedqa/pubmedqa_dev.json


def _f(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with a help text (shown by `--help`)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


SOURCE_KEYS = {"name", "source", "question_field", "answer_field", "hub_split", "max_records", "weight"}


@dataclass
class DataConfig:
    """Where the records come from, how they are cleaned, split and cut to length."""

    source: str = _f(
        "data/sample/healthcaremagic_sample.json",
        "JSON list, JSONL, CSV, a `datasets` save_to_disk folder, or a Hub dataset id "
        "(e.g. lavita/ChatDoctor-HealthCareMagic-100k).",
    )
    hub_split: str = _f("train", "Split to read when `source` is a Hub dataset id or a DatasetDict folder.")
    question_field: str = _f("input", "Record field holding the patient's question (not the fixed `instruction`).")
    answer_field: str = _f("output", "Record field holding the doctor's answer.")
    train_fraction: float = _f(0.8, "Share of questions assigned to the train split.")
    val_fraction: float = _f(0.1, "Share of questions assigned to the validation split.")
    test_fraction: float = _f(0.1, "Share of questions assigned to the test split.")
    seed: int = _f(42, "Seed mixed into the question hash that assigns splits.")
    min_question_chars: int = _f(20, "Questions shorter than this (after cleaning) are rejected.")
    min_answer_chars: int = _f(60, "Answers shorter than this (after cleaning) are rejected.")
    max_question_tokens: int = _f(1024, "Questions longer than this many tokens are rejected as junk.")
    max_answer_tokens: int = _f(1024, "Answers longer than this many tokens are rejected as junk.")
    max_length: int = _f(
        512,
        "Tokens per example (prompt + answer + EOS); longer ones are truncated, "
        "question first (from its start), then the answer's tail.",
    )
    max_records: int = _f(0, "Read at most this many records (0 = all); for smoke runs.")
    sources: list[dict] = _f(
        [],
        "Several sources in one run, instead of data.source: a list of {name, source, "
        "question_field, answer_field, hub_split, max_records, weight} (each field but name "
        "and source defaults to data.*'s). Every record keeps its source's name; a question "
        "in two sources is kept from the first listed. weight: how often each train example "
        "of the source appears per epoch (1 = once, 2 = twice, 0.5 = a seeded half). "
        "Empty = data.source alone.",
    )
    num_proc: int = _f(1, "Processes for tokenization (datasets.map num_proc).")
    fast_tokenizer: bool = _f(
        True,
        "Tokenize with medqa's fast path for BioGPT's tokenizer (the same ids, ~4x "
        "sooner) when it applies; false = the tokenizer as it is.",
    )

    def validate(self) -> None:
        fracs = (self.train_fraction, self.val_fraction, self.test_fraction)
        if any(f < 0 for f in fracs) or abs(sum(fracs) - 1.0) > 1e-6:
            raise ConfigError(
                f"data.train_fraction + data.val_fraction + data.test_fraction must sum to 1 "
                f"and none may be negative; got {fracs} (sum {sum(fracs):.4f}). "
                "Fix the fractions, e.g. 0.8/0.1/0.1."
            )
        for name in ("min_question_chars", "min_answer_chars", "max_records"):
            if getattr(self, name) < 0:
                raise ConfigError(f"data.{name} must be >= 0, got {getattr(self, name)}.")
        for name in ("max_question_tokens", "max_answer_tokens", "max_length", "num_proc"):
            if getattr(self, name) < 1:
                raise ConfigError(f"data.{name} must be >= 1, got {getattr(self, name)}.")
        if self.max_length < 16:
            raise ConfigError(f"data.max_length must be at least 16 tokens, got {self.max_length}.")
        names = []
        for i, entry in enumerate(self.sources):
            where = f"data.sources[{i}]"
            unknown = sorted(set(entry) - SOURCE_KEYS) if isinstance(entry, dict) else []
            if (
                not isinstance(entry, dict)
                or unknown
                or not all(isinstance(entry.get(k), str) and entry[k].strip() for k in ("name", "source"))
            ):
                raise ConfigError(
                    f"{where} must be a mapping with a `name` and a `source` (and optionally "
                    f"{', '.join(sorted(SOURCE_KEYS - {'name', 'source'}))}); got {entry!r}."
                )
            weight, limit = entry.get("weight", 1.0), entry.get("max_records", 0)
            if not isinstance(weight, (int, float)) or isinstance(weight, bool) or weight <= 0:
                raise ConfigError(
                    f"{where}.weight must be a number > 0 (1 = each train example once per epoch); got {weight!r}."
                )
            if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
                raise ConfigError(f"{where}.max_records must be an integer >= 0 (0 = all); got {limit!r}.")
            names.append(entry["name"])
        if len(set(names)) != len(names):
            raise ConfigError(f"data.sources: names must be unique, got {names}.")


@dataclass
class PromptConfig:
    """The one prompt template shared by tokenization, training, evaluation and generation."""

    template: str = _f(
        "### Question:\n{question}\n\n### Answer:\n",
        "Text before the answer; `{question}` is replaced by the cleaned question.",
    )
    use_chat_template: bool = _f(
        False,
        "Build the prompt with the tokenizer's chat template (a user turn holding the "
        "question, then the assistant header) instead of `template`.",
    )
    system: str = _f("", "System message for the chat template (empty = the template's default).")
    min_question_tokens: int = _f(8, "When truncating, keep at least this many question tokens (its end).")

    def validate(self) -> None:
        if self.template.count("{question}") != 1:
            raise ConfigError(f"prompt.template must contain `{{question}}` exactly once; got {self.template!r}.")


@dataclass
class TinyModelConfig:
    """The tiny BioGPT-architecture model built offline for the demo and the tests."""

    enabled: bool = _f(
        False, "Build the tiny model when `model.name_or_path` equals `model.tiny.path` and that folder is missing."
    )
    path: str = _f("${workdir}/models/tiny-biogpt", "Folder of the tiny model.")
    vocab_size: int = _f(2000, "BPE vocabulary size learned from the train split (incl. 4 special tokens).")
    tokenizer_files: str = _f(
        "",
        "Folder with real BioGPT vocab.json/merges.txt to use instead of learning "
        "a vocabulary (e.g. assets/biogpt-tokenizer, shipped).",
    )
    hidden_size: int = _f(64, "Hidden size.")
    num_layers: int = _f(2, "Transformer layers.")
    num_heads: int = _f(4, "Attention heads.")
    intermediate_size: int = _f(128, "Feed-forward size.")
    max_positions: int = _f(1024, "Maximum positions.")
    initializer_range: float = _f(0.2, "Init std; a tiny random BioGPT learns under LoRA only with a large one.")

    def validate(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"model.tiny.hidden_size ({self.hidden_size}) must be divisible by "
                f"model.tiny.num_heads ({self.num_heads})."
            )
        if self.vocab_size < 64:
            raise ConfigError(f"model.tiny.vocab_size must be >= 64, got {self.vocab_size}.")


@dataclass
class ModelConfig:
    """Which causal LM and tokenizer to load, and how."""

    name_or_path: str = _f("microsoft/biogpt", "Hub id or local folder of a causal LM.")
    tokenizer: str = _f("", "Hub id or folder of the tokenizer; empty = same as `name_or_path`.")
    revision: str = _f("main", "Hub revision (branch, tag or commit).")
    trust_remote_code: bool = _f(False, "Run model code from the Hub. Off by default: it executes downloaded code.")
    gguf_file: str = _f(
        "",
        "A GGUF checkpoint to convert (dequantised) into `name_or_path` once, when that folder is "
        "missing: a path, or pkg://<python package>/<file> for a file shipped in a package.",
    )
    dtype: str = _f(
        "auto",
        "The dtype every model is scored in (baseline, in-training validation under autocast, "
        "evaluate): auto (bf16 where supported, fp16 on older GPUs, fp32 on CPU), float32, "
        "bfloat16, float16.",
    )
    device: str = _f("auto", "auto, cpu, cuda, cuda:N or mps.")
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig, metadata={"help": "Tiny offline model."})

    def validate(self) -> None:
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError(f"model.dtype must be auto, float32, bfloat16 or float16; got {self.dtype!r}.")
        self.tiny.validate()

    @property
    def tokenizer_path(self) -> str:
        return self.tokenizer or self.name_or_path


@dataclass
class LoraConfig:
    """LoRA adapter settings (peft)."""

    r: int = _f(8, "Rank of the update matrices.")
    alpha: int = _f(16, "Scaling numerator: the update is scaled by alpha / r.")
    dropout: float = _f(0.05, "Dropout on the LoRA input.")
    targets: str | list[str] = _f(
        "all-linear",
        "Preset (qv, attention, all-linear) resolved per architecture, "
        "or a list of layer names such as [q_proj, v_proj].",
    )

    def validate(self) -> None:
        if self.r < 1 or self.alpha <= 0 or not 0 <= self.dropout < 1:
            raise ConfigError(
                f"lora.r must be >= 1, lora.alpha > 0 and 0 <= lora.dropout < 1; got r={self.r}, "
                f"alpha={self.alpha}, dropout={self.dropout}."
            )


@dataclass
class ScoringConfig:
    """How answer perplexity is measured (the same function scores the baseline, training and the final test)."""

    batch_size: int = _f(8, "Examples per scoring batch; batches are formed from examples sorted by length.")
    bootstrap_samples: int = _f(1000, "Bootstrap resamples (over examples) for the 95% confidence intervals.")
    max_examples: int = _f(0, "Score at most this many examples per split (0 = all); for smoke runs.")
    tokens_per_batch: int = _f(
        0,
        "Padded tokens per scoring batch (examples sorted by length fill it); 0 = auto: "
        "sized from the free memory on CUDA, scoring.batch_size examples elsewhere.",
    )
    knowledge_questions: int = _f(
        0,
        "PubMedQA dev questions (of the 500 in data/pubmedqa/pubmedqa_dev.json, never the "
        "test ones; a seeded subset) each in-training evaluation also answers, with "
        "evaluate's PubMedQA scoring, beside the base model's score on them: "
        "eval_knowledge_acc in metrics.jsonl, for tune.objective (0 = off).",
    )

    def validate(self) -> None:
        if self.batch_size < 1 or self.bootstrap_samples < 0 or self.max_examples < 0 or self.tokens_per_batch < 0:
            raise ConfigError(
                f"scoring.batch_size must be >= 1 and scoring.bootstrap_samples, scoring.max_examples >= 0; got "
                f"{self.batch_size}, {self.bootstrap_samples}, {self.max_examples}."
            )
        if not 0 <= self.knowledge_questions <= KNOWLEDGE_DEV_SIZE:
            raise ConfigError(
                f"scoring.knowledge_questions must be between 0 (off) and {KNOWLEDGE_DEV_SIZE} (the "
                f"PubMedQA dev questions shipped); got {self.knowledge_questions}."
            )


@dataclass
class GenerateConfig:
    """How answers are generated (evaluation samples, notebooks, `medqa ask`)."""

    max_new_tokens: int = _f(128, "Most tokens generated per answer.")
    do_sample: bool = _f(False, "Sample instead of greedy decoding.")
    temperature: float = _f(0.7, "Sampling temperature (with do_sample).")
    top_p: float = _f(0.9, "Nucleus sampling mass (with do_sample).")
    num_beams: int = _f(1, "Beam search width (1 = greedy or sampling).")
    repetition_penalty: float = _f(1.0, "Penalty > 1 discourages repeating tokens.")
    no_repeat_ngram_size: int = _f(0, "Forbid repeating n-grams of this size (0 = off).")
    batch_size: int = _f(8, "Prompts per generation batch (grouped by length, left-padded).")
    static_cache: bool | str = _f(
        "auto",
        "Decode with a static KV cache (fixed shapes, compiled by transformers): "
        "auto = on CUDA, true, false. If it fails, the dynamic cache answers "
        "instead (one warning, recorded in report.json `fallbacks`).",
    )

    def validate(self) -> None:
        if self.max_new_tokens < 1 or self.num_beams < 1 or self.batch_size < 1:
            raise ConfigError("generate.max_new_tokens, generate.num_beams and generate.batch_size must be >= 1.")
        if self.static_cache not in (True, False, "auto"):
            raise ConfigError(f"generate.static_cache must be auto, true or false; got {self.static_cache!r}.")
        if self.temperature <= 0 or not 0 < self.top_p <= 1 or self.repetition_penalty <= 0:
            raise ConfigError(
                f"generate.temperature must be > 0, 0 < generate.top_p <= 1 and "
                f"generate.repetition_penalty > 0; got {self.temperature}, {self.top_p}, "
                f"{self.repetition_penalty}."
            )


@dataclass
class TrainConfig:
    """LoRA fine-tuning with transformers' Trainer."""

    learning_rate: float = _f(2e-4, "Peak learning rate (AdamW).")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    epochs: float = _f(1.0, "Training epochs (ignored when max_steps > 0).")
    max_steps: int = _f(0, "Optimizer steps to run; 0 = use epochs.")
    batch_size: int = _f(
        8,
        "Examples per device batch (batches are grouped by length and padded dynamically); "
        "with packing, packed rows per micro-batch when train.tokens_per_batch is 0 off CUDA.",
    )
    grad_accum: int = _f(
        1,
        "Gradient accumulation steps: effective batch = batch_size x grad_accum (with packing "
        "and train.tokens_per_step set, derived instead).",
    )
    tokens_per_batch: int = _f(
        0,
        "With packing: tokens per micro-batch, as rows of data.max_length tokens (every "
        "step has this one shape). 0 = auto: sized from the GPU's free memory on CUDA "
        "(if that fails, train.batch_size rows, recorded in metrics.json training."
        "fallbacks), train.batch_size rows elsewhere.",
    )
    tokens_per_step: int = _f(
        0,
        "With packing: tokens per optimizer step (the effective batch); gradient "
        "accumulation = tokens_per_step / tokens_per_batch, so the step is the same on every "
        "card. 0 = tokens_per_batch x train.grad_accum.",
    )
    compile: bool | str = _f(
        "auto",
        "torch.compile the model for the one packed micro-batch shape: auto = on CUDA "
        "with packing, true, false. The compile time is reported apart. If compiling "
        "fails (up front or in the first step), the eager step trains instead: one "
        "warning, recorded in metrics.json training.fallbacks.",
    )
    compile_mode: str = _f(
        "default",
        "torch.compile mode: default, reduce-overhead (CUDA graphs), max-autotune "
        "(CUDA graphs), max-autotune-no-cudagraphs. CUDA graphs need an accumulation of "
        "1 (train.tokens_per_step = the micro-batch); with more the run is refused.",
    )
    attention: str = _f(
        "auto",
        "Attention for packed rows: sdpa (a block-diagonal mask), flex (FlexAttention "
        "document mask, CUDA only), auto (= sdpa; see BENCHMARKS.md). If flex fails in the "
        "first step, sdpa trains instead (one warning, recorded in metrics.json).",
    )
    loss_chunk_tokens: int = _f(
        0,
        "Compute the training loss over this many tokens at a time, recomputing each "
        "chunk's logits in backward, so a large micro-batch never holds all its fp32 "
        "logits at once (0 = the model's own loss).",
    )
    warmup_ratio: float = _f(0.05, "Share of steps for linear warmup.")
    scheduler: str = _f("cosine", "Learning-rate schedule after warmup: cosine, linear, constant_with_warmup.")
    max_grad_norm: float = _f(1.0, "Gradient clipping norm.")
    logging_steps: int = _f(10, "Log train loss, learning rate, grad norm and throughput every N steps.")
    eval_steps: int = _f(50, "Evaluate val answer_loss (and save a checkpoint) every N steps.")
    save_total_limit: int = _f(2, "Checkpoints kept on disk (the best is always kept).")
    early_stopping_patience: int = _f(0, "Stop after this many evaluations without improvement (0 = off).")
    group_by_length: bool = _f(True, "Batch examples of similar length together, so little is padded.")
    pack_row_tokens: int = _f(
        0,
        "With packing: tokens per packed row (0 = data.max_length). Rows of 2 x "
        "data.max_length fill better (on the 500 real records with BioGPT's tokenizer, 0.98 of "
        "computed tokens are real at 1,024 against 0.92 at 512, the optimum for 512: a third of "
        "the examples are over 256 tokens) but SDPA's dense block mask then costs ~7% more "
        "attention per token; FlexAttention computes only the examples' own blocks. Positions "
        "restart per example, so it may exceed data.max_length (not the model's window).",
    )
    packing: bool = _f(
        False,
        "Pack several examples into each row of up to data.max_length tokens (block-diagonal "
        "attention, positions restart per example); batch_size then counts packed rows. "
        "Changes no metric: evaluation is never packed.",
    )
    gradient_checkpointing: bool = _f(False, "Recompute activations in backward: less memory, ~30% slower.")
    mixed_precision: str = _f(
        "auto",
        "auto (bf16 or fp16 on CUDA, none on CPU), no, bf16, fp16. On CUDA the frozen "
        "base weights are held in this dtype and the LoRA weights in fp32.",
    )
    qlora: bool = _f(False, "Load the base model in 4-bit (bitsandbytes, CUDA only) and train LoRA on top.")
    resume: bool = _f(
        False,
        "Continue from the newest intact checkpoint in outputs/finetune_checkpoints/ (a "
        "damaged newer one is named and set aside).",
    )
    ddp_timeout: int = _f(
        1800,
        "Several processes (torchrun): seconds a collective (barrier, all-reduce) waits for "
        "the slowest process before the run fails, e.g. while rank 0 alone writes the run or a "
        "process died. Raise it when rank 0's writing or first compile takes longer.",
    )
    report_to: list[str] = _f(
        ["tensorboard"],
        "Experiment trackers the Trainer logs to: tensorboard, wandb, mlflow, or "
        "any other transformers supports when it is installed; [] or [none] = "
        "only medqa's own metrics.jsonl. The default missing is a warning "
        "(training runs without it); a tracker you name must be installed.",
    )

    def validate(self) -> None:
        if self.learning_rate <= 0:
            raise ConfigError(f"train.learning_rate must be > 0, got {self.learning_rate}.")
        if self.weight_decay < 0 or not 0 <= self.warmup_ratio < 1 or self.max_grad_norm <= 0:
            raise ConfigError(
                "train.weight_decay must be >= 0, 0 <= train.warmup_ratio < 1 and train.max_grad_norm > 0."
            )
        for name in ("batch_size", "grad_accum", "logging_steps", "eval_steps", "save_total_limit", "ddp_timeout"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}.")
        if self.max_steps < 0 or self.epochs <= 0 or self.early_stopping_patience < 0:
            raise ConfigError("train.max_steps and train.early_stopping_patience must be >= 0 and train.epochs > 0.")
        if self.mixed_precision not in ("auto", "no", "bf16", "fp16"):
            raise ConfigError(f"train.mixed_precision must be auto, no, bf16 or fp16; got {self.mixed_precision!r}.")
        if self.tokens_per_batch < 0 or self.tokens_per_step < 0 or self.loss_chunk_tokens < 0:
            raise ConfigError(
                "train.tokens_per_batch, train.tokens_per_step and train.loss_chunk_tokens must be >= 0 "
                "(0 = auto / off)."
            )
        if self.pack_row_tokens < 0:
            raise ConfigError(f"train.pack_row_tokens must be >= 0 (0 = data.max_length); got {self.pack_row_tokens}.")
        if self.compile not in (True, False, "auto"):
            raise ConfigError(f"train.compile must be auto, true or false; got {self.compile!r}.")
        if self.compile is True and not self.packing:
            raise ConfigError(
                "train.compile=true needs train.packing=true: compiling is worth it only for one static "
                "batch shape, and unpacked batches change shape every step. Set train.packing=true or "
                "train.compile=auto."
            )
        if self.compile_mode not in ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"):
            raise ConfigError(
                f"train.compile_mode must be default, reduce-overhead, max-autotune or "
                f"max-autotune-no-cudagraphs; got {self.compile_mode!r}."
            )
        if self.attention not in ("auto", "sdpa", "flex"):
            raise ConfigError(f"train.attention must be auto, sdpa or flex; got {self.attention!r}.")
        if self.scheduler not in ("cosine", "linear", "constant_with_warmup", "constant"):
            raise ConfigError(
                f"train.scheduler must be cosine, linear, constant_with_warmup or constant; got {self.scheduler!r}."
            )


@dataclass
class SearchConfig:
    """Ray Tune hyperparameter search (`medqa tune`). Each trial runs the same function as `medqa train`."""

    num_samples: int = _f(4, "Trials to sample from the search space.")
    max_concurrent: int = _f(2, "Trials running at once.")
    cpus_per_trial: float = _f(1.0, "CPUs reserved per trial.")
    gpus_per_trial: float = _f(0.0, "GPUs (or a fraction, e.g. 0.5 to share one) per trial.")
    address: str = _f("", "Ray cluster to join (also RAY_ADDRESS); empty = start a local Ray sized to the machine.")
    learning_rate: list[float] = _f([1e-4, 1e-2], "Log-uniform bounds [low, high] for train.learning_rate.")
    weight_decay: list[float] = _f([0.0, 0.1], "Uniform bounds [low, high] for train.weight_decay.")
    lora_r: list[int] = _f([], "Choices for lora.r (empty = not searched).")
    lora_alpha: list[int] = _f([], "Choices for lora.alpha (empty = not searched).")
    lora_dropout: list[float] = _f([], "Choices for lora.dropout (empty = not searched).")
    lora_targets: list[str] = _f([], "Choices of lora.targets presets (empty = not searched).")
    grace_period: int = _f(1, "ASHA: evaluations every trial gets before it can be stopped.")
    reduction_factor: int = _f(2, "ASHA: keep the best 1/reduction_factor of trials at each rung.")
    max_failures: int = _f(1, "Retries of a trial that crashes before it is reported as an error.")
    resume: bool = _f(False, "Restore the latest interrupted experiment under outputs/ray_* (Tuner.restore).")
    seed: int = _f(0, "Seed of the random search.")
    objective: str = _f(
        "answer_loss",
        "How the adapter is chosen, the same rule for the best checkpoint of a run "
        "(`medqa train`), the best trial of a search and ASHA's pruning: answer_loss "
        "(lowest val answer_loss); answer_loss_within_knowledge (lowest val answer_loss "
        "among those whose PubMedQA dev accuracy fell by at most tune.max_knowledge_drop "
        "against the base model; none such: lowest val answer_loss, with a warning); "
        "weighted (val answer_loss - tune.knowledge_weight x the accuracy change). The "
        "last two need scoring.knowledge_questions > 0.",
    )
    max_knowledge_drop: float = _f(
        0.02,
        "answer_loss_within_knowledge: the largest PubMedQA dev accuracy drop against "
        "the base model an eligible adapter may show (0.02 = 2 points).",
    )
    knowledge_weight: float = _f(
        1.0,
        "weighted: nats of val answer_loss one unit of PubMedQA dev accuracy is worth "
        "(1.0: losing 0.05 accuracy costs as much as 0.05 nats per answer token).",
    )

    def validate(self) -> None:
        for name in ("learning_rate", "weight_decay"):
            bounds = getattr(self, name)
            if len(bounds) != 2 or bounds[0] > bounds[1] or bounds[0] < 0:
                raise ConfigError(f"tune.{name} must be [low, high] with 0 <= low <= high; got {bounds}.")
        if self.learning_rate[0] <= 0:
            raise ConfigError(f"tune.learning_rate bounds must be > 0 (log-uniform); got {self.learning_rate}.")
        if self.num_samples < 1 or self.max_concurrent < 1 or self.cpus_per_trial <= 0 or self.gpus_per_trial < 0:
            raise ConfigError(
                "tune.num_samples and tune.max_concurrent must be >= 1, tune.cpus_per_trial > 0 "
                "and tune.gpus_per_trial >= 0."
            )
        if self.grace_period < 1 or self.reduction_factor < 2 or self.max_failures < 0:
            raise ConfigError("tune.grace_period must be >= 1, tune.reduction_factor >= 2, tune.max_failures >= 0.")
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"tune.objective must be one of {', '.join(OBJECTIVES)}; got {self.objective!r}.")
        if not 0 <= self.max_knowledge_drop <= 1 or self.knowledge_weight < 0:
            raise ConfigError(
                f"tune.max_knowledge_drop must be an accuracy between 0 and 1 and tune.knowledge_weight "
                f">= 0; got {self.max_knowledge_drop} and {self.knowledge_weight}."
            )


@dataclass
class EvaluateConfig:
    """The final comparison on the test split (`medqa evaluate`)."""

    num_questions: int = _f(20, "Test questions to answer and score with ROUGE and BLEU (0 = all).")
    samples_in_report: int = _f(3, "Side-by-side answers shown in report.md.")
    external_test: str = _f(
        "",
        "Another source's test records (JSON, JSONL, CSV, a datasets folder or a Hub id), "
        "cleaned as prepare cleans, never re-split, scored beside the test split (e.g. iCliniq).",
    )
    external_name: str = _f("external", "Name of that data set in the report.")
    external_question_field: str = _f("input", "Its field holding the question.")
    external_answer_field: str = _f("output", "Its field holding the answer (iCliniq: answer_icliniq).")
    bertscore_model: str = _f(
        "",
        "Encoder for BERTScore of the generated answers (a local folder, or a Hub id when "
        "online); empty = BERTScore off (the report says how to turn it on).",
    )
    bertscore_layers: int = _f(0, "Encoder layers BERTScore uses (0 = all).")
    pubmedqa_questions: int = _f(
        0,
        "PubMedQA test questions (of the 500 shipped in data/pubmedqa/) each model answers "
        'zero-shot, for the report\'s "knowledge kept" table (0 = off).',
    )
    pubmedqa_file: str = _f(
        "",
        "Questions in the same layout ([{id, question, contexts, answer: yes/no/maybe}]) to use "
        "instead of the shipped PubMedQA test split.",
    )
    benchmarks: list[str] = _f(
        [],
        "lm-evaluation-harness tasks or groups `medqa benchmark` runs on every model, e.g. "
        "pubmedqa_local (the shipped PubMedQA questions, offline), medmcqa, medqa_4options, "
        "mmlu_clinical_knowledge; a Hub task needs network or its data in the datasets "
        "cache. Empty = `medqa benchmark` has nothing to run.",
    )
    benchmark_questions: int = _f(
        0,
        "Questions per benchmark task (0 = all): pubmedqa_local takes a seeded random "
        "subset (the questions evaluate.pubmedqa_questions would pick), other tasks "
        "lm-eval's first N (its `limit`).",
    )

    def validate(self) -> None:
        if self.benchmark_questions < 0 or not all(isinstance(t, str) and t.strip() for t in self.benchmarks):
            raise ConfigError(
                "evaluate.benchmark_questions must be >= 0 and evaluate.benchmarks a list of lm-eval "
                "task names, e.g. [pubmedqa_local, medmcqa]."
            )
        if self.num_questions < 0 or self.samples_in_report < 0 or self.pubmedqa_questions < 0:
            raise ConfigError(
                "evaluate.num_questions, evaluate.samples_in_report and evaluate.pubmedqa_questions must be >= 0."
            )


@dataclass
class Config:
    """The whole configuration of a run."""

    workdir: str = _f(".", "Root under which data/, tokenized/, outputs/ (and the tiny model) are written.")
    seed: int = _f(42, "Global seed for training and sampling.")
    force: bool = _f(False, "Use artifacts whose manifest names other inputs than this config (with a warning).")
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "Data loading and cleaning."})
    prompt: PromptConfig = field(default_factory=PromptConfig, metadata={"help": "Prompt template."})
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "Model and tokenizer."})
    lora: LoraConfig = field(default_factory=LoraConfig, metadata={"help": "LoRA adapter."})
    scoring: ScoringConfig = field(
        default_factory=ScoringConfig, metadata={"help": "Answer perplexity measurement (every stage)."}
    )
    generate: GenerateConfig = field(default_factory=GenerateConfig, metadata={"help": "Answer generation."})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"help": "Fine-tuning."})
    tune: SearchConfig = field(default_factory=SearchConfig, metadata={"help": "Hyperparameter search."})
    evaluate: EvaluateConfig = field(
        default_factory=EvaluateConfig, metadata={"help": "The final comparison (`medqa evaluate`)."}
    )

    def validate(self) -> Config:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if hasattr(value, "validate"):
                value.validate()
        if 0 < self.train.pack_row_tokens < self.data.max_length:
            raise ConfigError(
                f"train.pack_row_tokens={self.train.pack_row_tokens} is shorter than data.max_length="
                f"{self.data.max_length}: the longest examples would not fit a row. Use 0 (rows of "
                "data.max_length) or a width of at least data.max_length, e.g. twice it."
            )
        if self.tune.objective != "answer_loss" and not self.scoring.knowledge_questions:
            raise ConfigError(
                f"tune.objective={self.tune.objective} chooses by what the adapter keeps, measured on "
                "PubMedQA dev questions during training, and scoring.knowledge_questions is 0 (off). Set "
                "scoring.knowledge_questions (e.g. 100) or tune.objective=answer_loss."
            )
        return self

    # Paths derived from workdir: the artifacts each stage reads and writes.
    @property
    def root(self) -> Path:
        return Path(self.workdir)

    def resolve(self, path: str) -> str:
        """Expand `${workdir}` and `~` in a path field."""
        return os.path.expanduser(path.replace("${workdir}", str(self.workdir)))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
