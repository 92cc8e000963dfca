"""PubMedQA zero-shot: did fine-tuning keep the base model's biomedical knowledge?

The 500 expert-labelled test questions ship in `data/pubmedqa/` (MIT), beside the other 500 labelled ones (the
knowledge dev set, `dev_questions`: scored during training to choose an adapter, never reported as the test
figure). Each is scored as lm-evaluation-harness's `pubmedqa` task defines it (a `multiple_choice` task):

- context  = "Abstract: " + the abstract's sections joined by newlines + "\\nQuestion: " + question + "\\nAnswer:"
- choices  = "yes", "no", "maybe", each continued after the target delimiter " "
- loglik(choice) = sum of log p(continuation token | everything before it), where the continuation's tokens are
  those of tokenize(context + " " + choice) after the tokens of tokenize(context) (lm-eval's `_encode_pair`)
- acc      = mean over questions of [argmax_choice loglik == gold]; acc_norm divides each loglik by the
  choice's length in characters first, acc_bytes by its length in UTF-8 bytes (lm-eval 0.4.13's
  `ConfigurableTask.process_results`: len("yes"), len("no"), len("maybe"), without the delimiter; for these three
  ASCII words characters and bytes agree).
- start token: the tokenizer's default special tokens (BioGPT's `</s>` in front), as medqa's prompts are
  tokenized. lm-eval's HF backend does the same since 0.4.10 (`add_bos_token=None` leaves it to the tokenizer);
  lm-eval up to 0.4.9 passed `add_special_tokens=False` by default (no start token; Gemma excepted), so numbers from
  those versions differ for BioGPT.
- truncation: a sequence longer than the window keeps its last max_length + 1 tokens; the final one is no input
  (nothing follows it), so the model reads a full window of max_length tokens, as lm-eval's
  `(context + continuation)[-(max_length + 1):][:-1]` (keeping max_length would read one context token fewer).

`medqa benchmark` runs lm-eval itself on the same questions (task `pubmedqa_local`); tests/test_benchmark.py
checks that the two agree per question. This scorer stays for `medqa evaluate`'s report: it batches by length in
medqa's scoring loop and needs no task files or datasets cache.

Beside accuracy: macro-F1 over the three classes, bootstrap 95% intervals over questions, and a paired bootstrap
between two models on the same questions. Scores use `medqa.metrics.token_nll`, the function every medqa
perplexity is built on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medqa.batching import length_budget_batches
from medqa.errors import DataError
from medqa.metrics import pad_batch, paired_bootstrap, token_nll
from medqa.prompts import IGNORE_INDEX

CHOICES = ("yes", "no", "maybe")
DEFAULT_TEST = Path(__file__).resolve().parents[2] / "data" / "pubmedqa" / "pubmedqa_test.json"
# The other 500 labelled PQA-L questions: training and the search choose by them, the reported figure never does.
DEFAULT_DEV = DEFAULT_TEST.with_name("pubmedqa_dev.json")


def load_items(path: str | Path = DEFAULT_TEST) -> list[dict]:
    """The questions: dicts with id, question, contexts (list of str) and answer (yes/no/maybe). PubMedQA's own
    `ori_pqal.json` layout (a dict keyed by PubMed id with QUESTION, CONTEXTS, final_decision) is read too."""
    try:
        items = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # missing, unreadable, not UTF-8, not JSON
        raise DataError(
            f"Could not read PubMedQA-format questions from {path}: {exc}. Point evaluate.pubmedqa_file at "
            "a JSON list like data/pubmedqa/pubmedqa_test.json, or leave it empty for the shipped one."
        ) from None
    if isinstance(items, dict):  # PubMedQA's ori_pqal.json
        items = [
            {"id": k, "question": v.get("QUESTION"), "contexts": v.get("CONTEXTS"), "answer": v.get("final_decision")}
            if isinstance(v, dict)
            else v
            for k, v in items.items()
        ]

    def ok(x) -> bool:
        return (
            isinstance(x, dict)
            and isinstance(x.get("question"), str)
            and x.get("answer") in CHOICES
            and isinstance(x.get("contexts"), list)
            and all(isinstance(c, str) for c in x["contexts"])
        )

    bad = [i for i, x in enumerate(items if isinstance(items, list) else [items]) if not ok(x)]
    if not isinstance(items, list) or bad or not items:
        where = f"item {bad[0]} (of {len(bad)} bad ones)" if bad else "the file"
        raise DataError(
            f"{path}: {where} is not a PubMedQA question: each needs `question` (text), `contexts` (a "
            f"list of texts) and `answer` in {CHOICES}, and the file at least one. Use "
            "data/pubmedqa/pubmedqa_test.json's layout (or PubMedQA's ori_pqal.json)."
        )
    return items


def subset(items: list[dict], n: int, seed: int = 0) -> list[dict]:
    """`n` questions in a seeded random order (all of them when n >= len): a prefix of the file would be all
    "yes" answers for small n."""
    import random

    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    return [items[i] for i in sorted(order[:n])]


def dev_questions(n: int, seed: int) -> list[dict]:
    """`n` seeded questions of the knowledge dev set (scoring.knowledge_questions); [] when n is 0."""
    return subset(load_items(DEFAULT_DEV), n, seed) if n else []


def accuracy(scores: PubMedQAScores) -> dict:
    """acc and acc_norm only: what an in-training evaluation logs (no bootstrap)."""
    return {
        "acc": float((scores.predicted == scores.gold).mean()),
        "acc_norm": float((scores.predicted_norm == scores.gold).mean()),
    }


def context_text(item: dict) -> str:
    """lm-eval's doc_to_text for pubmedqa."""
    return "Abstract: {}\nQuestion: {}\nAnswer:".format("\n".join(item["contexts"]), item["question"])


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's `_encode_pair`: trailing white space of the context moves to the continuation; the continuation's
    tokens are those of the whole string after the context's own tokens."""
    n_space = len(context) - len(context.rstrip())
    if n_space:
        context, continuation = context[:-n_space], context[-n_space:] + continuation
    whole = list(tokenizer(context + continuation)["input_ids"])
    ctx = list(tokenizer(context)["input_ids"])
    return ctx, whole[len(ctx) :]


@dataclass
class PubMedQAScores:
    ids: list[str]
    gold: np.ndarray  # index into CHOICES
    loglik: np.ndarray  # (n, 3)
    choice_chars: np.ndarray  # (3,): characters of "yes", "no", "maybe" (lm-eval's acc_norm divisor)
    choice_bytes: np.ndarray  # (3,): their UTF-8 bytes (lm-eval's acc_bytes divisor)
    # `score_knowledge` only: per question, the summed NLL of the context's tokens after the first, and their count
    # (the abstract loss, `abstract_loss` below); None from `score_items`.
    text_nll: np.ndarray | None = None
    text_tokens: np.ndarray | None = None

    @property
    def predicted(self) -> np.ndarray:
        return self.loglik.argmax(axis=1)

    @property
    def predicted_norm(self) -> np.ndarray:
        return (self.loglik / self.choice_chars).argmax(axis=1)

    @property
    def predicted_bytes(self) -> np.ndarray:
        return (self.loglik / self.choice_bytes).argmax(axis=1)


def _scores(items: list[dict], loglik: np.ndarray, text_nll=None, text_tokens=None) -> PubMedQAScores:
    """The scores of `items` from their choices' log-likelihoods: ids, gold indices and lm-eval's divisors."""
    gold = np.array([CHOICES.index(item["answer"]) for item in items])
    chars = np.array([len(c) for c in CHOICES], dtype=float)
    utf8 = np.array([len(c.encode("utf-8")) for c in CHOICES], dtype=float)
    ids = [str(item.get("id", i)) for i, item in enumerate(items)]
    return PubMedQAScores(ids, gold, loglik, chars, utf8, text_nll, text_tokens)


def score_items(
    model, tokenizer, items: list[dict], batch_size: int = 8, max_length: int | None = None, progress: bool = False
) -> PubMedQAScores:
    """Log-likelihood of each choice for each question (see the module docstring). `progress`: a progress bar
    over the batches, as test scoring shows."""
    import torch

    max_length = max_length or getattr(model.config, "max_position_embeddings", 1024)
    rows, owners = [], []
    for q, item in enumerate(items):
        for c, choice in enumerate(CHOICES):
            ctx, cont = encode_pair(tokenizer, context_text(item), " " + choice)
            # max_length + 1 tokens; the last is never an input (see the forward below), so the model sees
            # max_length and the first continuation token still has max_length tokens before it, as in lm-eval.
            ids = (ctx + cont)[-(max_length + 1) :]
            labels = ([IGNORE_INDEX] * len(ctx) + cont)[-(max_length + 1) :]
            rows.append({"input_ids": ids, "labels": labels})
            owners.append((q, c))
    loglik = np.zeros((len(items), len(CHOICES)))
    # The last column is never an input that predicts a label (right padding: a pad, or a row's final token), so
    # the model runs on all but it; token_nll drops the last logit column, so a copy of the final one stands in for
    # it (never read).
    for idx, batch, logits in _forwards(model, tokenizer, rows, batch_size, progress, drop_last=True):
        logits = torch.cat([logits, logits[:, -1:]], dim=1)
        nll = token_nll(logits, batch["labels"]).double().sum(dim=1).cpu().numpy()
        for row, i in enumerate(idx):
            q, c = owners[i]
            loglik[q, c] = -nll[row]
    return _scores(items, loglik)


def _forwards(model, tokenizer, rows: list[dict], batch_size: int, progress: bool, drop_last: bool = False):
    """(row indices, padded batch, logits) for `rows` in batches of about `batch_size` rows of the longest's
    length, the model in eval mode without gradients (its mode restored afterwards); `drop_last`: the last column
    is not given to the model."""
    import torch
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    was_training = model.training
    model.eval()
    try:
        batches = length_budget_batches([len(r["input_ids"]) for r in rows], batch_size)
        for idx in tqdm(batches, desc="pubmedqa", disable=not progress, leave=False):
            batch = {k: v.to(device) for k, v in pad_batch([rows[i] for i in idx], pad).items()}
            end = -1 if drop_last else None
            with torch.inference_mode():
                logits = model(input_ids=batch["input_ids"][:, :end], attention_mask=batch["attention_mask"][:, :end])
                yield idx, batch, logits.logits
    finally:
        model.train(was_training)


def _knowledge_rows(tokenizer, items: list[dict], max_length: int) -> tuple[list[dict], list[tuple], dict]:
    """The rows `score_knowledge` runs; the reads (row, question, choice, positions, target tokens) that give each
    choice's log-likelihood; and {main row: question}, the rows whose labels mark the context's own tokens (the
    abstract loss)."""
    rows, reads, mains = [], [], {}
    for q, item in enumerate(items):
        context = context_text(item)
        pairs = [encode_pair(tokenizer, context, " " + choice) for choice in CHOICES]
        ctx = pairs[0][0][-max_length:]  # the window `score_items` gives a single-token choice
        main = {"input_ids": list(ctx), "labels": list(ctx)}
        rows.append(main)
        here, merged = len(rows) - 1, False
        mains[here] = q
        for c, (full, cont) in enumerate(pairs):
            if len(cont) == 1:  # read off the context's last position
                reads.append((here, q, c, [len(ctx) - 1], cont))
            elif not merged and len(full) + len(cont) - 1 <= max_length:
                # Appended to the main row: the context's positions see nothing after them (causal attention), so
                # the abstract loss and the other choices read the same logits; this choice's tokens follow it.
                merged = True
                main["input_ids"] += cont[:-1]
                main["labels"] += [IGNORE_INDEX] * (len(cont) - 1)
                reads.append((here, q, c, list(range(len(full) - 1, len(full) - 1 + len(cont))), cont))
            else:  # a row of its own, built as `score_items` builds it
                ids = (full + cont)[-(max_length + 1) :]
                n = min(len(cont), len(ids) - 1)
                rows.append({"input_ids": ids[:-1], "labels": [IGNORE_INDEX] * (len(ids) - 1)})
                reads.append((len(rows) - 1, q, c, list(range(len(ids) - 1 - n, len(ids) - 1)), ids[-n:]))
    return rows, reads, mains


def score_knowledge(
    model, tokenizer, items: list[dict], batch_size: int = 8, max_length: int | None = None, progress: bool = False
) -> PubMedQAScores:
    """`score_items`' log-likelihoods in one forward per question where the tokenizer allows, plus the abstract
    loss. The model reads the question's context (its last max_length tokens, as in `score_items`):

    - a choice whose continuation is one token (" yes", " no", " maybe" for SmolLM2 and Llama-style BPEs) is read
      off the context's last position, so the three choices cost one forward instead of three;
    - one choice of several tokens (BioGPT's " maybe") is appended to the same row and read where its tokens
      follow (causal attention leaves the context's logits unchanged); any other gets a row of its own;
    - the context's own tokens give `text_nll` / `text_tokens`: the summed NLL of every context token after the
      first ("Abstract: " + the abstract + the question), the abstract loss (`abstract_loss`).

    tests/test_knowledge.py checks the log-likelihoods equal `score_items`' and the text NLL the model's own loss."""
    import torch

    max_length = max_length or getattr(model.config, "max_position_embeddings", 1024)
    rows, reads, mains = _knowledge_rows(tokenizer, items, max_length)
    by_row: dict[int, list[tuple]] = {}
    for read in reads:
        by_row.setdefault(read[0], []).append(read)
    loglik = np.zeros((len(items), len(CHOICES)))
    text_nll, text_tokens = np.zeros(len(items)), np.zeros(len(items), dtype=np.int64)
    for idx, batch, logits in _forwards(model, tokenizer, rows, batch_size, progress):
        nll = token_nll(logits, batch["labels"]).double()
        counted = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(dim=1)
        for r, i in enumerate(idx):
            if i in mains:
                text_nll[mains[i]], text_tokens[mains[i]] = nll[r].sum().item(), int(counted[r])
            for _, q, c, positions, targets in by_row.get(i, []):
                logp = logits[r, positions].float().log_softmax(-1)
                picked = logp[torch.arange(len(targets)), torch.tensor(targets, device=logp.device)]
                loglik[q, c] = picked.double().sum().item()
    return _scores(items, loglik, text_nll, text_tokens)


def forwards_saved(tokenizer, items: list[dict], max_length: int = 1024) -> tuple[int, int]:
    """(rows `score_knowledge` runs, rows `score_items` runs) for these questions: what one forward saves."""
    rows, _, _ = _knowledge_rows(tokenizer, items, max_length)
    return len(rows), len(items) * len(CHOICES)


def abstract_loss(scores: PubMedQAScores) -> float:
    """Mean NLL per context token (nats): summed over every question's context tokens after the first, divided by
    their count, as answer_loss is over answer tokens."""
    if scores.text_nll is None:
        raise ValueError("abstract loss needs scores from score_knowledge")
    return float(scores.text_nll.sum() / max(int(scores.text_tokens.sum()), 1))


def paired_text(base: PubMedQAScores, tuned: PubMedQAScores, samples: int = 1000, seed: int = 0) -> dict:
    """Abstract loss of the tuned model against the base on the same contexts: the change in nats, its relative
    size (tuned / base - 1), a 95% paired-bootstrap interval over questions and the one-sided p that tuning did not
    raise it (medqa.metrics.paired_bootstrap, as for answer loss)."""
    if base.ids != tuned.ids or not np.array_equal(base.text_tokens, tuned.text_tokens):
        raise ValueError("paired comparison needs the same questions, tokenized alike")
    test = paired_bootstrap(base.text_nll, tuned.text_nll, base.text_tokens, samples, seed)
    b = abstract_loss(base)
    return {
        "abstract_loss_base": b,
        "abstract_loss": abstract_loss(tuned),
        "abstract_delta": test["loss_delta"],
        "abstract_delta_ci95": test["loss_delta_ci95"],
        "abstract_change": abstract_loss(tuned) / b - 1.0,
        "abstract_change_ci95": [x / b for x in test["loss_delta_ci95"]] if test["loss_delta_ci95"] else None,
        # here "p" is the share of resamples where tuning did NOT lower the loss: near 1 means it rose
        "p_value_not_lower": test["p_value"],
    }


def check_no_dev_overlap(items: list[dict], path, dev_path: str | Path = DEFAULT_DEV) -> None:
    """Refuse evaluated PubMedQA questions that are knowledge dev questions (which choose the adapter): a reported
    figure on them would be a selection figure. PubMedQA's ori_pqal.json holds all 1,000 labelled questions, the
    dev ones among them."""
    dev = {str(x.get("id")) for x in load_items(dev_path)}
    shared = [str(x.get("id")) for x in items if str(x.get("id")) in dev]
    if shared:
        raise DataError(
            f"{path}: {len(shared)} of its {len(items)} PubMedQA questions (ids {', '.join(shared[:3])}"
            f"{', ...' if len(shared) > 3 else ''}) are knowledge dev questions ({dev_path}), which training and "
            "the search use to choose the adapter, so a score on them is not a test figure. Evaluate on questions "
            "outside the dev set: data/pubmedqa/pubmedqa_test.json (the default), or remove those ids from the file."
        )


def macro_f1(gold: np.ndarray, predicted: np.ndarray) -> float:
    """Mean over the classes present in the gold labels or the predictions of F1 = 2PR / (P + R) (a present class
    with P + R = 0 counts 0), as scikit-learn's f1_score(average="macro") computes it."""
    f1 = []
    for c in sorted(set(gold.tolist()) | set(predicted.tolist())):
        tp = float(((predicted == c) & (gold == c)).sum())
        p = tp / max(int((predicted == c).sum()), 1)
        r = tp / max(int((gold == c).sum()), 1)
        f1.append(2 * p * r / (p + r) if p + r else 0.0)
    return float(np.mean(f1))


def summarize(scores: PubMedQAScores, bootstrap_samples: int = 1000, seed: int = 0) -> dict:
    """acc, acc_norm and macro-F1 with 95% bootstrap intervals over questions."""
    gold, pred = scores.gold, scores.predicted
    out = {
        "questions": len(gold),
        "acc": float((pred == gold).mean()),
        "acc_norm": float((scores.predicted_norm == gold).mean()),
        "acc_bytes": float((scores.predicted_bytes == gold).mean()),
        "macro_f1": macro_f1(gold, pred),
        "predicted_share": {c: float((pred == i).mean()) for i, c in enumerate(CHOICES)},
    }
    if bootstrap_samples:
        rng = np.random.default_rng(seed)
        idx = rng.integers(0, len(gold), size=(bootstrap_samples, len(gold)))
        accs = (pred[idx] == gold[idx]).mean(axis=1)
        f1s = [macro_f1(gold[i], pred[i]) for i in idx]
        out["acc_ci95"] = [float(np.percentile(accs, 2.5)), float(np.percentile(accs, 97.5))]
        out["macro_f1_ci95"] = [float(np.percentile(f1s, 2.5)), float(np.percentile(f1s, 97.5))]
    return out


def paired_comparison(base: PubMedQAScores, tuned: PubMedQAScores, samples: int = 1000, seed: int = 0) -> dict:
    """Accuracy difference (tuned - base) on the same questions, its 95% paired-bootstrap interval, and the share
    of resamples in which the tuned model is not worse (one-sided p for "fine-tuning lost accuracy", +1
    corrected)."""
    if base.ids != tuned.ids:
        raise ValueError("paired comparison needs the same questions in the same order")
    a = (base.predicted == base.gold).astype(float)
    b = (tuned.predicted == tuned.gold).astype(float)
    # medqa's paired bootstrap with one "token" per question: its delta of sums over counts is the accuracy change,
    # and its "not better" share (delta >= 0) is, for accuracy, the share of resamples where tuning lost nothing.
    test = paired_bootstrap(a, b, np.ones(len(a)), samples, seed)
    return {"acc_delta": test["loss_delta"], "acc_delta_ci95": test["loss_delta_ci95"], "p_value_lost": test["p_value"]}
