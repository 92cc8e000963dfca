"""`medqa evaluate` on another source's test file (iCliniq-style field names), cleaned as prepare cleans, never
re-split, every record accounted for; and its bad-input messages."""

from __future__ import annotations

import json

import pytest
from conftest import REAL_500, copy_trained, demo_config

from medqa.errors import DataError

QUICK = [
    "train.max_steps=10",
    "train.eval_steps=5",
    "scoring.bootstrap_samples=50",
    "evaluate.num_questions=2",
    "generate.max_new_tokens=4",
    "evaluate.pubmedqa_questions=0",
]


@pytest.fixture(scope="module")
def trained(trained_demo, tmp_path_factory):
    return copy_trained(trained_demo, tmp_path_factory.mktemp("external") / "w")


def _icliniq(tmp_path, workdir, extra: list | None = None, name: str = "iCliniq.json") -> tuple:
    real = json.loads(REAL_500.read_text())[:20]
    records = [{"input": r["input"], "answer_icliniq": r["output"], "answer_chatgpt": "Ask a doctor."} for r in real]
    data = workdir / "data"
    train_q = json.loads((data / "train_data.json").read_text())[0]["question"]
    val_q = json.loads((data / "val_data.json").read_text())[0]["question"]
    records += [
        {"input": real[0]["input"], "answer_icliniq": real[0]["output"]},  # a duplicate
        {"input": train_q.upper() + "!", "answer_icliniq": real[1]["output"]},  # seen in training
        {"input": val_q + " ", "answer_icliniq": real[4]["output"]},  # it chose the checkpoint: left out too
        {"input": real[2]["input"]},  # no answer
        {"input": "", "answer_icliniq": real[3]["output"]},  # no question
        "not a record",
        *(extra or []),
    ]
    path = tmp_path / name
    path.write_text(json.dumps(records))
    return path, len(records)


def _test_question_and_long_answer(workdir) -> list[dict]:
    """A question of the in-domain test split (kept, but counted) and an answer far over data.max_length (cut)."""
    real = json.loads(REAL_500.read_text())
    test_q = json.loads((workdir / "data" / "test_data.json").read_text())[0]["question"]
    return [
        {"input": test_q.lower(), "answer_icliniq": real[5]["output"]},
        {"input": real[21]["input"], "answer_icliniq": " ".join([real[21]["output"]] * 4)},
    ]


def test_external_file_scored_beside_the_test_split(trained, tmp_path):
    from medqa.evaluate import evaluate

    path, n = _icliniq(tmp_path, trained, _test_question_and_long_answer(trained))
    cfg = demo_config(
        trained,
        *QUICK,
        f"evaluate.external_test={path}",
        "evaluate.external_name=iCliniq",
        "evaluate.external_answer_field=answer_icliniq",
    )
    result = evaluate(cfg)
    ext = result.report["external"]
    assert ext["read"] == n and ext["read"] == ext["kept"] + sum(ext["rejected"].values())
    assert ext["rejected"]["in_training_data"] == 2 and ext["rejected"]["missing_answer"] == 1
    assert ext["also_in_test"] == 1 and ext["truncated"] >= 1
    assert ext["rejected"]["empty_question"] == 1 and ext["rejected"]["not_an_object"] == 1
    assert ext["rejected"].get("duplicate_exact", 0) + ext["rejected"].get("duplicate_question", 0) == 1
    rejected = (trained / "outputs" / "external" / "rejected.jsonl").read_text().splitlines()
    assert len(rejected) == sum(ext["rejected"].values())
    for m in result.report["models"].values():
        assert m["external"]["examples"] == ext["kept"] and m["external"]["answer_loss"] > 0
    assert "vs_base" in result.report["models"]["fine-tuned"]["external"]
    md = result.report_md.read_text()
    assert "## Another data set: iCliniq" in md and "| fine-tuned |" in md
    section = md.split("## Another data set")[1].split("| model |")[0]
    assert "{'" not in section and "': " not in section  # no Python dict
    assert "2 also in our train or val split" in section and "1 missing answer" in section
    assert "questions also in our train or val split are left out" in section
    assert f"{ext['truncated']} of them cut at data.max_length (256 tokens)" in section
    assert "1 of the scored questions is also in the in-domain test split: kept" in section


def test_external_report_counts_cut_records_and_the_overlap_with_test(trained, tmp_path):
    """`truncated` and `also_in_test`, against what the scored rows and the split files show."""
    from medqa.cleaning import normalize_key
    from medqa.external import load_external
    from medqa.modeling import load_tokenizer

    tokenizer = load_tokenizer(demo_config(trained))
    extra = _test_question_and_long_answer(trained)
    counts = {}
    for name, added in (("plain.json", []), ("more.json", extra)):
        path, _ = _icliniq(tmp_path, trained, added, name)
        cfg = demo_config(trained, f"evaluate.external_test={path}", "evaluate.external_answer_field=answer_icliniq")
        ds, report = load_external(cfg, tokenizer)
        # a cut example is exactly data.max_length tokens long (prompt + the answer's head + EOS)
        assert report["truncated"] == sum(n == cfg.data.max_length for n in ds["length"])
        records = json.loads(path.read_text())
        test_keys = {
            normalize_key(r["question"]) for r in json.loads((trained / "data" / "test_data.json").read_text())
        }
        kept = [records[int(i[1:])] for i in ds["id"]]
        assert report["also_in_test"] == sum(normalize_key(r["input"]) in test_keys for r in kept)
        counts[name] = report
    assert counts["more.json"]["kept"] == counts["plain.json"]["kept"] + 2  # both kept
    assert counts["more.json"]["truncated"] == counts["plain.json"]["truncated"] + 1
    assert counts["more.json"]["also_in_test"] == counts["plain.json"]["also_in_test"] + 1


def test_rejected_counts_read_as_text():
    from medqa.records import describe_counts

    assert (
        describe_counts({"answer_too_short": 2, "empty_answer": 3, "malformed_json": 0})
        == "3 empty answer, 2 answer too short"
    )
    assert describe_counts({"in_training_data": 1}) == "1 also in our train or val split"
    assert describe_counts({}) == "none"


def test_the_external_file_is_checked_with_its_own_fields_and_prepares_limits(tmp_path):
    """The external file is a source like prepare's (`SourceSpec`): evaluate's field names, data's limits."""
    from medqa.external import external_spec
    from medqa.records import check_record

    cfg = demo_config(
        tmp_path,
        "evaluate.external_test=iCliniq.json",
        "evaluate.external_answer_field=answer_icliniq",
        "data.min_answer_chars=10",
    )
    spec = external_spec(cfg)
    assert (spec.source, spec.question_field, spec.answer_field) == ("iCliniq.json", "input", "answer_icliniq")
    assert (spec.min_question_chars, spec.min_answer_chars) == (cfg.data.min_question_chars, 10)
    q = "My child has had a fever for three days, what should I do?"
    assert check_record({"input": q, "answer_icliniq": "See a doctor today."}, spec) == (q, "See a doctor today.")
    assert check_record({"input": q, "output": "See a doctor today."}, spec) == (None, "missing_answer")
    assert check_record({"input": q, "answer_icliniq": "Rest."}, spec) == (None, "answer_too_short")


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
    with pytest.raises(DataError, match="not found.*evaluate.external_test"):
        load_external(demo_config(trained, f"evaluate.external_test={tmp_path / 'missing.json'}"), tokenizer)
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    with pytest.raises(DataError, match="holds no records"):
        load_external(demo_config(trained, f"evaluate.external_test={empty}"), tokenizer)


def _tiny_encoder(folder):
    """A 2-layer BERT with a word-level vocabulary, saved like any encoder folder."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(
        set(
            "rest and drink fluids take paracetamol for the fever see a doctor if it persists "
            "your knee needs an x ray".split()
        )
    )
    folder.mkdir()
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), model_max_length=512).save_pretrained(folder)
    torch.manual_seed(0)
    BertModel(
        BertConfig(
            vocab_size=len(words), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
        )
    ).save_pretrained(folder)
    return folder


def test_bertscore_on_with_a_local_encoder(tmp_path):
    from medqa.textmetrics import bertscore

    encoder = _tiny_encoder(tmp_path / "enc")
    same = bertscore(["rest and drink fluids"], ["rest and drink fluids"], str(encoder))
    assert same["bertscore_precision"] == pytest.approx(1.0, abs=1e-5) and same["bertscore_f1"] == pytest.approx(
        1.0, abs=1e-5
    )
    other = bertscore(["see a doctor"], ["your knee needs an x ray"], str(encoder), num_layers=1)
    assert other["bertscore_f1"] < 0.999
    # an empty answer matches nothing: it scores 0, and the others keep their score in the mean
    mixed = bertscore(["", "rest and drink fluids"], ["see a doctor", "rest and drink fluids"], str(encoder))
    assert mixed["bertscore_f1"] == pytest.approx(0.5, abs=1e-5)


def test_bertscore_off_offline_with_its_message(trained, tmp_path, monkeypatch):
    from medqa.errors import ConfigError
    from medqa.report_markdown import render_markdown
    from medqa.textmetrics import BERTSCORE_OFF, bertscore

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="not a local folder and offline mode is on"):
        bertscore(["a"], ["b"], "roberta-large")
    from medqa.textmetrics import check_bertscore_encoder

    with pytest.raises(ConfigError, match="could not be loaded"):  # checked before any model is scored
        check_bertscore_encoder(str(tmp_path / "no-encoder-here"))
    report = {
        "test_examples": 1,
        "generated": 0,
        "models": {},
        "samples": [],
        "bertscore": BERTSCORE_OFF,
        "model_card": {
            "base_model": "x",
            "data": "d",
            "lora": {},
            "training": {},
            "prompt_template": "p",
            "intended_use": "i",
            "limits": "l",
            "licence": "c",
        },
    }
    md = render_markdown(report, 0)
    assert "BERTScore: off" in md and "evaluate.bertscore_model" in md
