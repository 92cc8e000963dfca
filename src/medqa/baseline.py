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
from medqa.metrics import EVAL_SPLITS, metrics_table, sanity_check
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
from medqa.scoring import Scoring, split_results
from medqa.workdir import check_tokenized, load_split, paths, write_per_example

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
    tokenizer, splits = load_eval_splits(cfg)
    model = load_base_model(cfg, tokenizer)
    results, rows = score_base(cfg, model, tokenizer, splits)
    metrics = baseline_metrics(cfg, model, tokenizer, results, start)
    # A randomly initialised model (the demo's tiny one) is expected to be worse than uniform before training.
    sanity_check(metrics, len(tokenizer), "baseline", quiet=is_tiny_model(cfg))
    out_dir = write_baseline(cfg, metrics, rows)
    log.info(
        "baseline: test answer_loss %.4f (perplexity %.2f) in %.0fs",
        results["test"]["answer_loss"],
        results["test"]["answer_perplexity"],
        metrics["seconds"],
    )
    return BaselineResult(metrics, out_dir)


def load_eval_splits(cfg: Config) -> tuple[object, dict]:
    """The tokenizer and the tokenized val and test splits, checked once against the prepared data's manifest (every
    split comes from the same prepare run)."""
    tokenizer = load_tokenizer(cfg)
    check_tokenized(cfg, tokenizer)
    return tokenizer, {s: load_split(cfg, s) for s in EVAL_SPLITS}


def load_base_model(cfg: Config, tokenizer):
    """The untuned model as every stage scores it; refused when its embedding cannot hold the tokenizer's tokens."""
    model = load_model(cfg)
    _, total = count_parameters(model)
    weights = next(model.parameters())
    log.info("baseline: model %s, %d parameters, %s on %s", model_path(cfg), total, weights.dtype, weights.device)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        raise DataError(
            f"The tokenizer has {len(tokenizer)} tokens but the model's embedding only "
            f"{model.get_input_embeddings().num_embeddings}; they do not belong together. Set "
            "model.tokenizer to the model's own tokenizer and re-run `medqa prepare`."
        )
    return model


def score_base(cfg: Config, model, tokenizer, splits: dict) -> tuple[dict, list[dict]]:
    """Each split's answer loss (per source too with data.sources) and its per-example rows: the scoring step of
    train and evaluate (`medqa.scoring`)."""
    scoring = Scoring.of(cfg, splits)
    budget = eval_tokens_per_batch(cfg.scoring.tokens_per_batch, model)
    return split_results({s: scoring.score(model, ds, tokenizer.pad_token_id, budget, s) for s, ds in splits.items()})


def baseline_metrics(cfg: Config, model, tokenizer, results: dict, start: float) -> dict:
    """metrics.json: the scores, then the model, its tokenizer, size, dtype and device, the time and the config."""
    _, total = count_parameters(model)
    return {
        **results,
        "model": model_path(cfg),
        "tokenizer": tokenizer_info(tokenizer),
        "parameters": total,
        "dtype": scoring_dtype(cfg),
        "device": str(next(model.parameters()).device),
        "seconds": round(time.perf_counter() - start, 2),
        "config": cfg.to_dict(),
    }


def write_baseline(cfg: Config, metrics: dict, rows: list[dict]) -> Path:
    """outputs/baseline/: metrics.json, per_example.jsonl and the manifest, replaced together."""
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
    return out_dir
