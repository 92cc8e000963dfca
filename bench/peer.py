"""medqa against its peer: the same LoRA fine-tune through `medqa train` and through TRL's `SFTTrainer`, side by side.

    python bench/peer.py --threads 1          # `make bench-peer`: SmolLM2-135M-Instruct, 20 steps (~28 min at load 5)
    python bench/peer.py --config configs/demo.yaml --steps 2 --repeats 1 --threads 1   # tests/test_peer_bench.py
    python bench/peer.py --from-json bench/results/peer-<machine>.json --markdown BENCHMARKS.md --readme README.md

Same model (loaded from the same folder, fp32), same tokenized train split's examples, same LoRA (r, alpha,
dropout, target modules), same optimizer, learning rate, schedule, warmup, clipping, batch size, seed and step
count. Each run is a fresh process (its peak memory is its own), the two sides alternate (medqa, TRL, TRL, medqa,
...) so a machine that slows down slows both, and the ratio is taken per pair. Steps are timed by one callback
(`medqa.trainer.StepTimer`, on both trainers): model loading, dataset preparation, evaluation and the final
scoring are outside it. Tokens are counted from the batches the trainers actually received. Both adapters are
scored by one function, `medqa.metrics.evaluate_answer_loss`, on medqa's tokenized test split.

A third arm, `medqa_all_logits`, is medqa with the output layer computed at every position (what
`medqa.faststep.lm_loss_sum` did before it kept only labelled positions): the difference is that change's saving.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", category=FutureWarning)

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "src"), str(REPO / "bench")]  # medqa, and marked_section beside this file
os.environ.setdefault("HF_HOME", str(REPO / ".cache" / "huggingface"))
from marked_section import write_marked_section  # noqa: E402

SIDES = ("medqa", "trl", "medqa_all_logits")
MARK_START, MARK_END = "<!-- peer:start -->", "<!-- peer:end -->"
RUN_FIELDS = (
    "side",
    "steps",
    "train_seconds",
    "median_step_seconds",
    "real_tokens",
    "answer_tokens",
    "computed_tokens",
    "real_tokens_per_s",
    "answer_tokens_per_s",
    "cpu_seconds",
    "real_tokens_per_cpu_s",
    "answer_tokens_per_cpu_s",
    "padding_efficiency",
    "peak_memory_mib",
    "peak_memory_scope",
    "final_train_loss",
)

# What the two sides share, and what they could not share. The first list is checked in `aligned_settings`
# against what each trainer actually ran with; the second is stated in the JSON and the table.
NOT_ALIGNED = {
    "truncation": "medqa cuts a long question from its start first, then the answer's tail, and always ends on EOS "
    "(trained only after a whole answer); TRL keeps the first max_length tokens of prompt + completion "
    "(truncation_mode=keep_start) and drops an example whose completion is cut away entirely",
    "tokenization": "medqa tokenizes the prompt template, the question and the answer apart and joins the ids; TRL "
    "renders the conversation with the tokenizer's chat template and tokenizes the prompt and prompt + completion "
    "(a different token may fall on the boundary); so the two see slightly different token counts",
    "pad_token": "medqa pads with the tokenizer's pad token; TRL sets its own (pad_token or eos) in its collator; "
    "pad positions are masked and carry no label on both sides",
    "batching": "medqa groups examples of similar length into a batch (train.group_by_length, its default), TRL "
    "samples them at random (its default; TRL's padding_free needs FlashAttention, not available on CPU): the "
    "padding differs, reported as padding_efficiency",
    "loss_kernel": "medqa computes the output layer only at labelled positions (lm_loss_sum); TRL's fused LM head "
    "scores only labelled positions on CUDA/XPU (Triton) and every position elsewhere, here included",
    "lora_init": "both seed the same way, but peft draws LoRA's A matrices inside each trainer's own setup, so the "
    "initial adapters are equally distributed, not identical",
    "per_step_metrics": "TRL computes entropy and token accuracy of every batch (part of its step, as a user gets "
    "it); medqa logs loss, learning rate and gradient norm",
}


def log(msg: str) -> None:
    print(f"[peer {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def load_average() -> list[float] | None:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def machine_name() -> str:
    """A short, file-name-safe name of this machine's kind: cores and CPU model, e.g. `2cpu-amd-epyc-9r14`."""
    import re

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    words = re.sub(r"\(R\)|\(TM\)|processor|cpu|@.*|\d+-core", " ", cpu, flags=re.I).split()
    return f"{os.cpu_count()}cpu-" + "-".join(re.sub(r"[^a-z0-9]", "", w.lower()) for w in words[:4] if w)


# ------------------------------------------------------------------------------------ measuring one run


class Counts:
    """Real tokens (attention mask), answer tokens (labels other than -100 after the shift) and computed tokens
    (the padded batch's size) of every micro-batch a trainer trains on."""

    def __init__(self):
        self.real = self.answer = self.computed = 0

    def add(self, inputs: dict) -> None:
        from medqa.prompts import IGNORE_INDEX

        ids = inputs["input_ids"]
        mask = inputs.get("attention_mask")
        self.computed += ids.numel()
        self.real += int(mask.sum()) if mask is not None and mask.dim() == 2 else ids.numel()
        self.answer += int((inputs["labels"][:, 1:] != IGNORE_INDEX).sum())


@contextlib.contextmanager
def counting(counts: Counts):
    """Count the inputs of every `transformers.Trainer.training_step`: medqa's AnswerLossTrainer and TRL's
    SFTTrainer both end in it (super()), so one hook counts both sides alike, from the batches themselves."""
    from transformers import Trainer

    original = Trainer.training_step

    def step(self, model, inputs, *args, **kwargs):
        counts.add(inputs)
        return original(self, model, inputs, *args, **kwargs)

    Trainer.training_step = step
    try:
        yield
    finally:
        Trainer.training_step = original


def _vm_hwm_mib() -> float | None:
    with contextlib.suppress(OSError, StopIteration, ValueError):
        line = next(x for x in open("/proc/self/status") if x.startswith("VmHWM:"))
        return int(line.split()[1]) / 1024
    return None


def memory_callback():
    """Peak resident memory during training only: Linux's high-water mark is reset when training begins (writing
    5 to /proc/self/clear_refs) and read when it ends. Where that cannot be done, the process's peak since it
    started (loading included) is reported, and `peak_memory_scope` says which."""
    import torch
    from transformers import TrainerCallback

    class PeakMemory(TrainerCallback):
        scope = "process"
        peak_mib: float | None = None

        def on_train_begin(self, args, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
                self.scope = "cuda_training"
                return
            with contextlib.suppress(OSError):
                Path("/proc/self/clear_refs").write_text("5")
                self.scope = "training"

        def on_train_end(self, args, state, control, **kw):
            if torch.cuda.is_available():
                self.peak_mib = torch.cuda.max_memory_allocated() / 2**20
            else:
                hwm = _vm_hwm_mib()
                self.peak_mib = hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    return PeakMemory()


def all_logits_loss_sum(hidden, labels, lm_head, chunk_tokens: int = 0):
    """`medqa.faststep.lm_loss_sum` as it was before it kept only labelled positions: the output layer at every
    position, the ignored ones dropped by cross_entropy (the `medqa_all_logits` arm)."""
    import torch
    from torch.utils.checkpoint import checkpoint

    from medqa.faststep import _chunk_loss_sum

    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    y = labels[:, 1:].reshape(-1)
    if not chunk_tokens or chunk_tokens >= h.shape[0]:
        return _chunk_loss_sum(h, y, lm_head.weight, lm_head.bias)
    total = h.new_zeros((), dtype=torch.float32)
    for start in range(0, h.shape[0], chunk_tokens):
        total = total + checkpoint(
            _chunk_loss_sum, h[start : start + chunk_tokens], y[start : start + chunk_tokens], lm_head.weight,
            lm_head.bias, use_reentrant=False,
        )  # fmt: skip
    return total


def train_medqa(cfg, run_dir: Path, timers: list, memory, counts: Counts, all_logits: bool) -> tuple[Path, dict]:
    """`medqa train` itself (medqa.train.train, as the CLI calls it), the timing callbacks added."""
    import medqa.faststep
    from medqa.train import train

    if all_logits:
        medqa.faststep.lm_loss_sum = all_logits_loss_sum
    with counting(counts):
        result = train(cfg, callbacks=[*timers, memory], run_dir=run_dir)
    t = result.metrics.get("training", {})
    settings = {
        "trainer": "medqa.train.train (AnswerLossTrainer)",
        "fast_step": t.get("attention") not in (None, "model default"),
        "packing": t.get("packing"),
        "final_train_loss": next((h["train_loss"] for h in reversed(result.history) if "train_loss" in h), None),
    }
    return result.out_dir, settings


def trl_dataset(cfg, tokenizer):
    """medqa's train split as a TRL prompt-completion dataset, built as a user would: the conversation (system
    prompt, question; the answer as the completion) where the tokenizer has a chat template, else medqa's prompt
    text and the answer followed by EOS. The examples are those of medqa's tokenized train split (same ids)."""
    from datasets import Dataset

    from medqa.prompts import template_text
    from medqa.workdir import load_records, load_split

    ids = set(load_split(cfg, "train")["id"])
    records = [r for r in load_records(cfg, "train") if r["id"] in ids]
    p = cfg.prompt
    if p.use_chat_template and getattr(tokenizer, "chat_template", None):
        system = [{"role": "system", "content": p.system}] if p.system else []
        rows = [
            {
                "prompt": [*system, {"role": "user", "content": r["question"]}],
                "completion": [{"role": "assistant", "content": r["answer"]}],
            }
            for r in records
        ]
    else:
        before, after, _ = template_text(tokenizer, p)
        rows = [
            {"prompt": before + r["question"] + after, "completion": r["answer"] + tokenizer.eos_token} for r in records
        ]
    return Dataset.from_list(rows), len(records)


def train_trl(cfg, run_dir: Path, timers: list, memory, counts: Counts) -> tuple[Path, dict]:
    """TRL's SFTTrainer with the settings a careful user would pick to match: fp32 (bf16 off), no gradient
    checkpointing, cosine with warmup, completion-only loss on a prompt-completion dataset."""
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from medqa.lora_targets import resolve_lora_targets
    from medqa.modeling import load_tokenizer, model_path

    t = cfg.train
    tokenizer = load_tokenizer(cfg)
    dataset, examples = trl_dataset(cfg, tokenizer)
    model = AutoModelForCausalLM.from_pretrained(model_path(cfg), dtype=torch.float32, attn_implementation="sdpa")
    peft_config = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=resolve_lora_targets(model, cfg.lora.targets),
        task_type="CAUSAL_LM",
    )
    args = SFTConfig(
        output_dir=str(run_dir),
        seed=cfg.seed,
        data_seed=cfg.seed,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.learning_rate,
        weight_decay=t.weight_decay,
        lr_scheduler_type=t.scheduler,
        warmup_steps=t.warmup_ratio,  # a float < 1: a share of the steps, as medqa passes it
        max_grad_norm=t.max_grad_norm,
        optim=medqa_optimizer(),
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        max_length=cfg.data.max_length,
        completion_only_loss=True,
        logging_steps=t.logging_steps,
        eval_strategy="no",
        save_strategy="no",
        report_to=[],
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[*timers, memory],
    )
    with counting(counts):
        trainer.train()
    adapter = run_dir / "adapter"
    trainer.save_model(str(adapter))
    losses = [x["loss"] for x in trainer.state.log_history if "loss" in x]
    settings = {
        "trainer": f"trl.SFTTrainer {__import__('trl').__version__}",
        "train_examples": examples,
        "train_examples_after_truncation": len(trainer.train_dataset),
        "optim": args.optim if isinstance(args.optim, str) else args.optim.value,
        "bf16": args.bf16,
        "gradient_checkpointing": args.gradient_checkpointing,
        "completion_only_loss": args.completion_only_loss,
        "truncation_mode": args.truncation_mode,
        "pad_token": trainer.processing_class.pad_token,
        "final_train_loss": losses[-1] if losses else None,
    }
    return adapter, settings


def medqa_optimizer() -> str:
    """The optimizer `medqa train` picks on this machine (fused AdamW where it runs), given to TRL too."""
    from medqa.fallbacks import Fallbacks
    from medqa.train import _optimizer

    return _optimizer(Fallbacks())


def score_adapter(cfg, adapter_dir: Path) -> dict:
    """The one scorer for both sides: the base model in medqa's scoring dtype with the adapter on top,
    `medqa.metrics.evaluate_answer_loss` over medqa's tokenized test split."""
    from peft import PeftModel

    from medqa.metrics import evaluate_answer_loss
    from medqa.modeling import load_model, load_tokenizer
    from medqa.workdir import load_split

    tokenizer = load_tokenizer(cfg)
    model = PeftModel.from_pretrained(load_model(cfg), str(adapter_dir))
    test = load_split(cfg, "test", limit=False)
    m, _ = evaluate_answer_loss(model, test, tokenizer.pad_token_id, cfg.scoring.batch_size, bootstrap_samples=0)
    return {k: m[k] for k in ("answer_loss", "answer_tokens", "examples")}


def run_side(cfg, side: str, run_dir: Path, threads: int, score: bool) -> dict:
    """One training run in this process (a child of `main`): train, time, count, score."""
    import torch

    from medqa.trainer import StepTimer

    class CpuStepTimer(StepTimer):
        """The same step boundaries, in this process's CPU time (all its threads): what the steps cost, whatever
        share of the cores other jobs left them. With one thread it is the time a core of its own would take."""

        @staticmethod
        def _now() -> float:
            return time.process_time()

    torch.set_num_threads(threads)
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    timer, cpu, memory, counts = StepTimer(), CpuStepTimer(), memory_callback(), Counts()
    if side == "trl":
        adapter, settings = train_trl(cfg, run_dir, [timer, cpu], memory, counts)
    else:
        all_logits = side == "medqa_all_logits"
        adapter, settings = train_medqa(cfg, run_dir, [timer, cpu], memory, counts, all_logits)
    secs, cpu_secs = sum(timer.durations), sum(cpu.durations)
    row = {
        "side": side,
        "steps": len(timer.durations),
        "train_seconds": round(secs, 3),
        "median_step_seconds": round(statistics.median(timer.durations), 4),
        "real_tokens": counts.real,
        "answer_tokens": counts.answer,
        "computed_tokens": counts.computed,
        "real_tokens_per_s": round(counts.real / secs, 2),
        "answer_tokens_per_s": round(counts.answer / secs, 2),
        "cpu_seconds": round(cpu_secs, 3),
        "real_tokens_per_cpu_s": round(counts.real / cpu_secs, 2),
        "answer_tokens_per_cpu_s": round(counts.answer / cpu_secs, 2),
        "padding_efficiency": round(counts.real / max(counts.computed, 1), 4),
        "peak_memory_mib": round(memory.peak_mib, 1) if memory.peak_mib else None,
        "peak_memory_scope": memory.scope,
        "final_train_loss": settings.pop("final_train_loss"),
        "settings": settings,
        "threads": torch.get_num_threads(),
    }
    if score:
        row["test"] = score_adapter(cfg, adapter)
    return row


# ------------------------------------------------------------------------------------ the whole comparison


def load_cfg(config: str, workdir: Path, steps: int, overrides: list[str]):
    from medqa.config import load_config

    return load_config(
        config,
        [
            f"workdir={workdir}",
            f"train.max_steps={steps}",
            f"train.eval_steps={steps}",  # one validation pass, after the last timed step
            f"train.logging_steps={min(5, steps)}",
            "train.save_total_limit=1",
            "scoring.knowledge_questions=0",  # no PubMedQA questions during training: neither side answers any
            "tune.objective=answer_loss",  # (the rule that would need them; this bench runs no search)
            # `medqa train` scores val during training and val and test at its end (outside the timing): 8
            # examples each keep that short; the common scorer below scores the whole test split, both sides.
            "scoring.max_examples=8",
            *overrides,
        ],
    )


def aligned_settings(cfg, runs: list[dict]) -> dict:
    """The settings both sides ran with (from the config medqa trained with and the SFTConfig TRL did)."""
    t, lora = cfg.train, cfg.lora
    trl_runs = [r for r in runs if r["side"] == "trl"]
    trl = trl_runs[0]["settings"] if trl_runs else {}
    return {
        "model": cfg.model.name_or_path if not cfg.model.gguf_file else cfg.model.gguf_file,
        "dtype": "float32 (no autocast, no bf16)",
        "train_split": "medqa's tokenized train split (same example ids on both sides)",
        "max_length": cfg.data.max_length,
        "lora": {"r": lora.r, "alpha": lora.alpha, "dropout": lora.dropout, "targets": lora.targets},
        "optimizer": trl.get("optim", medqa_optimizer()),
        "learning_rate": t.learning_rate,
        "weight_decay": t.weight_decay,
        "scheduler": t.scheduler,
        "warmup_ratio": t.warmup_ratio,
        "max_grad_norm": t.max_grad_norm,
        "batch_size": t.batch_size,
        "grad_accum": t.grad_accum,
        "steps": t.max_steps,
        "seed": cfg.seed,
        "gradient_checkpointing": False,
        "loss": "mean over answer tokens (prompt labels -100 on both sides)",
        "attention": "sdpa",
        "scorer": "medqa.metrics.evaluate_answer_loss on medqa's tokenized test split, both adapters",
    }


def summarise(runs: list[dict]) -> dict:
    """Per side: the median over its runs of every rate, with min and max; the ratios per alternated pair."""
    out: dict = {"sides": {}, "ratios": {}}
    for side in SIDES:
        mine = [r for r in runs if r["side"] == side]
        if not mine:
            continue
        s = {"runs": len(mine)}
        for key in (
            "real_tokens_per_s",
            "answer_tokens_per_s",
            "real_tokens_per_cpu_s",
            "answer_tokens_per_cpu_s",
            "median_step_seconds",
            "peak_memory_mib",
        ):
            vals = [r[key] for r in mine if r[key] is not None]
            if vals:
                s[key] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}
        s["padding_efficiency"] = statistics.median(r["padding_efficiency"] for r in mine)
        losses = [r["test"]["answer_loss"] for r in mine if "test" in r]
        if losses:
            s["test_answer_loss"] = {"median": statistics.median(losses), "min": min(losses), "max": max(losses)}
        out["sides"][side] = s
    # Pairs: the k-th run of each side ran next to each other (alternated), so their ratio shares the machine's load.
    for name, num, den in (
        ("medqa_over_trl", "medqa", "trl"),
        ("logits_only_saving", "medqa", "medqa_all_logits"),
    ):
        a = [r for r in runs if r["side"] == num]
        b = [r for r in runs if r["side"] == den]
        pairs = list(zip(a, b))
        if not pairs:
            continue
        out["ratios"][name] = {
            key: {
                "median": round(statistics.median(x[key] / y[key] for x, y in pairs), 4),
                "per_pair": [round(x[key] / y[key], 4) for x, y in pairs],
            }
            for key in ("real_tokens_per_s", "answer_tokens_per_s", "real_tokens_per_cpu_s", "answer_tokens_per_cpu_s")
        }
    return out


def order(repeats: int, all_logits_runs: int) -> list[str]:
    """medqa, TRL, then TRL, medqa, ...: each side runs first as often as last. The `medqa_all_logits` arm runs
    after the k-th pair, for the first `all_logits_runs` pairs (beside the medqa run it is compared with)."""
    out = []
    for k in range(repeats):
        pair = ["medqa", "trl"] if k % 2 == 0 else ["trl", "medqa"]
        if k < all_logits_runs:
            pair = pair + ["medqa_all_logits"] if k % 2 == 0 else ["medqa_all_logits", *pair]
        out += pair
    return out


def run_child(args, side: str, k: int, work: Path, score: bool) -> dict:
    """One run in a fresh Python process: its own peak memory, no state left by the previous run."""
    out = work / "runs" / f"{k:02d}-{side}.json"
    cmd = [
        sys.executable,
        __file__,
        "--child",
        side,
        "--config",
        args.config,
        "--workdir",
        str(work),
        "--steps",
        str(args.steps),
        "--threads",
        str(args.threads),
        "--child-out",
        str(out),
        *(["--no-score"] if not score else []),
        *[x for o in args.override for x in ("--override", o)],
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{side} run {k} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    row = json.loads(out.read_text())
    row["wall_seconds"] = round(time.perf_counter() - t0, 1)
    row["load_average_after"] = load_average()
    return row


def measure(args) -> dict:
    import torch
    import transformers
    import trl

    from medqa.modeling import ensure_converted
    from medqa.prepare import prepare
    from medqa.workdir import paths

    start = time.perf_counter()
    load_start = load_average()
    work = Path(args.workdir).resolve()
    cfg = load_cfg(args.config, work, args.steps, args.override)
    if not paths(cfg).tokenized_split("test").is_dir():
        log(f"preparing {cfg.data.source} in {work}")
        prepare(cfg)
    ensure_converted(cfg)
    runs = []
    sequence = order(args.repeats, args.all_logits_runs)
    for k, side in enumerate(sequence):
        # medqa_all_logits trains the same adapter up to float rounding: its test loss is not scored again.
        row = run_child(args, side, k, work, score=not args.steps_only and side != "medqa_all_logits")
        log(
            f"{k + 1}/{len(sequence)} {side}: {row['real_tokens_per_s']:.1f} real tok/s, "
            f"{row['median_step_seconds']:.3f} s/step, test {row.get('test', {}).get('answer_loss', '-')}"
        )
        runs.append(row)
    return {
        "meta": {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine_name(),
            "host_cores": os.cpu_count(),
            "threads": args.threads,
            "config": args.config,
            "overrides": args.override,
            "command": " ".join(["python", "bench/peer.py", *sys.argv[1:]]),
            "versions": {
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "trl": trl.__version__,
                "python": platform.python_version(),
            },
            "load_average_at_start": load_start,
            "load_average_at_end": load_average(),
            "seconds": round(time.perf_counter() - start, 1),
        },
        "aligned": aligned_settings(cfg, runs),
        "not_aligned": NOT_ALIGNED,
        "runs": runs,
        **summarise(runs),
    }


# ------------------------------------------------------------------------------------ documents


def _f(x, digits=1):
    return "-" if x is None else f"{x:,.{digits}f}"


def _ratio_text(r: dict, key: str) -> str:
    return f"**{r[key]['median']:.2f}x** (pairs {', '.join(f'{x:.2f}' for x in r[key]['per_pair'])})"


def markdown_section(res: dict) -> str:
    m, sides, ratios = res["meta"], res["sides"], res["ratios"]
    names = {
        "medqa": "medqa (`medqa train`)",
        "trl": "TRL `SFTTrainer`, prompt-completion",
        "medqa_all_logits": "medqa, output layer at every position (before)",
    }
    lines = [
        MARK_START,
        f"**{m['date'][:10]}, {m['machine']}**: `{m['command']}`, {res['aligned']['steps']} steps of batch "
        f"{res['aligned']['batch_size']}, {m['threads']} torch thread(s) per run, torch {m['versions']['torch']}, "
        f"transformers {m['versions']['transformers']}, TRL {m['versions']['trl']}; load average (1, 5, 15 min) "
        f"{m['load_average_at_start']} at start, {m['load_average_at_end']} at end. Medians over runs (alternated, "
        "each a fresh process). Per CPU-second: the same steps timed in the process's CPU time, which other jobs "
        "on the machine do not stretch.",
        "",
        "| | runs | s/step | real tokens/s | answer tokens/s | real tokens / CPU-s | answer tokens / CPU-s "
        "| real / computed | peak memory (MiB) | test answer loss |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for side, s in sides.items():
        loss = s.get("test_answer_loss", {}).get("median")
        cpu = [s.get(k, {}).get("median") for k in ("real_tokens_per_cpu_s", "answer_tokens_per_cpu_s")]
        lines.append(
            f"| {names[side]} | {s['runs']} | {_f(s['median_step_seconds']['median'], 2)} "
            f"| {_f(s['real_tokens_per_s']['median'])} | {_f(s['answer_tokens_per_s']['median'])} "
            f"| {_f(cpu[0])} | {_f(cpu[1])} "
            f"| {s['padding_efficiency']:.3f} | {_f(s.get('peak_memory_mib', {}).get('median'), 0)} "
            f"| {_f(loss, 4)} |"
        )
    lines.append("")
    r = ratios.get("medqa_over_trl")
    if r:
        lines.append(
            f"medqa / TRL per alternated pair, real tokens/s: {_ratio_text(r, 'real_tokens_per_s')}; per CPU-second: "
            f"{_ratio_text(r, 'real_tokens_per_cpu_s')}. Answer tokens/s: {r['answer_tokens_per_s']['median']:.2f}x; "
            f"per CPU-second {r['answer_tokens_per_cpu_s']['median']:.2f}x."
        )
    s = ratios.get("logits_only_saving")
    if s:
        lines.append(
            "Logits only at labelled positions, over the output layer at every position (the same medqa step "
            f"otherwise): real tokens/s {_ratio_text(s, 'real_tokens_per_s')}; per CPU-second "
            f"{_ratio_text(s, 'real_tokens_per_cpu_s')}."
        )
    lines += ["", "Aligned: " + "; ".join(f"{k} {v}" for k, v in res["aligned"].items()) + ".", ""]
    lines += ["Not aligned:", ""] + [f"- **{k}**: {v}" for k, v in res["not_aligned"].items()]
    lines += ["", MARK_END]
    return "\n".join(lines) + "\n"


def readme_line(res: dict) -> str:
    sides = res["sides"]
    r = res["ratios"].get("medqa_over_trl", {})
    loss = {k: sides[k].get("test_answer_loss", {}).get("median") for k in ("medqa", "trl") if k in sides}
    rate = {k: sides[k]["real_tokens_per_s"]["median"] for k in ("medqa", "trl")}
    return (
        f"{MARK_START}\n- **Against TRL's `SFTTrainer`** (`make bench-peer`: SmolLM2-135M-Instruct, the same split, "
        f"LoRA, schedule and steps, {res['meta']['machine']}, {res['meta']['threads']} thread(s) per run): medqa "
        f"trains {_f(r.get('real_tokens_per_s', {}).get('median'), 2)}x TRL's real tokens/s "
        f"({_f(rate['medqa'])} vs {_f(rate['trl'])}) and "
        f"{_f(r.get('real_tokens_per_cpu_s', {}).get('median'), 2)}x per CPU-second, at a test answer loss of "
        f"{_f(loss.get('medqa'), 3)} vs {_f(loss.get('trl'), 3)} "
        f"([BENCHMARKS.md](BENCHMARKS.md#medqa-against-trls-sfttrainer)).\n{MARK_END}\n"
    )


def write_between_markers(path: Path, section: str) -> None:
    """Replace the text between the peer markers (or append the section when the file has none)."""
    write_marked_section(path, section, MARK_START, MARK_END, intro="")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/smollm2-offline.yaml", help="medqa config both sides train from")
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps per run")
    ap.add_argument("--repeats", type=int, default=2, help="runs per side (alternated)")
    ap.add_argument(
        "--threads",
        type=int,
        default=2,
        help="torch CPU threads in every run; 1 on a machine other jobs keep busy (threads that spin-wait for "
        "each other there are several times slower)",
    )
    ap.add_argument("--workdir", default=str(REPO / "outputs" / "bench" / "peer"), help="prepared data and runs")
    ap.add_argument("--override", action="append", default=[], help="a medqa config override (key=value)")
    ap.add_argument(
        "--all-logits-runs", type=int, default=1, help="runs of the medqa_all_logits arm (0: none; it costs a run)"
    )
    ap.add_argument("--steps-only", action="store_true", help="no final scoring of the adapters (smoke runs)")
    ap.add_argument("--out", default=None, help="JSON results (default bench/results/peer-<machine>.json)")
    ap.add_argument("--markdown", default=None, help="write the table between the peer markers of this file")
    ap.add_argument("--readme", default=None, help="write the one-line summary between the peer markers of this file")
    ap.add_argument("--from-json", default=None, help="measure nothing: write --markdown/--readme from this JSON")
    ap.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    ap.add_argument("--child-out", help=argparse.SUPPRESS)
    ap.add_argument("--no-score", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child:
        cfg = load_cfg(args.config, Path(args.workdir), args.steps, args.override)
        row = run_side(cfg, args.child, Path(args.workdir) / "runs" / args.child, args.threads, not args.no_score)
        Path(args.child_out).write_text(json.dumps(row, indent=1))
        return 0
    if args.from_json:
        res = json.loads(Path(args.from_json).read_text(encoding="utf-8"))
    else:
        res = measure(args)
        out = Path(args.out or REPO / "bench" / "results" / f"peer-{res['meta']['machine']}.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=1) + "\n", encoding="utf-8")
        log(f"wrote {out}")
    if args.markdown:
        write_between_markers(Path(args.markdown), markdown_section(res))
    if args.readme:
        write_between_markers(Path(args.readme), readme_line(res))
    print(markdown_section(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
