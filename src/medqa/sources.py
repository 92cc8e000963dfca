"""Reading raw records from a JSON list, JSONL, CSV, a `datasets` folder or a Hub dataset id.

Problems with the file as a whole (missing, not UTF-8, malformed JSON, Hub unreachable) raise `DataError`
with one paragraph naming the file and the fix. Problems with one record are not raised here: the record is
returned as it is and `prepare` rejects it with a reason, so that nothing is dropped without a count.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medqa.errors import DataError

log = logging.getLogger(__name__)

# A Hub id looks like `owner/name` with no file extension; anything else is treated as a local path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

OFFLINE_HINT = (
    "To work offline, point data.source at a local copy (JSON list, JSONL, CSV or a datasets folder), "
    "or run the embedded demo with `--config configs/demo.yaml`."
)


_BINARY_KINDS = {
    b"PAR1": "a Parquet file",
    b"\x1f\x8b": "a gzip-compressed file",
    b"PK\x03\x04": "a zip archive",
    b"\x89HDF": "an HDF5 file",
    b"ARROW1": "an Arrow file",
}


def _decode(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(
            f"Could not read {path}: {exc.strerror or exc}. Check that the file is readable by this user "
            "(permissions) and is not being written, then run again."
        ) from None
    kind = next((k for magic, k in _BINARY_KINDS.items() if raw.startswith(magic)), None)
    if kind:
        raise DataError(
            f"{path} is {kind}, not JSON, JSONL or CSV text. Convert it (e.g. with pandas: "
            "`pd.read_parquet(path).to_json('records.json', orient='records')`, or unpack it) and point "
            "data.source at the result."
        )
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(
            f"{path} is not UTF-8 text: byte {exc.start} (line {line}) is {raw[exc.start : exc.start + 1]!r}. "
            f"Convert the file to UTF-8, e.g. `iconv -f latin1 -t utf-8 {path} > fixed.json`, and point "
            "data.source at the result."
        ) from None


def _read_json(path: Path, text: str) -> list[Any]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{path} is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}. Fix the file there "
            "(a JSON list of objects), or save it as JSONL (one object per line, .jsonl) so that one bad "
            "line is rejected instead of stopping the run."
        ) from None
    if isinstance(data, dict):
        # Some exports wrap the list: {"data": [...]}. Accept a single list-valued key.
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) == 1:
            return lists[0]
        raise DataError(
            f"{path} holds a JSON object, not a list of records. Give a JSON list of "
            "{question, answer} objects, e.g. HealthCareMagic-100k.json's layout."
        )
    if not isinstance(data, list):
        raise DataError(f"{path} holds a JSON {type(data).__name__}, not a list of records.")
    return data


class MalformedLine(dict):
    """A JSONL line that did not parse; `prepare` rejects it with reason `malformed_json`."""


def _read_jsonl(path: Path, text: str) -> list[Any]:
    records: list[Any] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            log.warning("%s line %d is not valid JSON (%s, column %d); rejected.", path, lineno, exc.msg, exc.colno)
            records.append(MalformedLine(line=line, lineno=lineno, error=f"{exc.msg} at column {exc.colno}"))
    return records


def _read_csv(path: Path, text: str) -> list[Any]:
    # Long answers exceed the csv module's default field limit (128 KiB); our token limits reject them later.
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    # NUL bytes stop the csv module; they carry nothing, so they go (as the cleaning removes them from JSON).
    # strict: a quote that is never closed is an error, not one giant field swallowing every later row.
    reader = csv.DictReader(io.StringIO(text.replace("\x00", "")), strict=True)
    try:
        if not reader.fieldnames:
            raise DataError(f"{path} has no CSV header row. Add a header naming the columns (e.g. input,output).")
        return [dict(row) for row in reader]
    except csv.Error as exc:
        raise DataError(
            f"{path} is not valid CSV in the record that starts on line {reader.line_num + 1}: {exc}. "
            "Fix that record (a quote opened and never closed? quotes inside a field must be doubled), or "
            "save the records as JSONL, where one bad line is rejected instead of stopping the run."
        ) from None


def _read_datasets_folder(path: Path, split: str) -> list[Any]:
    import datasets

    markers = ("dataset_info.json", "state.json", "dataset_dict.json")
    if not any((path / m).exists() for m in markers):
        files = sorted(p.name for p in path.iterdir())[:8]
        readable = [f for f in files if f.lower().endswith((".json", ".jsonl", ".csv"))]
        hint = (
            f"To read a file in it, set data.source={path / readable[0]}."
            if readable
            else "Give a JSON, JSONL or CSV file instead."
        )
        raise DataError(
            f"data.source {path} is a folder but not a saved `datasets` folder (no {' or '.join(markers)}; "
            f"it holds {', '.join(files) or 'nothing'}). {hint} A `datasets` folder is what "
            "Dataset.save_to_disk writes."
        )
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as exc:  # a damaged or partial save_to_disk folder
        raise DataError(
            f"data.source {path} looks like a `datasets` folder but could not be loaded "
            f"({type(exc).__name__}: {str(exc)[:200]}). Save it again with Dataset.save_to_disk, or "
            "export the records to JSONL and point data.source at that file."
        ) from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(
                f"{path} is a DatasetDict without split {split!r} (it has {list(ds)}). "
                f"Set data.hub_split to one of them."
            )
        ds = ds[split]
    return ds.to_list()


def _read_hub(dataset_id: str, split: str) -> list[Any]:
    import datasets

    try:
        ds = datasets.load_dataset(dataset_id, split=split)
    except Exception as exc:  # the Hub client raises many types; all mean "could not get it"
        offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1"
        why = "offline mode is on (HF_HUB_OFFLINE=1)" if offline else "the Hugging Face Hub could not be reached"
        raise DataError(
            f"Could not load the Hub dataset {dataset_id!r} (split {split!r}): {why}, and no cached copy was "
            f"found ({type(exc).__name__}: {str(exc)[:200]}). {OFFLINE_HINT}"
        ) from None
    return ds.to_list()


def read_records(source: str, split: str = "train") -> list[Any]:
    """Return the raw records of `source` as a list (items may be anything; `prepare` validates each)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return _read_datasets_folder(path, split)
    if path.is_file():
        text = _decode(path)
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            return _read_jsonl(path, text)
        if suffix == ".csv":
            return _read_csv(path, text)
        return _read_json(path, text)
    if _HUB_ID.match(source) and not Path(source).suffix:
        return _read_hub(source, split)
    raise DataError(
        f"Data file {source} not found (looked in {Path.cwd()}). Check data.source: give a path to "
        "a JSON/JSONL/CSV file or a datasets folder, or a Hub id such as "
        "lavita/ChatDoctor-HealthCareMagic-100k. The embedded sample is "
        "data/sample/healthcaremagic_sample.json."
    )


@dataclass(frozen=True)
class SourceSpec:
    """One source of records, how to read it and what each of its records must hold: what `medqa.records` reads.
    From a `data.sources` entry, `data.source` alone (an unnamed one) or `evaluate.external_test`."""

    name: str  # "" for the one-source shorthand `data.source`
    source: str
    question_field: str
    answer_field: str
    hub_split: str
    max_records: int
    min_question_chars: int  # data.*'s for every source
    min_answer_chars: int
    weight: float = 1.0
    key: str = "data"  # the config key that names it, for messages: data, data.sources[i] or evaluate.external_test


def source_specs(data) -> list[SourceSpec]:
    """The sources a `DataConfig` names: `data.sources` in order, each field it leaves out taken from data.*; or
    `data.source` alone."""
    if not data.sources:
        return [source_spec(data, "", data.source)]
    return [
        source_spec(
            data,
            e.name,
            e.source,
            question_field=e.question_field,
            answer_field=e.answer_field,
            hub_split=e.hub_split,
            max_records=e.max_records,
            weight=e.weight,
            key=f"data.sources[{i}]",
        )
        for i, e in enumerate(data.sources)
    ]


def source_spec(
    data,
    name: str,
    source: str,
    *,
    question_field: str | None = None,
    answer_field: str | None = None,
    hub_split: str | None = None,
    max_records: int | None = None,
    weight: float | None = None,
    key: str = "data",
) -> SourceSpec:
    """One source read and checked as `data` (a `DataConfig`) says, but for what is given (not None)."""

    def given(value, default):
        return default if value is None else value

    return SourceSpec(
        name,
        source,
        given(question_field, data.question_field),
        given(answer_field, data.answer_field),
        given(hub_split, data.hub_split),
        given(max_records, data.max_records),
        data.min_question_chars,
        data.min_answer_chars,
        float(given(weight, 1.0)),
        key,
    )
