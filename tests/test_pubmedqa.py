"""PubMedQA zero-shot scoring: lm-evaluation-harness's definition checked on hand-built items with known
log-likelihoods, and run on the tiny model."""

from __future__ import annotations

import math
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from medqa.pubmedqa import (
    CHOICES,
    DEFAULT_TEST,
    context_text,
    encode_pair,
    load_items,
    macro_f1,
    paired_comparison,
    score_items,
    summarize,
)


class WordTokenizer:
    """Words and punctuation, one id each (ids given on first sight); a start token 1 like BioGPT's </s>."""

    pad_token_id = 0

    def __init__(self):
        self.vocab = {"<pad>": 0, "</s>": 1}

    def __call__(self, text):
        ids = [self.vocab.setdefault(w, len(self.vocab)) for w in re.findall(r"\w+|[^\w\s]", text)]
        return {"input_ids": [1] + ids}


class UnigramModel(torch.nn.Module):
    """Every position predicts the same distribution: log p(token) = log_softmax(scores)[token], whatever came
    before, so a continuation's log-likelihood is a sum we can write down."""

    def __init__(self, scores):
        super().__init__()
        self.scores = torch.nn.Parameter(torch.tensor(scores, dtype=torch.float32))
        self.config = SimpleNamespace(max_position_embeddings=1024)

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.scores.expand(*input_ids.shape, -1))


ITEMS = [
    {"id": "a", "question": "Does X help?", "contexts": ["One sentence.", "Two."], "answer": "yes"},
    {"id": "b", "question": "Is Y bad?", "contexts": ["Only one."], "answer": "no"},
    {"id": "c", "question": "Z?", "contexts": ["Unclear."], "answer": "maybe"},
]


def test_prompt_and_pair_encoding_follow_lm_eval():
    assert context_text(ITEMS[0]) == "Abstract: One sentence.\nTwo.\nQuestion: Does X help?\nAnswer:"
    tok = WordTokenizer()
    ctx, cont = encode_pair(tok, context_text(ITEMS[1]), " no")
    assert tok("Abstract: Only one.\nQuestion: Is Y bad?\nAnswer: no")["input_ids"] == ctx + cont
    assert cont == [tok.vocab["no"]]
    # trailing white space of the context moves to the continuation
    assert encode_pair(tok, "Answer: ", "yes") == encode_pair(tok, "Answer:", " yes")


def test_loglik_accuracy_and_norm_on_known_probabilities():
    tok = WordTokenizer()
    for item in ITEMS:  # fix the ids first
        for choice in CHOICES:
            tok(context_text(item) + " " + choice)
    scores = np.zeros(len(tok.vocab))
    scores[tok.vocab["yes"]], scores[tok.vocab["no"]], scores[tok.vocab["maybe"]] = 3.0, 2.5, 2.9
    model = UnigramModel(scores.tolist())
    result = score_items(model, tok, ITEMS, batch_size=2)
    log_z = math.log(np.exp(scores).sum())
    expected = [3.0 - log_z, 2.5 - log_z, 2.9 - log_z]  # one token each
    assert result.loglik == pytest.approx(np.array([expected] * 3), abs=1e-5)
    assert list(result.predicted) == [0, 0, 0]  # always "yes": right on item a only
    assert summarize(result, 0)["acc"] == pytest.approx(1 / 3)
    # acc_norm divides by the choice's characters, as lm-eval does: "yes" 3, "no" 2, "maybe" 5
    normed = np.array(expected) / np.array([3, 2, 5])
    assert list(result.predicted_norm) == [int(np.argmax(normed))] * 3
    assert summarize(result, 0)["acc_norm"] == pytest.approx(np.mean([int(np.argmax(normed)) == g for g in (0, 1, 2)]))


def test_macro_f1_by_hand():
    gold = np.array([0, 0, 1, 1, 2])
    pred = np.array([0, 1, 1, 1, 0])
    # yes: P 1/2 R 1/2 F 0.5; no: P 2/3 R 1 F 0.8; maybe: P 0 R 0 F 0
    assert macro_f1(gold, pred) == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    # classes in neither the labels nor the predictions do not count (scikit-learn's macro average)
    assert macro_f1(np.array([0, 0, 1]), np.array([0, 0, 1])) == 1.0


def test_shipped_test_split():
    items = load_items()
    assert len(items) == 500 and DEFAULT_TEST.parent.joinpath("LICENSE").is_file()
    assert {c: sum(i["answer"] == c for i in items) for c in CHOICES} == {"yes": 276, "no": 169, "maybe": 55}


def test_knowledge_dev_set_is_the_other_500_labelled_questions():
    """The dev questions (which training and the search choose by) never overlap the test ones (which are
    reported): PQA-L's 1,000 labelled questions split 500 / 500, all labels valid."""
    from medqa.pubmedqa import DEFAULT_DEV, dev_questions

    dev, test = load_items(DEFAULT_DEV), load_items(DEFAULT_TEST)
    dev_ids, test_ids = [x["id"] for x in dev], [x["id"] for x in test]
    assert len(dev) == len(set(dev_ids)) == 500 and len(test) == len(set(test_ids)) == 500
    assert not set(dev_ids) & set(test_ids)
    assert {x["answer"] for x in dev} == set(CHOICES) and all(x["contexts"] and x["question"] for x in dev)
    # nor the same question under another id
    assert not {x["question"] for x in dev} & {x["question"] for x in test}
    picked = dev_questions(20, seed=3)
    assert len(picked) == 20 and picked == dev_questions(20, seed=3) and set(x["id"] for x in picked) <= set(dev_ids)
    assert dev_questions(0, seed=3) == []


def test_tiny_model_scores_and_paired_comparison(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    items = load_items()[:12]
    scores = score_items(model, tok, items, batch_size=5, max_length=128)
    assert scores.loglik.shape == (12, 3) and np.isfinite(scores.loglik).all() and (scores.loglik < 0).all()
    summary = summarize(scores, bootstrap_samples=200)
    assert 0 <= summary["acc_ci95"][0] <= summary["acc"] <= summary["acc_ci95"][1] <= 1
    # batching does not change a number
    again = score_items(model, tok, items, batch_size=1, max_length=128)
    assert again.loglik == pytest.approx(scores.loglik, abs=1e-4)
    same = paired_comparison(scores, again, samples=200)
    assert same["acc_delta"] == 0 and same["p_value_lost"] == 1.0


def test_bad_question_files_and_pubmedqas_own_layout(tmp_path):
    from medqa.errors import DataError

    with pytest.raises(DataError, match="Could not read"):
        load_items(tmp_path / "missing.json")
    for content, match in (
        ('[{"id": "1", "question": "q", "contexts": ["c"], "answer": "perhaps"}]', "item 0"),
        ('["just text"]', "item 0"),
        ('[{"contexts": ["c"], "answer": "yes"}]', "item 0"),
        ('[{"question": "q", "contexts": [1, 2], "answer": "no"}]', "item 0"),
        ("[]", "at least one"),
    ):
        bad = tmp_path / "bad.json"
        bad.write_text(content)
        with pytest.raises(DataError, match=match):
            load_items(bad)
    (tmp_path / "latin1.json").write_bytes(b'[{"question": "caf\xe9"}]')
    with pytest.raises(DataError, match="Could not read"):
        load_items(tmp_path / "latin1.json")
    original = tmp_path / "ori_pqal.json"
    original.write_text('{"123": {"QUESTION": "q?", "CONTEXTS": ["a", "b"], "final_decision": "maybe"}}')
    assert load_items(original) == [{"id": "123", "question": "q?", "contexts": ["a", "b"], "answer": "maybe"}]


class BigramModel(torch.nn.Module):
    """Logits depend on the previous token: a label shifted by one position gives other numbers."""

    def __init__(self, vocab: int):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.table = torch.nn.Parameter(torch.randn(vocab, vocab, generator=generator) * 3)
        self.config = SimpleNamespace(max_position_embeddings=1024)

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.table[input_ids])


@pytest.mark.parametrize("max_length", [None, 8, 4])
def test_loglik_is_each_continuation_token_given_the_one_before(max_length):
    """By hand: sum over continuation tokens of log p(token | previous token), also when the context is cut from
    the left to fit max_length."""
    tok = WordTokenizer()
    for item in ITEMS:
        for choice in CHOICES:
            tok(context_text(item) + " " + choice)
    model = BigramModel(len(tok.vocab))
    logp = torch.log_softmax(model.table, -1).detach().numpy()
    result = score_items(model, tok, ITEMS, batch_size=2, max_length=max_length)
    for q, item in enumerate(ITEMS):
        for c, choice in enumerate(CHOICES):
            ctx, cont = encode_pair(tok, context_text(item), " " + choice)
            seq = ctx + cont
            expected = sum(logp[seq[k - 1], seq[k]] for k in range(len(ctx), len(seq)))
            assert result.loglik[q, c] == pytest.approx(expected, abs=1e-4)
