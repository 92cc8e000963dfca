"""Stage 1, `prepare(cfg)`: load, clean, deduplicate, split without leakage, tokenize with the prompt masked.

Reads `data.source`; writes under `workdir`:
  data/{train,val,test}_data.json   kept records: id, index (in the source), question, answer
  data/rejected.jsonl               every record not kept: index, reason, detail, the original record
  data/prepare_report.json          {"read": N, "kept": {...}, "rejected": {...}}; read = kept + rejected
  tokenized/tokenized_{split}       datasets.save_to_disk: id, input_ids, attention_mask, labels, length
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from medqa.artifacts import atomic_dir, write_json
from medqa.cleaning import clean_text, has_control_chars, is_greeting_only, normalize_key
from medqa.schema import Config
from medqa.errors import DataError
from medqa.fasttok import fast_encoder
from medqa.manifest import fingerprint_source, write_manifest
from medqa.modeling import load_tokenizer, tokenizer_info, tokenizer_path, wants_tiny
from medqa.prompts import ENCODE_VERSION, encode_example
from medqa.sources import MalformedLine, read_records

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
TOKENIZED_COLUMNS = ["id", "input_ids", "attention_mask", "labels", "length"]


@dataclass
class Candidate:
    index: int
    question: str
    answer: str
    key: str  # normalised question: the dedup and split key
    split: str = ""


@dataclass
class PrepareResult:
    report: dict[str, Any]
    data_dir: Path
    tokenized_dir: Path
    cached: bool = False
    splits: dict[str, list[dict]] = field(default_factory=dict, repr=False)


# ------------------------------------------------------------------------------------------ record checks


def _check_record(rec: Any, cfg: Config) -> tuple[str, str] | tuple[None, str]:
    """Return (question, answer) cleaned, or (None, reason)."""
    d = cfg.data
    if isinstance(rec, MalformedLine):
        return None, "malformed_json"
    if not isinstance(rec, dict):
        return None, "not_an_object"
    fields = {}
    for role, name in (("question", d.question_field), ("answer", d.answer_field)):
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
    if len(q) < d.min_question_chars or is_greeting_only(q):
        return None, "question_too_short"
    if len(a) < d.min_answer_chars:
        return None, "answer_too_short"
    return q, a


def split_of(key: str, cfg: Config) -> str:
    """Deterministic split from a hash of the normalised question: the same question always lands in the same
    split, so no question is in two splits, and adding records never moves existing ones."""
    digest = hashlib.sha256(f"{cfg.data.seed}\x00{key}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < cfg.data.train_fraction:
        return "train"
    return "val" if u < cfg.data.train_fraction + cfg.data.val_fraction else "test"


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
            raise DataError(f"{source}: field {name!r} ({key}) appears in none of its {len(objects)} "
                            f"records. Fields present: {', '.join(seen)}. Set {key} to the field that holds the "
                            f"{role}, e.g. `{key}={guess}`.")


def length_reject(cand: Candidate, question_tokens: int, answer_tokens: int, cfg: Config,
                  records: list[Any]) -> dict | None:
    """The reject entry for a candidate over data.max_question_tokens or data.max_answer_tokens, else None."""
    if question_tokens > cfg.data.max_question_tokens:
        reason, tokens = "question_too_long", question_tokens
    elif answer_tokens > cfg.data.max_answer_tokens:
        reason, tokens = "answer_too_long", answer_tokens
    else:
        return None
    return {"index": cand.index, "reason": reason, "detail": f"{tokens} tokens", "record": records[cand.index]}


def write_rejects(path: Path, rejected: list[dict]) -> None:
    """One JSON line per rejected record (index, reason, detail, the record as read)."""
    # backslashreplace: a lone surrogate in a rejected raw record is written as its JSON escape (\\ud800).
    with open(path, "w", encoding="utf-8", errors="backslashreplace") as f:
        for r in rejected:
            f.write(json.dumps(r, ensure_ascii=False, default=str) + "\n")


def clean_records(records: list[Any], cfg: Config) -> tuple[list[Candidate], list[dict]]:
    """Validate and clean every record (character-level checks); duplicates are kept here, so that a later
    length filter can never drop the only valid copy of a question."""
    kept: list[Candidate] = []
    rejected: list[dict] = []
    for index, rec in enumerate(tqdm(records, desc="clean", disable=len(records) < 5000, leave=False)):
        q, reason_or_a = _check_record(rec, cfg)
        if q is None:
            rejected.append({"index": index, "reason": reason_or_a, "record": rec})
            continue
        cand = Candidate(index, q, reason_or_a, normalize_key(q))
        cand.split = split_of(cand.key, cfg)
        kept.append(cand)
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
            rejected.append({"index": cand.index, "reason": "duplicate_exact" if same else "duplicate_question",
                             "detail": f"same question as record {first.index}", "record": records[cand.index]})
            continue
        first_seen[cand.key] = cand
        kept.append(cand)
    return kept, rejected


def clean_and_dedupe(records: list[Any], cfg: Config) -> tuple[list[Candidate], list[dict]]:
    """`clean_records` then `dedupe` (no token-length filter: for the tiny model's vocabulary and the tests)."""
    cands, rejected = clean_records(records, cfg)
    kept, duplicates = dedupe(cands, records)
    return kept, sorted(rejected + duplicates, key=lambda r: r["index"])


# ------------------------------------------------------------------------------------------ tokenization


def _encode_batch(batch: dict[str, list], tokenizer, cfg: Config) -> dict[str, list]:
    out: dict[str, list] = {k: [] for k in ("input_ids", "attention_mask", "labels", "length",
                                            "question_tokens", "answer_tokens", "truncated")}
    for q, a in zip(batch["question"], batch["answer"]):
        enc = encode_example(tokenizer, cfg.prompt, q, a, cfg.data.max_length)
        out["input_ids"].append(enc.input_ids)
        out["attention_mask"].append([1] * len(enc.input_ids))
        out["labels"].append(enc.labels)
        out["length"].append(len(enc.input_ids))
        out["question_tokens"].append(enc.question_tokens)
        out["answer_tokens"].append(enc.answer_tokens)
        out["truncated"].append(enc.truncated)
    return out


def tokenize(cands: list[Candidate], encoder, cfg: Config, inputs: dict[str, str]):
    """Tokenize with datasets.map (batched, num_proc); `encoder` is the tokenizer or its fast path (same ids).
    The cache file is keyed on a hash of the texts, the
    tokenizer's vocabulary and the prompt/length settings, so a re-run with the same inputs only reads it.
    (datasets' own fingerprint hashes the pickled function, which for a slow tokenizer changes as its memo
    fills, so it would miss.)"""
    import datasets

    ds = datasets.Dataset.from_dict({
        "id": [f"q{hashlib.sha256(c.key.encode()).hexdigest()[:12]}" for c in cands],
        "question": [c.question for c in cands],
        "answer": [c.answer for c in cands],
    })
    h = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode())  # prepared_inputs(): data, settings, tokenizer
    h.update(json.dumps([(c.question, c.answer) for c in cands]).encode())
    fingerprint = h.hexdigest()[:32]
    cache_dir = Path(cfg.workdir) / ".cache" / "prepare"
    cache_dir.mkdir(parents=True, exist_ok=True)
    cache_file = cache_dir / f"tokenized-{fingerprint}.arrow"
    num_proc = cfg.data.num_proc if len(cands) >= 200 * cfg.data.num_proc else 1
    return ds.map(_encode_batch, batched=True, batch_size=256, num_proc=num_proc if num_proc > 1 else None,
                  fn_kwargs={"tokenizer": encoder, "cfg": cfg}, cache_file_name=str(cache_file),
                  new_fingerprint=fingerprint, load_from_cache_file=True, desc="tokenize")


# ------------------------------------------------------------------------------------------ the stage


def tiny_training_texts(cands: list[Candidate], cfg: Config) -> list[str]:
    """What the tiny model's vocabulary is learned from: the train split as the model will see it."""
    return [cfg.prompt.template.replace("{question}", c.question) + " " + c.answer for c in cands if c.split == "train"]


def _ensure_tokenizer(cfg: Config, cands: list[Candidate]):
    if wants_tiny(cfg):
        from medqa.tiny import build_tiny_model

        texts = tiny_training_texts(cands, cfg)
        log.info("Building the tiny demo model from %d training records.", len(texts))
        build_tiny_model(texts, cfg.model.tiny, cfg.resolve(cfg.model.tiny.path), seed=cfg.seed)
    return load_tokenizer(cfg)


def prepare(cfg: Config) -> PrepareResult:
    """Run the data-preparation stage and return its report."""
    start = time.perf_counter()
    log.info("prepare: source=%s tokenizer=%s workdir=%s", cfg.data.source, tokenizer_path(cfg), cfg.workdir)
    records = read_records(cfg.data.source, cfg.data.hub_split)
    if cfg.data.max_records:
        records = records[: cfg.data.max_records]
    if not records:
        raise DataError(f"{cfg.data.source} holds no records (an empty list or file). Point data.source at the file "
                        "with the question/answer records.")
    check_fields_present(records, cfg.data.source, {"question": (cfg.data.question_field, "data.question_field"),
                                                    "answer": (cfg.data.answer_field, "data.answer_field")})
    cands, rejected = clean_records(records, cfg)
    if not cands:
        reasons = Counter(r["reason"] for r in rejected).most_common(3)
        raise DataError(f"{cfg.data.source}: none of its {len(records)} records survived cleaning (top reasons: "
                        f"{reasons}). Check data.question_field/data.answer_field and the min_*_chars limits; "
                        "every record and its reason is listed in data/rejected.jsonl only when some are kept.")

    tokenizer = _ensure_tokenizer(cfg, dedupe(cands, records)[0])
    inputs = prepared_inputs(cfg, tokenizer)
    # BioGPT's tokenizer has a fast path with the same ids (medqa.fasttok); any other tokenizer runs as it is.
    encoder = (fast_encoder(tokenizer) if cfg.data.fast_tokenizer else None) or tokenizer
    path = "fast" if encoder is not tokenizer else "slow"
    log.info("tokenize: %s path (%s)", path, type(tokenizer).__name__)
    tokenized = tokenize(cands, encoder, cfg, inputs)
    # Whole columns as lists, read once: indexing a Dataset column row by row costs a copy of its schema each time,
    # which made these loops most of prepare's time.
    columns = tokenized.select_columns(["id", "question_tokens", "answer_tokens", "truncated"]).to_dict()
    q_tokens, a_tokens = columns["question_tokens"], columns["answer_tokens"]
    # Filter first, then deduplicate: when the first copy of a question is too long, a valid later copy is kept.
    valid: list[Candidate] = []
    row_of: dict[int, int] = {}
    for row, cand in enumerate(cands):
        reject = length_reject(cand, q_tokens[row], a_tokens[row], cfg, records)
        if reject:
            rejected.append(reject)
        else:
            valid.append(cand)
            row_of[cand.index] = row
    unique, duplicates = dedupe(valid, records)
    rejected = sorted(rejected + duplicates, key=lambda r: r["index"])
    keep_rows: dict[str, list[int]] = {s: [] for s in SPLITS}
    by_row = {row_of[cand.index]: cand for cand in unique}
    for row, cand in by_row.items():
        keep_rows[cand.split].append(row)

    ids, cut = columns["id"], columns["truncated"]
    splits = {s: [{"id": ids[r], "index": by_row[r].index, "question": by_row[r].question,
                   "answer": by_row[r].answer} for r in rows] for s, rows in keep_rows.items()}
    truncated = sum(cut[r] for rows in keep_rows.values() for r in rows)
    report = {
        "source": cfg.data.source,
        "read": len(records),
        "kept": {s: len(rows) for s, rows in keep_rows.items()},
        "rejected": dict(sorted(Counter(r["reason"] for r in rejected).items())),
        "truncated": truncated,
        # records kept or not whose question or answer had control characters or escape sequences removed
        "control_characters_removed": _count_control(records, cfg),
        "tokenizer": tokenizer_path(cfg),
        "tokenizer_info": tokenizer_info(tokenizer),
        "tokenizer_path": path,  # medqa.fasttok or the tokenizer as it is
        "max_length": cfg.data.max_length,
    }
    assert report["read"] == sum(report["kept"].values()) + sum(report["rejected"].values())
    if not splits["train"]:
        raise DataError(f"{cfg.data.source}: no records landed in the train split ({report['kept']}). Use more "
                        "records or raise data.train_fraction.")

    data_dir, tok_dir = Path(cfg.workdir) / "data", Path(cfg.workdir) / "tokenized"
    _write_data(data_dir, splits, rejected, report, cfg, inputs)
    with atomic_dir(tok_dir) as tmp:
        for split, rows in keep_rows.items():
            part = tokenized.select(rows).select_columns(TOKENIZED_COLUMNS)
            # An empty split (e.g. test_fraction=0) saves as one empty shard; datasets' shard count fails on it.
            part.save_to_disk(str(tmp / f"tokenized_{split}"), **({"num_shards": 1} if not rows else {}))
        write_json(tmp / "prepare_report.json", report)
        write_manifest(tmp, "prepare", cfg, inputs)

    secs = time.perf_counter() - start
    log.info("prepare: read %d, kept %s, rejected %d (%s), truncated %d, in %.1fs", report["read"], report["kept"],
             sum(report["rejected"].values()), report["rejected"], truncated, secs)
    return PrepareResult(report=report, data_dir=data_dir, tokenized_dir=tok_dir, splits=splits)


def _count_control(records: list[Any], cfg: Config) -> int:
    fields = (cfg.data.question_field, cfg.data.answer_field)
    return sum(1 for r in records if isinstance(r, dict) and not isinstance(r, MalformedLine)
               and any(isinstance(r.get(f), str) and has_control_chars(r[f]) for f in fields))


def prepared_inputs(cfg: Config, tokenizer) -> dict[str, str]:
    """The inputs `prepare` output depends on; later stages recompute these and compare."""
    d = cfg.data
    settings = json.dumps([ENCODE_VERSION, cfg.prompt.template, cfg.prompt.use_chat_template, cfg.prompt.system,
                           getattr(tokenizer, "chat_template", None) if cfg.prompt.use_chat_template else None,
                           cfg.prompt.min_question_tokens, d.max_length, d.question_field, d.answer_field, d.seed,
                           d.train_fraction, d.val_fraction, d.hub_split, d.max_records, d.min_question_chars,
                           d.min_answer_chars, d.max_question_tokens, d.max_answer_tokens])
    return {"source": fingerprint_source(cfg.data.source), "tokenizer": tokenizer_info(tokenizer)["vocab_sha256"],
            "prompt_and_split": hashlib.sha256(settings.encode()).hexdigest()}


def _write_data(data_dir: Path, splits: dict[str, list[dict]], rejected: list[dict], report: dict, cfg: Config,
                inputs: dict[str, str]) -> None:
    """Write the split files into a temporary folder, then move each into place with os.replace. The report
    goes last, so a crash leaves it describing the previous complete set."""
    data_dir.mkdir(parents=True, exist_ok=True)
    tmp = data_dir / f".prepare.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        for split, rows in splits.items():
            (tmp / f"{split}_data.json").write_text(json.dumps(rows, indent=1, ensure_ascii=False) + "\n",
                                                    encoding="utf-8")
        write_rejects(tmp / "rejected.jsonl", rejected)
        write_json(tmp / "prepare_report.json", report)
        write_manifest(tmp, "prepare", cfg, inputs)
        for name in [f"{s}_data.json" for s in splits] + ["rejected.jsonl", "prepare_report.json", "manifest.json"]:
            os.replace(tmp / name, data_dir / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
