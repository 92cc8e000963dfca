"""Answer perplexity, defined once and used by every stage (baseline, training, final evaluation).

Definitions (docs: README, "Metrics"):
- `answer_loss`: mean negative log-likelihood (natural log) per answer token, over ALL answer tokens of a split:
  sum of per-token NLL / number of answer tokens. Answer tokens are the positions whose label is not -100:
  the answer and its EOS. It is not a mean of batch means, so batch size and padding cannot change it.
- `answer_perplexity` = exp(answer_loss); `bits_per_token` = answer_loss / ln 2.
- `answer_perplexity_ci95`: 2.5 and 97.5 percentiles of exp(sum NLL / sum tokens) over bootstrap resamples of
  examples (with replacement).
- `sequence_loss` / `sequence_perplexity`: the same over every real token after the first (prompt and answer),
  the original project's way, for comparison. Padding never counts in either.
"""

from __future__ import annotations

import logging
import math
import sys
from dataclasses import dataclass

import numpy as np

from medqa.batching import length_budget_batches
from medqa.prompts import IGNORE_INDEX

log = logging.getLogger(__name__)

EVAL_SPLITS = ("val", "test")  # the splits every stage scores


@dataclass
class ExampleScores:
    """Per-example sums, in the order of the dataset given to `score_examples`."""

    ids: list[str]
    answer_nll: np.ndarray  # float64, summed over the example's answer tokens
    answer_tokens: np.ndarray  # int
    sequence_nll: np.ndarray
    sequence_tokens: np.ndarray


def pad_batch(rows: list[dict], pad_id: int) -> dict:
    """Right-pad input_ids (pad id), labels (-100) and attention_mask (0) to the longest row."""
    import torch

    width = max(len(r["input_ids"]) for r in rows)
    out = {"input_ids": [], "labels": [], "attention_mask": []}
    for r in rows:
        n = len(r["input_ids"])
        out["input_ids"].append(list(r["input_ids"]) + [pad_id] * (width - n))
        out["labels"].append(list(r["labels"]) + [IGNORE_INDEX] * (width - n))
        out["attention_mask"].append([1] * n + [0] * (width - n))
    return {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}


def token_nll(logits, labels, chunk_tokens: int = 4096):
    """Per-position NLL of labels[:, 1:] under logits[:, :-1] (computed in fp32); 0 where the label is -100.
    Rows are converted to fp32 a few at a time (about `chunk_tokens` positions), so a large scoring batch never
    holds an fp32 copy of all its logits (each position's NLL is independent: chunking changes no number)."""
    import torch
    import torch.nn.functional as F

    shift_labels = labels[:, 1:]
    rows = max(1, chunk_tokens // max(shift_labels.shape[1], 1))
    out = []
    for r in range(0, logits.shape[0], rows):
        chunk = logits[r : r + rows, :-1].float()
        nll = F.cross_entropy(
            chunk.reshape(-1, chunk.size(-1)),
            shift_labels[r : r + rows].reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="none",
        )
        out.append(nll.view(chunk.shape[:2]))
    return torch.cat(out)


def score_examples(
    model, dataset, pad_id: int, batch_size: int = 8, progress: bool = False, tokens_per_batch: int = 0
) -> ExampleScores:
    """Sum of answer and sequence NLL per example. Right padding with an attention mask leaves every real
    position's logits unchanged in a causal LM, so results do not depend on batch size. Batches hold
    `batch_size` examples, or with `tokens_per_batch` as many as fit in that many padded tokens (a GPU scores
    short answers hundreds at a time)."""
    import torch
    from tqdm.auto import tqdm

    n = len(dataset)
    answer_nll = np.zeros(n)
    answer_tok = np.zeros(n, dtype=np.int64)
    seq_nll = np.zeros(n)
    seq_tok = np.zeros(n, dtype=np.int64)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    batches = length_budget_batches(list(dataset["length"]), batch_size, tokens_per_batch)
    with torch.inference_mode():
        for idx in tqdm(batches, desc="score", disable=not progress, leave=False):
            batch = pad_batch([dataset[i] for i in idx], pad_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            # One pass over the vocabulary for every real token; answer positions are a subset of them (their
            # label is the input token itself), so the answer NLL is a masked sum of the same numbers.
            # So scoring keeps the output layer at every position, unlike training (`medqa.faststep.lm_loss_sum`,
            # labelled positions only): sequence_loss needs every real token's logits, and skipping the prompt's
            # would drop that reported metric.
            scored = batch["labels"] != IGNORE_INDEX
            if (scored & (batch["labels"] != batch["input_ids"])).any():
                raise ValueError("labels must equal input_ids wherever they are not -100 (causal LM labels)")
            seq_labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
            s = token_nll(logits, seq_labels).double().cpu()
            a_mask = (batch["labels"][:, 1:] != IGNORE_INDEX).cpu()
            s_mask = (batch["attention_mask"][:, 1:] == 1).cpu()
            a = s * a_mask
            for row, i in enumerate(idx):
                answer_nll[i], answer_tok[i] = a[row].sum().item(), a_mask[row].sum().item()
                seq_nll[i], seq_tok[i] = s[row].sum().item(), s_mask[row].sum().item()
    model.train(was_training)
    ids = list(dataset["id"]) if "id" in dataset.column_names else [str(i) for i in range(n)]
    return ExampleScores(ids, answer_nll, answer_tok, seq_nll, seq_tok)


def bootstrap_ppl_ci(nll: np.ndarray, tokens: np.ndarray, samples: int, seed: int) -> list[float] | None:
    """95% percentile interval of exp(sum nll / sum tokens) over resamples of examples (None when samples=0)."""
    if samples == 0 or len(nll) == 0:
        return None
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(nll), size=(samples, len(nll)))
    ppl = np.exp(nll[idx].sum(axis=1) / np.maximum(tokens[idx].sum(axis=1), 1))
    return [float(np.percentile(ppl, 2.5)), float(np.percentile(ppl, 97.5))]


def summarize(scores: ExampleScores, bootstrap_samples: int = 1000, seed: int = 0) -> dict:
    """The split-level metrics from per-example sums (definitions in the module docstring)."""
    tokens = int(scores.answer_tokens.sum())
    if tokens == 0:
        raise ValueError("no answer tokens to score")
    loss = float(scores.answer_nll.sum() / tokens)
    seq_tokens = int(scores.sequence_tokens.sum())
    seq_loss = float(scores.sequence_nll.sum() / seq_tokens)
    return {
        "answer_loss": loss,
        "answer_perplexity": math.exp(loss),
        "answer_perplexity_ci95": bootstrap_ppl_ci(scores.answer_nll, scores.answer_tokens, bootstrap_samples, seed),
        "bits_per_token": loss / math.log(2),
        "answer_tokens": tokens,
        "examples": len(scores.ids),
        "sequence_loss": seq_loss,
        "sequence_perplexity": math.exp(seq_loss),
        "sequence_tokens": seq_tokens,
    }


def evaluate_answer_loss(
    model,
    dataset,
    pad_id: int,
    batch_size: int = 8,
    bootstrap_samples: int = 1000,
    seed: int = 0,
    progress: bool = False,
    tokens_per_batch: int = 0,
) -> tuple[dict, ExampleScores]:
    """Score a tokenized split: the one metric function for the baseline, training and final evaluation."""
    scores = score_examples(model, dataset, pad_id, batch_size, progress, tokens_per_batch)
    return summarize(scores, bootstrap_samples, seed), scores


def paired_bootstrap(base_nll: np.ndarray, tuned_nll: np.ndarray, tokens: np.ndarray, samples: int, seed: int) -> dict:
    """Paired bootstrap over examples (Koehn 2004) for tuned vs base answer_loss on the same tokens.

    `p_value` is the share of resamples in which the tuned model is not better (its loss >= the base's), with
    the +1 correction so it is never 0: a one-sided test of "fine-tuning lowered the answer loss"."""
    if samples == 0:
        return {
            "loss_delta": float((tuned_nll.sum() - base_nll.sum()) / tokens.sum()),
            "p_value": None,
            "loss_delta_ci95": None,
        }
    rng = np.random.default_rng(seed)
    n = len(tokens)
    not_better = 0
    deltas = []
    for start in range(0, samples, 200):  # chunks keep memory at 200 x n indices
        idx = rng.integers(0, n, size=(min(200, samples - start), n))
        tok = tokens[idx].sum(axis=1)
        delta = (tuned_nll[idx].sum(axis=1) - base_nll[idx].sum(axis=1)) / tok
        not_better += int((delta >= 0).sum())
        deltas.append(delta)
    d = np.concatenate(deltas)
    return {
        "loss_delta": float((tuned_nll.sum() - base_nll.sum()) / tokens.sum()),
        "p_value": (not_better + 1) / (samples + 1),
        "loss_delta_ci95": [float(np.percentile(d, 2.5)), float(np.percentile(d, 97.5))],
    }


def perplexity_warning(metrics: dict, vocab_size: int, what: str = "") -> str | None:
    """The original project's bug signature: an answer perplexity above the vocabulary size is worse than
    guessing every token uniformly at random (perplexity = V). A trained or pretrained model never gets there on
    its own data; a pipeline fault does. Returns the warning text (None when the number is plausible)."""
    ppl = metrics.get("answer_perplexity")
    if ppl is None or not vocab_size or ppl <= vocab_size:
        return None
    return (
        f"WARNING: {what + ' ' if what else ''}answer perplexity {ppl:,.1f} is above the vocabulary size "
        f"{vocab_size:,}: worse than guessing uniformly at random. This is the signature of a pipeline fault, "
        "not of a weak model: usual causes are the wrong question/answer field (data.question_field, "
        "data.answer_field), padding or prompt tokens in the loss, a tokenizer that does not belong to the model, "
        "or text mangled before tokenization (e.g. lower-cased). A randomly initialised model (the tiny demo "
        "model before training) is the one expected exception."
    )


def sanity_check(metrics: dict, vocab_size: int, what: str, quiet: bool = False) -> str | None:
    """Warn loudly (log and stderr) when a split's answer perplexity is above the vocabulary size, and record the
    warning in `metrics["sanity_warnings"]`. `quiet`: a randomly initialised model, where it is expected (logged
    at info level and recorded as such)."""
    warnings = [
        w
        for split in EVAL_SPLITS
        if split in metrics
        for w in [perplexity_warning(metrics[split], vocab_size, f"{what} {split}")]
        if w
    ]
    if not warnings:
        return None
    text = "\n".join(warnings)
    if quiet:
        log.info(
            "%s answer perplexity is above the vocabulary size, as expected for a randomly initialised model.", what
        )
        metrics["sanity_warnings"] = ["above uniform, expected: randomly initialised model"]
        return None
    log.warning(text)
    print(text, file=sys.stderr)
    metrics["sanity_warnings"] = warnings
    return text


def metrics_table(runs: dict[str, dict]) -> str:
    """A small fixed-width table: one row per (run, split)."""
    lines = [
        f"{'model':<12} {'split':<5} {'examples':>8} {'tokens':>8} {'answer_loss':>11} {'answer_ppl':>10} "
        f"{'95% CI':>19} {'bits/tok':>8} {'seq_ppl':>9}"
    ]
    for name, metrics in runs.items():
        for split in EVAL_SPLITS:
            m = metrics.get(split)
            if not m:
                continue
            ci = m["answer_perplexity_ci95"]
            ci_text = f"[{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "-"
            lines.append(
                f"{name:<12} {split:<5} {m['examples']:>8} {m['answer_tokens']:>8} {m['answer_loss']:>11.4f} "
                f"{m['answer_perplexity']:>10.2f} {ci_text:>19} {m['bits_per_token']:>8.3f} "
                f"{m['sequence_perplexity']:>9.2f}"
            )
    return "\n".join(lines)
