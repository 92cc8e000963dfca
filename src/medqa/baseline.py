"""Stage 2, `baseline(cfg)`: how well the untuned model predicts the doctors' answers.

Reads `tokenized/tokenized_{val,test}`; writes `outputs/baseline/metrics.json`
(`{"val": {...}, "test": {...}, "model": ..., "tokenizer": ..., "config": {...}}`) and
`outputs/baseline/per_example.jsonl` (per-example answer NLL and token counts, for paired comparisons later).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from medqa.artifacts import atomic_dir, write_json
from medqa.batching import eval_tokens_per_batch
from medqa.schema import Config
from medqa.errors import DataError
from medqa.metrics import ExampleScores, evaluate_answer_loss, perplexity_warning
from medqa.manifest import check_inputs, fingerprint_model, write_manifest
from medqa.modeling import (count_parameters, is_tiny_model, load_model, load_tokenizer, model_path,
                            scoring_dtype, tokenizer_info)

log = logging.getLogger(__name__)

EVAL_SPLITS = ("val", "test")


@dataclass
class BaselineResult:
    metrics: dict
    out_dir: Path

    def table(self) -> str:
        return metrics_table({"baseline": self.metrics})


def check_tokenized(cfg: Config, tokenizer) -> None:
    """Stop when tokenized/ was prepared from other data, settings or tokenizer than this config names."""
    from medqa.data import prepared_inputs

    check_inputs(cfg, Path(cfg.workdir) / "tokenized", prepared_inputs(cfg, tokenizer),
                 "medqa prepare --config <your config>")


def load_tokenized(cfg: Config, split: str, tokenizer=None):
    """A tokenized split, checked against the tokenizer when one is given; `scoring.max_examples` applies to the
    val and test splits only (it is a scoring shortcut, never a way to shrink training)."""
    import datasets

    path = Path(cfg.workdir) / "tokenized" / f"tokenized_{split}"
    if not path.is_dir():
        raise DataError(f"{path} not found. Run `medqa prepare --config <your config>` first (same workdir).")
    if tokenizer is not None:
        check_tokenized(cfg, tokenizer)
    ds = datasets.load_from_disk(str(path))
    if len(ds) == 0:
        raise DataError(f"{path} is empty: the {split} split has no examples. Use more records or change "
                        "data.val_fraction / data.test_fraction, then re-run `medqa prepare`.")
    if split != "train" and cfg.scoring.max_examples and len(ds) > cfg.scoring.max_examples:
        ds = ds.select(range(cfg.scoring.max_examples))
    return ds


def per_example_rows(split: str, scores: ExampleScores) -> list[dict]:
    return [{"split": split, "id": i, "answer_nll": float(n), "answer_tokens": int(t)}
            for i, n, t in zip(scores.ids, scores.answer_nll, scores.answer_tokens)]


def sanity_check(metrics: dict, vocab_size: int, what: str, quiet: bool = False) -> str | None:
    """Warn loudly (log and stderr) when a split's answer perplexity is above the vocabulary size, and record the
    warning in `metrics["sanity_warnings"]`. `quiet`: a randomly initialised model, where it is expected (logged
    at info level and recorded as such)."""
    import sys

    warnings = [w for split in EVAL_SPLITS if split in metrics
                for w in [perplexity_warning(metrics[split], vocab_size, f"{what} {split}")] if w]
    if not warnings:
        return None
    text = "\n".join(warnings)
    if quiet:
        log.info("%s answer perplexity is above the vocabulary size, as expected for a randomly initialised model.",
                 what)
        metrics["sanity_warnings"] = ["above uniform, expected: randomly initialised model"]
        return None
    log.warning(text)
    print(text, file=sys.stderr)
    metrics["sanity_warnings"] = warnings
    return text


def metrics_table(runs: dict[str, dict]) -> str:
    """A small fixed-width table: one row per (run, split)."""
    lines = [f"{'model':<12} {'split':<5} {'examples':>8} {'tokens':>8} {'answer_loss':>11} {'answer_ppl':>10} "
             f"{'95% CI':>19} {'bits/tok':>8} {'seq_ppl':>9}"]
    for name, metrics in runs.items():
        for split in EVAL_SPLITS:
            m = metrics.get(split)
            if not m:
                continue
            ci = m["answer_perplexity_ci95"]
            ci_text = f"[{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "-"
            lines.append(f"{name:<12} {split:<5} {m['examples']:>8} {m['answer_tokens']:>8} {m['answer_loss']:>11.4f} "
                         f"{m['answer_perplexity']:>10.2f} {ci_text:>19} {m['bits_per_token']:>8.3f} "
                         f"{m['sequence_perplexity']:>9.2f}")
    return "\n".join(lines)


def baseline(cfg: Config) -> BaselineResult:
    """Score the untuned model on val and test with the shared answer-loss function."""
    start = time.perf_counter()
    tokenizer = load_tokenizer(cfg)
    check_tokenized(cfg, tokenizer)  # once for the folder: every split comes from the same prepare run
    splits = {s: load_tokenized(cfg, s) for s in EVAL_SPLITS}
    model = load_model(cfg)
    trainable, total = count_parameters(model)
    log.info("baseline: model %s, %d parameters, %s on %s", model_path(cfg), total,
             next(model.parameters()).dtype, next(model.parameters()).device)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        raise DataError(f"The tokenizer has {len(tokenizer)} tokens but the model's embedding only "
                        f"{model.get_input_embeddings().num_embeddings}; they do not belong together. Set "
                        "model.tokenizer to the model's own tokenizer and re-run `medqa prepare`.")
    results, rows = {}, []
    for split, ds in splits.items():
        results[split], scores = evaluate_answer_loss(model, ds, tokenizer.pad_token_id, cfg.scoring.batch_size,
                                                      cfg.scoring.bootstrap_samples, cfg.seed, progress=True,
                                                      tokens_per_batch=eval_tokens_per_batch(cfg.scoring.tokens_per_batch,
                                                                                             model))
        rows += per_example_rows(split, scores)
    metrics = {**results, "model": model_path(cfg), "tokenizer": tokenizer_info(tokenizer),
               "parameters": total, "dtype": scoring_dtype(cfg),
               "device": str(next(model.parameters()).device), "seconds": round(time.perf_counter() - start, 2),
               "config": cfg.to_dict()}
    # A randomly initialised model (the demo's tiny one) is expected to be worse than uniform before training.
    sanity_check(metrics, len(tokenizer), "baseline", quiet=is_tiny_model(cfg))
    out_dir = Path(cfg.workdir) / "outputs" / "baseline"
    with atomic_dir(out_dir) as tmp:
        write_json(tmp / "metrics.json", metrics)
        (tmp / "per_example.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        write_manifest(tmp, "baseline", cfg, {"base_model": fingerprint_model(model_path(cfg), cfg.model.revision),
                                              "tokenizer": metrics["tokenizer"]["vocab_sha256"]})
    result = BaselineResult(metrics, out_dir)
    log.info("baseline: test answer_loss %.4f (perplexity %.2f) in %.0fs", results["test"]["answer_loss"],
             results["test"]["answer_perplexity"], metrics["seconds"])
    return result
