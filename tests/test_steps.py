"""A stage's steps called alone, on small hand-made inputs: what each step decides, without running the stage."""

from __future__ import annotations

import numpy as np
from conftest import demo_config


def _cand(index: int, question: str, split: str = "train"):
    from medqa.cleaning import normalize_key
    from medqa.records import Candidate

    return Candidate(index, question, f"answer {index}", normalize_key(question), split=split)


def test_prepare_keeps_a_valid_later_copy_when_the_first_is_too_long(tmp_path):
    """keep_rows filters by token length first and deduplicates after: a too-long first copy of a question leaves
    its valid later copy kept, and a third copy is a duplicate of that one."""
    import datasets

    from medqa.prepare import keep_rows, place

    cfg = demo_config(tmp_path, "data.max_question_tokens=5")
    questions = ["How long does a cold last?", "how long does a cold last", "How long does a cold last?!", "Why?"]
    records = [{"input": q, "output": f"answer {i}"} for i, q in enumerate(questions)]
    cands = [_cand(0, questions[0]), _cand(1, questions[1]), _cand(2, questions[2]), _cand(3, questions[3], "test")]
    tokenized = datasets.Dataset.from_dict(
        {
            "id": ["a", "b", "c", "d"],
            "question_tokens": [9, 5, 5, 2],
            "answer_tokens": [4, 4, 4, 4],
            "truncated": [False, True, False, False],
        }
    )
    kept = keep_rows(cfg, records, cands, [], tokenized)
    assert kept.rows == {"train": [1], "val": [], "test": [3]}
    assert [(r["index"], r["reason"]) for r in kept.rejected] == [(0, "question_too_long"), (2, "duplicate_question")]
    assert kept.rejected[1]["detail"] == "same question as record 1"
    assert kept.truncated_count == 1
    splits = place(kept, [], [], mix=False)
    assert splits["train"] == [{"id": "b", "index": 1, "question": questions[1], "answer": "answer 1"}]
    assert [r["id"] for r in splits["test"]] == ["d"] and splits["val"] == []


def test_evaluate_compares_each_fine_tuned_model_with_the_base_on_what_was_measured(tmp_path):
    """compare_to_base: every model but the base gets the paired bootstrap of its test answer-loss against the base's
    (the same numbers as calling it directly), and a vs_base for the external set only when it was scored."""
    from medqa.evaluate import ModelScores, compare_to_base
    from medqa.metrics import ExampleScores, paired_bootstrap
    from medqa.scoring import Scoring

    cfg = demo_config(tmp_path, "scoring.bootstrap_samples=200")
    rng = np.random.default_rng(0)
    tokens = rng.integers(5, 50, size=30)

    def scores(scale: float) -> ExampleScores:
        nll = tokens * scale * rng.uniform(0.9, 1.1, size=30)
        return ExampleScores([f"q{i}" for i in range(30)], nll, tokens, nll, tokens)

    base = ModelScores("base", {"external": {}}, [], scores(3.0), external=scores(3.0))
    tuned = ModelScores("fine-tuned", {"external": {}}, [], scores(2.0), external=scores(3.5))
    best = ModelScores("tuned (best trial)", {}, [], scores(3.0))
    compare_to_base(Scoring.of(cfg, ["test"]), [base, tuned, best])
    assert "vs_base" not in base.entry and "vs_base" not in base.entry["external"]
    assert tuned.entry["vs_base"] == paired_bootstrap(
        base.test.answer_nll, tuned.test.answer_nll, tokens, 200, cfg.seed
    )
    assert tuned.entry["vs_base"]["loss_delta"] < 0 < tuned.entry["external"]["vs_base"]["loss_delta"]
    assert tuned.entry["vs_base"]["p_value"] < 0.05
    assert set(best.entry) == {"vs_base"}  # no external set scored for it, no PubMedQA, no sources
