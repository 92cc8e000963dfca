"""Record-level cleaning shared by `prepare` and the external test file: check and clean each record, assign
its split from its question, deduplicate, filter by token length, and write the rejects with their reasons.
Nothing is dropped silently: every record read ends up kept or in a rejects list.

Each function takes what it reads: a source's field names and character limits (`SourceSpec`, one per source of a
mix, or the external test file's), the split settings and token limits (`DataConfig`, the same for every source).
"""

from __future__ import annotations

import difflib
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from medqa.cleaning import clean_text, is_greeting_only, normalize_key
from medqa.errors import DataError
from medqa.schema import DataConfig
from medqa.sources import MalformedLine, SourceSpec


@dataclass
class Candidate:
    index: int
    question: str
    answer: str
    key: str  # normalised question: the dedup and split key
    split: str = ""
    source: str = ""  # data.sources' name ("" with data.source alone)


def check_record(rec: Any, spec: SourceSpec) -> tuple[str, str] | tuple[None, str]:
    """Return (question, answer) cleaned, or (None, reason): the record read with its source's field names and
    checked against its character limits."""
    if isinstance(rec, MalformedLine):
        return None, "malformed_json"
    if not isinstance(rec, dict):
        return None, "not_an_object"
    fields = {}
    for role, name in (("question", spec.question_field), ("answer", spec.answer_field)):
        value = rec.get(name)
        if value is None:
            return None, f"missing_{role}"
        if not isinstance(value, str):
            return None, f"{role}_not_a_string"
        fields[role] = clean_text(value)
    q, a = fields["question"], fields["answer"]
    if not q:
        return None, "empty_question"
    if not a:
        return None, "empty_answer"
    if len(q) < spec.min_question_chars or is_greeting_only(q):
        return None, "question_too_short"
    if len(a) < spec.min_answer_chars:
        return None, "answer_too_short"
    return q, a


def split_of(key: str, data: DataConfig) -> str:
    """Deterministic split from a hash of the normalised question (data.seed, data.*_fraction): the same question
    always lands in the same split, so no question is in two splits, and adding records never moves existing ones."""
    digest = hashlib.sha256(f"{data.seed}\x00{key}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < data.train_fraction:
        return "train"
    return "val" if u < data.train_fraction + data.val_fraction else "test"


def check_fields_present(records: list[Any], source: str, fields: dict[str, tuple[str, str]]) -> None:
    """Stop when a configured field is in none of the records: `fields` maps a role (question, answer) to
    (field name, the config key that names it)."""
    objects = [r for r in records if isinstance(r, dict) and not isinstance(r, MalformedLine)]
    if not objects:
        return
    configured = [name for name, _ in fields.values()]
    for role, (name, key) in fields.items():
        if not any(name in r for r in objects):
            seen = sorted({str(k) for r in objects[:1000] for k in r})
            others = [k for k in seen if k not in configured] or seen
            guess = (difflib.get_close_matches(role, others, n=1, cutoff=0.3) or others)[0]
            raise DataError(
                f"{source}: field {name!r} ({key}) appears in none of its {len(objects)} "
                f"records. Fields present: {', '.join(seen)}. Set {key} to the field that holds the "
                f"{role}, e.g. `{key}={guess}`."
            )


def length_reject(
    cand: Candidate, question_tokens: int, answer_tokens: int, data: DataConfig, records: list[Any]
) -> dict | None:
    """The reject entry for a candidate over data.max_question_tokens or data.max_answer_tokens, else None."""
    if question_tokens > data.max_question_tokens:
        reason, tokens = "question_too_long", question_tokens
    elif answer_tokens > data.max_answer_tokens:
        reason, tokens = "answer_too_long", answer_tokens
    else:
        return None
    return {"index": cand.index, "reason": reason, "detail": f"{tokens} tokens", "record": records[cand.index]}


# Reasons whose name alone would mislead a reader (the external test file leaves out train and val questions).
REASON_TEXT = {"in_training_data": "also in our train or val split"}


def describe_counts(counts: dict[str, int]) -> str:
    """Rejected counts as a reader says them, largest first: "3 empty answer, 2 answer too short" ("none" if
    empty)."""
    items = sorted(((n, r) for r, n in counts.items() if n), key=lambda x: (-x[0], x[1]))
    return ", ".join(f"{n} {REASON_TEXT.get(r, r.replace('_', ' '))}" for n, r in items) or "none"


def write_rejects(path: Path, rejected: list[dict]) -> None:
    """One JSON line per rejected record (index, reason, detail, the record as read)."""
    # backslashreplace: a lone surrogate in a rejected raw record is written as its JSON escape (\\ud800).
    with open(path, "w", encoding="utf-8", errors="backslashreplace") as f:
        for r in rejected:
            f.write(json.dumps(r, ensure_ascii=False, default=str) + "\n")


def clean_records(records: list[Any], spec: SourceSpec) -> tuple[list[Candidate], list[dict]]:
    """Validate and clean every record of one source (character-level checks, `check_record`); duplicates are kept
    here, so that a later length filter can never drop the only valid copy of a question. The candidates have no
    split yet: `split_of` gives prepare's, the external test file's are all test."""
    kept: list[Candidate] = []
    rejected: list[dict] = []
    for index, rec in enumerate(tqdm(records, desc="clean", disable=len(records) < 5000, leave=False)):
        q, reason_or_a = check_record(rec, spec)
        if q is None:
            rejected.append({"index": index, "reason": reason_or_a, "record": rec})
            continue
        kept.append(Candidate(index, q, reason_or_a, normalize_key(q)))
    return kept, rejected


def dedupe(cands: list[Candidate], records: list[Any]) -> tuple[list[Candidate], list[dict]]:
    """Keep the first candidate of each normalised question (candidates that passed every filter, in source
    order); the others are rejected as duplicates of it."""
    kept: list[Candidate] = []
    rejected: list[dict] = []
    first_seen: dict[str, Candidate] = {}
    for cand in cands:
        first = first_seen.get(cand.key)
        if first is not None:
            same = (first.question, first.answer) == (cand.question, cand.answer)
            of = f" of source {first.source}" if first.source else ""
            rejected.append(
                {
                    "index": cand.index,
                    "reason": "duplicate_exact" if same else "duplicate_question",
                    "detail": f"same question as record {first.index}{of}",
                    "record": records[cand.index],
                }
            )
            continue
        first_seen[cand.key] = cand
        kept.append(cand)
    return kept, rejected


def tiny_training_texts(cands: list[Candidate], template: str) -> list[str]:
    """What the tiny model's vocabulary is learned from: the train split as the model will see it (`template`:
    prompt.template)."""
    return [template.replace("{question}", c.question) + " " + c.answer for c in cands if c.split == "train"]
