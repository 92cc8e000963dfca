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


def add_lora(model):
    import torch
    from peft import LoraConfig, get_peft_model

    from medqa.modeling import resolve_lora_targets

    targets = resolve_lora_targets(model, "all-linear")
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=targets,
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


# ------------------------------------------------------------------------------------------ eval, generation


def bench_eval(model, rows: list[dict], args, device, n_params: int, peak: float | None) -> dict:
    import datasets

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
    return {"examples": len(rows), "tokens": real, "batch_size": args.batch_size, "tokens_per_s": real / t,
            "seconds": secs, "mfu": 2 * n_params * real / t / (peak * 1e12) if peak else None}


def bench_generate(model, rows: list[dict], args, device) -> dict:
    """Greedy decoding of exactly --new-tokens tokens after real-length prompts, left-padded, KV cache on."""
    import torch

    prompts = [r["input_ids"][:prompt_length(r)] for r in rows]
    out = {}
    for bs in (1, 16):
        group = prompts[:bs]
        width = max(len(p) for p in group)
        ids = torch.tensor([[PAD] * (width - len(p)) + p for p in group], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in group], device=device)
        kw = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, use_cache=True,
                  pad_token_id=PAD)
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=mask, **{**kw, "max_new_tokens": 4, "min_new_tokens": 4})
            secs = []
            for _ in range(args.repeats):
                sync(device)
                start = time.perf_counter()
                model.generate(input_ids=ids, attention_mask=mask, **kw)
                sync(device)
                secs.append(time.perf_counter() - start)
        t = statistics.median(secs)
        out[f"batch_{bs}"] = {"new_tokens_per_s": bs * args.new_tokens / t, "seconds": secs,
                              "prompt_tokens_mean": statistics.mean(len(p) for p in group)}
        print(f"  generate batch {bs:2d}: {bs * args.new_tokens / t:9,.0f} new tokens/s", flush=True)
    return {"new_tokens": args.new_tokens, **out}


# ------------------------------------------------------------------------------------------ main


def table(res: dict) -> str:
    def pct(x):
        return f"{100 * x:.1f}%" if x is not None else "n/a"

    tr = res["train"]
    lines = [f"{res['device']} ({res['dtype']}), {res['parameters'] / 1e6:.1f}M parameters, N = "
             f"{res['matmul_parameters'] / 1e6:.1f}M, peak {res['peak_tflops'] or 'unknown'} TFLOPS",
             "| training (LoRA) | tokens/s | answer tokens/s | padding efficiency | MFU 6N | MFU LoRA | speedup |",
             "|---|---|---|---|---|---|---|"]
    for s in ("padded_512", "grouped", "packed"):
        r = tr[s]
        lines.append(f"| {s} | {r['tokens_per_s']:,.0f} | {r['answer_tokens_per_s']:,.0f} | {r['padding_efficiency']:.3f} "
                     f"| {pct(r['mfu_6n'])} | {pct(r['mfu_lora'])} | {r.get('speedup_vs_padded_512', 1.0):.2f}x |")
    ev, gen = res["eval"], res["generate"]
    lines += ["", f"eval (score_examples, batch {ev['batch_size']}): {ev['tokens_per_s']:,.0f} tokens/s, MFU {pct(ev['mfu'])}",
              f"generation ({gen['new_tokens']} new tokens, greedy): batch 1 {gen['batch_1']['new_tokens_per_s']:,.0f}, "
              f"batch 16 {gen['batch_16']['new_tokens_per_s']:,.0f} new tokens/s"]
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
    args = ap.parse_args(argv)

    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu bench skipped: no CUDA device. Smoke-test it with: python bench/gpu.py --device cpu --tiny")
        return 0
    if args.threads or args.device == "cpu":
        # On a CPU smoke test one thread is the safe choice: with other jobs on the cores, two threads that
        # spin-wait for each other run several times slower than one.
        torch.set_num_threads(args.threads or 1)
    defaults = dict(examples=16, eval_examples=8, batch_size=4, new_tokens=4, repeats=1, warmup=1) if args.tiny else \
        dict(examples=1024, eval_examples=512, batch_size=16, new_tokens=128, repeats=3, warmup=3)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = args.peak_tflops or (peak_tflops(name) if device.type == "cuda" else None)

    start = time.perf_counter()
    dims = TINY if args.tiny else BIOGPT
    model = build_model(dims, device, dtype)
    n_params = matmul_params(model)
    res = {"device": name, "dtype": str(dtype).replace("torch.", ""), "peak_tflops": peak, "dims": dims,
           "parameters": sum(p.numel() for p in model.parameters()), "matmul_parameters": n_params,
           "torch": torch.__version__, "date": time.strftime("%Y-%m-%dT%H:%M:%S")}
    print(f"{name}: BioGPT {dims}, {res['parameters']:,} parameters", flush=True)
    # Eval and generation first, on the plain model; training then wraps the same weights with LoRA.
    res["eval"] = bench_eval(model, synthetic_rows(args.eval_examples, dims["vocab_size"], seed=1), args, device,
                             n_params, peak)
    res["generate"] = bench_generate(model, synthetic_rows(16, dims["vocab_size"], seed=2), args, device)
    res["train"] = bench_train(model, synthetic_rows(args.examples, dims["vocab_size"], seed=0), args, device,
                               n_params, peak)
    if device.type == "cuda":
        res["max_memory_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    res["seconds"] = time.perf_counter() - start
    res["args"] = vars(args)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n", encoding="utf-8")
    print(table(res))
    print(f"wrote {out} in {res['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
