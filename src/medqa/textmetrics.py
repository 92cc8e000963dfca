"""Scores for generated answers against the doctors' references.

ROUGE-1/2/L: `rouge_score` F-measure (0..1), with its default tokenizer (lower-cased alphanumeric words) and
Porter stemming, averaged over answers. BLEU: `sacrebleu` corpus BLEU (0..100) with its default 13a tokenizer.
(`evaluate.load("rouge")` would download a script from the Hub, so the libraries are used directly.)
"""

from __future__ import annotations

import numpy as np


def rouge(predictions: list[str], references: list[str]) -> dict[str, float]:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    scores = [scorer.score(ref, pred) for pred, ref in zip(predictions, references)]
    return {k: float(np.mean([s[k].fmeasure for s in scores])) if scores else 0.0
            for k in ("rouge1", "rouge2", "rougeL")}


def bleu(predictions: list[str], references: list[str]) -> float:
    import sacrebleu

    return float(sacrebleu.corpus_bleu(predictions, [references]).score)


def is_repetitive(text: str, n: int = 3, threshold: float = 0.5) -> bool:
    """A degenerate loop: fewer than half of the answer's word trigrams are distinct."""
    words = text.split()
    if len(words) < 4 * n:
        return False
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) < threshold


def generation_scores(predictions: list[str], references: list[str]) -> dict[str, float]:
    return {**rouge(predictions, references), "bleu": bleu(predictions, references),
            "mean_words": float(np.mean([len(p.split()) for p in predictions])) if predictions else 0.0,
            "empty_share": float(np.mean([not p.strip() for p in predictions])) if predictions else 0.0,
            "repetitive_share": float(np.mean([is_repetitive(p) for p in predictions])) if predictions else 0.0}
