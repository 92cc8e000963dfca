"""Stage 4b, `evaluate(cfg)`: the final, honest comparison on the held-out test split.

Scores the base model, the `medqa train` model (`outputs/finetune/`) and the best tuned model (`outputs/best/`),
whichever exist, with the baseline stage's metric function; adds a paired bootstrap p-value for each fine-tuned
model against the base; generates answers for `evaluate.num_questions` test questions and scores them with
ROUGE and BLEU. Writes `outputs/report.json` and `outputs/report.md` (metrics, samples and a model card; their shape
and every view of them: `medqa.report`) together, and `outputs/tradeoff.png` when a search measured its trade-off.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medqa.batching import eval_tokens_per_batch
from medqa.errors import DataError
from medqa.external import load_external
from medqa.fallbacks import Fallbacks
from medqa.generate import generate_answers
from medqa.locks import locked
from medqa.metrics import ExampleScores, paired_bootstrap, sanity_check
from medqa.modelcard import card_fields
from medqa.modeling import is_tiny_model, load_adapter_model, load_model, load_tokenizer, model_path, scoring_dtype
from medqa.plots import plot_tradeoff
from medqa.pubmedqa import DEFAULT_TEST as DEFAULT_PUBMEDQA
from medqa.pubmedqa import PubMedQAScores, abstract_loss, check_no_dev_overlap, paired_comparison, paired_text
from medqa.pubmedqa import load_items as load_pubmedqa
from medqa.pubmedqa import score_knowledge as score_pubmedqa
from medqa.pubmedqa import subset as pubmedqa_subset
from medqa.pubmedqa import summarize as summarize_pubmedqa
from medqa.report import Report, SearchSummary, search_summary, write_report
from medqa.schema import Config
from medqa.scoring import Scoring
from medqa.selection import Rule
from medqa.textmetrics import BERTSCORE_OFF, bertscore, check_bertscore_encoder, generation_scores
from medqa.workdir import (
    adapter_inputs,
    candidate_adapters,
    load_records,
    load_split,
    paths,
    read_benchmarks,
    read_search,
)

log = logging.getLogger(__name__)


@dataclass
class EvaluateResult:
    report: Report
    report_md: Path


@dataclass
class EvalInputs:
    """What every model is scored on: the tokenized test split, the questions to answer and their doctors'
    answers, and the optional other sets (PubMedQA questions, evaluate.external_test)."""

    tokenizer: Any
    test: Any  # the tokenized test split
    questions: list[str]  # the first evaluate.num_questions test questions (all when 0), answered by each model
    references: list[str]  # their answers in the data
    expected: dict  # what an adapter must have been trained on (workdir.adapter_inputs)
    scoring: Scoring  # how every model is scored, with the test split's id -> source map
    pubmedqa: list[dict] = field(default_factory=list)  # evaluate.pubmedqa_questions questions ([] when 0)
    external: Any = None  # the tokenized external test set, when evaluate.external_test names one
    external_report: dict | None = None


@dataclass
class ModelScores:
    """One model's results, kept together: its report entry (report["models"][name]), its answers, and the
    per-example scores that the paired comparisons against the base model need."""

    name: str
    entry: dict  # adapter, test, dtype, generation; external, pubmedqa when measured; vs_base... for a fine-tuned one
    answers: list[str]
    test: ExampleScores
    external: ExampleScores | None = None
    knowledge: PubMedQAScores | None = None
    warning: str | None = None  # sanity_check's, for the report


@locked("evaluate")
def evaluate(cfg: Config) -> EvaluateResult:
    """Score every available model on test, generate and score answers, write the report."""
    start = time.perf_counter()
    data = load_test_set(cfg)
    fallbacks = Fallbacks()  # a speed-up that could not run here (static-cache generation), for the report
    runs = [score_model(cfg, data, name, adapter, fallbacks) for name, adapter in candidate_adapters(cfg).items()]
    compare_to_base(data.scoring, runs)
    search = search_summary(read_search(cfg), paths(cfg).tradeoff.name)
    draw_tradeoff(cfg, search)
    report = build_report(cfg, data, runs, fallbacks, search, start)
    out = paths(cfg)
    write_report(out.report_json, out.report_md, report, cfg.evaluate.samples_in_report)
    return EvaluateResult(report, out.report_md)


def load_test_set(cfg: Config) -> EvalInputs:
    """The test split and its records (which must agree), the questions to answer, and the optional PubMedQA
    questions and external test set (`medqa.external`, which writes outputs/external/). Checks the BERTScore
    encoder now, not after the first model has been scored."""
    tokenizer = load_tokenizer(cfg)
    test = load_split(cfg, "test", tokenizer)
    rows = load_records(cfg, "test")  # read once: the questions and, with data.sources, each example's source
    records = {r["id"]: r for r in rows}
    ids = list(test["id"])
    missing = [i for i in ids if i not in records]
    if missing:
        raise DataError(
            f"{paths(cfg).records('test')} does not hold {len(missing)} of the "
            "tokenized test examples (data/ and tokenized/ are out of step). Re-run `medqa prepare`."
        )
    e = cfg.evaluate
    answered = ids if e.num_questions == 0 else ids[: e.num_questions]
    data = EvalInputs(
        tokenizer,
        test,
        [records[i]["question"] for i in answered],
        [records[i]["answer"] for i in answered],
        adapter_inputs(cfg, tokenizer),
        Scoring.of(cfg, ["test"], {"test": rows}),
    )
    if e.bertscore_model:
        check_bertscore_encoder(e.bertscore_model)
    if e.pubmedqa_questions:
        source = e.pubmedqa_file or DEFAULT_PUBMEDQA
        data.pubmedqa = pubmedqa_subset(load_pubmedqa(source), e.pubmedqa_questions, cfg.seed)
        check_no_dev_overlap(data.pubmedqa, source)  # the dev questions chose the adapter: never a test figure
    if e.external_test:
        data.external, data.external_report = load_external(cfg, tokenizer)
    return data


def score_model(cfg: Config, data: EvalInputs, name: str, adapter: Path | None, fallbacks: Fallbacks) -> ModelScores:
    """One model: test answer-loss (and per source), generated answers and their scores, the sanity gate, and the
    external test set and PubMedQA when configured."""
    # An adapter must come from this base model AND these splits: one trained on other splits may have seen these
    # test questions.
    model = load_model(cfg) if adapter is None else load_adapter_model(cfg, adapter, data.expected)
    budget = eval_tokens_per_batch(cfg.scoring.tokens_per_batch, model)
    pad = data.tokenizer.pad_token_id
    test = data.scoring.score(model, data.test, pad, budget, "test")
    metrics = test.metrics
    if test.by_source is not None:  # each source's test examples alone, beside the overall figure
        metrics["by_source"] = test.by_source
    answers = answer_questions(cfg, model, data, name, fallbacks)
    entry = {
        "adapter": str(adapter) if adapter else None,
        # the adapter's LoRA update as trained times this (`medqa.frontier`; 1 unless the frontier scaled it)
        "adapter_scale": adapter_scale(adapter),
        "test": metrics,
        "dtype": scoring_dtype(cfg),
        "generation": generation_metrics(cfg, answers, data.references),
    }
    run = ModelScores(name, entry, answers, test.scores)
    # The same gate as baseline and train (log, stderr); only the untrained tiny demo model is expected to fail.
    run.warning = sanity_check(
        {"test": metrics}, len(data.tokenizer), name, quiet=adapter is None and is_tiny_model(cfg)
    )
    if data.external is not None:  # another data set: does the gain generalise?
        log.info("evaluate: %s: scoring the %d examples of %s", name, len(data.external), cfg.evaluate.external_name)
        external = data.scoring.score(model, data.external, pad, budget)
        entry["external"], run.external = external.metrics, external.scores
    if data.pubmedqa:  # did fine-tuning keep the base model's biomedical knowledge?
        entry["pubmedqa"], run.knowledge = knowledge_kept(cfg, model, data, name)
    log.info("evaluate: %s test answer_loss %.4f", name, metrics["answer_loss"])
    return run


def knowledge_kept(cfg: Config, model, data: EvalInputs, name: str) -> tuple[dict, PubMedQAScores]:
    """The model's PubMedQA accuracy (medqa's scorer), its abstract loss and the majority-answer baseline."""
    log.info("evaluate: %s: scoring %d PubMedQA questions", name, len(data.pubmedqa))
    knowledge = score_pubmedqa(model, data.tokenizer, data.pubmedqa, cfg.scoring.batch_size, progress=True)
    summary = summarize_pubmedqa(knowledge, cfg.scoring.bootstrap_samples, cfg.seed)
    gold = knowledge.gold
    majority = int(np.bincount(gold).argmax())
    summary.update(
        abstract_loss=abstract_loss(knowledge),
        abstract_tokens=int(knowledge.text_tokens.sum()),
        majority_answer=["yes", "no", "maybe"][majority],
        majority_baseline_acc=float((gold == majority).mean()),
    )
    return summary, knowledge


def adapter_scale(adapter: Path | None) -> float | None:
    """The scale the frontier saved an adapter at (trial.json's adapter_scale; 1.0 for an adapter as trained, None
    for the base model)."""
    if adapter is None:
        return None
    trial = Path(adapter) / "trial.json"
    return float(json.loads(trial.read_text(encoding="utf-8")).get("adapter_scale", 1.0)) if trial.exists() else 1.0


def answer_questions(cfg: Config, model, data: EvalInputs, name: str, fallbacks: Fallbacks) -> list[str]:
    """The model's answers to the test questions, with a progress bar."""
    log.info("evaluate: %s: answering %d test questions", name, len(data.questions))
    return generate_answers(model, data.tokenizer, cfg, data.questions, fallbacks=fallbacks, progress=True)


def generation_metrics(cfg: Config, answers: list[str], references: list[str]) -> dict:
    """ROUGE, BLEU and the answers' shape; BERTScore too when evaluate.bertscore_model names an encoder."""
    scores = generation_scores(answers, references)
    if cfg.evaluate.bertscore_model:
        scores.update(bertscore(answers, references, cfg.evaluate.bertscore_model, cfg.evaluate.bertscore_layers))
    return scores


def compare_to_base(scoring: Scoring, runs: list[ModelScores]) -> None:
    """Each fine-tuned model against the base on the same examples (paired bootstrap): test answer-loss (and per
    source), the external test set and PubMedQA accuracy, when measured. Adds `vs_base` to their report entries."""
    base = next(r for r in runs if r.name == "base")
    n, seed = scoring.bootstrap_samples, scoring.seed
    for run in runs:
        if run is base:
            continue
        run.entry["vs_base"] = paired_bootstrap(
            base.test.answer_nll, run.test.answer_nll, base.test.answer_tokens, n, seed
        )
        per_source = scoring.paired_per_source("test", base.test, run.test)
        if per_source is not None:
            run.entry["vs_base_by_source"] = per_source
        if run.external is not None:
            run.entry["external"]["vs_base"] = paired_bootstrap(
                base.external.answer_nll, run.external.answer_nll, base.external.answer_tokens, n, seed
            )
        if run.knowledge is not None:
            run.entry["pubmedqa"]["vs_base"] = {
                **paired_comparison(base.knowledge, run.knowledge, n, seed),
                **paired_text(base.knowledge, run.knowledge, n, seed),
            }


def draw_tradeoff(cfg: Config, search: SearchSummary | None) -> None:
    """outputs/tradeoff.png: the search's trials, val answer-loss gain against PubMedQA dev accuracy change, under
    the rule that chose among them (when both were measured)."""
    if search is None or not search["plot"]:
        return
    selection = search["selection"]
    rule = Rule(**{k: selection[k] for k in Rule.__dataclass_fields__ if k in selection})
    plot_tradeoff(search["trials"], rule.drop_limit, paths(cfg).tradeoff)


def build_report(
    cfg: Config,
    data: EvalInputs,
    runs: list[ModelScores],
    fallbacks: Fallbacks,
    search: SearchSummary | None,
    start: float,
) -> Report:
    """report.json: every model's entry, the answers side by side, the model card, the benchmarks and search."""
    samples = [
        {"question": q, "reference": r, **{run.name: run.answers[i] for run in runs}}
        for i, (q, r) in enumerate(zip(data.questions, data.references))
    ]
    return Report(
        model=model_path(cfg),
        dtype=scoring_dtype(cfg),
        sanity_warnings=[run.warning for run in runs if run.warning],
        external=data.external_report,
        bertscore=cfg.evaluate.bertscore_model or BERTSCORE_OFF,
        test_examples=len(data.test),
        generated=len(data.questions),
        models={run.name: run.entry for run in runs},
        samples=samples,
        model_card=card_fields(cfg),
        benchmarks=read_benchmarks(cfg),
        fallbacks=fallbacks.records,
        search=search,
        seconds=round(time.perf_counter() - start, 2),
    )
