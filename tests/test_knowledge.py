"""Knowledge scoring in one forward per question (`medqa.pubmedqa.score_knowledge`): the same log-likelihoods as
the three-forward `score_items` (lm-eval's definition), the abstract loss equal to the model's own loss on the
context, and the guard that keeps knowledge dev questions out of a reported figure."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from medqa.pubmedqa import (
    CHOICES,
    DEFAULT_DEV,
    abstract_loss,
    check_no_dev_overlap,
    context_text,
    forwards_saved,
    load_items,
    paired_text,
    score_items,
    score_knowledge,
)


class SplitTokenizer:
    """Words and punctuation, one id each, except "maybe", which is two tokens ("may", "be") like BioGPT's
    " maybe"; a start token 1 like BioGPT's </s>."""

    pad_token_id = 0

    def __init__(self, split_maybe: bool = True):
        self.vocab = {"<pad>": 0, "</s>": 1}
        self.split = split_maybe

    def __call__(self, text):
        words = re.findall(r"\w+|[^\w\s]", text)
        if self.split:
            words = [p for w in words for p in (("may", "be") if w == "maybe" else (w,))]
        return {"input_ids": [1] + [self.vocab.setdefault(w, len(self.vocab)) for w in words]}


def _tiny_biogpt(vocab: int):
    from transformers import BioGptConfig, BioGptForCausalLM

    torch.manual_seed(0)
    cfg = BioGptConfig(
        vocab_size=vocab,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
    )
    return BioGptForCausalLM(cfg).eval()


@pytest.mark.parametrize("split_maybe", [False, True])
@pytest.mark.parametrize("max_length", [None, 40, 12])
def test_one_forward_equals_three_forwards(split_maybe, max_length):
    items = load_items(DEFAULT_DEV)[:6]
    tok = SplitTokenizer(split_maybe)
    for item in items:  # fix the ids first
        for choice in CHOICES:
            tok(context_text(item) + " " + choice)
    model = _tiny_biogpt(len(tok.vocab))
    three = score_items(model, tok, items, batch_size=4, max_length=max_length)
    one = score_knowledge(model, tok, items, batch_size=4, max_length=max_length)
    assert one.loglik == pytest.approx(three.loglik, abs=1e-5)
    assert (one.predicted == three.predicted).all() and one.ids == three.ids
    rows, before = forwards_saved(tok, items, max_length or 512)
    if not split_maybe:
        assert (rows, before) == (6, 18)  # one forward per question instead of three
    elif max_length is None:
        assert rows == 6  # " maybe" rides on the same row
    else:
        assert 6 <= rows <= 18


def test_one_forward_on_the_biogpt_tokenizer(biogpt_tokenizer_dir):
    """BioGPT's " maybe" is two tokens: it is appended to the context's row; numbers equal score_items'."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(biogpt_tokenizer_dir))
    items = load_items(DEFAULT_DEV)[:4]
    model = _tiny_biogpt(len(tok))
    three = score_items(model, tok, items, batch_size=3)
    one = score_knowledge(model, tok, items, batch_size=3)
    assert one.loglik == pytest.approx(three.loglik, abs=1e-5)
    assert forwards_saved(tok, items, 512) == (4, 12)


def test_abstract_loss_is_the_models_own_loss_on_the_context():
    """An independent computation: transformers' mean causal-LM loss on each context, times its predicted tokens."""
    items = load_items(DEFAULT_DEV)[:5]
    tok = SplitTokenizer()
    for item in items:
        for choice in CHOICES:
            tok(context_text(item) + " " + choice)
    model = _tiny_biogpt(len(tok.vocab))
    scores = score_knowledge(model, tok, items, batch_size=2)
    total, count = 0.0, 0
    for q, item in enumerate(items):
        ids = torch.tensor([tok(context_text(item))["input_ids"]])
        with torch.no_grad():
            loss = model(input_ids=ids, labels=ids).loss.item()
        n = ids.shape[1] - 1
        assert scores.text_tokens[q] == n
        assert scores.text_nll[q] == pytest.approx(loss * n, rel=1e-5)
        total, count = total + loss * n, count + n
    assert abstract_loss(scores) == pytest.approx(total / count, rel=1e-5)
    same = paired_text(scores, scores, samples=200)
    assert same["abstract_delta"] == 0 and same["abstract_change"] == 0


def test_evaluated_questions_never_overlap_the_dev_set(tmp_path):
    from medqa.errors import DataError

    dev = json.loads(DEFAULT_DEV.read_text())
    check_no_dev_overlap(load_items(), "pubmedqa_test.json")  # the shipped test file: no overlap
    mixed = tmp_path / "ori_pqal.json"  # PubMedQA's own file holds all 1,000, the dev ones among them
    mixed.write_text(
        json.dumps(
            {
                x["id"]: {"QUESTION": x["question"], "CONTEXTS": x["contexts"], "final_decision": x["answer"]}
                for x in dev[:3]
            }
        )
    )
    with pytest.raises(DataError) as err:
        check_no_dev_overlap(load_items(mixed), mixed)
    text = str(err.value)
    assert str(mixed) in text and "3 of its 3" in text and dev[0]["id"] in text and "pubmedqa_test.json" in text
    assert "\n" not in text  # one paragraph


def test_scores_are_finite_and_text_tokens_counted():
    items = load_items(DEFAULT_DEV)[:3]
    tok = SplitTokenizer(False)
    for item in items:
        for choice in CHOICES:
            tok(context_text(item) + " " + choice)
    scores = score_knowledge(_tiny_biogpt(len(tok.vocab)), tok, items)
    assert np.isfinite(scores.loglik).all() and (scores.text_tokens > 10).all()


def test_base_scores_are_computed_once_per_workdir(tmp_path, monkeypatch):
    """A second Probe (another trial, the frontier, a later stage) reads the base model's scores from the workdir's
    cache instead of scoring them again; another key (model files, dtype) scores anew."""
    from medqa import knowledge
    from medqa.knowledge import Probe

    items = load_items(DEFAULT_DEV)[:4]
    tok = SplitTokenizer(False)
    for item in items:
        for choice in CHOICES:
            tok(context_text(item) + " " + choice)
    model = _tiny_biogpt(len(tok.vocab))
    calls = []
    real = knowledge.score_knowledge

    def counting(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(knowledge, "score_knowledge", counting)
    key = {"base_model": "abc", "precision": "float32"}
    first = Probe(items, 2, tmp_path, key).base(model, tok)
    again = Probe(items, 2, tmp_path, key).base(model, tok)
    assert len(calls) == 1 and again.ids == first.ids
    assert np.array_equal(again.loglik, first.loglik) and np.array_equal(again.text_nll, first.text_nll)
    Probe(items, 2, tmp_path, {**key, "precision": "bfloat16"}).base(model, tok)
    assert len(calls) == 2
    measured = Probe(items, 2, tmp_path, key).measure(model, tok)  # the model is the base: nothing changed
    assert measured["knowledge_change"] == 0 and measured["abstract_change"] == 0 and len(calls) == 3
    probe = Probe(items, 2, tmp_path, key)
    probe.cache_file().write_text("{damaged")
    probe.base(model, tok)  # a damaged cache is scored again, not trusted
    assert len(calls) == 4


def test_choice_loss_is_the_gold_answers_cross_entropy_among_the_three():
    from medqa.knowledge import choice_loss
    from medqa.pubmedqa import PubMedQAScores

    ll = np.log(np.array([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]])) - 3.0  # unnormalised: a constant per row
    s = PubMedQAScores(["a", "b"], np.array([0, 2]), ll, np.ones(3), np.ones(3))
    assert choice_loss(s) == pytest.approx((-np.log(0.5) - np.log(0.3)) / 2)
