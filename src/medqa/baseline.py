"""Stage 2, `baseline(cfg)`: how well the untuned model predicts the doctors' answers.

Reads `tokenized/tokenized_{val,test}`; writes `outputs/baseline/metrics.json`
(`{"val": {...}, "test": {...}, "model": ..., "tokenizer": ..., "config": {...}}`) and
`outputs/baseline/per_example.jsonl` (per-example answer NLL and token counts, for paired comparisons later).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from medqa.artifacts import atomic_dir, write_json
from medqa.batching import eval_tokens_per_batch
from medqa.errors import DataError
from medqa.locks import locked
from medqa.manifest import fingerprint_model, write_manifest
from medqa.metrics import EVAL_SPLITS, evaluate_answer_loss, metrics_table, sanity_check
from medqa.mixing import by_source
from medqa.modeling import (
    count_parameters,
    is_tiny_model,
    load_model,
    load_tokenizer,
    model_path,
    scoring_dtype,
    tokenizer_info,
)
from medqa.schema import Config
from medqa.workdir import check_tokenized, load_split, paths, per_example_rows, write_per_example

log = logging.getLogger(__name__)


@dataclass
class BaselineResult:
    metrics: dict
    out_dir: Path

    def table(self) -> str:
        return metrics_table({"baseline": self.metrics})


@locked("baseline")
def baseline(cfg: Config) -> BaselineResult:
    """Score the untuned model on val and test with the shared answer-loss function."""
    start = time.perf_counter()
    tokenizer = load_tokenizer(cfg)
    check_tokenized(cfg, tokenizer)  # once for the folder: every split comes from the same prepare run
    splits = {s: load_split(cfg, s) for s in EVAL_SPLITS}
    model = load_model(cfg)
    trainable, total = count_parameters(model)
    log.info(
        "baseline: model %s, %d parameters, %s on %s",
        model_path(cfg),
        total,
        next(model.parameters()).dtype,
        next(model.parameters()).device,
    )
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        raise DataError(
            f"The tokenizer has {len(tokenizer)} tokens but the model's embedding only "
            f"{model.get_input_embeddings().num_embeddings}; they do not belong together. Set "
            "model.tokenizer to the model's own tokenizer and re-run `medqa prepare`."
        )
    results, rows = {}, []
    for split, ds in splits.items():
        results[split], scores = evaluate_answer_loss(
            model,
            ds,
            tokenizer.pad_token_id,
            cfg.scoring.batch_size,
            cfg.scoring.bootstrap_samples,
            cfg.seed,
            progress=True,
            tokens_per_batch=eval_tokens_per_batch(cfg.scoring.tokens_per_batch, model),
        )
        rows += per_example_rows(split, scores)
        if cfg.data.sources:
            results.setdefault("by_source", {})[split] = by_source(cfg, split, scores)
    metrics = {
        **results,
        "model": model_path(cfg),
        "tokenizer": tokenizer_info(tokenizer),
        "parameters": total,
        "dtype": scoring_dtype(cfg),
        "device": str(next(model.parameters()).device),
        "seconds": round(time.perf_counter() - start, 2),
        "config": cfg.to_dict(),
    }
    # A randomly initialised model (the demo's tiny one) is expected to be worse than uniform before training.
    sanity_check(metrics, len(tokenizer), "baseline", quiet=is_tiny_model(cfg))
    out_dir = paths(cfg).baseline
    with atomic_dir(out_dir) as tmp:
        write_json(tmp / "metrics.json", metrics)
        write_per_example(tmp / "per_example.jsonl", rows)
        write_manifest(
            tmp,
            "baseline",
            cfg,
            {
                "base_model": fingerprint_model(model_path(cfg), cfg.model.revision),
                "tokenizer": metrics["tokenizer"]["vocab_sha256"],
            },
        )
    result = BaselineResult(metrics, out_dir)
    log.info(
        "baseline: test answer_loss %.4f (perplexity %.2f) in %.0fs",
        results["test"]["answer_loss"],
        results["test"]["answer_perplexity"],
        metrics["seconds"],
    )
    return result
