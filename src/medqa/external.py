"""A test set from another source, scored beside the in-domain test split (`evaluate.external_test`).

ChatDoctor shows generalisation on iCliniq (fields `input`, `answer_icliniq`, ...): point `evaluate.external_test` at
such a file and name its fields (`evaluate.external_question_field`, `evaluate.external_answer_field`). Its records
are read, checked and cleaned exactly as `medqa prepare` does (same cleaning, same length limits, first valid copy of
a question kept), never re-split: every kept record is a test example. A question that is also in our train split
(or val, which chose the checkpoint) is left out (`in_training_data`), so the score measures generalisation. Every
record read is kept or written to `outputs/external/rejected.jsonl` with its reason, and the counts add up. The report
also counts the kept records cut at `data.max_length` (`truncated`) and those whose question is also in the in-domain
test split (`also_in_test`): they are kept, as they come from another source, but the two test sets then overlap.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from typing import Any

from tqdm.auto import tqdm

from medqa.cleaning import normalize_key
from medqa.errors import DataError
from medqa.prompts import encode_example
from medqa.records import (
    Candidate,
    check_fields_present,
    clean_records,
    dedupe,
    describe_counts,
    length_reject,
    write_rejects,
)
from medqa.schema import Config
from medqa.sources import SourceSpec, read_records, source_spec
from medqa.workdir import load_records, paths

log = logging.getLogger(__name__)

KEY = "evaluate.external_test"


def load_external(cfg: Config, tokenizer) -> tuple[object, dict]:
    """(tokenized Dataset of the kept records, report {read, kept, rejected}); writes outputs/external/."""
    spec = external_spec(cfg)
    records = read_external(spec)
    cands, rejected = clean_external(records, spec, cfg)
    kept, dropped = tokenize_external(cands, records, tokenizer, cfg)  # too long, or a duplicate
    rejected = sorted(rejected + dropped, key=lambda r: r["index"])
    report = build_report(cfg, records, kept, rejected)
    write_external(cfg, report, rejected)
    return _dataset(kept), report


def external_spec(cfg: Config) -> SourceSpec:
    """The external test file as a source: its own field names, prepare's character limits (data.*)."""
    e = cfg.evaluate
    return source_spec(
        cfg.data,
        e.external_name,
        e.external_test,
        question_field=e.external_question_field,
        answer_field=e.external_answer_field,
        hub_split="train",  # what `read_records` reads from a Hub id or a DatasetDict folder
        max_records=0,
        key=KEY,
    )


def read_external(spec: SourceSpec) -> list[Any]:
    """The file's records, stopping with one message when it cannot be read, holds none, or lacks a field."""
    log.info("evaluate: reading the external test set %s", spec.source)
    try:
        records = read_records(spec.source, spec.hub_split)
    except DataError as exc:  # the reader names data.source; here the setting is evaluate.external_test
        raise DataError(str(exc).replace("data.source", KEY)) from None
    check_fields_present(
        records,
        spec.source,
        {
            "question": (spec.question_field, "evaluate.external_question_field"),
            "answer": (spec.answer_field, "evaluate.external_answer_field"),
        },
    )
    if not records:
        raise DataError(f"{spec.source} holds no records. Point {KEY} at a file of question/answer records.")
    return records


def clean_external(records: list[Any], spec: SourceSpec, cfg: Config) -> tuple[list[Candidate], list[dict]]:
    """The same checks and cleaning as prepare, never re-split (every candidate is a test one); a question the
    fine-tuned model trained on, or that chose its checkpoint (val), is rejected as `in_training_data`: it would
    test nothing."""
    in_train: set[str] = set()
    for split in ("train", "val"):
        in_train |= {normalize_key(r["question"]) for r in load_records(cfg, split)}
    cands, rejected = clean_records(records, spec)
    kept = []
    for cand in cands:
        if cand.key in in_train:
            rejected.append({"index": cand.index, "reason": "in_training_data", "record": records[cand.index]})
        else:
            cand.split = "test"
            kept.append(cand)
    return kept, rejected


def tokenize_external(
    cands: list[Candidate], records: list[Any], tokenizer, cfg: Config
) -> tuple[list[tuple[Candidate, Any]], list[dict]]:
    """(each kept candidate with its encoding, the rejects): prepare's token-length limits, then its dedupe (the
    first valid copy of a question kept)."""
    encoded, rejected = [], []
    for cand in tqdm(cands, desc="tokenize external", disable=len(cands) < 1000, leave=False):
        enc = encode_example(tokenizer, cfg.prompt, cand.question, cand.answer, cfg.data.max_length)
        reject = length_reject(cand, enc.question_tokens, enc.answer_tokens, cfg.data, records)
        if reject:
            rejected.append(reject)
        else:
            encoded.append((cand, enc))
    unique, duplicates = dedupe([cand for cand, _ in encoded], records)
    keep = {cand.index for cand in unique}
    return [(cand, enc) for cand, enc in encoded if cand.index in keep], rejected + duplicates


def _dataset(kept: list[tuple[Candidate, Any]]):
    import datasets

    return datasets.Dataset.from_list(
        [
            {
                "id": f"x{c.index}",
                "input_ids": enc.input_ids,
                "attention_mask": [1] * len(enc.input_ids),
                "labels": enc.labels,
                "length": len(enc.input_ids),
            }
            for c, enc in kept
        ]
    )


def build_report(cfg: Config, records: list[Any], kept: list[tuple[Candidate, Any]], rejected: list[dict]) -> dict:
    """outputs/external/report.json: read = kept + rejected; `truncated` (cut at data.max_length) and `also_in_test`
    (also a question of the in-domain test split) count kept records."""
    in_test = {normalize_key(r["question"]) for r in load_records(cfg, "test")}
    report = {
        "source": cfg.evaluate.external_test,
        "name": cfg.evaluate.external_name,
        "read": len(records),
        "kept": len(kept),
        "rejected": dict(sorted(Counter(r["reason"] for r in rejected).items())),
        "truncated": sum(enc.truncated for _, enc in kept),
        "max_length": cfg.data.max_length,
        "also_in_test": sum(c.key in in_test for c, _ in kept),
    }
    assert report["read"] == report["kept"] + sum(report["rejected"].values())
    return report


def write_external(cfg: Config, report: dict, rejected: list[dict]) -> None:
    """Write rejected.jsonl and report.json under outputs/external/; stop when no record could be scored (both
    written first, so the message can point at them)."""
    out = paths(cfg).external
    out.mkdir(parents=True, exist_ok=True)
    write_rejects(out / "rejected.jsonl", rejected)
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    if report["kept"] == 0:
        raise DataError(
            f"{report['source']}: none of its {report['read']} records could be scored (rejected: "
            f"{describe_counts(report['rejected'])}); every one is listed in {out / 'rejected.jsonl'}. Check the field "
            "names (evaluate.external_question_field, evaluate.external_answer_field)."
        )
