"""`prepare` on the 500 real HealthCareMagic records with the real BioGPT tokenizer."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import BIOGPT_TOKENIZER, REAL_500

from medqa.cleaning import normalize_key
from medqa.config import load_config
from medqa.prompts import IGNORE_INDEX, prompt_ids

SPLITS = ("train", "val", "test")


def real_config(workdir: Path, *overrides: str):
    return load_config(
        None, [f"workdir={workdir}", f"data.source={REAL_500}", f"model.name_or_path={BIOGPT_TOKENIZER}", *overrides]
    )


@pytest.fixture(scope="module")
def prepared(real_500, biogpt_tokenizer_dir, tmp_path_factory):
    from medqa.prepare import prepare

    workdir = tmp_path_factory.mktemp("real")
    cfg = real_config(workdir)
    result = prepare(cfg)
    splits = {s: json.loads((workdir / "data" / f"{s}_data.json").read_text()) for s in SPLITS}
    rejected = [json.loads(line) for line in (workdir / "data" / "rejected.jsonl").read_text().splitlines()]
    return cfg, result, splits, rejected


def test_report_adds_up(prepared):
    cfg, result, splits, rejected = prepared
    report = json.loads((Path(cfg.workdir) / "data" / "prepare_report.json").read_text())
    assert report == result.report
    assert report["read"] == 500
    assert report["read"] == sum(report["kept"].values()) + sum(report["rejected"].values())
    assert {s: len(splits[s]) for s in SPLITS} == report["kept"]
    assert len(rejected) == sum(report["rejected"].values())
    assert sorted(r["index"] for r in rejected) == [r["index"] for r in rejected]
    kept_idx = {r["index"] for s in SPLITS for r in splits[s]}
    assert kept_idx.isdisjoint(r["index"] for r in rejected)
    assert len(kept_idx) + len(rejected) == 500


def test_short_answers_and_greeting_rejected_short_question_kept(prepared):
    _, _, splits, rejected = prepared
    raw = json.loads(REAL_500.read_text())
    short_answers = {i for i, r in enumerate(raw) if len(r["output"]) < 60}
    assert len(short_answers) == 5
    reasons = {r["index"]: r["reason"] for r in rejected}
    for i in short_answers:
        assert reasons.get(i) == "answer_too_short", (i, raw[i]["output"])
    hello = next(i for i, r in enumerate(raw) if r["input"].strip() == "Hello sir")
    assert reasons[hello] == "question_too_short"
    kept_questions = [r["question"] for s in SPLITS for r in splits[s]]
    assert "how to treat high CO2 in blood" in kept_questions
    for r in rejected:  # the rejects file keeps the original record
        assert r["record"] == raw[r["index"]]


def test_no_chat_doctor_survives(prepared):
    _, _, splits, _ = prepared
    for s in SPLITS:
        for r in splits[s]:
            assert not re.search(r"chat\s*doctor", r["answer"], re.IGNORECASE), r["answer"]
            assert not re.search(r"chat\s*doctor", r["question"], re.IGNORECASE), r["question"]


def test_case_and_punctuation_kept_question_from_input(prepared):
    _, _, splits, _ = prepared
    raw = json.loads(REAL_500.read_text())
    first = splits["train"][0]
    assert first["question"][:40] == " ".join(raw[first["index"]]["input"].split())[:40]
    assert any(any(c.isupper() for c in r["answer"]) and "," in r["answer"] for r in splits["train"])
    assert not any(r["question"].startswith("If you are a doctor") for s in SPLITS for r in splits[s])


def test_no_leakage(prepared):
    _, result, splits, _ = prepared
    keys = {s: [normalize_key(r["question"]) for r in splits[s]] for s in SPLITS}
    total = sum(len(v) for v in keys.values())
    assert len(set().union(*map(set, keys.values()))) == total
    assert not (set(keys["train"]) & set(keys["val"]))
    assert not (set(keys["train"]) & set(keys["test"]))
    assert not (set(keys["val"]) & set(keys["test"]))
    # The split follows the configured fractions roughly (80/10/10 of ~494 records).
    assert 0.7 < len(keys["train"]) / total < 0.9


def test_tokenized_rows_mask_prompt_and_end_with_eos(prepared):
    import datasets

    from medqa.modeling import load_tokenizer

    cfg, _, splits, _ = prepared
    tok = load_tokenizer(cfg)
    assert tok.pad_token_id == 1 and tok.eos_token_id == 2
    checked = exact = 0
    for s in SPLITS:
        ds = datasets.load_from_disk(str(Path(cfg.workdir) / "tokenized" / f"tokenized_{s}"))
        assert set(ds.column_names) >= {"input_ids", "attention_mask", "labels", "length"}
        by_id = {r["id"]: r for r in splits[s]}
        assert len(ds) == len(by_id)
        for row in ds:
            ids, labels = row["input_ids"], row["labels"]
            rec = by_id[row["id"]]
            assert len(ids) == len(labels) == row["length"] == sum(row["attention_mask"]) <= cfg.data.max_length
            first = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
            assert all(label == IGNORE_INDEX for label in labels[:first])
            assert all(label != IGNORE_INDEX for label in labels[first:-1])
            assert labels[first:-1] == ids[first:-1]
            assert ids[-1] == tok.eos_token_id
            # EOS is a target only after a whole answer (a cut one must not learn to stop mid-sentence)
            whole = len(tok(rec["answer"], add_special_tokens=False)["input_ids"]) == len(ids) - first - 1
            assert labels[-1] == (tok.eos_token_id if whole else IGNORE_INDEX)
            assert tok.pad_token_id not in labels
            # The first labelled token is the first answer token: the prompt is exactly what generation sees.
            assert ids[:first] == prompt_ids(tok, cfg.prompt, rec["question"], cfg.data.max_length - (len(ids) - first))
            answer_ids = tok(rec["answer"], add_special_tokens=False)["input_ids"]
            decoded = tok.decode(labels[first:-1])
            if len(ids) < cfg.data.max_length:
                assert labels[first:-1] == answer_ids
                squash = lambda t: re.sub(r"\W+", "", t.casefold())  # noqa: E731
                exact += squash(decoded) == squash(rec["answer"])
            else:  # truncated: the answer's head is kept
                assert answer_ids[: len(labels) - first - 1] == labels[first:-1]
            checked += 1
    assert checked > 450
    assert exact / checked > 0.97  # the rest differ only by Moses escaping or <unk> for rare characters


def test_two_runs_byte_identical(prepared, tmp_path):
    from medqa.prepare import prepare

    cfg, _, _, _ = prepared
    prepare(real_config(tmp_path))
    for sub in ("data", "tokenized"):
        # Everything but the manifests (which record the time they were written) is byte-identical.
        a = sorted(
            p.relative_to(Path(cfg.workdir))
            for p in (Path(cfg.workdir) / sub).rglob("*")
            if p.is_file() and p.name != "manifest.json"
        )
        b = sorted(
            p.relative_to(tmp_path) for p in (tmp_path / sub).rglob("*") if p.is_file() and p.name != "manifest.json"
        )
        assert a == b
        for rel in a:
            assert (Path(cfg.workdir) / rel).read_bytes() == (tmp_path / rel).read_bytes(), rel
