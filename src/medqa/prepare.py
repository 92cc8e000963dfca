"""Stage 1, `prepare(cfg)`: load, clean, deduplicate, split without leakage, tokenize with the prompt masked.

Reads `data.source`; writes under `workdir`:
  data/{train,val,test}_data.json   kept records: id, index (in the source), question, answer
  data/rejected.jsonl               every record not kept: index, reason, detail, the original record
  data/prepare_report.json          {"read": N, "kept": {...}, "rejected": {...}}; read = kept + rejected
  tokenized/tokenized_{split}       datasets.save_to_disk: id, input_ids, attention_mask, labels, length
"""

from __future__ import annotations

import bisect
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

from medqa.artifacts import atomic_dir, write_json
from medqa.cleaning import has_control_chars
from medqa.errors import DataError
from medqa.fasttok import fast_encoder
from medqa.locks import locked
from medqa.manifest import write_manifest
from medqa.modeling import load_tokenizer, model_path, tokenizer_info, tokenizer_path, wants_tiny
from medqa.prompts import encode_example
from medqa.records import (
    Candidate,
    check_fields_present,
    clean_records,
    dedupe,
    length_reject,
    split_of,
    tiny_training_texts,
    write_rejects,
)
from medqa.schema import Config
from medqa.sources import MalformedLine, SourceSpec, read_records, source_specs
from medqa.tiny import build_tiny_model
from medqa.workdir import SPLITS, TOKENIZED_COLUMNS, paths, prepared_inputs

log = logging.getLogger(__name__)


@dataclass
class PrepareResult:
    report: dict[str, Any]
    data_dir: Path
    tokenized_dir: Path
    cached: bool = False
    splits: dict[str, list[dict]] = field(default_factory=dict, repr=False)


# ------------------------------------------------------------------------------------------ tokenization


def _encode_batch(batch: dict[str, list], tokenizer, cfg: Config) -> dict[str, list]:
    out: dict[str, list] = {
        k: []
        for k in ("input_ids", "attention_mask", "labels", "length", "question_tokens", "answer_tokens", "truncated")
    }
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

    ds = datasets.Dataset.from_dict(
        {
            "id": [f"q{hashlib.sha256(c.key.encode()).hexdigest()[:12]}" for c in cands],
            "question": [c.question for c in cands],
            "answer": [c.answer for c in cands],
        }
    )
    h = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode())  # prepared_inputs(): data, settings, tokenizer
    h.update(json.dumps([(c.question, c.answer) for c in cands]).encode())
    fingerprint = h.hexdigest()[:32]
    cache_dir = paths(cfg).cache / "prepare"
    cache_dir.mkdir(parents=True, exist_ok=True)
    cache_file = cache_dir / f"tokenized-{fingerprint}.arrow"
    num_proc = cfg.data.num_proc if len(cands) >= 200 * cfg.data.num_proc else 1
    return ds.map(
        _encode_batch,
        batched=True,
        batch_size=256,
        num_proc=num_proc if num_proc > 1 else None,
        fn_kwargs={"tokenizer": encoder, "cfg": cfg},
        cache_file_name=str(cache_file),
        new_fingerprint=fingerprint,
        load_from_cache_file=True,
        desc="tokenize",
    )


# ------------------------------------------------------------------------------------------ the stage


@locked("prepare")
def prepare(cfg: Config) -> PrepareResult:
    """Run the data-preparation stage: read and clean, tokenize, keep (token limits, duplicates), split, write."""
    start = time.perf_counter()
    specs = source_specs(cfg.data)
    log.info(
        "prepare: source=%s tokenizer=%s workdir=%s",
        ", ".join(s.source for s in specs),
        tokenizer_path(cfg),
        cfg.workdir,
    )
    records, cands, rejected, starts = read_sources(cfg, specs)
    tokenizer = _ensure_tokenizer(cfg, dedupe(cands, records)[0])
    inputs = prepared_inputs(cfg, tokenizer)
    encoder, path = pick_encoder(cfg, tokenizer)
    tokenized = tokenize(cands, encoder, cfg, inputs)
    kept = keep_rows(cfg, records, cands, rejected, tokenized)
    splits = place(kept, specs, starts, mix=bool(cfg.data.sources))
    report = build_report(cfg, specs, starts, records, kept, splits, tokenizer, path)
    data_dir, tok_dir = write_prepared(cfg, splits, kept, report, inputs, tokenized)
    log.info(
        "prepare: read %d, kept %s, rejected %d (%s), truncated %d, in %.1fs",
        report["read"],
        report["kept"],
        sum(report["rejected"].values()),
        report["rejected"],
        report["truncated"],
        time.perf_counter() - start,
    )
    return PrepareResult(report=report, data_dir=data_dir, tokenized_dir=tok_dir, splits=splits)


def make_tiny_model(cfg: Config, cands: list[Candidate] | None = None) -> Path:
    """Build the tiny demo model (`medqa.tiny.build_tiny_model`) at model.name_or_path, its vocabulary learned
    from the train split of `cands`: deduplicated candidates, or when None the configured sources read, cleaned
    and deduplicated as prepare does. The one way to build it: prepare, `medqa make-tiny-model` and the tests."""
    if cands is None:
        records, cands, _, _ = read_sources(cfg, source_specs(cfg.data))
        cands = dedupe(cands, records)[0]
    texts = tiny_training_texts(cands, cfg.prompt.template)
    log.info("Building the tiny demo model from %d training records.", len(texts))
    return build_tiny_model(texts, cfg.model.tiny, model_path(cfg), seed=cfg.seed)


def _ensure_tokenizer(cfg: Config, cands: list[Candidate]):
    """The configured tokenizer, after building the tiny demo model when it is the configured one and missing."""
    if wants_tiny(cfg):
        make_tiny_model(cfg, cands)
    return load_tokenizer(cfg)


def pick_encoder(cfg: Config, tokenizer) -> tuple[Any, str]:
    """(encoder, "fast" or "slow"): BioGPT's tokenizer has a fast path with the same ids (medqa.fasttok); any other
    tokenizer, or data.fast_tokenizer=false, runs as it is."""
    encoder = (fast_encoder(tokenizer) if cfg.data.fast_tokenizer else None) or tokenizer
    path = "fast" if encoder is not tokenizer else "slow"
    log.info("tokenize: %s path (%s)", path, type(tokenizer).__name__)
    return encoder, path


@dataclass
class Kept:
    """What `keep_rows` keeps of the tokenized candidates, by row of the tokenized dataset."""

    rows: dict[str, list[int]]  # per split, the kept rows
    by_row: dict[int, Candidate]  # the candidate of each kept row
    rejected: list[dict]  # every record not kept, in index order
    ids: list[str]  # per row: the example id
    truncated: list[bool]  # per row: cut at data.max_length

    @property
    def truncated_count(self) -> int:
        return sum(self.truncated[r] for rows in self.rows.values() for r in rows)


def keep_rows(cfg: Config, records: list[Any], cands: list[Candidate], rejected: list[dict], tokenized) -> Kept:
    """Apply the token-length limits, then deduplicate, and put each kept row in its candidate's split. Filter first,
    then deduplicate: when the first copy of a question is too long, a valid later copy is kept. `rejected` (the
    cleaning's rejects) is extended with the new ones and returned sorted by index."""
    # Whole columns as lists, read once: indexing a Dataset column row by row costs a copy of its schema each time,
    # which made these loops most of prepare's time.
    columns = tokenized.select_columns(["id", "question_tokens", "answer_tokens", "truncated"]).to_dict()
    q_tokens, a_tokens = columns["question_tokens"], columns["answer_tokens"]
    valid: list[Candidate] = []
    row_of: dict[int, int] = {}
    for row, cand in enumerate(cands):
        reject = length_reject(cand, q_tokens[row], a_tokens[row], cfg.data, records)
        if reject:
            rejected.append(reject)
        else:
            valid.append(cand)
            row_of[cand.index] = row
    unique, duplicates = dedupe(valid, records)
    rows: dict[str, list[int]] = {s: [] for s in SPLITS}
    by_row = {row_of[cand.index]: cand for cand in unique}
    for row, cand in by_row.items():
        rows[cand.split].append(row)
    rejected = sorted(rejected + duplicates, key=lambda r: r["index"])
    return Kept(rows, by_row, rejected, columns["id"], columns["truncated"])


def place(kept: Kept, specs: list[SourceSpec], starts: list[int], mix: bool) -> dict[str, list[dict]]:
    """The kept records of each split as the data files hold them (id, index, question, answer; with data.sources
    also the source, and the index within it). With data.sources every reject in `kept` is also given its source
    and its index within it."""

    def record(row: int) -> dict:
        cand = kept.by_row[row]
        if not mix:
            return {"id": kept.ids[row], "index": cand.index, "question": cand.question, "answer": cand.answer}
        name, index = _source_of(cand.index, specs, starts)
        return {"id": kept.ids[row], "source": name, "index": index, "question": cand.question, "answer": cand.answer}

    splits = {s: [record(r) for r in rows] for s, rows in kept.rows.items()}
    if mix:  # every reject names its source and its index within it
        for r in kept.rejected:
            r["source"], r["index"] = _source_of(r["index"], specs, starts)
            r.update(record=r.pop("record"))  # the record as read stays the last field
    return splits


def build_report(
    cfg: Config,
    specs: list[SourceSpec],
    starts: list[int],
    records: list[Any],
    kept: Kept,
    splits: dict[str, list[dict]],
    tokenizer,
    path: str,
) -> dict:
    """prepare_report.json: read = kept + rejected (overall and, with data.sources, per source). Raises when the
    train split is empty."""
    mix = bool(cfg.data.sources)
    report = {
        "source": cfg.data.source if not mix else [spec.source for spec in specs],
        "read": len(records),
        "kept": {s: len(rows) for s, rows in kept.rows.items()},
        "rejected": dict(sorted(Counter(r["reason"] for r in kept.rejected).items())),
        "truncated": kept.truncated_count,
        # records kept or not whose question or answer had control characters or escape sequences removed
        "control_characters_removed": _count_control(records, cfg, specs, starts),
        "tokenizer": tokenizer_path(cfg),
        "tokenizer_info": tokenizer_info(tokenizer),
        "tokenizer_path": path,  # medqa.fasttok or the tokenizer as it is
        "max_length": cfg.data.max_length,
    }
    if mix:
        report["sources"] = _per_source(specs, starts, len(records), splits, kept)
    assert report["read"] == sum(report["kept"].values()) + sum(report["rejected"].values())
    if not splits["train"]:
        raise DataError(
            f"{report['source']}: no records landed in the train split ({report['kept']}). Use more "
            "records or raise data.train_fraction."
        )
    return report


def write_prepared(
    cfg: Config, splits: dict[str, list[dict]], kept: Kept, report: dict, inputs: dict[str, str], tokenized
) -> tuple[Path, Path]:
    """Write data/ (`_write_data`) and tokenized/ (atomically); returns the two folders."""
    data_dir, tok_dir = paths(cfg).data, paths(cfg).tokenized
    _write_data(data_dir, splits, kept.rejected, report, cfg, inputs)
    with atomic_dir(tok_dir) as tmp:
        for split, rows in kept.rows.items():
            part = tokenized.select(rows).select_columns(TOKENIZED_COLUMNS)
            # An empty split (e.g. test_fraction=0) saves as one empty shard; datasets' shard count fails on it.
            part.save_to_disk(str(tmp / f"tokenized_{split}"), **({"num_shards": 1} if not rows else {}))
        write_json(tmp / "prepare_report.json", report)
        write_manifest(tmp, "prepare", cfg, inputs)
    return data_dir, tok_dir


def read_sources(cfg: Config, specs: list[SourceSpec]) -> tuple[list[Any], list[Candidate], list[dict], list[int]]:
    """Read and clean every source: (all records, in source order; their candidates; their rejects; the index in
    `records` where each source starts). Candidate and reject indices are positions in `records`; `_source_of`
    turns them into (source, index within it) for the files."""
    records: list[Any] = []
    cands: list[Candidate] = []
    rejected: list[dict] = []
    starts: list[int] = []
    for spec in specs:
        recs = read_records(spec.source, spec.hub_split)
        if spec.max_records:
            recs = recs[: spec.max_records]
        if not recs:
            raise DataError(
                f"{spec.source} holds no records (an empty list or file). Point {spec.key}.source at the "
                "file with the question/answer records."
            )
        check_fields_present(
            recs,
            spec.source,
            {
                "question": (spec.question_field, f"{spec.key}.question_field"),
                "answer": (spec.answer_field, f"{spec.key}.answer_field"),
            },
        )
        kept, dropped = clean_records(recs, spec)
        if not kept:
            reasons = Counter(r["reason"] for r in dropped).most_common(3)
            raise DataError(
                f"{spec.source}: none of its {len(recs)} records survived cleaning (top reasons: "
                f"{reasons}). Check {spec.key}.question_field/{spec.key}.answer_field and the min_*_chars limits; "
                "every record and its reason is listed in data/rejected.jsonl only when some are kept."
            )
        offset = len(records)
        for cand in kept:
            cand.index += offset
            cand.source = spec.name
            cand.split = split_of(cand.key, cfg.data)
        for r in dropped:
            r["index"] += offset
        starts.append(offset)
        records += recs
        cands += kept
        rejected += dropped
    return records, cands, rejected, starts


def _source_of(index: int, specs: list[SourceSpec], starts: list[int]) -> tuple[str, int]:
    """(source name, index within that source) of a position in the concatenated records."""
    i = bisect.bisect_right(starts, index) - 1
    return specs[i].name, index - starts[i]


def _per_source(
    specs: list[SourceSpec], starts: list[int], total: int, splits: dict[str, list[dict]], kept: Kept
) -> dict:
    """read / rejected by reason / kept per split / truncated, for each source; they add up to the overall report."""
    out = {}
    ends = starts[1:] + [total]
    for spec, start, end in zip(specs, starts, ends):
        mine = [r for r in kept.rejected if r["source"] == spec.name]
        out[spec.name] = {
            "source": spec.source,
            "weight": spec.weight,
            "read": end - start,
            "kept": {s: sum(1 for x in rows if x["source"] == spec.name) for s, rows in splits.items()},
            "rejected": dict(sorted(Counter(r["reason"] for r in mine).items())),
            "truncated": sum(
                kept.truncated[r] for rows in kept.rows.values() for r in rows if kept.by_row[r].source == spec.name
            ),
        }
        assert out[spec.name]["read"] == (
            sum(out[spec.name]["kept"].values()) + sum(out[spec.name]["rejected"].values())
        )
    return out


def _count_control(records: list[Any], cfg: Config, specs: list[SourceSpec], starts: list[int]) -> int:
    ends = starts[1:] + [len(records)]
    count = 0
    for spec, start, end in zip(specs, starts, ends):
        fields = (spec.question_field, spec.answer_field)
        count += sum(
            1
            for r in records[start:end]
            if isinstance(r, dict)
            and not isinstance(r, MalformedLine)
            and any(isinstance(r.get(f), str) and has_control_chars(r[f]) for f in fields)
        )
    return count


def _write_data(
    data_dir: Path,
    splits: dict[str, list[dict]],
    rejected: list[dict],
    report: dict,
    cfg: Config,
    inputs: dict[str, str],
) -> None:
    """Write the split files into a temporary folder, then move each into place with os.replace. The report
    goes last, so a crash leaves it describing the previous complete set."""
    data_dir.mkdir(parents=True, exist_ok=True)
    tmp = data_dir / f".prepare.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        for split, rows in splits.items():
            (tmp / f"{split}_data.json").write_text(
                json.dumps(rows, indent=1, ensure_ascii=False) + "\n", encoding="utf-8"
            )
        write_rejects(tmp / "rejected.jsonl", rejected)
        write_json(tmp / "prepare_report.json", report)
        write_manifest(tmp, "prepare", cfg, inputs)
        for name in [f"{s}_data.json" for s in splits] + ["rejected.jsonl", "prepare_report.json", "manifest.json"]:
            os.replace(tmp / name, data_dir / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
