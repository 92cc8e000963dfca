"""`medqa evaluate` on another source's test file (iCliniq-style field names), cleaned as prepare cleans, never
re-split, every record accounted for; and its bad-input messages."""

from __future__ import annotations

import json

import pytest

from conftest import REAL_500, demo_config, prepare_demo
from medqa.errors import DataError

QUICK = ["train.max_steps=10", "train.eval_steps=5", "eval.bootstrap_samples=50", "evaluate.num_questions=2",
         "generate.max_new_tokens=4", "evaluate.pubmedqa_questions=0"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from medqa.train import train

    workdir = prepare_demo(tmp_path_factory.mktemp("external"), *QUICK)
    train(demo_config(workdir, *QUICK))
    return workdir


def _icliniq(tmp_path, workdir) -> tuple:
    real = json.loads(REAL_500.read_text())[:20]
    records = [{"input": r["input"], "answer_icliniq": r["output"], "answer_chatgpt": "Ask a doctor."} for r in real]
    train_q = json.loads((workdir / "data" / "train_data.json").read_text())[0]["question"]
    records += [{"input": real[0]["input"], "answer_icliniq": real[0]["output"]},  # a duplicate
                {"input": train_q.upper() + "!", "answer_icliniq": real[1]["output"]},  # seen in training
                {"input": real[2]["input"]},  # no answer
                {"input": "", "answer_icliniq": real[3]["output"]},  # no question
                "not a record"]
    path = tmp_path / "iCliniq.json"
    path.write_text(json.dumps(records))
    return path, len(records)


def test_external_file_scored_beside_the_test_split(trained, tmp_path):
    from medqa.evaluate import evaluate

    path, n = _icliniq(tmp_path, trained)
    cfg = demo_config(trained, *QUICK, f"evaluate.external_test={path}", "evaluate.external_name=iCliniq",
                      "evaluate.external_answer_field=answer_icliniq")
    result = evaluate(cfg)
    ext = result.report["external"]
    assert ext["read"] == n and ext["read"] == ext["kept"] + sum(ext["rejected"].values())
    assert ext["rejected"]["in_training_data"] == 1 and ext["rejected"]["missing_answer"] == 1
    assert ext["rejected"]["empty_question"] == 1 and ext["rejected"]["not_an_object"] == 1
    assert ext["rejected"].get("duplicate_exact", 0) + ext["rejected"].get("duplicate_question", 0) == 1
    rejected = (trained / "outputs" / "external" / "rejected.jsonl").read_text().splitlines()
    assert len(rejected) == sum(ext["rejected"].values())
    for name, m in result.report["models"].items():
        assert m["external"]["examples"] == ext["kept"] and m["external"]["answer_loss"] > 0
    assert "vs_base" in result.report["models"]["fine-tuned"]["external"]
    md = result.report_md.read_text()
    assert "## Another data set: iCliniq" in md and "| fine-tuned |" in md


def test_external_file_bad_inputs(trained, tmp_path):
    from medqa.external import load_external
    from medqa.modeling import load_tokenizer

    path, _ = _icliniq(tmp_path, trained)
    tokenizer = load_tokenizer(demo_config(trained))
    cfg = demo_config(trained, f"evaluate.external_test={path}")  # default answer field `output`: not in this file
    with pytest.raises(DataError) as info:
        load_external(cfg, tokenizer)
    message = str(info.value)
    assert "evaluate.external_answer_field" in message and "answer_icliniq" in message and str(path) in message
    with pytest.raises(DataError, match="not found"):
        load_external(demo_config(trained, f"evaluate.external_test={tmp_path / 'missing.json'}"), tokenizer)
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    with pytest.raises(DataError, match="holds no records"):
        load_external(demo_config(trained, f"evaluate.external_test={empty}"), tokenizer)
