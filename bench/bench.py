"""CPU benchmark: how much of the compute goes to real tokens, and what that buys, ours vs the original project.

    python bench/bench.py [--quick] [--out outputs/bench/bench.json]     # `make bench`: measures, writes the JSON
    python bench/bench.py --from-json outputs/bench/bench.json --markdown BENCHMARKS.md     # `make bench-docs`

Runs on the 500 shipped real records plus, when ../shared is there, the 5,452 synthetic ones (5,952 records; or
$MEDQA_SHARED) with a tiny BioGPT (2 layers, hidden 64) built on the real BioGPT tokenizer (42,384 tokens, shipped
in assets/), in a temporary workdir:

  a. padding efficiency of training batches (real tokens / tokens computed) at 8 examples per batch:
     padded_512 (every example padded to 512, the original project's way), grouped by length (Trainer's
     sampler, padded to the batch's longest: train.packing false, the CPU configs), packed (medqa.packing,
     rows of up to 512 tokens: train.packing true, configs/biogpt.yaml); bench/hand_loop.py builds them;
  b. one training epoch over a subset, LoRA + AdamW, the same step code for every strategy: examples/s and
     answer tokens/s, the strategies interleaved in each repeat, speedups as paired ratios;
  c. evaluation tokens/s: medqa.metrics.score_examples (length-batched) vs one example at a time vs pad-to-512;
  d. `prepare` records/s with BioGPT's tokenizer through medqa's fast path and as it is (identical ids checked),
     each with data.num_proc 1 and 2, and a cached re-run in the same workdir;
  e. scaling: prepare and one packed training epoch at 1x, 2x, 4x of a base size.

Every figure is the median of 3 repeats (2 with --quick) with its min and max. On 2 cores that another job
keeps busy: full run ~7 minutes, --quick ~1.5 to 2 (smaller subsets; prepare timed on 1,000 of the 5,952
records); less when they are idle or with --threads 1. "ours" in the headline figures is packing; the
grouped numbers are reported beside it. See bench/README.md.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import random
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
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", category=FutureWarning)  # peft calls a deprecated transformers property

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "src"), str(REPO / "bench")]  # medqa, and hand_loop beside this file (also when imported)
import hand_loop  # noqa: E402
from hand_loop import MAX_LENGTH, STRATEGIES  # noqa: E402
from marked_section import write_marked_section  # noqa: E402

SHARED = Path(os.environ.get("MEDQA_SHARED", REPO.parent / "shared"))
# The 500 real records and BioGPT's tokenizer ship with the repository; the 5,452 synthetic GenMedGPT records are
# added from ../shared when it is there (our machines and CI), for scale.
DATA_FILES = [
    REPO / "data" / "real" / "healthcaremagic_500.json",
    SHARED / "data" / "genmedgpt5k_SYNTHETIC_chatdoctor5k.json",
]
TOKENIZER = REPO / "assets" / "biogpt-tokenizer"
BATCH = 8  # examples per training batch (train.batch_size)
MARK_START, MARK_END = "<!-- bench:start -->", "<!-- bench:end -->"

# Sizes. Training the tiny model costs ~0.7 ms per token computed with one thread, ~2.7 ms with two threads on
# cores shared with another job; its time goes to the 42,384-way logits and their softmax, so it grows with
# the tokens computed, padding included.
SIZES = {
    "full": dict(
        repeats=3, prepare_records=None, train_examples=32, eval_examples=32, scale_records=400, scale_examples=12
    ),
    "quick": dict(
        repeats=2, prepare_records=1000, train_examples=16, eval_examples=8, scale_records=200, scale_examples=8
    ),
}


# ------------------------------------------------------------------------------------------ helpers


def stats(values: list[float]) -> dict:
    """Median with its spread over repeats."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "values": values}


def timed(fn, *args, **kw) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn(*args, **kw)
    return time.perf_counter() - start, out


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def machine() -> dict:
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu": cpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "load_average_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


# ------------------------------------------------------------------------------------------ setup


def write_source(work: Path) -> Path:
    """Both record files as one JSON list, shuffled (seeded) so that any prefix has the same mix of the
    longer real HealthCareMagic records and the shorter GenMedGPT ones (prefixes are used for scaling)."""
    records = [r for path in DATA_FILES if path.exists() for r in json.loads(path.read_text())]
    random.Random(0).shuffle(records)
    path = work / "records.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def build_model_dir(work: Path) -> Path:
    from medqa.config import TinyModelConfig
    from medqa.tiny import build_tiny_model

    return build_tiny_model([], TinyModelConfig(tokenizer_files=str(TOKENIZER)), work / "tiny-biogpt", seed=0)


def prepare_cfg(
    workdir: Path, source: Path, model_dir: Path, num_proc: int = 1, records: int | None = None, fast: bool = True
):
    from medqa.config import load_config

    return load_config(
        None,
        [
            f"workdir={workdir}",
            f"data.source={source}",
            f"model.name_or_path={model_dir}",
            f"data.num_proc={num_proc}",
            f"data.max_records={records or 0}",
            f"data.max_length={MAX_LENGTH}",
            f"data.fast_tokenizer={str(fast).lower()}",
        ],
    )


def load_base_model(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), attn_implementation="sdpa")


# ------------------------------------------------------------------------------------------ batching strategies


def efficiency(batches: list[list[dict]], strategy: str) -> float:
    from medqa.packing import padding_efficiency

    lengths = [[len(r["input_ids"]) for r in b] for b in batches]
    return padding_efficiency(lengths, pad_to=MAX_LENGTH if strategy == "padded_512" else None)


# ------------------------------------------------------------------------------------------ a. padding


def packing_lower_bound(lengths: list[int], row_tokens: int) -> float | None:
    """The fewest rows of `row_tokens` any packing of these whole examples can use, from below: the linear-
    programming relaxation of bin packing's arc-flow model (Valerio de Carvalho, 1999), whose bound is tight in
    practice. None without scipy (not a medqa requirement)."""
    try:
        import numpy as np
        from scipy.optimize import linprog
        from scipy.sparse import lil_matrix
    except ImportError:
        return None
    sizes = sorted(set(lengths))
    count = {n: 0 for n in sizes}
    for n in lengths:
        count[n] += 1
    reach = [False] * (row_tokens + 1)  # row positions a sequence of examples can end at
    reach[0] = True
    for a in range(row_tokens + 1):
        if reach[a]:
            for n in sizes:
                if a + n <= row_tokens:
                    reach[a + n] = True
    nodes = [a for a in range(row_tokens + 1) if reach[a]] + ([row_tokens] if not reach[row_tokens] else [])
    node = {a: i for i, a in enumerate(nodes)}
    arcs = [(a, a + n, n) for a in nodes for n in sizes if a + n <= row_tokens]  # an example at position a
    arcs += [(a, row_tokens, 0) for a in nodes if a < row_tokens]  # the rest of the row is padding
    # variables: one flow per arc, then z = rows; flow conservation at every node, demand per example size
    a_eq = lil_matrix((len(nodes), len(arcs) + 1))
    a_ub = lil_matrix((len(sizes), len(arcs) + 1))
    for j, (u, v, n) in enumerate(arcs):
        a_eq[node[u], j] -= 1
        a_eq[node[v], j] += 1
        if n:
            a_ub[sizes.index(n), j] -= 1
    a_eq[node[0], len(arcs)] = 1
    a_eq[node[row_tokens], len(arcs)] = -1
    cost = np.zeros(len(arcs) + 1)
    cost[-1] = 1
    res = linprog(
        cost,
        A_ub=a_ub.tocsr(),
        b_ub=[-count[n] for n in sizes],
        A_eq=a_eq.tocsr(),
        b_eq=np.zeros(len(nodes)),
        bounds=(0, None),
        method="highs",
    )
    return float(res.fun) if res.status == 0 else None


def bench_padding(train_rows: list[dict], repeats: int) -> dict:
    rows_per_batch = hand_loop.packed_rows_per_batch([len(r["input_ids"]) for r in train_rows], BATCH)
    out = {}
    for strategy in STRATEGIES:
        values = [
            efficiency(hand_loop.make_batches(train_rows, strategy, BATCH, rows_per_batch, seed), strategy)
            for seed in range(repeats)
        ]
        out[strategy] = stats(values)
    return {
        "ours": out["packed"]["median"],
        "padded_512": out["padded_512"]["median"],
        "grouped": out["grouped"],
        "packed": out["packed"],
        "padded_512_stats": out["padded_512"],
        "examples": len(train_rows),
        "batch_size": BATCH,
        "packed_rows_per_batch": rows_per_batch,
        "packed_max_tokens": MAX_LENGTH,
    }


def bench_packing_real(work: Path, model_dir: Path) -> dict:
    """Packing on the 500 shipped real records alone (what users and the GPU machine have), tokenized by
    `medqa prepare` with the shipped BioGPT tokenizer, counted as `medqa train` computes: every row padded to its
    width, the last batch's empty rows included (medqa.packing.pack_stats), at rows of data.max_length and of
    twice that; with the bin-packing lower bound on the rows of data.max_length."""
    import datasets

    from medqa.packing import pack_stats
    from medqa.prepare import prepare

    workdir = work / "real-only"
    prepare(prepare_cfg(workdir, DATA_FILES[0], model_dir))
    lengths = [len(x) for x in datasets.load_from_disk(str(workdir / "tokenized" / "tokenized_train"))["input_ids"]]
    per_batch = hand_loop.packed_rows_per_batch(lengths, BATCH)
    rows = {w: pack_stats(lengths, w, max(1, round(per_batch * MAX_LENGTH / w))) for w in (MAX_LENGTH, 2 * MAX_LENGTH)}
    bound = packing_lower_bound(lengths, MAX_LENGTH)
    return {
        "records": str(DATA_FILES[0].relative_to(REPO)),
        "tokenizer": str(TOKENIZER.relative_to(REPO)),
        "examples": len(lengths),
        "median_tokens": statistics.median(lengths),
        "mean_tokens": statistics.mean(lengths),
        "rows": {str(w): r for w, r in rows.items()},
        "ours": rows[2 * MAX_LENGTH]["efficiency"],
        "rows_of_max_length": rows[MAX_LENGTH]["efficiency"],
        "lower_bound_rows_of_max_length": bound,
    }


# ------------------------------------------------------------------------------------------ b. training


def timed_epoch(base, batches: list[list[dict]], strategy: str, pad_id: int) -> float:
    """Seconds of one epoch of a fresh LoRA copy of `base`, every batch collated inside the timing, the gradient
    clipped to 1.0 (train.max_grad_norm)."""
    model, optimizer, _ = hand_loop.add_lora(copy.deepcopy(base))
    return hand_loop.train_epoch(
        model, optimizer, (hand_loop.collate(rows, strategy, pad_id) for rows in batches), max_grad_norm=1.0
    )


def bench_train(base, train_rows: list[dict], n: int, repeats: int, pad_id: int) -> dict:
    subset = random.Random(1).sample(train_rows, min(n, len(train_rows)))
    n_answer = sum(hand_loop.answer_tokens(r) for r in subset)
    rows_per_batch = hand_loop.packed_rows_per_batch([len(r["input_ids"]) for r in train_rows], BATCH)
    timed_epoch(
        base, hand_loop.make_batches(subset[:2], "grouped", BATCH, rows_per_batch=1, seed=0), "grouped", pad_id
    )  # warm-up
    seconds: dict[str, list[float]] = {s: [] for s in STRATEGIES}
    eff: dict[str, list[float]] = {s: [] for s in STRATEGIES}
    for rep in range(repeats):
        for strategy in STRATEGIES[rep % 3 :] + STRATEGIES[: rep % 3]:  # rotate, so no strategy always goes first
            batches = hand_loop.make_batches(subset, strategy, BATCH, rows_per_batch=rows_per_batch, seed=100 + rep)
            secs = timed_epoch(base, batches, strategy, pad_id)
            seconds[strategy].append(secs)
            eff[strategy].append(efficiency(batches, strategy))
            log(f"train {strategy:8s} repeat {rep}: {len(subset) / secs:6.2f} examples/s")
    out = {
        s: {
            "examples_per_s": stats([len(subset) / t for t in seconds[s]]),
            "answer_tokens_per_s": stats([n_answer / t for t in seconds[s]]),
            "seconds": stats(seconds[s]),
            "padding_efficiency": stats(eff[s]),
        }
        for s in STRATEGIES
    }
    ratio = {s: stats([o / t for o, t in zip(seconds["padded_512"], seconds[s])]) for s in ("grouped", "packed")}
    return {
        "speedup": ratio,
        "strategies": out,
        "examples": len(subset),
        "answer_tokens": n_answer,
        "packed_rows_per_batch": rows_per_batch,
        "model": "tiny BioGPT + LoRA all-linear r=8, AdamW",
    }


# ------------------------------------------------------------------------------------------ c. evaluation


def score_padded_512(model, rows: list[dict], pad_id: int, batch_size: int = BATCH) -> float:
    """The original way: every example padded to 512, batches in data order. Per batch the same work as
    `score_examples` (answer and sequence NLL); returns the summed answer NLL."""
    import torch

    from medqa.metrics import token_nll

    total = 0.0
    with torch.inference_mode():
        for k in range(0, len(rows), batch_size):
            batch = hand_loop.collate(rows[k : k + batch_size], "padded_512", pad_id)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            total += token_nll(logits, batch["labels"]).double().sum().item()
            token_nll(logits, batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)).double().sum()
    return total


def bench_eval(base, val_ds, n: int, repeats: int, pad_id: int) -> dict:
    from medqa.metrics import score_examples

    ds = val_ds.select(range(min(n, len(val_ds))))
    rows = [ds[i] for i in range(len(ds))]
    tokens = sum(len(r["input_ids"]) for r in rows)
    model = base.eval()
    methods = {
        "length_batched": lambda: float(score_examples(model, ds, pad_id, batch_size=BATCH).answer_nll.sum()),
        "one_at_a_time": lambda: float(score_examples(model, ds, pad_id, batch_size=1).answer_nll.sum()),
        "padded_512": lambda: score_padded_512(model, rows, pad_id),
    }
    methods["length_batched"]()  # warm-up
    seconds: dict[str, list[float]] = {m: [] for m in methods}
    nll: dict[str, float] = {}
    for rep in range(repeats):
        for name, fn in methods.items():
            secs, nll[name] = timed(fn)
            seconds[name].append(secs)
        log(f"eval repeat {rep}: " + ", ".join(f"{m} {tokens / s[-1]:.0f} tok/s" for m, s in seconds.items()))
    # All three must score the same answer tokens identically (padding never reaches the metric).
    spread = max(nll.values()) - min(nll.values())
    return {
        "tokens_per_s": {m: stats([tokens / t for t in s]) for m, s in seconds.items()},
        "speedup_vs_padded_512": stats([p / t for p, t in zip(seconds["padded_512"], seconds["length_batched"])]),
        "speedup_vs_one_at_a_time": stats([p / t for p, t in zip(seconds["one_at_a_time"], seconds["length_batched"])]),
        "answer_nll_sum": nll,
        "answer_nll_max_difference": spread,
        "examples": len(rows),
        "tokens": tokens,
        "batch_size": BATCH,
    }


# ------------------------------------------------------------------------------------------ d, e. prepare


def run_prepare(cfg_args: tuple, rerun: bool = False) -> tuple[float, float | None, int]:
    """Seconds of a fresh `prepare`, of a re-run in the same workdir (reads the tokenization cache) when
    `rerun`, and the records read."""
    from medqa.prepare import prepare

    cfg = prepare_cfg(*cfg_args)
    first, result = timed(prepare, cfg)
    cached = timed(prepare, cfg)[0] if rerun else None
    return first, cached, result.report["read"]


def bench_prepare(work: Path, source: Path, model_dir: Path, records: int | None, repeats: int) -> tuple[dict, Path]:
    """Returns the results and the first workdir (kept: the other sections read its tokenized splits).
    Both tokenizer paths (medqa's fast path for BioGPT's tokenizer, and the tokenizer as it is), each with
    data.num_proc 1 and 2, interleaved within each repeat; the tokenized outputs of the two paths must be equal.
    The cached re-run is timed after the fast num_proc=1 run (a cache hit does not tokenize)."""
    import datasets

    rate: dict[str, list[float]] = {f"{p}-{n}": [] for p in ("fast", "slow") for n in (1, 2)}
    cached: list[float] = []
    keep = work / "prepare-fast-np1-r0"
    read = 0
    identical = True
    for rep in range(repeats):
        for path in ("fast", "slow"):
            for num_proc in (1, 2):
                workdir = work / f"prepare-{path}-np{num_proc}-r{rep}"
                secs, again, read = run_prepare(
                    (workdir, source, model_dir, num_proc, records, path == "fast"),
                    rerun=num_proc == 1 and path == "fast",
                )
                rate[f"{path}-{num_proc}"].append(read / secs)
                if again is not None:
                    cached.append(again)
                log(
                    f"prepare {path} num_proc={num_proc} repeat {rep}: {read / secs:.0f} records/s"
                    + (f", cached re-run {again:.1f} s" if again is not None else "")
                )
                if rep == 0 and path == "slow" and num_proc == 1:
                    for split in ("train", "val", "test"):
                        a = datasets.load_from_disk(str(keep / "tokenized" / f"tokenized_{split}"))["input_ids"]
                        b = datasets.load_from_disk(str(workdir / "tokenized" / f"tokenized_{split}"))["input_ids"]
                        identical &= a == b
                if workdir != keep:
                    shutil.rmtree(workdir)
    fast_over_slow = [f / s for f, s in zip(rate["fast-1"], rate["slow-1"])]
    return {
        "records": read,
        "records_per_s": {k: stats(v) for k, v in rate.items()},
        "fast_over_slow": stats(fast_over_slow),
        "identical_token_ids": identical,
        "cached_rerun_seconds": stats(cached),
    }, keep


def bench_scaling(
    work: Path, source: Path, model_dir: Path, base, train_rows: list[dict], sizes: dict, repeats: int, pad_id: int
) -> dict:
    """Time per unit at 1x, 2x, 4x of a base size: prepare (s per 1,000 records) and one packed training epoch
    (s per example and per 1,000 tokens; per token is the steadier unit, as example lengths vary)."""
    rows_per_batch = hand_loop.packed_rows_per_batch([len(r["input_ids"]) for r in train_rows], BATCH)
    out: dict = {}
    for factor in (1, 2, 4):
        n_rec, n_ex = sizes["scale_records"] * factor, sizes["scale_examples"] * factor
        prep, per_example, per_ktok = [], [], []
        for rep in range(repeats):
            workdir = work / f"scale-{factor}x-r{rep}"
            secs, _, read = run_prepare((workdir, source, model_dir, 1, n_rec))
            shutil.rmtree(workdir)
            prep.append(secs / read * 1000)
            subset = random.Random(rep).sample(train_rows, min(n_ex, len(train_rows)))
            batches = hand_loop.make_batches(subset, "packed", BATCH, rows_per_batch=rows_per_batch, seed=rep)
            secs = timed_epoch(base, batches, "packed", pad_id)
            per_example.append(secs / len(subset))
            per_ktok.append(secs / sum(len(r["input_ids"]) for r in subset) * 1000)
        row = out[f"{factor}x"] = {
            "records": n_rec,
            "train_examples": n_ex,
            "prepare_seconds_per_1k_records": stats(prep),
            "train_seconds_per_example": stats(per_example),
            "train_seconds_per_1k_tokens": stats(per_ktok),
        }
        log(
            f"scaling {factor}x: prepare {row['prepare_seconds_per_1k_records']['median']:.2f} s/1k records, "
            f"train {row['train_seconds_per_1k_tokens']['median']:.2f} s/1k tokens"
        )
    for key in ("prepare_seconds_per_1k_records", "train_seconds_per_example", "train_seconds_per_1k_tokens"):
        out[f"{key}_4x_over_1x"] = out["4x"][key]["median"] / out["1x"][key]["median"]  # 1.0 = linear
    return out


# ------------------------------------------------------------------------------------------ report


def fmt(s: dict, digits: int = 1) -> str:
    return f"{s['median']:,.{digits}f} ({s['min']:,.{digits}f}-{s['max']:,.{digits}f})"


def load(meta: dict, when: str) -> str:
    value = meta["machine"].get(f"load_average_at_{when}")
    return "n/a" if value is None else f"{value:.1f}"


def markdown_section(res: dict) -> str:
    m, pad, tr, ev, pr, sc = (
        res["meta"],
        res["padding_efficiency"],
        res["train"],
        res["eval"],
        res["prepare"],
        res["scaling"],
    )
    st = tr["strategies"]
    lines = [
        MARK_START,
        f"## Results ({m['date']}, {'--quick' if m['quick'] else 'full run'})",
        "",
        f"Machine: {m['machine']['cores']} cores ({m['machine']['cpu']}), torch {m['machine']['torch']} "
        f"({m['machine']['torch_threads']} threads), transformers {m['machine']['transformers']}; load average "
        f"{load(m, 'start')} at start, {load(m, 'end')} at end. Median of {m['repeats']} repeats (min-max). "
        f"Run time {m['seconds']:.0f} s.",
        "",
        f"Training: {tr['examples']} train examples, one epoch, {tr['model']}; batches of {BATCH} examples "
        f"(packed: {tr['packed_rows_per_batch']} rows of up to {MAX_LENGTH} tokens per batch).",
        "",
        "| | padded_512 (the original project's) | ours: grouped by length | ours: packed | packed / padded_512 |",
        "|---|---|---|---|---|",
        f"| padding efficiency, train split ({pad['examples']:,} examples) | {pad['padded_512']:.3f} | "
        f"{fmt(pad['grouped'], 3)} | {fmt(pad['packed'], 3)} | {pad['ours'] / pad['padded_512']:.2f}x |",
        *(
            []
            if "real_500" not in pad
            else [
                f"| packed, the {pad['real_500']['examples']} real train examples alone (as `medqa train` "
                "computes: rows padded, last batch's empty rows counted) | "
                f"{pad['real_500']['mean_tokens'] / MAX_LENGTH:.3f} | | rows of {MAX_LENGTH}: "
                f"{pad['real_500']['rows_of_max_length']:.3f}; rows of {2 * MAX_LENGTH}: "
                f"{pad['real_500']['ours']:.3f} | |"
            ]
        ),
        f"| training examples/s | {fmt(st['padded_512']['examples_per_s'], 2)} | "
        f"{fmt(st['grouped']['examples_per_s'], 2)} | "
        f"{fmt(st['packed']['examples_per_s'], 2)} | {fmt(tr['speedup']['packed'], 2)}x |",
        f"| training answer tokens/s | {fmt(st['padded_512']['answer_tokens_per_s'], 0)} | "
        f"{fmt(st['grouped']['answer_tokens_per_s'], 0)} | {fmt(st['packed']['answer_tokens_per_s'], 0)} | |",
        f"| training speedup over padded_512 | 1.00 | {fmt(tr['speedup']['grouped'], 2)}x | "
        f"{fmt(tr['speedup']['packed'], 2)}x | |",
        "",
        f"Evaluation ({ev['examples']} val examples, {ev['tokens']:,} tokens; same answer NLL from all three, "
        f"max difference {ev['answer_nll_max_difference']:.1e}):",
        "",
        "| | padded to 512 | one example at a time | `score_examples` (length-batched, 8) |",
        "|---|---|---|---|",
        f"| tokens/s | {fmt(ev['tokens_per_s']['padded_512'], 0)} | {fmt(ev['tokens_per_s']['one_at_a_time'], 0)} | "
        f"{fmt(ev['tokens_per_s']['length_batched'], 0)} |",
        f"| length-batched speedup | {fmt(ev['speedup_vs_padded_512'], 2)}x | "
        f"{fmt(ev['speedup_vs_one_at_a_time'], 2)}x | |",
        "",
        f"`prepare` on {pr['records']:,} records (cached re-run: {fmt(pr['cached_rerun_seconds'], 1)} s):",
        "",
        "| data.num_proc | fast path (medqa.fasttok) records/s | BioGptTokenizer as it is, records/s |",
        "|---|---|---|",
        *[
            f"| {n} | {fmt(pr['records_per_s'][f'fast-{n}'], 0)} | {fmt(pr['records_per_s'][f'slow-{n}'], 0)} |"
            for n in (1, 2)
        ],
        "",
        f"Fast path / slow path, num_proc 1, paired per repeat: {fmt(pr['fast_over_slow'], 2)}x; token ids "
        f"{'identical' if pr['identical_token_ids'] else 'DIFFERENT'} in all three splits.",
        "",
        "Scaling (time per unit; 4x / 1x = 1.00 is linear, below 1 means fixed costs are being amortised):",
        "",
        "| size | records | prepare s / 1k records | train examples | packed train s / 1k tokens | s / example |",
        "|---|---|---|---|---|---|",
        *[
            f"| {f} | {sc[f]['records']:,} | {fmt(sc[f]['prepare_seconds_per_1k_records'], 2)} | "
            f"{sc[f]['train_examples']} | {fmt(sc[f]['train_seconds_per_1k_tokens'], 2)} | "
            f"{fmt(sc[f]['train_seconds_per_example'], 3)} |"
            for f in ("1x", "2x", "4x")
        ],
        f"| 4x / 1x | | {sc['prepare_seconds_per_1k_records_4x_over_1x']:.2f} | | "
        f"{sc['train_seconds_per_1k_tokens_4x_over_1x']:.2f} | {sc['train_seconds_per_example_4x_over_1x']:.2f} |",
        MARK_END,
    ]
    return "\n".join(lines) + "\n"


INTRO = """# Benchmarks

Produced by `make bench` (measures; writes outputs/bench/bench.json) and then `make bench-docs` (writes that run's
results section here; details: `bench/README.md`). On CPU, with a tiny BioGPT on the real BioGPT tokenizer, the 500
real records shipped in `data/real/` and the 5,452 synthetic ones from `../shared/data` where it exists, it
measures how much of the computed tokens are real (padding efficiency), training and evaluation throughput of
grouping by length and of packing against the original project's pad-everything-to-512, `medqa prepare`
throughput, and how time scales with data size. The machine, library versions and date are in the results
section, which each `make bench-docs` replaces.

"""


def write_markdown(path: Path, res: dict) -> None:
    """The results section of `res` between the bench markers of `path` (a new file starts with `INTRO`)."""
    section = markdown_section(res)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_marked_section(path, section, MARK_START, MARK_END, intro=INTRO)


def renamed(res: dict) -> dict:
    """The JSON of a run made before pad-to-512 was named `padded_512` (it was `original` in bench.py and
    `padded_512` in gpu.py), read under today's name, so `make bench-docs` still documents such a run."""
    pad, strategies = res["padding_efficiency"], res["train"]["strategies"]
    for part, old, new in (
        (pad, "original", "padded_512"),
        (pad, "original_stats", "padded_512_stats"),
        (strategies, "original", "padded_512"),
    ):
        if old in part:
            part[new] = part.pop(old)
    return res


def docs_from_json(results: Path, markdown: str | None) -> int:
    """The results section of `markdown` rewritten from an earlier run's JSON, so documenting a run never needs
    measuring again (and measuring never changes a tracked file)."""
    if not markdown:
        print("bench: --from-json needs --markdown FILE (the file whose results section to replace).")
        return 2
    if not results.is_file():
        print(f"bench: {results} not found; run `make bench` first (it writes it), then `make bench-docs`.")
        return 1
    write_markdown(Path(markdown), renamed(json.loads(results.read_text(encoding="utf-8"))))
    log(f"wrote the results of {results} into {markdown}")
    return 0


# ------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller subsets and 2 repeats (about 1.5 minutes)")
    ap.add_argument("--out", default=str(REPO / "outputs" / "bench" / "bench.json"), help="JSON results file")
    ap.add_argument("--markdown", default=None, help="markdown file whose results section is written/replaced")
    ap.add_argument(
        "--from-json",
        default=None,
        help="measure nothing: write --markdown from the results JSON of an earlier run (`make bench-docs`)",
    )
    ap.add_argument("--keep", action="store_true", help="keep the temporary workdir (its path is printed)")
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's choice, one per core); 1 on a machine shared with "
        "other jobs, where threads that spin-wait for each other are several times slower",
    )
    args = ap.parse_args(argv)
    if args.from_json:
        return docs_from_json(Path(args.from_json), args.markdown)

    if not DATA_FILES[1].exists():
        print(f"bench: {DATA_FILES[1]} not found (../shared); running on the 500 shipped real records only.")

    import datasets
    import torch

    datasets.disable_progress_bars()
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = SIZES["quick" if args.quick else "full"]
    repeats = sizes["repeats"]
    start = time.perf_counter()
    meta = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "quick": args.quick,
        "repeats": repeats,
        "machine": machine(),
        "sizes": sizes,
    }
    work = Path(tempfile.mkdtemp(prefix="medqa-bench-"))
    log(
        f"workdir {work}; {'quick' if args.quick else 'full'} run, {repeats} repeats, "
        f"{torch.get_num_threads()} torch threads"
    )
    load = meta["machine"]["load_average_at_start"]
    if load is not None and load > 0.5 * (os.cpu_count() or 1) and torch.get_num_threads() > 1:
        log(
            f"warning: load average {load:.1f} on {os.cpu_count()} cores: other jobs are running; timings will be "
            "noisy and multi-threaded torch slow (consider --threads 1)"
        )
    try:
        source = write_source(work)
        model_dir = build_model_dir(work)
        prep, base_dir = bench_prepare(work, source, model_dir, sizes["prepare_records"], repeats)

        tok = {s: datasets.load_from_disk(str(base_dir / "tokenized" / f"tokenized_{s}")) for s in ("train", "val")}
        train_rows = [
            {"input_ids": i, "labels": lab} for i, lab in zip(tok["train"]["input_ids"], tok["train"]["labels"])
        ]
        base = load_base_model(model_dir)
        pad_id = base.config.pad_token_id
        meta["model"] = {
            "path": "tiny BioGPT (medqa.tiny) on the real BioGPT tokenizer",
            "parameters": sum(p.numel() for p in base.parameters()),
            "vocab_size": base.config.vocab_size,
            "hidden_size": base.config.hidden_size,
            "layers": base.config.num_hidden_layers,
        }
        lengths = [len(r["input_ids"]) for r in train_rows]
        meta["train_lengths"] = {
            "examples": len(lengths),
            "mean": statistics.mean(lengths),
            "median": statistics.median(lengths),
            "max": max(lengths),
        }

        padding = bench_padding(train_rows, repeats)
        padding["real_500"] = real = bench_packing_real(work, model_dir)
        log(
            f"packing the {real['examples']} real train examples: "
            f"rows of {MAX_LENGTH} {real['rows_of_max_length']:.3f} "
            f"(lower bound {real['lower_bound_rows_of_max_length']} rows), rows of {2 * MAX_LENGTH} {real['ours']:.3f}"
        )
        log(
            f"padding efficiency: padded_512 {padding['padded_512']:.3f}, grouped {padding['grouped']['median']:.3f}, "
            f"packed {padding['packed']['median']:.3f}"
        )
        train = bench_train(base, train_rows, sizes["train_examples"], repeats, pad_id)
        evaluation = bench_eval(base, tok["val"], sizes["eval_examples"], repeats, pad_id)
        scaling = bench_scaling(work, source, model_dir, base, train_rows, sizes, repeats, pad_id)
    finally:
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    meta["seconds"] = time.perf_counter() - start
    meta["machine"]["load_average_at_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    res = {
        "padding_efficiency": padding,
        "train_speedup": train["speedup"]["packed"]["median"],
        "train_speedup_grouped": train["speedup"]["grouped"]["median"],
        "eval_speedup": evaluation["speedup_vs_padded_512"]["median"],
        "prepare_records_per_s": {k: v["median"] for k, v in prep["records_per_s"].items()},
        "train": train,
        "eval": evaluation,
        "prepare": prep,
        "scaling": scaling,
        "meta": meta,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n", encoding="utf-8")
    if args.markdown:
        write_markdown(Path(args.markdown), res)
    print(markdown_section(res))
    log(f"wrote {out}{' and ' + args.markdown if args.markdown else ''} in {meta['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
