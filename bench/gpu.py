"""GPU benchmark for the real BioGPT shape: LoRA training tokens/s and MFU per batching strategy, evaluation
and generation tokens/s.

    python bench/gpu.py [--out outputs/bench/gpu.json]      # CUDA, bf16; ~2 minutes on one H100
    python bench/gpu.py --device cpu --tiny                 # smoke test of the same code, < 1 minute on CPU

The model is BioGptForCausalLM with microsoft/biogpt's configuration (24 layers, hidden 1024, 16 heads,
feed-forward 4096, 42,384 tokens, 1,024 positions) and random weights: nothing is downloaded, and speed does not
depend on the weights. Examples are synthetic, with lengths drawn like HealthCareMagic's under the BioGPT
tokenizer (log-normal, median 225 tokens, cut to 38..512) and the prompt's labels set to -100.

FLOPs (what MFU counts; useful work only, so padding counts as waste):
  N       = parameters used in matmuls: all of the base model's but the positional embedding table (the token
            embedding is counted once: BioGPT ties it to the LM head, a V x d matmul; the lookup is free).
  train   = 6 * N * real tokens ("mfu_6n", the usual convention), and the LoRA-exact
            (4 * N + 6 * N_lora) * real tokens ("mfu_lora"): forward 2N, backward 2N for the activation
            gradients through the frozen weights, and no weight gradients except LoRA's (2N_lora fwd + 4N_lora bwd).
  eval    = 2 * N * real tokens.
  Attention scores (2 * layers * d * l^2 per sequence of l tokens, forward) add under 1% at these lengths and
  are left out. MFU = FLOPs / seconds / peak dense bf16 FLOP/s of the card (PEAK_BF16_TFLOPS; --peak-tflops).

Training: LoRA r=8 on all linear layers (as `medqa train`), frozen bf16 base weights, fp32 adapters under bf16
autocast, AdamW; one epoch over --examples examples per strategy after --warmup untimed steps:
  padded_512  every example padded to 512 (the original project), --batch-size examples per batch;
  grouped     batches of --batch-size examples of similar length (Trainer's sampler), padded to the longest;
  packed      medqa.packing rows of up to 512 tokens, ~--batch-size examples' worth of rows per batch, with the
              block-diagonal 4D mask (SDPA).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore", category=FutureWarning)
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

MAX_LENGTH = 512
PAD, EOS = 1, 2  # BioGPT's ids
BIOGPT = dict(vocab_size=42384, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
              intermediate_size=4096, max_position_embeddings=1024)
TINY = dict(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=128, max_position_embeddings=1024)
# Peak dense bf16 tensor-core TFLOPS (no sparsity), first match on torch.cuda.get_device_name(); T4: fp16.
PEAK_BF16_TFLOPS = [(r"H100.*PCIe", 756.0), (r"H100", 989.0), (r"H200", 989.0), (r"A100", 312.0),
                    (r"\bL4\b", 121.0), (r"\bT4\b", 65.0)]


def peak_tflops(device_name: str) -> float | None:
    return next((tf for pattern, tf in PEAK_BF16_TFLOPS if re.search(pattern, device_name)), None)


def synthetic_rows(n: int, vocab: int, seed: int = 0) -> list[dict]:
    """Tokenized examples like `medqa prepare` writes: </s>, prompt, answer, EOS; labels -100 on the prompt."""
    import numpy as np

    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(225), 0.5, size=n), 38, MAX_LENGTH).astype(int)
    rows = []
    for length in lengths:
        prompt = max(8, int(0.45 * length))  # HealthCareMagic: question ~45% of the tokens
        ids = [EOS] + rng.integers(4, vocab, size=length - 2).tolist() + [EOS]
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:], "length": int(length)})
    return rows


def prompt_length(row: dict) -> int:
    """Tokens before the first labelled one: the prompt."""
    return next(i for i, label in enumerate(row["labels"]) if label != -100)


def build_model(dims: dict, device, dtype):
    import torch
    from transformers import BioGptConfig, BioGptForCausalLM

    config = BioGptConfig(**dims, pad_token_id=PAD, bos_token_id=0, eos_token_id=EOS)
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the device: 347M parameters init slowly on a CPU
        model = BioGptForCausalLM._from_config(config, attn_implementation="sdpa", dtype=dtype)
    model.generation_config.pad_token_id = PAD
    return model.eval()


def matmul_params(model) -> int:
    """N: every parameter but the positional embedding table (see the module docstring)."""
    return sum(p.numel() for name, p in model.named_parameters() if "embed_positions" not in name)


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------ training


def batches(rows: list[dict], strategy: str, batch_size: int, mask_dtype, seed: int = 0) -> list[dict]:
    """Collated batches of one epoch for a strategy (built before timing: on a GPU the collation of the next
    batch overlaps with compute in a DataLoader worker)."""
    import random

    import torch
    from transformers.trainer_pt_utils import get_length_grouped_indices

    from medqa.metrics import pad_batch
    from medqa.packing import PackedCollator, pack_examples

    rng = random.Random(seed)
    if strategy == "packed":
        packed = pack_examples(rows, MAX_LENGTH)
        rng.shuffle(packed)
        mean = statistics.mean(len(r["input_ids"]) for r in rows)
        per_batch = max(1, round(batch_size * mean / MAX_LENGTH))  # about batch_size examples per batch
        collate = PackedCollator(PAD, mask_dtype=mask_dtype)  # the attention's compute dtype
        return [collate(packed[i:i + per_batch]) for i in range(0, len(packed), per_batch)]
    if strategy == "grouped":
        order = get_length_grouped_indices([len(r["input_ids"]) for r in rows], batch_size,
                                           generator=torch.Generator().manual_seed(seed))
    else:
        order = list(range(len(rows)))
        rng.shuffle(order)
    dummy = {"input_ids": [PAD] * MAX_LENGTH, "labels": [-100] * MAX_LENGTH}  # forces width 512, then dropped
    out = []
    for k in range(0, len(order), batch_size):
        group = [rows[i] for i in order[k:k + batch_size]]
        if strategy == "padded_512":
            out.append({key: v[:-1] for key, v in pad_batch(group + [dummy], PAD).items()})
        else:
            out.append(pad_batch(group, PAD))
    return out


def add_lora(model, r: int = 8, alpha: int = 16):
    import torch
    from peft import LoraConfig, get_peft_model

    from medqa.modeling import resolve_lora_targets

    targets = resolve_lora_targets(model, "all-linear")
    model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.05, target_modules=targets,
                                             task_type="CAUSAL_LM"))
    n_lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    return model.train(), optimizer, n_lora


def train_steps(model, optimizer, epoch: list[dict], device) -> float:
    """Seconds for one pass over `epoch`: forward (bf16 autocast on CUDA), backward, AdamW step."""
    import torch

    sync(device)
    start = time.perf_counter()
    for batch in epoch:
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    sync(device)
    return time.perf_counter() - start


def bench_train(model, rows: list[dict], args, device, n_params: int, peak: float | None) -> dict:
    import torch

    model, optimizer, n_lora = add_lora(model)
    real = sum(len(r["input_ids"]) for r in rows)
    answer = sum(sum(label != -100 for label in r["labels"][1:]) for r in rows)
    out: dict = {"examples": len(rows), "real_tokens": real, "answer_tokens": answer, "lora_parameters": n_lora,
                 "batch_size": args.batch_size}
    for strategy in ("padded_512", "grouped", "packed"):
        epoch = batches(rows, strategy, args.batch_size, torch.bfloat16 if device.type == "cuda" else torch.float32)
        train_steps(model, optimizer, epoch[:args.warmup], device)  # CUDA/cuBLAS warm-up, allocator growth
        secs = [train_steps(model, optimizer, epoch, device) for _ in range(args.repeats)]
        t = statistics.median(secs)
        computed = sum(b["input_ids"].numel() for b in epoch)
        flops_6n, flops_lora = 6 * n_params * real, (4 * n_params + 6 * n_lora) * real
        out[strategy] = {
            "tokens_per_s": real / t, "answer_tokens_per_s": answer / t, "examples_per_s": len(rows) / t,
            "computed_tokens_per_s": computed / t, "padding_efficiency": real / computed,
            "steps": len(epoch), "seconds": secs,
            "mfu_6n": flops_6n / t / (peak * 1e12) if peak else None,
            "mfu_lora": flops_lora / t / (peak * 1e12) if peak else None,
        }
        print(f"  train {strategy:10s}: {real / t:9,.0f} tokens/s, padding efficiency {real / computed:.3f}", flush=True)
    for strategy in ("grouped", "packed"):
        out[strategy]["speedup_vs_padded_512"] = out[strategy]["tokens_per_s"] / out["padded_512"]["tokens_per_s"]
    return out


# ------------------------------------------------------------------------------------------ the Trainer path

HCM_EPOCH_TOKENS = 27_000_000  # HealthCareMagic-100k train split under BioGPT's tokenizer (issue 11's count)
TRAINER_VARIANTS = {  # name: config overrides on top of configs/biogpt.yaml's train section
    "unpacked_grouped": ["train.packing=false", "train.batch_size=8", "train.grad_accum=4", "train.compile=false"],
    "packed_eager": ["train.packing=true", "train.compile=false"],
    "packed_compiled": ["train.packing=true", "train.compile=true"],
    "packed_compiled_flex": ["train.packing=true", "train.compile=true", "train.attention=flex"],
    "packed_compiled_cudagraphs": ["train.packing=true", "train.compile=true", "train.compile_mode=reduce-overhead"],
}


def bench_trainer(dims: dict, rows: list[dict], args, device, n_params: int, peak: float | None,
                  on_progress=None) -> dict:
    """`medqa train`'s own path (medqa.train.setup_training + fit: transformers' Trainer, LoRA as in
    configs/biogpt.yaml, its batch plan, compile and loss settings) on a fresh fp32 model with bf16 autocast, as
    `medqa train` loads it. Each variant runs --trainer-steps optimizer steps; the first step (compilation) is
    reported apart, and tokens/s is the steady state: real tokens per step / median step time. A variant that
    fails is recorded with its error and the others still run."""
    import datasets
    import torch

    train_ds = datasets.Dataset.from_list(rows)
    eval_ds = train_ds.select(range(min(8, len(rows))))
    real_per_example = sum(r["length"] for r in rows) / len(rows)
    out: dict = {"examples": len(rows), "mean_tokens": real_per_example}
    for name in args.trainer_variants.split(","):
        if name not in TRAINER_VARIANTS:
            raise SystemExit(f"unknown --trainer-variants entry {name!r}; choose from {', '.join(TRAINER_VARIANTS)}")
        if device.type != "cuda" and ("compiled" in name or "flex" in name) and not args.trainer_compile_on_cpu:
            continue
        try:  # one variant failing (e.g. a compile mode on this card) must not cost the others' figures
            out[name] = _trainer_variant(name, dims, train_ds, eval_ds, real_per_example, args, device, n_params,
                                         peak)
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


def _trainer_variant(name, dims, train_ds, eval_ds, real_per_example, args, device, n_params, peak) -> dict:
    import tempfile

    import torch

    from medqa.config import load_config
    from medqa.train import fit, setup_training

    with tempfile.TemporaryDirectory() as work:
        overrides = [f"workdir={work}", "data.max_length=512", f"train.max_steps={args.trainer_steps}",
                     "train.logging_steps=1000000", "train.eval_steps=1000000", "train.early_stopping_patience=0",
                     "train.warmup_ratio=0.0", *TRAINER_VARIANTS[name]]
        if device.type != "cuda":
            overrides += ["train.mixed_precision='no'", "train.tokens_per_batch=1024", "train.tokens_per_step=2048",
                          "train.loss_chunk_tokens=512", "lora.r=8"]
        if args.tokens_per_batch:
            overrides.append(f"train.tokens_per_batch={args.tokens_per_batch}")
        cfg = load_config(REPO / "configs" / "biogpt.yaml", overrides)
        model = build_model(dims, device, torch.float32).train()
        lora_model, _, _ = add_lora(model, r=cfg.lora.r, alpha=cfg.lora.alpha)
        setup = setup_training(cfg, lora_model, train_ds, PAD)
        trainer, timer = fit(cfg, lora_model, None, setup, eval_ds, Path(work), trial=True, pad_id=PAD)
        summary = timer.summary(setup.describe()["compiled"])
        if setup.plan:
            real_per_step = setup.plan.rows_per_batch * setup.plan.grad_accum * setup.tokens_per_row
        else:
            real_per_step = cfg.train.batch_size * cfg.train.grad_accum * real_per_example
        tps = real_per_step / summary["median_step_seconds"]
        r = {**setup.describe(), **summary, "steps": trainer.state.global_step, "real_tokens_per_step": real_per_step,
             "tokens_per_s": tps, "mfu_6n": 6 * n_params * tps / (peak * 1e12) if peak else None,
             "projected_hcm100k_epoch_minutes": (HCM_EPOCH_TOKENS / tps + summary.get("compile_seconds", 0)) / 60}
        if device.type == "cuda":
            r["max_memory_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        print(f"  medqa train {name:26s}: {tps:9,.0f} tokens/s, step {summary['median_step_seconds'] * 1e3:7.1f} ms, "
              f"first step {summary['first_step_seconds']:.1f} s, HealthCareMagic-100k epoch "
              f"{r['projected_hcm100k_epoch_minutes']:.1f} min", flush=True)
        return r


# ------------------------------------------------------------------------------------------ eval, generation


def bench_eval(model, rows: list[dict], args, device, n_params: int, peak: float | None) -> dict:
    import datasets

    from medqa.batching import eval_tokens_per_batch
    from medqa.metrics import score_examples

    ds = datasets.Dataset.from_list(rows)
    score_examples(model, ds.select(range(min(len(rows), 2 * args.batch_size))), PAD, args.batch_size)  # warm-up
    secs = []
    for _ in range(args.repeats):
        sync(device)
        start = time.perf_counter()
        score_examples(model, ds, PAD, batch_size=args.batch_size)
        sync(device)
        secs.append(time.perf_counter() - start)
    t = statistics.median(secs)
    real = sum(len(r["input_ids"]) for r in rows)
    print(f"  eval (score_examples, batch {args.batch_size}): {real / t:9,.0f} tokens/s", flush=True)
    res = {"examples": len(rows), "tokens": real, "batch_size": args.batch_size, "tokens_per_s": real / t,
           "seconds": secs, "mfu": 2 * n_params * real / t / (peak * 1e12) if peak else None}
    # What `medqa baseline/evaluate` run: batches filled to a token budget (auto from free memory on CUDA).
    budget = eval_tokens_per_batch(0, model) or 2048
    secs = []
    for _ in range(args.repeats):
        sync(device)
        start = time.perf_counter()
        score_examples(model, ds, PAD, batch_size=args.batch_size, tokens_per_batch=budget)
        sync(device)
        secs.append(time.perf_counter() - start)
    t = statistics.median(secs)
    res["token_budget"] = {"tokens_per_batch": budget, "tokens_per_s": real / t, "seconds": secs,
                           "mfu": 2 * n_params * real / t / (peak * 1e12) if peak else None}
    print(f"  eval (score_examples, {budget:,} tokens per batch): {real / t:9,.0f} tokens/s", flush=True)
    return res


def bench_generate(model, rows: list[dict], args, device) -> dict:
    """Greedy decoding of exactly --new-tokens tokens after real-length prompts, left-padded, KV cache on."""
    import torch

    prompts = [r["input_ids"][:prompt_length(r)] for r in rows]
    out = {}
    for bs, cache in ((1, "dynamic"), (32, "dynamic"), (1, "static"), (32, "static")):
        if cache == "static" and device.type != "cuda" and not args.tiny:
            continue
        group = prompts[:bs]
        width = -(-max(len(p) for p in group) // 64) * 64  # as medqa.generate rounds prompt widths
        ids = torch.tensor([[PAD] * (width - len(p)) + p for p in group], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in group], device=device)
        kw = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, use_cache=True,
                  pad_token_id=PAD, cache_implementation="static" if cache == "static" else None)
        key = f"batch_{bs}" if cache == "dynamic" else f"batch_{bs}_static"
        try:
            with torch.inference_mode():
                warm = time.perf_counter()  # the static cache's first call compiles (reported apart)
                model.generate(input_ids=ids, attention_mask=mask, **kw)
                warm = time.perf_counter() - warm
                secs = []
                for _ in range(args.repeats):
                    sync(device)
                    start = time.perf_counter()
                    model.generate(input_ids=ids, attention_mask=mask, **kw)
                    sync(device)
                    secs.append(time.perf_counter() - start)
        except Exception as exc:  # noqa: BLE001 - recorded; the other settings still run
            out[key] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
            print(f"  generate batch {bs:2d} ({cache} cache): FAILED {type(exc).__name__}: {str(exc)[:200]}", flush=True)
            continue
        t = statistics.median(secs)
        out[key] = {"new_tokens_per_s": bs * args.new_tokens / t, "seconds": secs, "first_call_seconds": warm,
                    "prompt_tokens_mean": statistics.mean(len(p) for p in group)}
        print(f"  generate batch {bs:2d} ({cache} cache): {bs * args.new_tokens / t:9,.0f} new tokens/s, first call "
              f"{warm:.1f} s", flush=True)
    return {"new_tokens": args.new_tokens, **out}


# ------------------------------------------------------------------------------------------ main


def table(res: dict) -> str:
    def pct(x):
        return f"{100 * x:.1f}%" if x is not None else "n/a"

    tr = res.get("train")
    lines = [f"{res['device']} ({res['dtype']}), {res['parameters'] / 1e6:.1f}M parameters, N = "
             f"{res['matmul_parameters'] / 1e6:.1f}M, peak {res['peak_tflops'] or 'unknown'} TFLOPS",
             "| training (LoRA) | tokens/s | answer tokens/s | padding efficiency | MFU 6N | MFU LoRA | speedup |",
             "|---|---|---|---|---|---|---|"]
    for s in ("padded_512", "grouped", "packed") if tr else ():
        r = tr[s]
        lines.append(f"| {s} | {r['tokens_per_s']:,.0f} | {r['answer_tokens_per_s']:,.0f} | {r['padding_efficiency']:.3f} "
                     f"| {pct(r['mfu_6n'])} | {pct(r['mfu_lora'])} | {r.get('speedup_vs_padded_512', 1.0):.2f}x |")
    ev, gen = res["eval"], res["generate"]
    tb = ev["token_budget"]
    lines += ["", f"eval (score_examples, batch {ev['batch_size']}): {ev['tokens_per_s']:,.0f} tokens/s, MFU {pct(ev['mfu'])}; "
              f"by token budget ({tb['tokens_per_batch']:,} tokens): {tb['tokens_per_s']:,.0f} tokens/s, MFU {pct(tb['mfu'])}",
              f"generation ({gen['new_tokens']} new tokens, greedy), new tokens/s: " + ", ".join(
                  f"{k.replace('_', ' ')} {v['new_tokens_per_s']:,.0f}" if "error" not in v else f"{k} failed"
                  for k, v in gen.items() if k.startswith("batch"))]
    tt = res.get("trainer")
    if tt:
        lines += ["", "| `medqa train` (Trainer path) | tokens/s | MFU 6N | step | first step | micro-batch x accum | "
                      "HealthCareMagic-100k epoch |", "|---|---|---|---|---|---|---|"]
        for name, r in tt.items():
            if not isinstance(r, dict):
                continue
            if "error" in r:
                lines.append(f"| {name} | failed: {r['error'][:80]} | | | | | |")
                continue
            plan = r.get("batch_plan")
            shape = (f"{plan['rows_per_batch']} x {plan['row_tokens']} x {plan['grad_accum']}" if plan
                     else "8 examples x 4")
            lines.append(f"| {name} | {r['tokens_per_s']:,.0f} | {pct(r['mfu_6n'])} | "
                         f"{r['median_step_seconds'] * 1e3:,.0f} ms | {r['first_step_seconds']:.1f} s | {shape} | "
                         f"{r['projected_hcm100k_epoch_minutes']:.1f} min |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    ap.add_argument("--tiny", action="store_true", help="tiny dimensions and sizes: a smoke test")
    ap.add_argument("--examples", type=int, default=None, help="training examples per epoch (default 1024; tiny 16)")
    ap.add_argument("--eval-examples", type=int, default=None, help="scored examples (default 512; tiny 8)")
    ap.add_argument("--batch-size", type=int, default=None, help="examples per batch (default 16; tiny 4)")
    ap.add_argument("--new-tokens", type=int, default=None, help="generated tokens (default 128; tiny 4)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats, median reported (default 3; tiny 1)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed training steps per strategy (default 3; tiny 1)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: 1 on --device cpu, else torch's)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="override the card's peak bf16 TFLOPS")
    ap.add_argument("--out", default=str(REPO / "outputs" / "bench" / "gpu.json"), help="JSON results file")
    ap.add_argument("--results-dir", default=None, help="also write <card>.json here (e.g. bench/results)")
    ap.add_argument("--skip-hand-loop", action="store_true", help="skip the hand-written training loop")
    ap.add_argument("--trainer-variants", default=None,
                    help=f"comma-separated Trainer-path variants: {', '.join(TRAINER_VARIANTS)} (default: "
                         "unpacked_grouped,packed_eager,packed_compiled on CUDA; the first two on CPU)")
    ap.add_argument("--trainer-steps", type=int, default=None, help="optimizer steps per variant (default 25; tiny 3)")
    ap.add_argument("--trainer-examples", type=int, default=None, help="examples for the Trainer path (default "
                                                                        "12000; tiny 64)")
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
    defaults = dict(examples=16, eval_examples=8, batch_size=4, new_tokens=4, repeats=1, warmup=1, trainer_steps=3,
                    trainer_examples=64) if args.tiny else \
        dict(examples=1024, eval_examples=512, batch_size=16, new_tokens=128, repeats=3, warmup=3, trainer_steps=25,
             trainer_examples=12000)
    if args.trainer_variants is None:
        # On a GPU the default path first, so a run cut short by its time limit still has it.
        args.trainer_variants = ("packed_compiled,packed_eager,unpacked_grouped" if args.device != "cpu"
                                 else "unpacked_grouped,packed_eager")
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = args.peak_tflops or (peak_tflops(name) if device.type == "cuda" else None)

    start = time.perf_counter()
    dims = TINY if args.tiny else BIOGPT
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    card = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()

    def save() -> None:
        """Results so far, after every section: a run cut short by its time limit keeps what it measured."""
        res["seconds"] = time.perf_counter() - start
        text = json.dumps(res, indent=1) + "\n"
        out.write_text(text, encoding="utf-8")
        if args.results_dir:
            Path(args.results_dir).mkdir(parents=True, exist_ok=True)
            (Path(args.results_dir) / f"{card}.json").write_text(text, encoding="utf-8")

    res = {"device": name, "dtype": str(dtype).replace("torch.", ""), "peak_tflops": peak, "dims": dims,
           "parameters": None, "matmul_parameters": None, "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "args": vars(args)}
    model = build_model(dims, device, dtype)
    n_params = matmul_params(model)
    res.update(parameters=sum(p.numel() for p in model.parameters()), matmul_parameters=n_params)
    print(f"{name}: BioGPT {dims}, {res['parameters']:,} parameters", flush=True)
    del model
    # `medqa train`'s own path first (what issue 11 is about), each variant on a fresh model.
    res["trainer"] = {}
    res["trainer"] = bench_trainer(dims, synthetic_rows(args.trainer_examples, dims["vocab_size"], seed=3), args,
                                   device, n_params, peak,
                                   on_progress=lambda partial: (res.__setitem__("trainer", partial), save()))
    save()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    # Eval and generation on the plain model; the hand loop then wraps the same weights with LoRA.
    model = build_model(dims, device, dtype)
    res["eval"] = bench_eval(model, synthetic_rows(args.eval_examples, dims["vocab_size"], seed=1), args, device,
                             n_params, peak)
    save()
    res["generate"] = bench_generate(model, synthetic_rows(32, dims["vocab_size"], seed=2), args, device)
    save()
    if not args.skip_hand_loop:
        res["train"] = bench_train(model, synthetic_rows(args.examples, dims["vocab_size"], seed=0), args, device,
                                   n_params, peak)
    if device.type == "cuda":
        res["max_memory_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    save()
    print(table(res))
    print(f"wrote {out} in {res['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
