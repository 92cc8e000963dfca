"""`prepare` on the shipped sample and on every kind of bad input."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from conftest import REPO, SAMPLE, demo_config

from medqa.cli import main
from medqa.errors import DataError
from medqa.prepare import prepare


def cfg_for(tmp_path: Path, source, tiny_model_dir: Path, *overrides: str):
    return demo_config(tmp_path, f"data.source={source}", f"model.name_or_path={tiny_model_dir}", *overrides)


def write_records(path: Path, records) -> Path:
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


GOOD_Q = "I have had a dry cough and mild fever for three days, what should I do?"
GOOD_A = "Hello, this sounds like a viral infection. Drink plenty of fluids, rest, and take paracetamol for fever."


def test_demo_builds_tiny_model_and_shows_cleaning(tmp_path):
    cfg = demo_config(tmp_path)
    result = prepare(cfg)
    report = result.report
    assert (tmp_path / "models" / "tiny-biogpt" / "config.json").exists()
    assert (tmp_path / "models" / "tiny-biogpt" / "model.safetensors").exists()
    assert report["read"] == len(json.loads(SAMPLE.read_text()))
    assert report["read"] == sum(report["kept"].values()) + sum(report["rejected"].values())
    # The planted noise in the sample is caught: duplicates, empty answer, "Brief", "Hello sir", bad types.
    for reason in (
        "duplicate_exact",
        "duplicate_question",
        "empty_answer",
        "answer_too_short",
        "question_too_short",
        "missing_answer",
        "question_not_a_string",
    ):
        assert report["rejected"].get(reason, 0) >= 1, reason
    kept = [r for s in ("train", "val", "test") for r in json.loads((tmp_path / "data" / f"{s}_data.json").read_text())]
    text = " ".join(r["question"] + " " + r["answer"] for r in kept)
    assert "Chat Doctor" not in text and "<br" not in text and "&amp;" not in text and "@" not in text


def test_rerun_uses_cache_and_is_identical(tmp_path, tiny_model_dir):
    cfg = cfg_for(tmp_path, SAMPLE, tiny_model_dir)
    prepare(cfg)
    cache = sorted((tmp_path / ".cache" / "prepare").glob("*.arrow"))
    # Everything but the manifest (which records the time it was written) is byte-identical.
    first = {
        p: p.read_bytes() for p in (tmp_path / "tokenized").rglob("*") if p.is_file() and p.name != "manifest.json"
    }
    mtimes = [p.stat().st_mtime_ns for p in cache]
    prepare(cfg)
    assert sorted((tmp_path / ".cache" / "prepare").glob("*.arrow")) == cache
    assert [p.stat().st_mtime_ns for p in cache] == mtimes  # read, not rewritten
    assert {
        p: p.read_bytes() for p in (tmp_path / "tokenized").rglob("*") if p.is_file() and p.name != "manifest.json"
    } == first


def test_jsonl_csv_and_datasets_folder_sources(tmp_path, tiny_model_dir):
    import datasets

    records = json.loads(SAMPLE.read_text())[:60]
    rows = [
        r
        for r in records
        if isinstance(r, dict) and isinstance(r.get("input"), str) and isinstance(r.get("output"), str)
    ]
    jsonl = tmp_path / "r.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n{not json\n")
    out = prepare(cfg_for(tmp_path / "a", jsonl, tiny_model_dir)).report
    assert out["read"] == len(rows) + 1 and out["rejected"]["malformed_json"] == 1
    with open(tmp_path / "r.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["instruction", "input", "output"])
        w.writeheader()
        w.writerows(rows)
    out_csv = prepare(cfg_for(tmp_path / "b", tmp_path / "r.csv", tiny_model_dir)).report
    assert out_csv["kept"] == {k: v for k, v in out["kept"].items()}
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "folder"))
    out_ds = prepare(cfg_for(tmp_path / "c", tmp_path / "folder", tiny_model_dir)).report
    assert out_ds["kept"] == out["kept"]


def test_record_level_problems_are_rejected_not_fatal(tmp_path, tiny_model_dir):
    records = [
        {"input": GOOD_Q, "output": GOOD_A},
        "just a string",
        {"input": GOOD_Q + " Also headache.", "answer": "wrong field name"},
        {"input": 12345, "output": GOOD_A},
        {"input": GOOD_Q.upper(), "output": GOOD_A},
        {"input": "Hello sir", "output": GOOD_A},
        {"input": GOOD_Q + " And nausea.", "output": "Brief"},
        {"input": GOOD_Q + " Worse at night.", "output": "<br>"},
    ]
    cfg = cfg_for(
        tmp_path,
        write_records(tmp_path / "r.json", records),
        tiny_model_dir,
        "data.train_fraction=1.0",
        "data.val_fraction=0",
        "data.test_fraction=0",
    )
    report = prepare(cfg).report
    assert report["kept"]["train"] == 1
    assert report["rejected"] == {
        "not_an_object": 1,
        "missing_answer": 1,
        "question_not_a_string": 1,
        "duplicate_question": 1,
        "question_too_short": 1,
        "answer_too_short": 1,
        "empty_answer": 1,
    }
    rejected = [json.loads(x) for x in (tmp_path / "data" / "rejected.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rejected] == list(range(1, 8))
    assert rejected[0]["record"] == "just a string"


def test_too_long_in_tokens_rejected_and_no_eos_label_after_a_cut_answer(tmp_path, tiny_model_dir):
    import datasets

    long_answer = " ".join([GOOD_A] * 40)
    records = [{"input": GOOD_Q, "output": long_answer}, {"input": GOOD_Q + " (2)", "output": GOOD_A}]
    cfg = cfg_for(
        tmp_path,
        write_records(tmp_path / "r.json", records),
        tiny_model_dir,
        "data.max_answer_tokens=300",
        "data.train_fraction=1.0",
        "data.val_fraction=0",
        "data.test_fraction=0",
    )
    assert prepare(cfg).report["rejected"] == {"answer_too_long": 1}
    cfg = cfg_for(
        tmp_path,
        tmp_path / "r.json",
        tiny_model_dir,
        "data.max_length=64",
        "data.train_fraction=1.0",
        "data.val_fraction=0",
        "data.test_fraction=0",
    )
    report = prepare(cfg).report
    assert report["truncated"] == 1
    ds = datasets.load_from_disk(str(tmp_path / "tokenized" / "tokenized_train"))
    assert max(ds["length"]) == 64
    assert all(ids[-1] == 2 for ids in ds["input_ids"])  # the sequence still ends with EOS...
    by_length = {len(ids): labels for ids, labels in zip(ds["input_ids"], ds["labels"])}
    cut, whole = by_length[64], by_length[min(by_length)]
    assert cut[-1] == -100 and cut[-2] != -100  # ...but after a cut answer EOS is not a target
    assert whole[-1] == 2  # a whole answer still learns to stop


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "not found"),
        (b'[{"input": "a", "output": "b"},\n {"input": "c" "output": "d"}]', "line 2, column"),
        (b'[{"input": "caf\xe9 au lait", "output": "b"}]', "not UTF-8"),
        (b'{"a": 1, "b": 2}', "not a list of records"),
    ],
)
def test_file_level_errors(tmp_path, tiny_model_dir, content, message):
    path = tmp_path / "records.json"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError) as info:
        prepare(cfg_for(tmp_path, path, tiny_model_dir))
    assert message in str(info.value) and str(path) in str(info.value)


def test_field_absent_everywhere_and_empty_after_cleaning(tmp_path, tiny_model_dir):
    path = write_records(tmp_path / "r.json", [{"question": GOOD_Q, "output": GOOD_A}] * 3)
    with pytest.raises(
        DataError,
        match=r"field 'input' \(data.question_field\) appears in none .*`"
        r"data.question_field=question",
    ):
        prepare(cfg_for(tmp_path, path, tiny_model_dir))
    path = write_records(tmp_path / "r2.json", [{"input": "Hello sir", "output": "Brief"}] * 3)
    with pytest.raises(DataError, match="none of its 3 records survived cleaning"):
        prepare(cfg_for(tmp_path, path, tiny_model_dir))


def test_hub_dataset_offline_says_so(tmp_path, tiny_model_dir):
    with pytest.raises(DataError, match=r"(?s)offline.*configs/demo.yaml"):
        prepare(cfg_for(tmp_path, "lavita/ChatDoctor-HealthCareMagic-100k", tiny_model_dir))


def test_cli_prepare_bad_file_has_no_traceback(tmp_path, capsys):
    rc = main(
        [
            "prepare",
            "--config",
            str(REPO / "configs" / "demo.yaml"),
            f"workdir={tmp_path}",
            f"data.source={tmp_path / 'missing.json'}",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and "missing.json" in err and "data.source" in err
