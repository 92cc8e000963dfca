"""The configuration schema: one dataclass per concern. The defaults live here and only here.

Every field carries a `help` string; `medqa <stage> --help` prints them and `medqa <stage> --print-config`
prints the resolved whole. The YAML files under configs/ hold only what differs from these defaults; the loader
is `medqa.config`.

A field also declares everything else the code needs to know about it, and every list of fields elsewhere is
derived from these declarations (`FIELDS` and the functions below it), so a new field cannot be forgotten:

    affects   what a change of its value changes (AFFECTS): the prepared data ("prepare": hashed into the prepared
              data's fingerprint, `workdir.prepared_inputs`, and so every run on it), what a training run learns
              or keeps ("train": in the run fingerprint that guards a resume, `manifest.determining_config`), only
              a search's result ("search": in a search's fingerprint), or none of these ("nothing": speed,
              memory, where files go, what is reported). Required.
    path      it names a file, folder or Hub id. What it points at is fingerprinted by content (the data, the
              tokenizer's vocabulary, the model files), so the name itself is in no fingerprint, and `medqa tune`
              makes it absolute for the trials.
    choices   the values `validate()` accepts; `{choices}` in the help text is replaced by them.
    ge, gt, le, lt   bounds `validate()` checks (>=, >, <=, <).
    searches, sampler   a `tune` field holding the search space of another field: its dotted key, and the Ray
              Tune sampler (loguniform or uniform over [low, high], choice over a list).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from medqa.errors import ConfigError

# How an adapter is chosen (`medqa.selection`): the checkpoint of a run, the trial of a search, what ASHA prunes on.
OBJECTIVES = ("answer_loss", "answer_loss_within_knowledge", "weighted")
# What "knowledge kept" is measured by (`medqa.selection`): the abstract loss on the PubMedQA dev abstracts, their
# PubMedQA accuracy, or both.
KNOWLEDGE_MEASURES = ("abstract_loss", "pubmedqa", "both")
# Adapter scales the frontier tries (`medqa.frontier`): 0 is the base model, 1 the adapter as trained.
FRONTIER_ALPHAS = [0.0, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
KNOWLEDGE_DEV_SIZE = 500  # PubMedQA dev questions shipped in data/pubmedqa/pubmedqa_dev.json
AFFECTS = ("prepare", "train", "search", "nothing")
SAMPLERS = ("loguniform", "uniform", "choice")
_BOUNDS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}


def _f(
    default: Any,
    help: str,
    *,
    affects: str,
    path: bool = False,
    choices: tuple = (),
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    searches: str = "",
    sampler: str = "",
) -> Any:
    """A dataclass field with its help text (shown by `--help`) and its declarations (see the module docstring)."""
    assert affects in AFFECTS and (not searches) == (not sampler) and sampler in ("", *SAMPLERS)
    bounds = {name: value for name, value in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if value is not None}
    help = help.replace("{choices}", ", ".join(_show(c) for c in choices))
    metadata = {"help": help, "affects": affects, "path": path, "choices": choices, "bounds": bounds}
    if searches:
        metadata.update(searches=searches, sampler=sampler)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def _section(cls: type, help: str) -> Any:
    """A nested section (a dataclass of fields) with its help text."""
    return field(default_factory=cls, metadata={"help": help})


def _show(value: Any) -> str:
    """A value as YAML and overrides spell it (true, not True)."""
    return str(value).lower() if isinstance(value, bool) else str(value)


class Section:
    """A config section. `validate()` checks every field against its declaration (choices, bounds), then
    `check()` the rules between fields."""

    def validate(self, prefix: str | None = None) -> None:
        prefix = _prefix(type(self)) if prefix is None else prefix
        for f in dataclasses.fields(self):
            value, key = getattr(self, f.name), f"{prefix}{f.name}"
            if isinstance(value, Section):
                value.validate(f"{key}.")
                continue
            choices, bounds = f.metadata["choices"], f.metadata["bounds"]
            # `in` would take 1 for True: compare value and type
            if choices and not any(value == c and type(value) is type(c) for c in choices):
                raise ConfigError(f"{key} must be one of {', '.join(_show(c) for c in choices)}; got {value!r}.")
            if any(not _holds(value, op, bound) for op, bound in bounds.items()):
                raise ConfigError(f"{key} must be {_rule(bounds)}; got {value!r}.")
        self.check()

    def check(self) -> None:
        """Rules between fields (none unless a section defines them)."""


def _holds(value: Any, op: str, bound: float) -> bool:
    return {"ge": value >= bound, "gt": value > bound, "le": value <= bound, "lt": value < bound}[op]


def _rule(bounds: dict[str, float]) -> str:
    if set(bounds) == {"ge", "le"}:
        return f"between {bounds['ge']} and {bounds['le']}"
    return " and ".join(f"{_BOUNDS[op]} {bound}" for op, bound in bounds.items())


@dataclass
class SourceConfig:
    """One entry of `data.sources`, as the YAML file writes it: a field left out (None) takes data.*'s
    (`medqa.sources.source_specs` resolves them). An entry of a list, not a section: its checks take the key that
    names it (data.sources[i]), and its fields' declarations describe it only (`FIELDS` holds data.sources whole)."""

    name: str = _f("", "The source's name, carried by each of its records (required).", affects="prepare")
    source: str = _f(
        "", "Where its records are, in any form data.source takes (required).", affects="prepare", path=True
    )
    question_field: str | None = _f(
        None, "Its field holding the question (default data.question_field).", affects="prepare"
    )
    answer_field: str | None = _f(None, "Its field holding the answer (default data.answer_field).", affects="prepare")
    hub_split: str | None = _f(None, "Its split to read (default data.hub_split).", affects="prepare")
    max_records: int | None = _f(
        None, "Read at most this many of its records (default data.max_records).", affects="prepare"
    )
    # int or float as written (1 stays 1): the run fingerprint hashes the entry as written (`to_dict`).
    weight: int | float | None = _f(
        None, "How often each of its train examples appears per epoch (default 1).", affects="train"
    )

    @classmethod
    def shape(cls) -> str:
        """What an entry must be, for the messages that refuse one."""
        optional = sorted(f.name for f in dataclasses.fields(cls) if f.name not in ("name", "source"))
        return f"a mapping with a `name` and a `source` (and optionally {', '.join(optional)})"

    def check(self, where: str) -> None:
        """Refuse an entry without a name and a source, or with a weight or max_records out of range (`where`: the
        key naming it, data.sources[i])."""
        if not all(isinstance(v, str) and v.strip() for v in (self.name, self.source)):
            raise ConfigError(f"{where} must be {self.shape()}; got {self.to_dict()!r}.")
        weight, limit = self.weight, self.max_records
        if weight is not None and (not isinstance(weight, (int, float)) or isinstance(weight, bool) or weight <= 0):
            raise ConfigError(
                f"{where}.weight must be a number > 0 (1 = each train example once per epoch); got {weight!r}."
            )
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 0):
            raise ConfigError(f"{where}.max_records must be an integer >= 0 (0 = all); got {limit!r}.")

    def to_dict(self) -> dict[str, Any]:
        """The entry as written, only the fields it sets: run fingerprints hash it (`manifest.determining_config`)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass
class DataConfig(Section):
    """Where the records come from, how they are cleaned, split and cut to length."""

    source: str = _f(
        "data/sample/healthcaremagic_sample.json",
        "JSON list, JSONL, CSV, a `datasets` save_to_disk folder, or a Hub dataset id "
        "(e.g. lavita/ChatDoctor-HealthCareMagic-100k).",
        affects="prepare",
        path=True,
    )
    hub_split: str = _f(
        "train", "Split to read when `source` is a Hub dataset id or a DatasetDict folder.", affects="prepare"
    )
    question_field: str = _f(
        "input", "Record field holding the patient's question (not the fixed `instruction`).", affects="prepare"
    )
    answer_field: str = _f("output", "Record field holding the doctor's answer.", affects="prepare")
    train_fraction: float = _f(0.8, "Share of questions assigned to the train split.", affects="prepare", ge=0)
    val_fraction: float = _f(0.1, "Share of questions assigned to the validation split.", affects="prepare", ge=0)
    test_fraction: float = _f(0.1, "Share of questions assigned to the test split.", affects="prepare", ge=0)
    seed: int = _f(42, "Seed mixed into the question hash that assigns splits.", affects="prepare")
    min_question_chars: int = _f(
        20, "Questions shorter than this (after cleaning) are rejected.", affects="prepare", ge=0
    )
    min_answer_chars: int = _f(60, "Answers shorter than this (after cleaning) are rejected.", affects="prepare", ge=0)
    max_question_tokens: int = _f(
        1024, "Questions longer than this many tokens are rejected as junk.", affects="prepare", ge=1
    )
    max_answer_tokens: int = _f(
        1024, "Answers longer than this many tokens are rejected as junk.", affects="prepare", ge=1
    )
    max_length: int = _f(
        512,
        "Tokens per example (prompt + answer + EOS); longer ones are truncated, "
        "question first (from its start), then the answer's tail.",
        affects="prepare",
        ge=16,
    )
    max_records: int = _f(0, "Read at most this many records (0 = all); for smoke runs.", affects="prepare", ge=0)
    sources: list[SourceConfig] = _f(
        [],
        "Several sources in one run, instead of data.source: a list of {name, source, "
        "question_field, answer_field, hub_split, max_records, weight} (question_field, "
        "answer_field, hub_split and max_records default to data.*'s, weight to 1). Every "
        "record keeps its source's name; a question "
        "in two sources is kept from the first listed. weight: how often each train example "
        "of the source appears per epoch (1 = once, 2 = twice, 0.5 = a seeded half). "
        "Empty = data.source alone.",
        affects="prepare",
    )
    num_proc: int = _f(1, "Processes for tokenization (datasets.map num_proc).", affects="nothing", ge=1)
    fast_tokenizer: bool = _f(
        True,
        "Tokenize with medqa's fast path for BioGPT's tokenizer (the same ids, ~4x "
        "sooner) when it applies; false = the tokenizer as it is.",
        affects="nothing",
    )

    def check(self) -> None:
        fracs = (self.train_fraction, self.val_fraction, self.test_fraction)
        if abs(sum(fracs) - 1.0) > 1e-6:
            raise ConfigError(
                f"data.train_fraction + data.val_fraction + data.test_fraction must sum to 1; got {fracs} "
                f"(sum {sum(fracs):.4f}). Fix the fractions, e.g. 0.8/0.1/0.1."
            )
        for i, entry in enumerate(self.sources):
            entry.check(f"data.sources[{i}]")
        names = [entry.name for entry in self.sources]
        if len(set(names)) != len(names):
            raise ConfigError(f"data.sources: names must be unique, got {names}.")


@dataclass
class PromptConfig(Section):
    """The one prompt template shared by tokenization, training, evaluation and generation."""

    template: str = _f(
        "### Question:\n{question}\n\n### Answer:\n",
        "Text before the answer; `{question}` is replaced by the cleaned question.",
        affects="prepare",
    )
    use_chat_template: bool = _f(
        False,
        "Build the prompt with the tokenizer's chat template (a user turn holding the "
        "question, then the assistant header) instead of `template`.",
        affects="prepare",
    )
    system: str = _f("", "System message for the chat template (empty = the template's default).", affects="prepare")
    min_question_tokens: int = _f(
        8, "When truncating, keep at least this many question tokens (its end).", affects="prepare"
    )

    def check(self) -> None:
        if self.template.count("{question}") != 1:
            raise ConfigError(f"prompt.template must contain `{{question}}` exactly once; got {self.template!r}.")


@dataclass
class TinyModelConfig(Section):
    """The tiny BioGPT-architecture model built offline for the demo and the tests."""

    enabled: bool = _f(
        False,
        "Build the tiny model when `model.name_or_path` equals `model.tiny.path` and that folder is missing.",
        affects="train",
    )
    path: str = _f("${workdir}/models/tiny-biogpt", "Folder of the tiny model.", affects="train", path=True)
    vocab_size: int = _f(
        2000, "BPE vocabulary size learned from the train split (incl. 4 special tokens).", affects="train", ge=64
    )
    tokenizer_files: str = _f(
        "",
        "Folder with real BioGPT vocab.json/merges.txt to use instead of learning "
        "a vocabulary (e.g. assets/biogpt-tokenizer, shipped).",
        affects="train",
        path=True,
    )
    hidden_size: int = _f(64, "Hidden size.", affects="train")
    num_layers: int = _f(2, "Transformer layers.", affects="train")
    num_heads: int = _f(4, "Attention heads.", affects="train", ge=1)
    intermediate_size: int = _f(128, "Feed-forward size.", affects="train")
    max_positions: int = _f(1024, "Maximum positions.", affects="train")
    initializer_range: float = _f(
        0.2, "Init std; a tiny random BioGPT learns under LoRA only with a large one.", affects="train"
    )

    def check(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"model.tiny.hidden_size ({self.hidden_size}) must be divisible by "
                f"model.tiny.num_heads ({self.num_heads})."
            )


@dataclass
class ModelConfig(Section):
    """Which causal LM and tokenizer to load, and how."""

    name_or_path: str = _f("microsoft/biogpt", "Hub id or local folder of a causal LM.", affects="train", path=True)
    tokenizer: str = _f(
        "", "Hub id or folder of the tokenizer; empty = same as `name_or_path`.", affects="prepare", path=True
    )
    revision: str = _f("main", "Hub revision (branch, tag or commit).", affects="train")
    trust_remote_code: bool = _f(
        False, "Run model code from the Hub. Off by default: it executes downloaded code.", affects="train"
    )
    gguf_file: str = _f(
        "",
        "A GGUF checkpoint to convert (dequantised) into `name_or_path` once, when that folder is "
        "missing: a path, or pkg://<python package>/<file> for a file shipped in a package.",
        affects="train",
        path=True,
    )
    dtype: str = _f(
        "auto",
        "The dtype every model is scored in (baseline, in-training validation under autocast, "
        "evaluate): auto (bf16 where supported, fp16 on older GPUs, fp32 on CPU), float32, "
        "bfloat16, float16.",
        affects="nothing",
        choices=("auto", "float32", "bfloat16", "float16"),
    )
    device: str = _f("auto", "auto, cpu, cuda, cuda:N or mps.", affects="train")
    tiny: TinyModelConfig = _section(TinyModelConfig, "Tiny offline model.")

    @property
    def tokenizer_path(self) -> str:
        return self.tokenizer or self.name_or_path


@dataclass
class LoraConfig(Section):
    """LoRA adapter settings (peft)."""

    r: int = _f(8, "Rank of the update matrices.", affects="train", ge=1)
    alpha: int = _f(16, "Scaling numerator: the update is scaled by alpha / r.", affects="train", gt=0)
    dropout: float = _f(0.05, "Dropout on the LoRA input.", affects="train", ge=0, lt=1)
    use_rslora: bool = _f(
        False,
        "Rank-stabilised LoRA (Kalajdzievski 2023): the update is scaled by alpha / sqrt(r) instead of alpha / r, so a "
        "large rank (64) learns as fast as a small one.",
        affects="train",
    )
    targets: str | list[str] = _f(
        "all-linear",
        "Preset (qv, attention, all-linear) resolved per architecture, "
        "or a list of layer names such as [q_proj, v_proj].",
        affects="train",
    )


@dataclass
class ScoringConfig(Section):
    """How answer perplexity is measured (the same function scores the baseline, training and the final test)."""

    batch_size: int = _f(
        8, "Examples per scoring batch; batches are formed from examples sorted by length.", affects="nothing", ge=1
    )
    bootstrap_samples: int = _f(
        1000, "Bootstrap resamples (over examples) for the 95% confidence intervals.", affects="nothing", ge=0
    )
    max_examples: int = _f(
        0, "Score at most this many examples per split (0 = all); for smoke runs.", affects="train", ge=0
    )
    tokens_per_batch: int = _f(
        0,
        "Padded tokens per scoring batch (examples sorted by length fill it); 0 = auto: "
        "sized from the free memory on CUDA, scoring.batch_size examples elsewhere.",
        affects="nothing",
        ge=0,
    )
    knowledge_questions: int = _f(
        0,
        "PubMedQA dev questions (of the 500 in data/pubmedqa/pubmedqa_dev.json, never the "
        "test ones; a seeded subset) each in-training evaluation also answers, with "
        "evaluate's PubMedQA scoring, beside the base model's score on them: "
        "eval_knowledge_acc in metrics.jsonl, for tune.objective (0 = off).",
        affects="train",
        ge=0,
        le=KNOWLEDGE_DEV_SIZE,
    )


@dataclass
class GenerateConfig(Section):
    """How answers are generated (evaluation samples, notebooks, `medqa ask`)."""

    max_new_tokens: int = _f(128, "Most tokens generated per answer.", affects="nothing", ge=1)
    do_sample: bool = _f(False, "Sample instead of greedy decoding.", affects="nothing")
    temperature: float = _f(0.7, "Sampling temperature (with do_sample).", affects="nothing", gt=0)
    top_p: float = _f(0.9, "Nucleus sampling mass (with do_sample).", affects="nothing", gt=0, le=1)
    num_beams: int = _f(1, "Beam search width (1 = greedy or sampling).", affects="nothing", ge=1)
    repetition_penalty: float = _f(1.0, "Penalty > 1 discourages repeating tokens.", affects="nothing", gt=0)
    no_repeat_ngram_size: int = _f(0, "Forbid repeating n-grams of this size (0 = off).", affects="nothing")
    batch_size: int = _f(8, "Prompts per generation batch (grouped by length, left-padded).", affects="nothing", ge=1)
    static_cache: bool | str = _f(
        "auto",
        "Decode with a static KV cache (fixed shapes, compiled by transformers): "
        "auto = on CUDA, true, false. If it fails, the dynamic cache answers "
        "instead (one warning, recorded in report.json `fallbacks`).",
        affects="nothing",
        choices=("auto", True, False),
    )


@dataclass
class TrainConfig(Section):
    """LoRA fine-tuning with transformers' Trainer."""

    learning_rate: float = _f(2e-4, "Peak learning rate (AdamW).", affects="train", gt=0)
    weight_decay: float = _f(0.0, "AdamW weight decay.", affects="train", ge=0)
    epochs: float = _f(1.0, "Training epochs (ignored when max_steps > 0).", affects="train", gt=0)
    max_steps: int = _f(0, "Optimizer steps to run; 0 = use epochs.", affects="train", ge=0)
    kl_to_base: float = _f(
        0.0,
        "Regulariser: beta of beta x KL(base || tuned), the base model's next-token distribution (the adapter "
        "disabled, no gradient) against the tuned one's, per answer token, added to the training loss. 0 = off "
        "(exactly the plain loss); costs one more forward of the frozen model per step.",
        affects="train",
        ge=0,
    )
    batch_size: int = _f(
        8,
        "Examples per device batch, grouped by length and padded to the batch's longest (train.packing=false); "
        "with packing, packed rows per micro-batch when train.tokens_per_batch is 0 off CUDA.",
        affects="train",
        ge=1,
    )
    grad_accum: int = _f(
        1,
        "Gradient accumulation steps: effective batch = batch_size x grad_accum (with packing "
        "and train.tokens_per_step set, derived instead).",
        affects="train",
        ge=1,
    )
    tokens_per_batch: int = _f(
        0,
        "With packing: tokens per micro-batch, as rows of data.max_length tokens (every "
        "step has this one shape). 0 = auto: sized from the GPU's free memory on CUDA "
        "(if that fails, train.batch_size rows, recorded in metrics.json training."
        "fallbacks), train.batch_size rows elsewhere.",
        affects="train",
        ge=0,
    )
    tokens_per_step: int = _f(
        0,
        "With packing: tokens per optimizer step (the effective batch); gradient "
        "accumulation = tokens_per_step / tokens_per_batch, so the step is the same on every "
        "card. 0 = tokens_per_batch x train.grad_accum.",
        affects="train",
        ge=0,
    )
    compile: bool | str = _f(
        "auto",
        "torch.compile the model for the one packed micro-batch shape: auto = on CUDA "
        "with packing, true, false. The compile time is reported apart. If compiling "
        "fails (up front or in the first step), the eager step trains instead: one "
        "warning, recorded in metrics.json training.fallbacks.",
        affects="nothing",
        choices=("auto", True, False),
    )
    compile_mode: str = _f(
        "default",
        "torch.compile mode: default, reduce-overhead (CUDA graphs), max-autotune "
        "(CUDA graphs), max-autotune-no-cudagraphs. CUDA graphs need an accumulation of "
        "1 (train.tokens_per_step = the micro-batch); with more the run is refused.",
        affects="nothing",
        choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
    )
    attention: str = _f(
        "auto",
        "Attention for packed rows: sdpa (a block-diagonal mask), flex (FlexAttention "
        "document mask, CUDA only), auto (= sdpa; see BENCHMARKS.md). If flex fails in the "
        "first step, sdpa trains instead (one warning, recorded in metrics.json).",
        affects="train",
        choices=("auto", "sdpa", "flex"),
    )
    loss_chunk_tokens: int = _f(
        0,
        "Compute the training loss over this many tokens at a time, recomputing each "
        "chunk's logits in backward, so a large micro-batch never holds all its fp32 "
        "logits at once (0 = the model's own loss).",
        affects="nothing",
        ge=0,
    )
    warmup_ratio: float = _f(0.05, "Share of steps for linear warmup.", affects="train", ge=0, lt=1)
    scheduler: str = _f(
        "cosine",
        "Learning-rate schedule after warmup: {choices}.",
        affects="train",
        choices=("cosine", "linear", "constant_with_warmup", "constant"),
    )
    max_grad_norm: float = _f(1.0, "Gradient clipping norm.", affects="train", gt=0)
    logging_steps: int = _f(
        10, "Log train loss, learning rate, grad norm and throughput every N steps.", affects="nothing", ge=1
    )
    eval_steps: int = _f(50, "Evaluate val answer_loss (and save a checkpoint) every N steps.", affects="train", ge=1)
    save_total_limit: int = _f(2, "Checkpoints kept on disk (the best is always kept).", affects="nothing", ge=1)
    early_stopping_patience: int = _f(
        0, "Stop after this many evaluations without improvement (0 = off).", affects="train", ge=0
    )
    group_by_length: bool = _f(True, "Batch examples of similar length together, so little is padded.", affects="train")
    pack_row_tokens: int = _f(
        0,
        "With packing: tokens per packed row (0 = data.max_length). Rows of 2 x "
        "data.max_length fill better (on the 500 real records with BioGPT's tokenizer, 0.98 of "
        "computed tokens are real at 1,024 against 0.92 at 512, the optimum for 512: a third of "
        "the examples are over 256 tokens) but SDPA's dense block mask then costs ~7% more "
        "attention per token; FlexAttention computes only the examples' own blocks. Positions "
        "restart per example, so it may exceed data.max_length (not the model's window).",
        affects="train",
        ge=0,
    )
    packing: bool = _f(
        False,
        "Pack several examples into each row of up to data.max_length tokens (block-diagonal "
        "attention, positions restart per example); batch_size then counts packed rows. "
        "Changes no metric: evaluation is never packed.",
        affects="train",
    )
    gradient_checkpointing: bool = _f(
        False, "Recompute activations in backward: less memory, ~30% slower.", affects="nothing"
    )
    mixed_precision: str = _f(
        "auto",
        "auto (bf16 or fp16 on CUDA, none on CPU), no, bf16, fp16. On CUDA the frozen "
        "base weights are held in this dtype and the LoRA weights in fp32.",
        affects="train",
        choices=("auto", "no", "bf16", "fp16"),
    )
    qlora: bool = _f(
        False, "Load the base model in 4-bit (bitsandbytes, CUDA only) and train LoRA on top.", affects="train"
    )
    resume: bool = _f(
        False,
        "Continue from the newest intact checkpoint in outputs/finetune_checkpoints/ (a "
        "damaged newer one is named and set aside).",
        affects="nothing",
    )
    ddp_timeout: int = _f(
        1800,
        "Several processes (torchrun): seconds a collective (barrier, all-reduce) waits for "
        "the slowest process before the run fails, e.g. while rank 0 alone writes the run or a "
        "process died. Raise it when rank 0's writing or first compile takes longer.",
        affects="nothing",
        ge=1,
    )
    report_to: list[str] = _f(
        ["tensorboard"],
        "Experiment trackers the Trainer logs to: tensorboard, wandb, mlflow, or "
        "any other transformers supports when it is installed; [] or [none] = "
        "only medqa's own metrics.jsonl. The default missing is a warning "
        "(training runs without it); a tracker you name must be installed.",
        affects="nothing",
    )

    def check(self) -> None:
        if self.compile is True and not self.packing:
            raise ConfigError(
                "train.compile=true needs train.packing=true: compiling is worth it only for one static "
                "batch shape, and unpacked batches change shape every step. Set train.packing=true or "
                "train.compile=auto."
            )


@dataclass
class TuneConfig(Section):
    """Ray Tune hyperparameter search (`medqa tune`). Each trial runs the same function as `medqa train`."""

    num_samples: int = _f(4, "Trials to sample from the search space.", affects="search", ge=1)
    max_concurrent: int = _f(2, "Trials running at once.", affects="nothing", ge=1)
    cpus_per_trial: float = _f(1.0, "CPUs reserved per trial.", affects="nothing", gt=0)
    gpus_per_trial: float = _f(0.0, "GPUs (or a fraction, e.g. 0.5 to share one) per trial.", affects="nothing", ge=0)
    address: str = _f(
        "", "Ray cluster to join (also RAY_ADDRESS); empty = start a local Ray sized to the machine.", affects="nothing"
    )
    learning_rate: list[float] = _f(
        [1e-4, 1e-2],
        "Log-uniform bounds [low, high] for train.learning_rate.",
        affects="search",
        searches="train.learning_rate",
        sampler="loguniform",
    )
    weight_decay: list[float] = _f(
        [0.0, 0.1],
        "Uniform bounds [low, high] for train.weight_decay.",
        affects="search",
        searches="train.weight_decay",
        sampler="uniform",
    )
    lora_r: list[int] = _f(
        [], "Choices for lora.r (empty = not searched).", affects="search", searches="lora.r", sampler="choice"
    )
    lora_alpha: list[int] = _f(
        [], "Choices for lora.alpha (empty = not searched).", affects="search", searches="lora.alpha", sampler="choice"
    )
    lora_dropout: list[float] = _f(
        [],
        "Choices for lora.dropout (empty = not searched).",
        affects="search",
        searches="lora.dropout",
        sampler="choice",
    )
    lora_targets: list[str] = _f(
        [],
        "Choices of lora.targets presets (empty = not searched).",
        affects="search",
        searches="lora.targets",
        sampler="choice",
    )
    grace_period: int = _f(1, "ASHA: evaluations every trial gets before it can be stopped.", affects="search", ge=1)
    reduction_factor: int = _f(
        2, "ASHA: keep the best 1/reduction_factor of trials at each rung.", affects="search", ge=2
    )
    max_failures: int = _f(
        1, "Retries of a trial that crashes before it is reported as an error.", affects="nothing", ge=0
    )
    resume: bool = _f(
        False, "Restore the latest interrupted experiment under outputs/ray_* (Tuner.restore).", affects="nothing"
    )
    seed: int = _f(0, "Seed of the random search.", affects="search")
    max_steps: list[int] = _f(
        [],
        "Choices for train.max_steps (0 = train.epochs; empty = not searched): e.g. [40, 0] lets a trial run a "
        "whole epoch beside short ones.",
        affects="search",
        searches="train.max_steps",
        sampler="choice",
    )
    objective: str = _f(
        "answer_loss",
        "How the adapter is chosen, the same rule for the best checkpoint of a run "
        "(`medqa train`), the best trial of a search, ASHA's pruning and the point of the "
        "frontier: answer_loss (lowest val answer_loss); answer_loss_within_knowledge (lowest "
        "val answer_loss among those that kept tune.knowledge_measure within its limit "
        "against the base model; none such: the nearest miss, with a warning); weighted (val "
        "answer_loss + tune.knowledge_weight x the relative abstract loss change + "
        "tune.accuracy_weight x the PubMedQA accuracy drop, by tune.knowledge_measure). The "
        "last two need scoring.knowledge_questions > 0.",
        affects="train",
        choices=OBJECTIVES,
    )
    knowledge_measure: str = _f(
        "abstract_loss",
        "What knowledge kept is measured by, on the PubMedQA dev questions: abstract_loss "
        "(the loss per token on their abstracts, a paired continuous measure: tight "
        "intervals from few questions), pubmedqa (their accuracy: noisy on 100 questions, "
        "near the always-yes share for small models), or both. One of {choices}.",
        affects="train",
        choices=KNOWLEDGE_MEASURES,
    )
    max_knowledge_drop: float = _f(
        0.02,
        "The largest PubMedQA dev accuracy drop against the base model an eligible adapter "
        "may show (0.02 = 2 points), with knowledge_measure pubmedqa or both.",
        affects="train",
        ge=0,
        le=1,
    )
    max_abstract_loss_rise: float = _f(
        0.02,
        "The largest relative rise of the abstract loss against the base model an eligible "
        "adapter may show (0.02 = 2%), with knowledge_measure abstract_loss or both.",
        affects="train",
        ge=0,
    )
    knowledge_weight: float = _f(
        25.0,
        "weighted: nats of val answer_loss one unit of relative abstract-loss change is worth (25: a 2% rise, the "
        "default limit, costs 0.5 nats, the size of the answer-loss gains fine-tuning gives a 135M model on the "
        "real records).",
        affects="train",
        ge=0,
    )
    accuracy_weight: float = _f(
        10.0,
        "weighted: nats of val answer_loss one unit of PubMedQA dev accuracy is worth (10: a "
        "5-point drop costs 0.5 nats, the size of the answer-loss gains fine-tuning gives a "
        "135M model on the real records).",
        affects="train",
        ge=0,
    )
    frontier_alphas: list[float] = _f(
        list(FRONTIER_ALPHAS),
        "Scales of each kept adapter's LoRA update the frontier scores after the search "
        "(0 = the base model, 1 = as trained; exact for LoRA, not for DoRA); [1.0] = no "
        "scaling; [] = no frontier (the best trial as trained).",
        affects="search",
    )
    final_knowledge_questions: int = _f(
        KNOWLEDGE_DEV_SIZE,
        "PubMedQA dev questions the frontier's chosen point (and the base model, once per workdir) is finally "
        "scored on: all 500 by default, a far tighter figure than the subset scored at every evaluation (0 = off).",
        affects="nothing",
        ge=0,
        le=KNOWLEDGE_DEV_SIZE,
    )
    final_knowledge_checks: int = _f(
        3,
        "With tune.knowledge_measure pubmedqa or both: how many of the front's points, best first by the rule's "
        "other measures, are scored on the tune.final_knowledge_questions dev questions until one keeps accuracy "
        "within tune.max_knowledge_drop (the choice is made on them, not on the noisy subset).",
        affects="nothing",
        ge=1,
    )

    def check(self) -> None:
        for name in ("learning_rate", "weight_decay"):
            bounds = getattr(self, name)
            if len(bounds) != 2 or bounds[0] > bounds[1] or bounds[0] < 0:
                raise ConfigError(f"tune.{name} must be [low, high] with 0 <= low <= high; got {bounds}.")
        if self.learning_rate[0] <= 0:
            raise ConfigError(f"tune.learning_rate bounds must be > 0 (log-uniform); got {self.learning_rate}.")
        if any(not 0 <= a <= 4 for a in self.frontier_alphas):
            raise ConfigError(
                f"tune.frontier_alphas must be scales between 0 and 4 (1 = the adapter as trained); got "
                f"{self.frontier_alphas}."
            )


@dataclass
class EvaluateConfig(Section):
    """The final comparison on the test split (`medqa evaluate`)."""

    num_questions: int = _f(
        20, "Test questions to answer and score with ROUGE and BLEU (0 = all).", affects="nothing", ge=0
    )
    samples_in_report: int = _f(3, "Side-by-side answers shown in report.md.", affects="nothing", ge=0)
    external_test: str = _f(
        "",
        "Another source's test records (JSON, JSONL, CSV, a datasets folder or a Hub id), "
        "cleaned as prepare cleans, never re-split, scored beside the test split (e.g. iCliniq).",
        affects="nothing",
        path=True,
    )
    external_name: str = _f("external", "Name of that data set in the report.", affects="nothing")
    external_question_field: str = _f("input", "Its field holding the question.", affects="nothing")
    external_answer_field: str = _f(
        "output", "Its field holding the answer (iCliniq: answer_icliniq).", affects="nothing"
    )
    bertscore_model: str = _f(
        "",
        "Encoder for BERTScore of the generated answers (a local folder, or a Hub id when "
        "online); empty = BERTScore off (the report says how to turn it on).",
        affects="nothing",
        path=True,
    )
    bertscore_layers: int = _f(0, "Encoder layers BERTScore uses (0 = all).", affects="nothing", ge=0)
    pubmedqa_questions: int = _f(
        0,
        "PubMedQA test questions (of the 500 shipped in data/pubmedqa/) each model answers "
        'zero-shot, for the report\'s "knowledge kept" table (0 = off).',
        affects="nothing",
        ge=0,
    )
    pubmedqa_file: str = _f(
        "",
        "Questions in the same layout ([{id, question, contexts, answer: yes/no/maybe}]) to use "
        "instead of the shipped PubMedQA test split.",
        affects="nothing",
        path=True,
    )
    benchmarks: list[str] = _f(
        [],
        "lm-evaluation-harness tasks or groups `medqa benchmark` runs on every model, e.g. "
        "pubmedqa_local (the shipped PubMedQA questions, offline), medmcqa, medqa_4options, "
        "mmlu_clinical_knowledge; a Hub task needs network or its data in the datasets "
        "cache. Empty = `medqa benchmark` has nothing to run.",
        affects="nothing",
    )
    benchmark_questions: int = _f(
        0,
        "Questions per benchmark task (0 = all): pubmedqa_local takes a seeded random "
        "subset (the questions evaluate.pubmedqa_questions would pick), other tasks "
        "lm-eval's first N (its `limit`).",
        affects="nothing",
        ge=0,
    )

    def check(self) -> None:
        if not all(isinstance(t, str) and t.strip() for t in self.benchmarks):
            raise ConfigError(
                "evaluate.benchmarks must be a list of lm-eval task names, e.g. [pubmedqa_local, medmcqa]."
            )


@dataclass
class Config(Section):
    """The whole configuration of a run."""

    workdir: str = _f(
        ".",
        "Root under which data/, tokenized/, outputs/ (and the tiny model) are written.",
        affects="nothing",
        path=True,
    )
    seed: int = _f(42, "Global seed for training and sampling.", affects="train")
    force: bool = _f(
        False, "Use artifacts whose manifest names other inputs than this config (with a warning).", affects="nothing"
    )
    data: DataConfig = _section(DataConfig, "Data loading and cleaning.")
    prompt: PromptConfig = _section(PromptConfig, "Prompt template.")
    model: ModelConfig = _section(ModelConfig, "Model and tokenizer.")
    lora: LoraConfig = _section(LoraConfig, "LoRA adapter.")
    scoring: ScoringConfig = _section(ScoringConfig, "Answer perplexity measurement (every stage).")
    generate: GenerateConfig = _section(GenerateConfig, "Answer generation.")
    train: TrainConfig = _section(TrainConfig, "Fine-tuning.")
    tune: TuneConfig = _section(TuneConfig, "Hyperparameter search.")
    evaluate: EvaluateConfig = _section(EvaluateConfig, "The final comparison (`medqa evaluate`).")

    def validate(self, prefix: str | None = "") -> Config:
        """Check every section; returns the config, so `load_config` can end with `return cfg.validate()`."""
        super().validate(prefix)
        return self

    def check(self) -> None:
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

    def resolve(self, path: str) -> str:
        """Expand `${workdir}` and `~` in a path field."""
        return os.path.expanduser(path.replace("${workdir}", str(self.workdir)))

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["data"]["sources"] = [entry.to_dict() for entry in self.data.sources]  # as written (SourceConfig.to_dict)
        return out


# ------------------------------------------------------------------------ what the declarations give the code


def _leaves(cls: type, prefix: str = "") -> dict[str, dataclasses.Field]:
    out = {}
    for f in dataclasses.fields(cls):
        if isinstance(f.default_factory, type) and issubclass(f.default_factory, Section):
            out.update(_leaves(f.default_factory, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = f
    return out


def _sections(cls: type, prefix: str = "") -> dict[type, str]:
    out = {cls: prefix}
    for f in dataclasses.fields(cls):
        if isinstance(f.default_factory, type) and issubclass(f.default_factory, Section):
            out.update(_sections(f.default_factory, f"{prefix}{f.name}."))
    return out


FIELDS: dict[str, dataclasses.Field] = _leaves(Config)  # dotted key -> field, for every field of every section
_PREFIXES = _sections(Config)  # section class -> its dotted prefix ("model.tiny."), for validate()'s messages


def _prefix(cls: type) -> str:
    return _PREFIXES[cls]


def keys(affects: str | tuple[str, ...] = AFFECTS, *, path: bool | None = None) -> list[str]:
    """The dotted keys of the fields that `affects` one of these (in declaration order), only paths (path=True)
    or no paths (path=False)."""
    wanted = (affects,) if isinstance(affects, str) else affects
    return [
        key
        for key, f in FIELDS.items()
        if f.metadata["affects"] in wanted and (path is None or f.metadata["path"] == path)
    ]


def not_determining() -> set[str]:
    """Fields a resumed run or search may change: those that affect nothing, and paths (what they point at is
    fingerprinted in the run's inputs)."""
    return set(keys("nothing")) | set(keys(path=True))


def searched() -> dict[str, tuple[str, str]]:
    """`tune` field -> (the dotted key it searches, its sampler), in declaration order."""
    return {
        key.split(".", 1)[1]: (f.metadata["searches"], f.metadata["sampler"])
        for key, f in FIELDS.items()
        if "searches" in f.metadata
    }


def get(cfg: Config, key: str) -> Any:
    """The value of a dotted key, e.g. get(cfg, "model.tiny.path")."""
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def default(key: str) -> Any:
    """A field's default value."""
    return get(Config(), key)
