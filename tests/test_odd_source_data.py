"""`prepare` on odd source data: the length filter runs before deduplication, control characters and lone surrogates
never reach the splits or the tokenizer, and broken, binary, damaged, empty or unreadable sources each get one clear
message."""

from __future__ import annotations

import json
from unittest import mock

import pytest
from test_prepare_inputs import GOOD_A, GOOD_Q, cfg_for, write_records

from medqa.errors import DataError
from medqa.prepare import prepare


def _one_split(*extra):
    return ("data.train_fraction=1.0", "data.val_fraction=0", "data.test_fraction=0", *extra)


# ------------------------------------------------------------------------------------------ dedupe order


def test_length_filter_runs_before_dedupe(tmp_path, tiny_model_dir):
    """The first copy of a question is too long; the valid later copy is kept (not rejected as a duplicate)."""
    long_answer = " ".join([GOOD_A] * 40)
    records = [
        {"input": GOOD_Q, "output": long_answer},
        {"input": GOOD_Q, "output": GOOD_A},
        {"input": GOOD_Q, "output": GOOD_A + " Again."},
    ]
    cfg = cfg_for(
        tmp_path, write_records(tmp_path / "r.json", records), tiny_model_dir, *_one_split("data.max_answer_tokens=300")
    )
    result = prepare(cfg)
    assert result.report["rejected"] == {"answer_too_long": 1, "duplicate_question": 1}
    kept = result.splits["train"]
    assert [r["index"] for r in kept] == [1] and kept[0]["answer"] == GOOD_A
    rejected = [json.loads(x) for x in (tmp_path / "data" / "rejected.jsonl").read_text().splitlines()]
    assert [(r["index"], r["reason"]) for r in rejected] == [(0, "answer_too_long"), (2, "duplicate_question")]
    assert "record 1" in rejected[1]["detail"]


# ------------------------------------------------------------------------------------------ control characters


def test_control_characters_never_reach_the_splits_or_the_tokenizer(tmp_path, tiny_model_dir):
    import datasets

    dirty_q = "I have\x00 had a dry cough\x07 and \x1b[31mmild fever\x1b[0m for three days, what should I do?\ud800"
    records = [
        {"input": dirty_q, "output": GOOD_A + "\x08\x1b]0;title\x07"},
        {"input": GOOD_Q + " Also\u200b a rash.", "output": "\ufeff" + GOOD_A},
        {"input": "\x00\x07\x1b[0m", "output": GOOD_A},
    ]  # nothing left: rejected, counted
    cfg = cfg_for(tmp_path, write_records(tmp_path / "r.json", records), tiny_model_dir, *_one_split())
    result = prepare(cfg)
    report = result.report
    assert report["kept"]["train"] == 2 and report["rejected"] == {"empty_question": 1}
    assert report["control_characters_removed"] == 3
    text = (tmp_path / "data" / "train_data.json").read_text(encoding="utf-8")
    for bad in ("\\u0000", "\\u0007", "\\u001b", "\\u0008", "\\ud800", "\\u200b", "\\ufeff"):
        assert bad not in text.lower()
    kept = json.loads(text)
    assert kept[0]["question"] == "I have had a dry cough and mild fever for three days, what should I do?"
    # The raw record is kept, unchanged but writable, in rejected.jsonl.
    rejected = [json.loads(x) for x in (tmp_path / "data" / "rejected.jsonl").read_text().splitlines()]
    assert rejected[0]["record"]["input"] == "\x00\x07\x1b[0m"
    ds = datasets.load_from_disk(str(tmp_path / "tokenized" / "tokenized_train"))
    assert len(ds) == 2


def test_cleaning_keeps_text_around_odd_controls():
    from medqa.cleaning import clean_text

    # an operating-system command without its terminator must not eat the rest of the question
    assert clean_text("I have fever \x1b]and a long question about it") == "I have fever and a long question about it"
    assert clean_text("title \x1b]0;x\x07 kept") == "title kept"
    # controls that are white space separate words instead of gluing them
    for ws in ("\x0b", "\x1c", "\x1d", "\x1e", "\x1f", "\x85"):
        assert clean_text(f"Dose{ws}10 mg") == "Dose 10 mg"


def test_lone_surrogate_in_a_rejected_record_is_written(tmp_path, tiny_model_dir):
    records = [{"input": "short \ud83d", "output": GOOD_A}, {"input": GOOD_Q, "output": GOOD_A}]
    cfg = cfg_for(tmp_path, write_records(tmp_path / "r.json", records), tiny_model_dir, *_one_split())
    assert prepare(cfg).report["rejected"] == {"question_too_short": 1}
    rejected = json.loads((tmp_path / "data" / "rejected.jsonl").read_text(encoding="utf-8").splitlines()[0])
    assert rejected["record"]["input"] == "short \ud83d"


# ------------------------------------------------------------------------------------------ bad sources


def _error(cfg) -> str:
    with pytest.raises(DataError) as info:
        prepare(cfg)
    return str(info.value)


def test_folder_that_is_not_a_datasets_folder(tmp_path, tiny_model_dir):
    folder = tmp_path / "exports"
    folder.mkdir()
    write_records(folder / "records.json", [{"input": GOOD_Q, "output": GOOD_A}])
    message = _error(cfg_for(tmp_path, folder, tiny_model_dir))
    assert str(folder) in message and "not a saved `datasets` folder" in message
    assert f"data.source={folder / 'records.json'}" in message
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "holds nothing" in _error(cfg_for(tmp_path, empty, tiny_model_dir))


def test_damaged_datasets_folder(tmp_path, tiny_model_dir):
    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "state.json").write_text("{not json")
    message = _error(cfg_for(tmp_path, folder, tiny_model_dir))
    assert "could not be loaded" in message and str(folder) in message


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("records.json", b"PAR1\x00\x00binary", "a Parquet file"),
        ("records.json", b"\x1f\x8b\x08\x00gz", "gzip-compressed"),
        ("records.csv", b'input,output\n"unterminated,x\n' + b"a" * 10, "not valid CSV"),
    ],
)
def test_binary_and_broken_files(tmp_path, tiny_model_dir, name, content, expected):
    path = tmp_path / name
    path.write_bytes(content)
    message = _error(cfg_for(tmp_path, path, tiny_model_dir))
    assert expected in message and str(path) in message


def test_csv_stray_quote_does_not_swallow_later_rows(tmp_path, tiny_model_dir):
    """A quote that is never closed is an error naming the record, not one giant field holding every later row."""
    path = tmp_path / "records.csv"
    rows = [f'"{GOOD_Q}","{GOOD_A}"' for _ in range(5)]
    rows[1] = f'"{GOOD_Q} (oops),"{GOOD_A}"'
    path.write_text("input,output\n" + "\n".join(rows) + "\n", encoding="utf-8")
    message = _error(cfg_for(tmp_path, path, tiny_model_dir))
    assert "not valid CSV" in message and "line 3" in message


def test_csv_with_nul_bytes_and_huge_fields(tmp_path, tiny_model_dir):
    import csv

    path = tmp_path / "records.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["input", "output"])
        w.writerow([GOOD_Q + "\x00", GOOD_A])
        w.writerow([GOOD_Q + " Second.", "x" * 200_000])  # over the csv module's default 128 KiB field limit
    result = prepare(cfg_for(tmp_path, path, tiny_model_dir, *_one_split()))
    assert result.report["read"] == 2
    assert result.report["kept"]["train"] + sum(result.report["rejected"].values()) == 2


def test_empty_sources(tmp_path, tiny_model_dir):
    for name, content in (("empty.json", "[]"), ("empty.jsonl", "\n\n"), ("empty.csv", "input,output\n")):
        path = tmp_path / name
        path.write_text(content)
        message = _error(cfg_for(tmp_path, path, tiny_model_dir))
        assert "holds no records" in message and str(path) in message


def test_unreadable_file(tmp_path, tiny_model_dir):
    path = write_records(tmp_path / "r.json", [{"input": GOOD_Q, "output": GOOD_A}])
    with mock.patch("pathlib.Path.read_bytes", side_effect=PermissionError(13, "Permission denied")):
        message = _error(cfg_for(tmp_path, path, tiny_model_dir))
    assert "Could not read" in message and "Permission denied" in message
