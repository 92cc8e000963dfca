"""answer_loss: checked against an independent computation, and invariant to batching and padding."""

from __future__ import annotations

import math

import datasets
import numpy as np
import pytest
import torch

from medqa.batching import length_budget_batches
from medqa.metrics import bootstrap_ppl_ci, evaluate_answer_loss, pad_batch
from medqa.prompts import IGNORE_INDEX

PAD = 1


@pytest.fixture(scope="module")
def model():
    from transformers import BioGptConfig, BioGptForCausalLM

    torch.manual_seed(0)
    cfg = BioGptConfig(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=128,
        initializer_range=0.2,
        pad_token_id=PAD,
    )
    return BioGptForCausalLM(cfg).eval()


def make_rows(n=11, seed=0, prompt_len=None):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        p = prompt_len or int(rng.integers(3, 12))
        a = int(rng.integers(2, 20))
        ids = [2] + rng.integers(4, 99, size=p + a - 1).tolist()
        rows.append({"id": f"e{i}", "input_ids": ids, "labels": [IGNORE_INDEX] * p + ids[p:], "length": p + a})
    return rows


def independent_nll(model, rows):
    """One example at a time, no padding, log-softmax in float64, summed over answer positions."""
    total, count = 0.0, 0
    with torch.no_grad():
        for r in rows:
            logits = model(input_ids=torch.tensor([r["input_ids"]])).logits[0].double()
            logp = torch.log_softmax(logits, dim=-1)
            for t in range(1, len(r["input_ids"])):
                if r["labels"][t] != IGNORE_INDEX:
                    total -= logp[t - 1, r["labels"][t]].item()
                    count += 1
    return total / count, count


def test_answer_loss_equals_independent_nll(model):
    rows = make_rows()
    metrics, scores = evaluate_answer_loss(
        model, datasets.Dataset.from_list(rows), PAD, batch_size=4, bootstrap_samples=200
    )
    expected, count = independent_nll(model, rows)
    assert metrics["answer_tokens"] == count == sum(sum(label != IGNORE_INDEX for label in r["labels"]) for r in rows)
    assert metrics["answer_loss"] == pytest.approx(expected, abs=1e-5)
    assert metrics["answer_perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)
    assert metrics["bits_per_token"] == pytest.approx(expected / math.log(2), rel=1e-6)
    lo, hi = metrics["answer_perplexity_ci95"]
    assert lo < metrics["answer_perplexity"] < hi
    # A mean of per-example means would differ: the definition is token-weighted.
    per_example = np.mean(scores.answer_nll / scores.answer_tokens)
    assert abs(per_example - expected) > 1e-4


def test_sequence_loss_counts_every_real_token_after_the_first(model):
    rows = make_rows(5, seed=3)
    metrics, _ = evaluate_answer_loss(model, datasets.Dataset.from_list(rows), PAD, batch_size=2, bootstrap_samples=0)
    seq_rows = [{**r, "labels": [IGNORE_INDEX] + r["input_ids"][1:]} for r in rows]
    expected, count = independent_nll(model, seq_rows)
    assert metrics["sequence_tokens"] == count == sum(len(r["input_ids"]) - 1 for r in rows)
    assert metrics["sequence_loss"] == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("batch_size", [1, 2, 3, 8, 64])
def test_batch_size_and_padding_do_not_change_it(model, batch_size):
    ds = datasets.Dataset.from_list(make_rows(13, seed=1))
    ref, _ = evaluate_answer_loss(model, ds, PAD, batch_size=1, bootstrap_samples=0)
    got, _ = evaluate_answer_loss(model, ds, PAD, batch_size=batch_size, bootstrap_samples=0)
    assert got["answer_loss"] == pytest.approx(ref["answer_loss"], abs=1e-4)
    # Padding with another id changes nothing either: the attention mask hides it and labels ignore it.
    other, _ = evaluate_answer_loss(model, ds, 57, batch_size=batch_size, bootstrap_samples=0)
    assert other["answer_loss"] == pytest.approx(ref["answer_loss"], abs=1e-4)


def test_prompt_changes_loss_only_through_context(model):
    rows = make_rows(6, seed=2, prompt_len=5)
    longer = [
        {
            **r,
            "input_ids": r["input_ids"][:1] + [50] * 7 + r["input_ids"][1:],
            "labels": [IGNORE_INDEX] * 7 + r["labels"],
            "length": r["length"] + 7,
        }
        for r in rows
    ]
    base, _ = evaluate_answer_loss(model, datasets.Dataset.from_list(rows), PAD, bootstrap_samples=0)
    alt, _ = evaluate_answer_loss(model, datasets.Dataset.from_list(longer), PAD, bootstrap_samples=0)
    # Same answer tokens are counted; the prompt contributes no terms of its own ...
    assert alt["answer_tokens"] == base["answer_tokens"]
    assert alt["answer_loss"] == pytest.approx(independent_nll(model, longer)[0], abs=1e-5)
    # ... but as context it does change the predictions.
    assert alt["answer_loss"] != pytest.approx(base["answer_loss"], abs=1e-4)


def test_pad_batch_and_length_budget_batches():
    rows = make_rows(5)
    batch = pad_batch(rows, PAD)
    assert batch["input_ids"].shape == (5, max(r["length"] for r in rows))
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
    assert (batch["input_ids"][batch["attention_mask"] == 0] == PAD).all()
    batches = length_budget_batches([5, 1, 9, 3, 7], 2)
    assert batches == [[2, 4], [0, 3], [1]] and sorted(sum(batches, [])) == [0, 1, 2, 3, 4]


def test_bootstrap_interval_is_a_percentile_interval():
    nll = np.array([10.0, 20.0, 30.0, 40.0])
    tokens = np.array([10, 10, 10, 10])
    lo, hi = bootstrap_ppl_ci(nll, tokens, 2000, seed=0)
    assert math.exp(1.0) <= lo < math.exp(2.5) < hi <= math.exp(4.0)
    assert bootstrap_ppl_ci(np.ones(5), np.ones(5, dtype=int), 500, 0) == [math.e, math.e]
