"""Scores for generated answers against the doctors' references.

ROUGE-1/2/L: `rouge_score` F-measure (0..1), with its default tokenizer (lower-cased alphanumeric words) and
Porter stemming, averaged over answers. BLEU: `sacrebleu` corpus BLEU (0..100) with its default 13a tokenizer.
(`evaluate.load("rouge")` would download a script from the Hub, so the libraries are used directly.)
"""

from __future__ import annotations

import numpy as np

from medqa.errors import ConfigError


def rouge(predictions: list[str], references: list[str]) -> dict[str, float]:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    scores = [scorer.score(ref, pred) for pred, ref in zip(predictions, references)]
    return {
        k: float(np.mean([s[k].fmeasure for s in scores])) if scores else 0.0 for k in ("rouge1", "rouge2", "rougeL")
    }


def bleu(predictions: list[str], references: list[str]) -> float:
    import sacrebleu

    return float(sacrebleu.corpus_bleu(predictions, [references]).score)


def is_repetitive(text: str, n: int = 3, threshold: float = 0.5) -> bool:
    """A degenerate loop: fewer than half of the answer's word trigrams are distinct."""
    words = text.split()
    if len(words) < 4 * n:
        return False
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) < threshold


def generation_scores(predictions: list[str], references: list[str]) -> dict[str, float]:
    return {
        **rouge(predictions, references),
        "bleu": bleu(predictions, references),
        "mean_words": float(np.mean([len(p.split()) for p in predictions])) if predictions else 0.0,
        "empty_share": float(np.mean([not p.strip() for p in predictions])) if predictions else 0.0,
        "repetitive_share": float(np.mean([is_repetitive(p) for p in predictions])) if predictions else 0.0,
    }


BERTSCORE_OFF = (
    "BERTScore: off. It compares answers in an encoder's embedding space and needs that encoder; "
    "set evaluate.bertscore_model to a local folder with one (e.g. a saved roberta-large or a biomedical "
    "BERT; offline nothing can be downloaded) and `pip install bert-score`."
)


def bertscore(
    predictions: list[str], references: list[str], model: str, num_layers: int = 0, batch_size: int = 16
) -> dict[str, float]:
    """Mean BERTScore precision, recall and F1 (PyPI `bert-score`, no idf, no baseline rescaling) with the encoder at
    `model` (a local folder or a Hub id), using its first `num_layers` layers (0 = all)."""
    import os
    from pathlib import Path

    try:
        import bert_score
    except ImportError:
        raise ConfigError(
            "evaluate.bertscore_model is set but the bert-score package is missing: pip install bert-score."
        ) from None
    if not Path(model).exists() and os.environ.get("HF_HUB_OFFLINE") == "1":
        raise ConfigError(
            f"evaluate.bertscore_model={model!r} is not a local folder and offline mode is on "
            "(HF_HUB_OFFLINE=1): give the folder of a saved encoder, or leave it empty to skip BERTScore."
        )
    num_layers = num_layers or check_bertscore_encoder(model)
    # An empty answer has no token to match: it scores 0 (bert-score itself fails on empty strings).
    keep = [i for i, p in enumerate(predictions) if p.strip()]
    totals = {"bertscore_precision": 0.0, "bertscore_recall": 0.0, "bertscore_f1": 0.0}
    if keep:
        p, r, f = bert_score.score(
            [predictions[i] for i in keep],
            [references[i] for i in keep],
            model_type=model,
            num_layers=num_layers,
            batch_size=batch_size,
            device="cpu" if not _cuda() else None,
        )
        totals = {
            "bertscore_precision": float(p.sum()),
            "bertscore_recall": float(r.sum()),
            "bertscore_f1": float(f.sum()),
        }
    n = max(len(predictions), 1)
    return {k: v / n for k, v in totals.items()}


def check_bertscore_encoder(model: str) -> int:
    """The encoder's layer count, or one clear ConfigError (checked before any model is scored)."""
    from transformers import AutoConfig

    try:
        import bert_score  # noqa: F401
    except ImportError:
        raise ConfigError(
            "evaluate.bertscore_model is set but the bert-score package is missing: pip install bert-score."
        ) from None
    try:
        return int(AutoConfig.from_pretrained(model).num_hidden_layers)
    except Exception as exc:  # a missing folder, no config.json, no network: one paragraph
        raise ConfigError(
            f"evaluate.bertscore_model={model!r} could not be loaded ({type(exc).__name__}: "
            f"{str(exc)[:200]}). Give the folder of a saved encoder (with config.json), or leave it empty "
            "to skip BERTScore."
        ) from None


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
