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

from tqdm.auto import tqdm

from medqa.cleaning import normalize_key
from medqa.errors import DataError
from medqa.prompts import encode_example
from medqa.records import (
    Candidate,
    check_fields_present,
    check_record,
    dedupe,
    describe_counts,
    length_reject,
    write_rejects,
)
from medqa.schema import Config
from medqa.sources import read_records, source_spec
from medqa.workdir import load_records, paths

log = logging.getLogger(__name__)


def load_external(cfg: Config, tokenizer) -> tuple[object, dict]:
    """(tokenized Dataset of the kept records, report {read, kept, rejected}); writes outputs/external/."""
    import datasets

    e = cfg.evaluate
    log.info("evaluate: reading the external test set %s", e.external_test)
    try:
        records = read_records(e.external_test)
    except DataError as exc:  # the reader names data.source; here the setting is evaluate.external_test
        raise DataError(str(exc).replace("data.source", "evaluate.external_test")) from None
    check_fields_present(
        records,
        e.external_test,
        {
            "question": (e.external_question_field, "evaluate.external_question_field"),
            "answer": (e.external_answer_field, "evaluate.external_answer_field"),
        },
    )
    if not records:
        raise DataError(
            f"{e.external_test} holds no records. Point evaluate.external_test at a file of question/answer records."
        )
    # The same checks and cleaning as prepare, with this file's field names.
    spec = source_spec(
        cfg.data,
        e.external_name,
        e.external_test,
        question_field=e.external_question_field,
        answer_field=e.external_answer_field,
        key="evaluate.external_test",
    )
    # Questions the fine-tuned model trained on, or that chose its checkpoint (val), are not a test of anything.
    in_train: set[str] = set()
    for split in ("train", "val"):
        in_train |= {normalize_key(r["question"]) for r in load_records(cfg, split)}
    cands, rejected = [], []
    for index, rec in enumerate(records):
        q, reason_or_a = check_record(rec, spec)
        if q is None:
            rejected.append({"index": index, "reason": reason_or_a, "record": rec})
        elif normalize_key(q) in in_train:
            rejected.append({"index": index, "reason": "in_training_data", "record": rec})
        else:
            cands.append(Candidate(index, q, reason_or_a, normalize_key(q), split="test"))
    rows, kept_cands = [], []
    for cand in tqdm(cands, desc="tokenize external", disable=len(cands) < 1000, leave=False):
        enc = encode_example(tokenizer, cfg.prompt, cand.question, cand.answer, cfg.data.max_length)
        reject = length_reject(cand, enc.question_tokens, enc.answer_tokens, cfg.data, records)
        if reject:
            rejected.append(reject)
        else:
            kept_cands.append(cand)
            rows.append(enc)
    unique, duplicates = dedupe(kept_cands, records)
    rejected = sorted(rejected + duplicates, key=lambda r: r["index"])
    keep = {c.index for c in unique}
    kept = [(c, enc) for c, enc in zip(kept_cands, rows) if c.index in keep]
    ds = datasets.Dataset.from_list(
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
    in_test = {normalize_key(r["question"]) for r in load_records(cfg, "test")}
    report = {
        "source": e.external_test,
        "name": e.external_name,
        "read": len(records),
        "kept": len(ds),
        "rejected": dict(sorted(Counter(r["reason"] for r in rejected).items())),
        "truncated": sum(enc.truncated for _, enc in kept),
        "max_length": cfg.data.max_length,
        "also_in_test": sum(c.key in in_test for c, _ in kept),
    }
    assert report["read"] == report["kept"] + sum(report["rejected"].values())
    out = paths(cfg).external
    out.mkdir(parents=True, exist_ok=True)
    write_rejects(out / "rejected.jsonl", rejected)
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    if len(ds) == 0:
        raise DataError(
            f"{e.external_test}: none of its {len(records)} records could be scored (rejected: "
            f"{describe_counts(report['rejected'])}); every one is listed in {out / 'rejected.jsonl'}. Check the field "
            "names (evaluate.external_question_field, evaluate.external_answer_field)."
        )
    return ds, report
