"""The artifact contract: where every artifact lives under `workdir`, the one function that writes it and the one
that reads it. Stages share artifacts through this module only; none imports another, except tune, whose trials
run `train.train`.

    artifact                              written by                      read by
    data/{split}_data.json                prepare.prepare                 workdir.load_records
    data/rejected.jsonl, prepare_report   prepare.prepare                 (people; the notebooks)
    tokenized/tokenized_{split}/          prepare.prepare                 workdir.load_split (check_tokenized)
    outputs/baseline/metrics.json         baseline.baseline               workdir.read_metrics
    outputs/*/per_example.jsonl           baseline, train (write_per_example)
                                                                          (paired comparisons by hand)
    outputs/finetune_checkpoints/         train.fit (transformers' Trainer)
                                                                          train.train on resume
    outputs/finetune/ (adapter)           train.train                     workdir.candidate_adapters,
                                                                          modeling.load_adapter_model
    outputs/ray_*/ (search, results.csv)  tune.tune                       tune.tune on resume (Tuner.restore)
    outputs/best/ (adapter)               tune.tune                       workdir.candidate_adapters
    outputs/best/trial.json               tune.tune                       workdir.read_search (evaluate's report)
    outputs/frontier/ (frontier.csv, png) frontier.run_frontier (tune)    frontier.front_table (notebook 4)
    .cache/knowledge/base-*.json          knowledge.Probe.base            knowledge.Probe.base (every evaluation)
    outputs/tradeoff.png                  evaluate.evaluate               (report.md; notebook 4)
    outputs/benchmarks/ (lm-eval runs)    benchmark.benchmark             workdir.read_benchmarks (evaluate's report)
    outputs/report.{json,md}              evaluate.evaluate               export.push_to_hub (model card)
    outputs/external/                     external.load_external          (people)
    outputs/merged/                       export.export                   (users: from_pretrained)
    outputs/chat/feedback.jsonl           ratings.record_feedback (chat)  ratings.read_feedback (feedback.feedback)
    outputs/chat/feedback_summary.json    feedback.feedback               (people; --export-preferences: DPO data)
    .locks/{stage}.lock, {stage}.lock.json  locks.hold (each writing stage)  locks.hold (a second writer: refused)

Every path comes from `paths(cfg)` (a `Workdir`). Whether an artifact is fresh for a config is decided here too:
`prepared_inputs` and `adapter_inputs` are what the manifests beside the artifacts record (`medqa.manifest`).
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from medqa import schema
from medqa.errors import DataError
from medqa.faults import damaged
from medqa.manifest import check_inputs, fingerprint_model, fingerprint_source
from medqa.metrics import EVAL_SPLITS, ExampleScores  # noqa: F401  (EVAL_SPLITS: part of the contract)
from medqa.modeling import model_path, tokenizer_info
from medqa.prompts import ENCODE_VERSION
from medqa.schema import Config
from medqa.sources import source_specs

SPLITS = ("train", "val", "test")
TOKENIZED_COLUMNS = ["id", "input_ids", "attention_mask", "labels", "length"]
HISTORY = "metrics.jsonl"  # one line per logging step and per evaluation, in checkpoints and the run folder
PREPARE_AGAIN = "medqa prepare --config <your config>"


@dataclass(frozen=True)
class Workdir:
    """Every path under a workdir. `outputs` may be elsewhere (a Ray Tune trial trains into its own folder)."""

    root: Path
    outputs: Path

    @classmethod
    def of(cls, cfg: Config, outputs: str | Path | None = None) -> Workdir:
        root = Path(cfg.workdir)
        return cls(root, Path(outputs) if outputs else root / "outputs")

    # prepare
    @property
    def data(self) -> Path:
        return self.root / "data"

    def records(self, split: str) -> Path:
        return self.data / f"{split}_data.json"

    @property
    def tokenized(self) -> Path:
        return self.root / "tokenized"

    def tokenized_split(self, split: str) -> Path:
        return self.tokenized / f"tokenized_{split}"

    @property
    def cache(self) -> Path:
        return self.root / ".cache"

    # every stage that writes (medqa.locks): under the workdir itself, so a shared filesystem shows them to all
    def lock(self, stage: str) -> Path:
        return self.root / ".locks" / f"{stage}.lock"

    def lock_holder(self, stage: str) -> Path:
        return self.root / ".locks" / f"{stage}.lock.json"

    # baseline, train, tune, evaluate, export
    @property
    def baseline(self) -> Path:
        return self.outputs / "baseline"

    @property
    def checkpoints(self) -> Path:
        return self.outputs / "finetune_checkpoints"

    @property
    def finetune(self) -> Path:
        return self.outputs / "finetune"

    @property
    def best(self) -> Path:
        return self.outputs / "best"

    @property
    def external(self) -> Path:
        return self.outputs / "external"

    @property
    def merged(self) -> Path:
        return self.outputs / "merged"

    @property
    def benchmarks(self) -> Path:
        return self.outputs / "benchmarks"

    @property
    def chat_feedback(self) -> Path:
        return self.outputs / "chat" / "feedback.jsonl"

    @property
    def chat_feedback_summary(self) -> Path:
        return self.outputs / "chat" / "feedback_summary.json"

    @property
    def chat_feedback_lock(self) -> Path:
        return self.outputs / "chat" / "feedback.jsonl.lock"

    @property
    def report_json(self) -> Path:
        return self.outputs / "report.json"

    @property
    def report_md(self) -> Path:
        return self.outputs / "report.md"

    @property
    def tradeoff(self) -> Path:
        return self.outputs / "tradeoff.png"

    @property
    def frontier(self) -> Path:
        return self.outputs / "frontier"

    @property
    def knowledge_cache(self) -> Path:
        """The base model's knowledge scores, computed once per workdir (every trial and stage reads them)."""
        return self.cache / "knowledge"


def paths(cfg: Config) -> Workdir:
    return Workdir.of(cfg)


# ------------------------------------------------------------------------------------------- freshness


# The prepared data's settings fingerprint hashes every field declared affects="prepare" in `medqa.schema`, but the
# paths (data.source, model.tokenizer: their content is fingerprinted) and data.sources (fingerprinted per source
# below). These fields were hashed in this order before the schema declared them, and stay so, so that data prepared
# and adapters trained since then keep their fingerprint. A field declared since enters by name when it is set away
# from its default: its default must keep the old behaviour (when not, bump prompts.ENCODE_VERSION).
_HASHED_SINCE_THE_START = (
    "prompt.template",
    "prompt.use_chat_template",
    "prompt.system",
    "prompt.chat_template",  # not a field: the tokenizer's template, when it is used
    "prompt.min_question_tokens",
    "data.max_length",
    "data.question_field",
    "data.answer_field",
    "data.seed",
    "data.train_fraction",
    "data.val_fraction",
    "data.hub_split",
    "data.max_records",
    "data.min_question_chars",
    "data.min_answer_chars",
    "data.max_question_tokens",
    "data.max_answer_tokens",
)


def prepare_settings(cfg: Config, tokenizer) -> list:
    """The settings the prepared data depends on, besides its sources and tokenizer (see above)."""
    hashed = [k for k in schema.keys("prepare", path=False) if k != "data.sources"]
    values = {k: schema.get(cfg, k) for k in hashed}
    values["prompt.chat_template"] = getattr(tokenizer, "chat_template", None) if cfg.prompt.use_chat_template else None
    settings = [ENCODE_VERSION, *(values.pop(k) for k in _HASHED_SINCE_THE_START if k in values)]
    since = {k: v for k, v in values.items() if v != schema.default(k)}
    return settings + [since] if since else settings


def prepared_inputs(cfg: Config, tokenizer) -> dict[str, str]:
    """The inputs `prepare` output depends on; later stages recompute these and compare."""
    d = cfg.data
    settings = json.dumps(prepare_settings(cfg, tokenizer))
    inputs = {
        "source": fingerprint_source(cfg.data.source),
        "tokenizer": tokenizer_info(tokenizer)["vocab_sha256"],
        "prompt_and_split": hashlib.sha256(settings.encode()).hexdigest(),
    }
    if d.sources:  # each source's data and how it is read (its weight changes training only, not the prepared data)
        del inputs["source"]
        for spec in source_specs(d):
            read = json.dumps([spec.question_field, spec.answer_field, spec.hub_split, spec.max_records])
            inputs[f"source {len(inputs) - 2}: {spec.name}"] = (
                fingerprint_source(spec.source) + ":" + hashlib.sha256(read.encode()).hexdigest()[:16]
            )
    return inputs


def adapter_inputs(cfg: Config, tokenizer) -> dict[str, str]:
    """What an adapter depends on: the base model it was trained on, and the data it saw."""
    return {"base_model": fingerprint_model(model_path(cfg), cfg.model.revision), **prepared_inputs(cfg, tokenizer)}


def check_tokenized(cfg: Config, tokenizer) -> None:
    """Stop when tokenized/ was prepared from other data, settings or tokenizer than this config names."""
    check_inputs(cfg, paths(cfg).tokenized, prepared_inputs(cfg, tokenizer), PREPARE_AGAIN)


# -------------------------------------------------------------------------------------------- reading


def load_split(cfg: Config, split: str, tokenizer=None, limit: bool = True):
    """A tokenized split, checked against the tokenizer when one is given; `scoring.max_examples` applies to the
    val and test splits only (it is a scoring shortcut, never a way to shrink training), unless `limit=False`."""
    import datasets

    path = paths(cfg).tokenized_split(split)
    if not path.is_dir():
        raise DataError(f"{path} not found. Run `{PREPARE_AGAIN}` first (same workdir).")
    if tokenizer is not None:
        check_tokenized(cfg, tokenizer)
    with damaged(path, PREPARE_AGAIN):  # an arrow file cut short: name it, not a pyarrow traceback
        ds = datasets.load_from_disk(str(path))
    if len(ds) == 0:
        raise DataError(
            f"{path} is empty: the {split} split has no examples. Use more records or change "
            "data.val_fraction / data.test_fraction, then re-run `medqa prepare`."
        )
    if limit and split != "train" and cfg.scoring.max_examples and len(ds) > cfg.scoring.max_examples:
        ds = ds.select(range(cfg.scoring.max_examples))
    return ds


def load_records(cfg: Config, split: str) -> list[dict]:
    """The cleaned records of a split (`{id, question, answer, ...}`), as prepare wrote them."""
    path = paths(cfg).records(split)
    if not path.exists():
        raise DataError(f"{path} not found. Run `{PREPARE_AGAIN}` first (same workdir).")
    with damaged(path, PREPARE_AGAIN):
        return json.loads(path.read_text(encoding="utf-8"))


def read_metrics(folder: Path) -> dict | None:
    """A stage's metrics.json (baseline, finetune, best), or None when that stage has not run."""
    path = Path(folder) / "metrics.json"
    if not path.exists():
        return None
    with damaged(path, f"the stage that wrote {Path(folder).name}/ (medqa baseline, train or tune)"):
        return json.loads(path.read_text(encoding="utf-8"))


def read_benchmarks(cfg: Config) -> dict | None:
    """`medqa benchmark`'s summary.json (lm-eval scores per model and the paired changes), or None when it has
    not run."""
    path = paths(cfg).benchmarks / "summary.json"
    if not path.exists():
        return None
    with damaged(path, "medqa benchmark"):
        return json.loads(path.read_text(encoding="utf-8"))


def read_search(cfg: Config) -> dict | None:
    """The search that chose outputs/best/: its trial.json (the selection rule, whether the chosen trial was
    eligible) and `trials`, the rows of its results.csv; None when `medqa tune` has not run (or its experiment
    folder is gone)."""
    trial = paths(cfg).best / "trial.json"
    if not trial.exists():
        return None
    with damaged(trial, "medqa tune"):
        chosen = json.loads(trial.read_text(encoding="utf-8"))
    results = Path(chosen.get("experiment", "")) / "results.csv"
    if not results.is_file():
        return None
    with damaged(results, "medqa tune tune.resume=true"), open(results, newline="", encoding="utf-8") as f:
        trials = [{k: _cell(v) for k, v in row.items()} for row in csv.DictReader(f)]
    return {"chosen": chosen, "trials": trials}


def _cell(text: str):
    """A results.csv cell as written by pandas: '' (missing) -> None, True/False, numbers, else the text."""
    if text == "":
        return None
    if text in ("True", "False"):
        return text == "True"
    try:
        return float(text) if any(c in text for c in ".eEn") else int(text)
    except ValueError:
        return text


def candidate_adapters(cfg: Config) -> dict[str, Path | None]:
    """name -> adapter folder (None for the base model), for those that exist: what `evaluate` compares."""
    p = paths(cfg)
    found: dict[str, Path | None] = {"base": None}
    for name, folder in (("fine-tuned", p.finetune), ("tuned (best trial)", p.best)):
        if (folder / "adapter_config.json").exists():
            found[name] = folder
    return found


# -------------------------------------------------------------------------------------------- writing


def per_example_rows(split: str, scores: ExampleScores) -> list[dict]:
    return [
        {"split": split, "id": i, "answer_nll": float(n), "answer_tokens": int(t)}
        for i, n, t in zip(scores.ids, scores.answer_nll, scores.answer_tokens)
    ]


def write_per_example(path: Path, rows: list[dict]) -> None:
    """`per_example.jsonl`: per-example answer NLL and token counts, for paired comparisons later."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
