"""GPU benchmark for the real BioGPT shape: `medqa train`'s own Trainer path (the headline), scoring and
generation tokens/s, and a hand-written training loop per batching strategy.

    python bench/gpu.py [--out outputs/bench/gpu.json]      # CUDA, bf16; ~3 minutes on one H100
    python bench/gpu.py --device cpu --tiny                 # smoke test of the same code, ~1 minute on CPU
    python bench/gpu.py --sections trainer ...              # one part; --merge adds to an existing --out

The model is BioGptForCausalLM with microsoft/biogpt's configuration (24 layers, hidden 1024, 16 heads,
feed-forward 4096, 42,384 tokens, 1,024 positions) and random weights: nothing is downloaded, and speed does not
depend on the weights. The examples are real: `medqa prepare` runs on the 500 HealthCareMagic records shipped in
data/real/ with the BioGPT tokenizer shipped in assets/biogpt-tokenizer, and the timed sets are drawn from its
train (and val) split with replacement (seeded), so lengths, prompt share and packing are HealthCareMagic's under
BioGPT's tokenizer. `real_data` in the JSON holds the measured distribution.

FLOPs (what MFU counts; useful work only, so padding counts as waste):
  N       = parameters used in matmuls: all of the base model's but the positional embedding table (the token
            embedding is counted once: BioGPT ties it to the LM head, a V x d matmul; the lookup is free).
  train   = 6 * N * real tokens ("mfu_6n", the usual convention), and the LoRA-exact
            (4 * N + 6 * N_lora) * real tokens ("mfu_lora"): forward 2N, backward 2N for the activation
            gradients through the frozen weights, and no weight gradients except LoRA's (2N_lora fwd + 4N_lora bwd).
  eval    = 2 * N * real tokens.
  Attention scores (2 * layers * d * l^2 per sequence of l tokens, forward) add under 1% at these lengths and
  are left out. MFU = FLOPs / seconds / peak dense bf16 FLOP/s of the card (PEAK_BF16_TFLOPS; --peak-tflops).

Sections (--sections; each result is written to --out the moment it exists, so a run cut short keeps it):
  trainer   medqa.train.setup_training + fit (transformers' Trainer, configs/biogpt.yaml's LoRA, batch plan,
            compile and loss settings) on the model as `medqa train` loads it (medqa.modeling.build_lora_model
            from a saved random BioGPT): tokens/s, mean and median step time, compile time apart, dynamo's graph
            breaks, graphs and recompiles, and the HealthCareMagic-100k epoch projection;
  eval      medqa.metrics.score_examples, batch 16 and by token budget (what in-training evaluation runs);
  generate  greedy decoding, dynamic KV cache at batch 1 and 32, static cache at batch 1 (one compile);
  hand      the hand-written loop: padded_512 / grouped / packed, LoRA r=8, bf16 base, AdamW.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
warnings.filterwarnings("ignore", category=FutureWarning)
REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "src"), str(REPO / "bench")]  # medqa, and hand_loop beside this file (also when imported)
import hand_loop  # noqa: E402
from hand_loop import MAX_LENGTH, STRATEGIES  # noqa: E402

PAD, EOS = 1, 2  # BioGPT's ids
VOCAB = 42384  # BioGPT's tokenizer; the tiny model keeps it, so real token ids and the real tokenizer work
BIOGPT = dict(
    vocab_size=VOCAB,
    hidden_size=1024,
    num_hidden_layers=24,
    num_attention_heads=16,
    intermediate_size=4096,
    max_position_embeddings=1024,
)
TINY = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
    max_position_embeddings=1024,
)
REAL_RECORDS = REPO / "data" / "real" / "healthcaremagic_500.json"  # shipped
TOKENIZER = REPO / "assets" / "biogpt-tokenizer"  # shipped
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json")
HCM_RECORDS = 112_165  # lavita/ChatDoctor-HealthCareMagic-100k: the records configs/biogpt.yaml prepares
SECTIONS = ("model", "trainer", "eval", "generate", "hand")
# Peak dense bf16 tensor-core TFLOPS (no sparsity), first match on torch.cuda.get_device_name(); T4: fp16.
PEAK_BF16_TFLOPS = [
    (r"H100.*PCIe", 756.0),
    (r"H100", 989.0),
    (r"H200", 989.0),
    (r"A100", 312.0),
    (r"\bL4\b", 121.0),
    (r"\bT4\b", 65.0),
]


def peak_tflops(device_name: str) -> float | None:
    return next((tf for pattern, tf in PEAK_BF16_TFLOPS if re.search(pattern, device_name)), None)


def prompt_length(row: dict) -> int:
    """Tokens before the first labelled one: the prompt."""
    return next(i for i, label in enumerate(row["labels"]) if label != -100)


# ------------------------------------------------------------------------------------------ real data, model


def real_data(work: Path) -> tuple[dict, dict]:
    """`medqa prepare` on the 500 shipped real records with the shipped BioGPT tokenizer: the token ids medqa
    trains on. Returns the tokenized rows per split and their statistics (tokens per example, prompt share, the
    share of the records each split keeps, packed examples per row at 1x and 2x data.max_length)."""
    import datasets

    from medqa.config import load_config
    from medqa.packing import pack_stats
    from medqa.prepare import prepare

    datasets.disable_progress_bars()
    cfg = load_config(
        None,
        [
            f"workdir={work / 'real'}",
            f"data.source={REAL_RECORDS}",
            f"model.name_or_path={TOKENIZER}",
            f"data.max_length={MAX_LENGTH}",
        ],
    )
    report = prepare(cfg).report  # a re-run in the same workdir reads prepare's cache
    rows: dict[str, list[dict]] = {}
    stats: dict = {
        "records": str(REAL_RECORDS.relative_to(REPO)),
        "tokenizer": str(TOKENIZER.relative_to(REPO)),
        "read": report["read"],
        "max_length": MAX_LENGTH,
    }
    for split in ("train", "val", "test"):
        ds = datasets.load_from_disk(str(work / "real" / "tokenized" / f"tokenized_{split}"))
        rows[split] = [
            {"input_ids": list(i), "labels": list(lab), "length": len(i)}
            for i, lab in zip(ds["input_ids"], ds["labels"])
        ]
        lengths = [r["length"] for r in rows[split]]
        stats[split] = {
            "examples": len(lengths),
            "share_of_records": len(lengths) / report["read"],
            "median_tokens": statistics.median(lengths),
            "mean_tokens": statistics.mean(lengths),
            "min_tokens": min(lengths),
            "max_tokens": max(lengths),
            "prompt_share": sum(prompt_length(r) for r in rows[split]) / sum(lengths),
        }
    lengths = [r["length"] for r in rows["train"]]
    stats["packing"] = {f"rows_of_{w}": pack_stats(lengths, w) for w in (MAX_LENGTH, 2 * MAX_LENGTH)}
    return rows, stats


def resample(rows: list[dict], n: int, seed: int) -> list[dict]:
    """n examples drawn from `rows` with replacement (seeded): the real length distribution at any size."""
    rng = random.Random(seed)
    return [rows[rng.randrange(len(rows))] for _ in range(n)]


def build_model(dims: dict, device, dtype):
    import torch
    from transformers import BioGptConfig, BioGptForCausalLM

    config = BioGptConfig(**dims, pad_token_id=PAD, bos_token_id=0, eos_token_id=EOS)
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the device: 347M parameters init slowly on a CPU
        model = BioGptForCausalLM._from_config(config, attn_implementation="sdpa", dtype=dtype)
    model.generation_config.pad_token_id = PAD
    return model.eval()


def save_model(dims: dict, device, folder: Path) -> Path:
    """A random BioGPT of these dimensions saved with the BioGPT tokenizer, as a model folder that `medqa train`
    (model.name_or_path) loads like microsoft/biogpt. Kept if it is already there with the same dimensions."""
    import torch

    cfg_file = folder / "config.json"
    if cfg_file.exists() and all(json.loads(cfg_file.read_text()).get(k) == v for k, v in dims.items()):
        return folder
    model = build_model(dims, device, torch.float32)  # fp32 on disk, as microsoft/biogpt ships
    model.to("cpu").save_pretrained(str(folder))
    for name in TOKENIZER_FILES:
        shutil.copy(TOKENIZER / name, folder / name)
    return folder


def matmul_params(model) -> int:
    """N: every parameter but the positional embedding table (see the module docstring)."""
    return sum(p.numel() for name, p in model.named_parameters() if "embed_positions" not in name)


# ------------------------------------------------------------------------------------------ training


def batches(rows: list[dict], strategy: str, batch_size: int, mask_dtype, seed: int = 0) -> list[dict]:
    """Collated batches of one epoch for a strategy (built before timing: on a GPU the collation of the next
    batch overlaps with compute in a DataLoader worker)."""
    per_batch = hand_loop.packed_rows_per_batch([len(r["input_ids"]) for r in rows], batch_size)
    groups = hand_loop.make_batches(rows, strategy, batch_size, rows_per_batch=per_batch, seed=seed)
    return [hand_loop.collate(group, strategy, PAD, mask_dtype) for group in groups]


def bench_train(model, rows: list[dict], args, device, n_params: int, peak: float | None) -> dict:
    import torch

    model, optimizer, n_lora = hand_loop.add_lora(model)
    real = sum(len(r["input_ids"]) for r in rows)
    answer = sum(hand_loop.answer_tokens(r) for r in rows)
    out: dict = {
        "examples": len(rows),
        "real_tokens": real,
        "answer_tokens": answer,
        "lora_parameters": n_lora,
        "batch_size": args.batch_size,
    }
    for strategy in STRATEGIES:
        epoch = batches(rows, strategy, args.batch_size, torch.bfloat16 if device.type == "cuda" else torch.float32)
        hand_loop.train_epoch(model, optimizer, epoch[: args.warmup], device)  # CUDA/cuBLAS warm-up, allocator growth
        secs = [hand_loop.train_epoch(model, optimizer, epoch, device) for _ in range(args.repeats)]
        t = statistics.median(secs)
        computed = sum(b["input_ids"].numel() for b in epoch)
        flops_6n, flops_lora = 6 * n_params * real, (4 * n_params + 6 * n_lora) * real
        out[strategy] = {
            "tokens_per_s": real / t,
            "answer_tokens_per_s": answer / t,
            "examples_per_s": len(rows) / t,
            "computed_tokens_per_s": computed / t,
            "padding_efficiency": real / computed,
            "steps": len(epoch),
            "seconds": secs,
            "mfu_6n": flops_6n / t / (peak * 1e12) if peak else None,
            "mfu_lora": flops_lora / t / (peak * 1e12) if peak else None,
        }
        print(
            f"  train {strategy:10s}: {real / t:9,.0f} tokens/s, padding efficiency {real / computed:.3f}", flush=True
        )
    for strategy in ("grouped", "packed"):
        out[strategy]["speedup_vs_padded_512"] = out[strategy]["tokens_per_s"] / out["padded_512"]["tokens_per_s"]
    return out


# ------------------------------------------------------------------------------------------ the Trainer path

TRAINER_VARIANTS = {  # name: config overrides on top of configs/biogpt.yaml's train section
    "unpacked_grouped": ["train.packing=false", "train.batch_size=8", "train.grad_accum=4", "train.compile=false"],
    "packed_eager": ["train.packing=true", "train.compile=false"],
    "packed_compiled": ["train.packing=true", "train.compile=true"],
    "packed_compiled_flex": ["train.packing=true", "train.compile=true", "train.attention=flex"],
    "packed_compiled_cudagraphs": ["train.packing=true", "train.compile=true", "train.compile_mode=reduce-overhead"],
}


def dynamo_counts() -> dict:
    """torch.compile's record since the last `reset_dynamo_counts`: graph breaks (with their reasons), graphs
    compiled, and recompiles (a frame compiled again because a guard failed, e.g. a new shape)."""
    from torch._dynamo import utils

    breaks = utils.counters["graph_break"]
    recompiles = [m.recompile_reason for m in utils.get_compilation_metrics() if m.recompile_reason]
    return {
        "graph_breaks": sum(breaks.values()),
        "unique_graphs": utils.counters["stats"]["unique_graphs"],
        "recompiles": len(recompiles),
        "graph_break_reasons": [r.split("\n")[0][:200] for r in breaks][:5],
        "recompile_reasons": [r[:200] for r in recompiles][:5],
    }


def reset_dynamo_counts() -> None:
    from torch._dynamo import utils

    utils.counters.clear()
    utils.clear_compilation_metrics()


def project_epoch(r: dict, real: dict, eval_steps: int, scoring_tokens_per_s: float | None) -> dict:
    """One HealthCareMagic-100k epoch of `medqa train` at this variant's measured speed, evaluation included.

    Sizes from the real records (`real_data`): train examples = HCM_RECORDS x the share prepare keeps for train,
    at their mean tokens; packed rows = examples / the examples per row measured here; optimizer steps =
    ceil(rows / rows per step), so the last step's empty rows cost time and count no tokens. Time = steps x
    median step + compile. Evaluation: one pass over val every train.eval_steps (biogpt.yaml) plus the final
    scoring of val and test, at the scoring section's token-budget throughput (`None` until it is measured)."""
    tokens = {s: HCM_RECORDS * real[s]["share_of_records"] * real[s]["mean_tokens"] for s in ("train", "val", "test")}
    examples = HCM_RECORDS * real["train"]["share_of_records"]
    rows = examples / r["examples_per_row"]
    steps = math.ceil(rows / r["rows_per_step"])
    train_s = steps * r["median_step_seconds"] + r["compile_seconds"]
    evaluations = steps // eval_steps
    eval_tokens = evaluations * tokens["val"] + tokens["val"] + tokens["test"]
    eval_s = eval_tokens / scoring_tokens_per_s if scoring_tokens_per_s else None
    total = train_s + eval_s if eval_s is not None else None
    return {
        "records": HCM_RECORDS,
        "train_examples": round(examples),
        "real_tokens": round(tokens["train"]),
        "rows": round(rows),
        "optimizer_steps": steps,
        "train_minutes": train_s / 60,
        "evaluations_during_training": evaluations,
        "eval_steps": eval_steps,
        "eval_tokens": round(eval_tokens),
        "scoring_tokens_per_s": scoring_tokens_per_s,
        "eval_minutes": eval_s / 60 if eval_s is not None else None,
        "epoch_minutes": total / 60 if total is not None else None,
        "real_tokens_per_s_over_epoch": tokens["train"] / total if total else None,
    }


def bench_trainer(
    model_dir: Path,
    rows: list[dict],
    val_rows: list[dict],
    real: dict,
    args,
    device,
    n_params: int,
    peak: float | None,
    on_progress=None,
) -> dict:
    """`medqa train`'s own path, per variant (--trainer-variants), each on a freshly loaded model: --trainer-steps
    optimizer steps; the first (compilation) is reported apart; tokens/s is the steady state, real tokens per step
    / median step time (the mean is reported beside it). A variant that fails is recorded with its error and the
    others still run. `on_progress(results)` after each variant: the caller saves them."""
    import datasets
    import torch

    train_ds = datasets.Dataset.from_list(rows)
    eval_ds = datasets.Dataset.from_list(val_rows[:8])
    out: dict = {"examples": len(rows), "mean_tokens": statistics.mean(r["length"] for r in rows)}
    for name in args.trainer_variants.split(","):
        if name not in TRAINER_VARIANTS:
            raise SystemExit(f"unknown --trainer-variants entry {name!r}; choose from {', '.join(TRAINER_VARIANTS)}")
        if device.type != "cuda" and ("compiled" in name or "flex" in name) and not args.trainer_compile_on_cpu:
            continue
        try:  # one variant failing (e.g. a compile mode on this card) must not cost the others' figures
            out[name] = _trainer_variant(name, model_dir, train_ds, eval_ds, real, args, device, n_params, peak)
        except Exception as exc:  # noqa: BLE001 - reported in the results, and the run goes on
            import traceback

            out[name] = {"error": f"{type(exc).__name__}: {exc}"[:2000], "traceback": traceback.format_exc()[-4000:]}
            print(f"  medqa train {name:26s}: FAILED {type(exc).__name__}: {str(exc)[:300]}", flush=True)
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
        if on_progress:
            on_progress(out)
    return out


def _trainer_variant(name, model_dir, train_ds, eval_ds, real, args, device, n_params, peak) -> dict:
    import torch

    from medqa.config import load_config
    from medqa.modeling import build_lora_model
    from medqa.train import fit, setup_training

    shipped = load_config(REPO / "configs" / "biogpt.yaml", [])
    with tempfile.TemporaryDirectory() as work:
        overrides = [
            f"workdir={work}",
            f"model.name_or_path={model_dir}",
            f"data.max_length={MAX_LENGTH}",
            f"train.max_steps={args.trainer_steps}",
            "train.logging_steps=1000000",
            "train.eval_steps=1000000",
            "train.early_stopping_patience=0",
            "train.warmup_ratio=0.0",
            # no evaluation runs here (eval_steps above), and the synthetic rows have no tokenizer to
            # score PubMedQA with: the plain selection rule, no knowledge questions
            "tune.objective=answer_loss",
            "scoring.knowledge_questions=0",
            *TRAINER_VARIANTS[name],
        ]
        if device.type != "cuda":
            overrides += [
                "train.mixed_precision='no'",
                "train.tokens_per_batch=1024",
                "train.tokens_per_step=2048",
                "train.loss_chunk_tokens=512",
                "lora.r=8",
            ]
            if name == "unpacked_grouped":
                overrides += ["train.batch_size=2", "train.grad_accum=2"]
        if args.tokens_per_batch:
            overrides.append(f"train.tokens_per_batch={args.tokens_per_batch}")
        cfg = load_config(REPO / "configs" / "biogpt.yaml", overrides)
        reset_dynamo_counts()
        model = build_lora_model(cfg)  # exactly as `medqa train` loads it (device, dtype, LoRA)
        setup = setup_training(cfg, model, train_ds, PAD)
        trainer, timer = fit(cfg, model, None, setup, eval_ds, Path(work), trial=True, pad_id=PAD)
        compiled = setup.describe()["compiled"]
        summary = timer.summary(compiled)
        steady = timer.durations[1:] or timer.durations
        median, mean = statistics.median(steady), statistics.mean(steady)
        if setup.plan:
            rows_per_step = setup.plan.rows_per_batch * setup.plan.grad_accum
        else:
            rows_per_step = cfg.train.batch_size * cfg.train.grad_accum
        # Real tokens only: a packed row holds tokens_per_row real tokens on average, its padding to
        # data.max_length is not counted (nor, in the projection, the empty rows of the epoch's last step).
        real_per_step = rows_per_step * setup.tokens_per_row
        tps = real_per_step / median
        r = {
            **setup.describe(),
            **summary,
            "steps": trainer.state.global_step,
            "steady_steps": len(steady),
            "median_step_seconds": median,
            "mean_step_seconds": mean,
            "rows_per_step": rows_per_step,
            "real_tokens_per_row": setup.tokens_per_row,
            "examples_per_row": setup.examples_per_row,
            "real_tokens_per_step": real_per_step,
            "tokens_per_s": tps,
            "tokens_per_s_at_mean_step": real_per_step / mean,
            "mfu_6n": 6 * n_params * tps / (peak * 1e12) if peak else None,
            "dynamo": dynamo_counts(),
        }
        r["projection"] = project_epoch(r, real, shipped.train.eval_steps, None)
        r["projected_hcm100k_epoch_minutes"] = r["projection"]["train_minutes"]  # + evaluation once scored
        if device.type == "cuda":
            r["max_memory_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        d = r["dynamo"]
        print(
            f"  medqa train {name:26s}: {tps:9,.0f} tokens/s, step median {median * 1e3:7.1f} ms / mean "
            f"{mean * 1e3:7.1f} ms, first step {summary['first_step_seconds']:.1f} s, compile "
            f"{summary['compile_seconds']:.1f} s, graphs {d['unique_graphs']}, graph breaks {d['graph_breaks']}, "
            f"recompiles {d['recompiles']}; HealthCareMagic-100k training "
            f"{r['projection']['train_minutes']:.1f} min",
            flush=True,
        )
        del trainer, model
        return r


def add_eval_to_projections(res: dict) -> None:
    """Once scoring is measured, every Trainer variant's projection includes in-training evaluation."""
    tps = res.get("eval", {}).get("token_budget", {}).get("tokens_per_s")
    if not tps or "real_data" not in res:
        return
    eval_steps = next(
        (
            r["projection"]["eval_steps"]
            for r in res.get("trainer", {}).values()
            if isinstance(r, dict) and "projection" in r
        ),
        None,
    )
    for r in res.get("trainer", {}).values():
        if isinstance(r, dict) and "projection" in r:
            r["projection"] = project_epoch(r, res["real_data"], eval_steps, tps)
            r["projected_hcm100k_epoch_minutes"] = r["projection"]["epoch_minutes"]


# ------------------------------------------------------------------------------------------ eval, generation


def bench_eval(model, rows: list[dict], args, device, n_params: int, peak: float | None) -> dict:
    import datasets

    from medqa.batching import eval_tokens_per_batch
    from medqa.metrics import score_examples

    ds = datasets.Dataset.from_list(rows)
    score_examples(model, ds.select(range(min(len(rows), 2 * args.batch_size))), PAD, args.batch_size)  # warm-up
    secs = []
    for _ in range(args.repeats):
        hand_loop.sync(device)
        start = time.perf_counter()
        score_examples(model, ds, PAD, batch_size=args.batch_size)
        hand_loop.sync(device)
        secs.append(time.perf_counter() - start)
    t = statistics.median(secs)
    real = sum(len(r["input_ids"]) for r in rows)
    print(f"  eval (score_examples, batch {args.batch_size}): {real / t:9,.0f} tokens/s", flush=True)
    res = {
        "examples": len(rows),
        "tokens": real,
        "batch_size": args.batch_size,
        "tokens_per_s": real / t,
        "seconds": secs,
        "mfu": 2 * n_params * real / t / (peak * 1e12) if peak else None,
    }
    # What `medqa baseline/evaluate` run: batches filled to a token budget (auto from free memory on CUDA).
    budget = eval_tokens_per_batch(0, model) or 2048
    secs = []
    for _ in range(args.repeats):
        hand_loop.sync(device)
        start = time.perf_counter()
        score_examples(model, ds, PAD, batch_size=args.batch_size, tokens_per_batch=budget)
        hand_loop.sync(device)
        secs.append(time.perf_counter() - start)
    t = statistics.median(secs)
    res["token_budget"] = {
        "tokens_per_batch": budget,
        "tokens_per_s": real / t,
        "seconds": secs,
        "mfu": 2 * n_params * real / t / (peak * 1e12) if peak else None,
    }
    print(f"  eval (score_examples, {budget:,} tokens per batch): {real / t:9,.0f} tokens/s", flush=True)
    return res


def bench_generate(model, rows: list[dict], args, device, on_progress=None) -> dict:
    """Greedy decoding of exactly --new-tokens tokens after real prompts, left-padded, KV cache on: dynamic cache
    at batch 1 and 32, static cache (compiled by transformers: one compile per batch shape) at batch 1, and at 32
    with --static-batch-32 (or --tiny). `on_progress(results)` after each setting: the caller saves them."""
    import torch

    prompts = [r["input_ids"][: prompt_length(r)] for r in rows]
    out = {"new_tokens": args.new_tokens}
    settings = [(1, "dynamic"), (32, "dynamic"), (1, "static")]
    if args.static_batch_32 or args.tiny:
        settings.append((32, "static"))
    for bs, cache in settings:
        if cache == "static" and device.type != "cuda" and not args.tiny:
            continue
        group = prompts[:bs]
        width = -(-max(len(p) for p in group) // 64) * 64  # as medqa.generate rounds prompt widths
        ids = torch.tensor([[PAD] * (width - len(p)) + p for p in group], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in group], device=device)
        kw = dict(
            max_new_tokens=args.new_tokens,
            min_new_tokens=args.new_tokens,
            do_sample=False,
            use_cache=True,
            pad_token_id=PAD,
            cache_implementation="static" if cache == "static" else None,
        )
        key = f"batch_{bs}" if cache == "dynamic" else f"batch_{bs}_static"
        try:
            with torch.inference_mode():
                warm = time.perf_counter()  # the static cache's first call compiles (reported apart)
                model.generate(input_ids=ids, attention_mask=mask, **kw)
                warm = time.perf_counter() - warm
                secs = []
                for _ in range(args.repeats):
                    hand_loop.sync(device)
                    start = time.perf_counter()
                    model.generate(input_ids=ids, attention_mask=mask, **kw)
                    hand_loop.sync(device)
                    secs.append(time.perf_counter() - start)
        except Exception as exc:  # noqa: BLE001 - recorded; the other settings still run
            out[key] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
            print(
                f"  generate batch {bs:2d} ({cache} cache): FAILED {type(exc).__name__}: {str(exc)[:200]}", flush=True
            )
            if on_progress:
                on_progress(out)
            continue
        t = statistics.median(secs)
        out[key] = {
            "new_tokens_per_s": bs * args.new_tokens / t,
            "seconds": secs,
            "first_call_seconds": warm,
            "prompt_tokens_mean": statistics.mean(len(p) for p in group),
        }
        print(
            f"  generate batch {bs:2d} ({cache} cache): {bs * args.new_tokens / t:9,.0f} new tokens/s, first call "
            f"{warm:.1f} s",
            flush=True,
        )
        if on_progress:
            on_progress(out)
    return out


# ------------------------------------------------------------------------------------------ report


def table(res: dict) -> str:
    def pct(x):
        return f"{100 * x:.1f}%" if x is not None else "n/a"

    lines = [
        f"{res['device']} ({res['dtype']}), {res['parameters'] / 1e6:.1f}M parameters, N = "
        f"{res['matmul_parameters'] / 1e6:.1f}M, peak {res['peak_tflops'] or 'unknown'} TFLOPS"
    ]
    real = res.get("real_data")
    if real:
        t = real["train"]
        p = real["packing"]
        lines.append(
            f"real data ({real['records']}, {real['tokenizer']}): train {t['examples']} examples, median "
            f"{t['median_tokens']:.0f} / mean {t['mean_tokens']:.1f} tokens, prompt {t['prompt_share']:.0%}; "
            f"packed: {p['rows_of_512']['examples_per_row']:.2f} examples per 512-token row (fill "
            f"{p['rows_of_512']['fill']:.3f}), {p['rows_of_1024']['examples_per_row']:.2f} per 1024 (fill "
            f"{p['rows_of_1024']['fill']:.3f})"
        )
    tt = res.get("trainer")
    if tt:
        lines += [
            "",
            "| `medqa train` (Trainer path) | tokens/s | MFU 6N | step median / mean | compile | graphs / "
            "breaks / recompiles | micro-batch x accum | HealthCareMagic-100k epoch (train + eval) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, r in tt.items():
            if not isinstance(r, dict):
                continue
            if "error" in r:
                lines.append(f"| {name} | failed: {r['error'][:80]} | | | | | | |")
                continue
            plan, pr, d = r.get("batch_plan"), r["projection"], r["dynamo"]
            shape = (
                f"{plan['rows_per_batch']} x {plan['row_tokens']} x {plan['grad_accum']}"
                if plan
                else f"{r['rows_per_step']} examples"
            )
            epoch = (
                f"{pr['epoch_minutes']:.1f} min ({pr['train_minutes']:.1f} + {pr['eval_minutes']:.1f})"
                if pr["epoch_minutes"] is not None
                else f"{pr['train_minutes']:.1f} min + eval (not measured)"
            )
            lines.append(
                f"| {name} | {r['tokens_per_s']:,.0f} | {pct(r['mfu_6n'])} | {r['median_step_seconds'] * 1e3:,.0f}"
                f" / {r['mean_step_seconds'] * 1e3:,.0f} ms | {r['compile_seconds']:.1f} s | "
                f"{d['unique_graphs']} / {d['graph_breaks']} / {d['recompiles']} | {shape} | {epoch} |"
            )
    ev = res.get("eval")
    if ev:
        tb = ev["token_budget"]
        lines += [
            "",
            f"eval (score_examples, batch {ev['batch_size']}): {ev['tokens_per_s']:,.0f} tokens/s, MFU "
            f"{pct(ev['mfu'])}; by token budget ({tb['tokens_per_batch']:,} tokens): {tb['tokens_per_s']:,.0f} "
            f"tokens/s, MFU {pct(tb['mfu'])}",
        ]
    gen = res.get("generate")
    if gen:
        lines.append(
            f"generation ({gen['new_tokens']} new tokens, greedy), new tokens/s: "
            + ", ".join(
                f"{k.replace('_', ' ')} {v['new_tokens_per_s']:,.0f}" if "error" not in v else f"{k} failed"
                for k, v in gen.items()
                if k.startswith("batch")
            )
        )
    tr = res.get("train")
    if tr:
        lines += [
            "",
            "| hand loop (LoRA) | tokens/s | answer tokens/s | padding efficiency | MFU 6N | MFU LoRA | speedup |",
            "|---|---|---|---|---|---|---|",
        ]
        for s in STRATEGIES:
            r = tr[s]
            lines.append(
                f"| {s} | {r['tokens_per_s']:,.0f} | {r['answer_tokens_per_s']:,.0f} | "
                f"{r['padding_efficiency']:.3f} | {pct(r['mfu_6n'])} | {pct(r['mfu_lora'])} | "
                f"{r.get('speedup_vs_padded_512', 1.0):.2f}x |"
            )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    ap.add_argument("--tiny", action="store_true", help="tiny dimensions and sizes: a smoke test")
    ap.add_argument(
        "--sections",
        default=None,
        help=f"comma-separated, run in this order: {', '.join(SECTIONS)} (default: trainer,eval,generate,"
        "hand; model only saves the random model to --work for the CLI)",
    )
    ap.add_argument("--merge", action="store_true", help="add to the results already in --out (a later section)")
    ap.add_argument(
        "--work",
        default=None,
        help="folder for the prepared real records and the saved random model "
        "(default: a temporary folder, removed at the end)",
    )
    ap.add_argument("--examples", type=int, default=None, help="hand loop: examples per epoch (default 1024; tiny 16)")
    ap.add_argument("--eval-examples", type=int, default=None, help="scored examples (default 512; tiny 8)")
    ap.add_argument("--batch-size", type=int, default=None, help="examples per batch (default 16; tiny 4)")
    ap.add_argument("--new-tokens", type=int, default=None, help="generated tokens (default 128; tiny 4)")
    ap.add_argument(
        "--static-batch-32", action="store_true", help="also time the static cache at batch 32 (a second compile)"
    )
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats, median reported (default 3; tiny 1)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed training steps per strategy (default 3; tiny 1)")
    ap.add_argument(
        "--threads", type=int, default=None, help="CPU threads for torch (default: 1 on --device cpu, else torch's)"
    )
    ap.add_argument("--peak-tflops", type=float, default=None, help="override the card's peak bf16 TFLOPS")
    ap.add_argument("--out", default=str(REPO / "outputs" / "bench" / "gpu.json"), help="JSON results file")
    ap.add_argument("--results-dir", default=None, help="also write <card>.json here (e.g. bench/results)")
    ap.add_argument(
        "--trainer-variants",
        default=None,
        help=f"comma-separated Trainer-path variants: {', '.join(TRAINER_VARIANTS)} (default: "
        "packed_compiled,packed_eager,unpacked_grouped on CUDA; the last two on CPU)",
    )
    ap.add_argument("--trainer-steps", type=int, default=None, help="optimizer steps per variant (default 25; tiny 3)")
    ap.add_argument(
        "--trainer-examples",
        type=int,
        default=None,
        help="examples for the Trainer path, drawn from the real train split (default 12000; tiny 64)",
    )
    ap.add_argument("--trainer-compile-on-cpu", action="store_true", help="run compiled variants on CPU too")
    ap.add_argument("--tokens-per-batch", type=int, default=0, help="fix train.tokens_per_batch (default: auto)")
    args = ap.parse_args(argv)

    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu bench skipped: no CUDA device. Smoke-test it with: python bench/gpu.py --device cpu --tiny")
        return 0
    if args.threads or args.device == "cpu":
        # On a CPU smoke test one thread is the safe choice: with other jobs on the cores, two threads that
        # spin-wait for each other run several times slower than one.
        torch.set_num_threads(args.threads or 1)
    defaults = (
        dict(
            examples=16,
            eval_examples=8,
            batch_size=4,
            new_tokens=4,
            repeats=1,
            warmup=1,
            trainer_steps=3,
            trainer_examples=64,
        )
        if args.tiny
        else dict(
            examples=1024,
            eval_examples=512,
            batch_size=16,
            new_tokens=128,
            repeats=3,
            warmup=3,
            trainer_steps=25,
            trainer_examples=12000,
        )
    )
    if args.trainer_variants is None:
        # On a GPU the default path first, so a run cut short by its time limit still has it.
        args.trainer_variants = (
            "packed_compiled,packed_eager,unpacked_grouped" if args.device != "cpu" else "unpacked_grouped,packed_eager"
        )
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    sections = (args.sections or "trainer,eval,generate,hand").split(",")
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        raise SystemExit(f"unknown --sections entry {unknown[0]!r}; choose from {', '.join(SECTIONS)}")
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = args.peak_tflops or (peak_tflops(name) if device.type == "cuda" else None)

    start = time.perf_counter()
    dims = TINY if args.tiny else BIOGPT
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    card = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()
    temp = None if args.work else tempfile.mkdtemp(prefix="medqa-gpu-bench-")
    work = Path(args.work or temp)
    work.mkdir(parents=True, exist_ok=True)

    res = json.loads(out.read_text()) if args.merge and out.exists() else {}
    earlier = res.get("seconds", 0.0)

    def save() -> None:
        """Results so far, after every section and variant: a run cut short by its time limit keeps them."""
        res["seconds"] = earlier + time.perf_counter() - start
        text = json.dumps(res, indent=1) + "\n"
        out.write_text(text, encoding="utf-8")
        if args.results_dir:
            Path(args.results_dir).mkdir(parents=True, exist_ok=True)
            (Path(args.results_dir) / f"{card}.json").write_text(text, encoding="utf-8")

    res.update(
        {
            "device": name,
            "dtype": str(dtype).replace("torch.", ""),
            "peak_tflops": peak,
            "dims": dims,
            "torch": torch.__version__,
            "date": res.get("date", time.strftime("%Y-%m-%dT%H:%M:%S")),
        }
    )
    res.setdefault("args", {})[",".join(sections)] = vars(args)
    try:
        rows, res["real_data"] = real_data(work)
        t = res["real_data"]["train"]
        print(
            f"{name}: BioGPT {dims}; real data: {t['examples']} train examples, median {t['median_tokens']:.0f} "
            f"tokens, mean {t['mean_tokens']:.1f}, prompt share {t['prompt_share']:.2f}",
            flush=True,
        )
        model_dir = work / ("biogpt-random-tiny" if args.tiny else "biogpt-random")
        if "model" in sections or "trainer" in sections:
            save_model(dims, device, model_dir)
            print(f"saved the random model to {model_dir}", flush=True)
        if sections == ["model"]:
            return 0
        model = build_model(dims, device, dtype)
        n_params = matmul_params(model)
        res.update(parameters=sum(p.numel() for p in model.parameters()), matmul_parameters=n_params)
        if "trainer" in sections:
            del model
            # `medqa train`'s own path first: the headline. Saved after each variant.
            res["trainer"] = {}
            res["trainer"] = bench_trainer(
                model_dir,
                resample(rows["train"], args.trainer_examples, seed=3),
                rows["val"],
                res["real_data"],
                args,
                device,
                n_params,
                peak,
                on_progress=lambda partial: (res.__setitem__("trainer", partial), save()),
            )
            add_eval_to_projections(res)
            save()
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            model = build_model(dims, device, dtype)
        if "eval" in sections:
            res["eval"] = bench_eval(
                model, resample(rows["val"], args.eval_examples, seed=1), args, device, n_params, peak
            )
            add_eval_to_projections(res)
            save()
        if "generate" in sections:
            res["generate"] = {}
            res["generate"] = bench_generate(
                model,
                resample(rows["test"], 32, seed=2),
                args,
                device,
                on_progress=lambda partial: (res.__setitem__("generate", partial), save()),
            )
            save()
        if "hand" in sections:
            res["train"] = bench_train(
                model, resample(rows["train"], args.examples, seed=0), args, device, n_params, peak
            )
        if device.type == "cuda":
            res["max_memory_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        save()
    finally:
        if temp:
            shutil.rmtree(temp, ignore_errors=True)
    print(table(res))
    print(f"wrote {out} in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
