"""Stage 4b, `evaluate(cfg)`: the final, honest comparison on the held-out test split.

Scores the base model, the `medqa train` model (`outputs/finetune/`) and the best tuned model (`outputs/best/`),
whichever exist, with the baseline stage's metric function; adds a paired bootstrap p-value for each fine-tuned
model against the base; generates answers for `evaluate.num_questions` test questions and scores them with
ROUGE and BLEU. Writes `outputs/report.json` and `outputs/report.md` (metrics, samples and a model card).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medqa.artifacts import write_json, write_text_atomic
from medqa.batching import eval_tokens_per_batch
from medqa.errors import DataError
from medqa.external import load_external
from medqa.fallbacks import Fallbacks
from medqa.generate import generate_answers
from medqa.locks import locked
from medqa.metrics import ExampleScores, evaluate_answer_loss, paired_bootstrap, sanity_check
from medqa.mixing import by_source, paired_by_source
from medqa.modelcard import card_fields
from medqa.modeling import is_tiny_model, load_adapter_model, load_model, load_tokenizer, model_path, scoring_dtype
from medqa.plots import plot_tradeoff
from medqa.pubmedqa import DEFAULT_TEST as DEFAULT_PUBMEDQA
from medqa.pubmedqa import PubMedQAScores, abstract_loss, check_no_dev_overlap, paired_comparison, paired_text
from medqa.pubmedqa import load_items as load_pubmedqa
from medqa.pubmedqa import score_knowledge as score_pubmedqa
from medqa.pubmedqa import subset as pubmedqa_subset
from medqa.pubmedqa import summarize as summarize_pubmedqa
from medqa.records import describe_counts
from medqa.schema import Config
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
    report: dict
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
    compare_to_base(cfg, runs)
    report = build_report(cfg, data, runs, fallbacks, start)
    out = paths(cfg)
    write_json(out.report_json, report)
    write_text_atomic(out.report_md, render_markdown(report, cfg.evaluate.samples_in_report))
    return EvaluateResult(report, out.report_md)


def load_test_set(cfg: Config) -> EvalInputs:
    """The test split and its records (which must agree), the questions to answer, and the optional PubMedQA
    questions and external test set (`medqa.external`, which writes outputs/external/). Checks the BERTScore
    encoder now, not after the first model has been scored."""
    tokenizer = load_tokenizer(cfg)
    test = load_split(cfg, "test", tokenizer)
    records = {r["id"]: r for r in load_records(cfg, "test")}
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
    metrics, per_example = answer_loss(cfg, model, data.test, data.tokenizer, budget)
    if cfg.data.sources:  # each source's test examples alone, beside the overall figure
        metrics["by_source"] = by_source(cfg, "test", per_example)
    answers = answer_questions(cfg, model, data, name, fallbacks)
    entry = {
        "adapter": str(adapter) if adapter else None,
        # the adapter's LoRA update as trained times this (`medqa.frontier`; 1 unless the frontier scaled it)
        "adapter_scale": adapter_scale(adapter),
        "test": metrics,
        "dtype": scoring_dtype(cfg),
        "generation": generation_metrics(cfg, answers, data.references),
    }
    run = ModelScores(name, entry, answers, per_example)
    # The same gate as baseline and train (log, stderr); only the untrained tiny demo model is expected to fail.
    run.warning = sanity_check(
        {"test": metrics}, len(data.tokenizer), name, quiet=adapter is None and is_tiny_model(cfg)
    )
    if data.external is not None:  # another data set: does the gain generalise?
        log.info("evaluate: %s: scoring the %d examples of %s", name, len(data.external), cfg.evaluate.external_name)
        entry["external"], run.external = answer_loss(cfg, model, data.external, data.tokenizer, budget)
    if data.pubmedqa:  # did fine-tuning keep the base model's biomedical knowledge?
        log.info("evaluate: %s: scoring %d PubMedQA questions", name, len(data.pubmedqa))
        run.knowledge = score_pubmedqa(model, data.tokenizer, data.pubmedqa, cfg.scoring.batch_size, progress=True)
        entry["pubmedqa"] = summarize_pubmedqa(run.knowledge, cfg.scoring.bootstrap_samples, cfg.seed)
        gold = run.knowledge.gold
        majority = int(np.bincount(gold).argmax())
        entry["pubmedqa"].update(
            abstract_loss=abstract_loss(run.knowledge),
            abstract_tokens=int(run.knowledge.text_tokens.sum()),
            majority_answer=["yes", "no", "maybe"][majority],
            majority_baseline_acc=float((gold == majority).mean()),
        )
    log.info("evaluate: %s test answer_loss %.4f", name, metrics["answer_loss"])
    return run


def adapter_scale(adapter: Path | None) -> float | None:
    """The scale the frontier saved an adapter at (trial.json's adapter_scale; 1.0 for an adapter as trained, None
    for the base model)."""
    if adapter is None:
        return None
    trial = Path(adapter) / "trial.json"
    return float(json.loads(trial.read_text(encoding="utf-8")).get("adapter_scale", 1.0)) if trial.exists() else 1.0


def answer_loss(cfg: Config, model, dataset, tokenizer, tokens_per_batch: int) -> tuple[dict, ExampleScores]:
    """The baseline stage's metric function on a tokenized set, with a progress bar."""
    return evaluate_answer_loss(
        model,
        dataset,
        tokenizer.pad_token_id,
        cfg.scoring.batch_size,
        cfg.scoring.bootstrap_samples,
        cfg.seed,
        progress=True,
        tokens_per_batch=tokens_per_batch,
    )


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


def compare_to_base(cfg: Config, runs: list[ModelScores]) -> None:
    """Each fine-tuned model against the base on the same examples (paired bootstrap): test answer-loss (and per
    source), the external test set and PubMedQA accuracy, when measured. Adds `vs_base` to their report entries."""
    base = next(r for r in runs if r.name == "base")
    n, seed = cfg.scoring.bootstrap_samples, cfg.seed
    for run in runs:
        if run is base:
            continue
        run.entry["vs_base"] = paired_bootstrap(
            base.test.answer_nll, run.test.answer_nll, base.test.answer_tokens, n, seed
        )
        if cfg.data.sources:
            run.entry["vs_base_by_source"] = paired_by_source(cfg, "test", base.test, run.test)
        if run.external is not None:
            run.entry["external"]["vs_base"] = paired_bootstrap(
                base.external.answer_nll, run.external.answer_nll, base.external.answer_tokens, n, seed
            )
        if run.knowledge is not None:
            run.entry["pubmedqa"]["vs_base"] = {
                **paired_comparison(base.knowledge, run.knowledge, n, seed),
                **paired_text(base.knowledge, run.knowledge, n, seed),
            }


def build_report(cfg: Config, data: EvalInputs, runs: list[ModelScores], fallbacks: Fallbacks, start: float) -> dict:
    """report.json: every model's entry, the answers side by side, the model card, the benchmarks and search."""
    samples = [
        {"question": q, "reference": r, **{run.name: run.answers[i] for run in runs}}
        for i, (q, r) in enumerate(zip(data.questions, data.references))
    ]
    return {
        "model": model_path(cfg),
        "dtype": scoring_dtype(cfg),
        "sanity_warnings": [run.warning for run in runs if run.warning],
        "external": data.external_report,
        "bertscore": cfg.evaluate.bertscore_model or BERTSCORE_OFF,
        "test_examples": len(data.test),
        "generated": len(data.questions),
        "models": {run.name: run.entry for run in runs},
        "samples": samples,
        "model_card": card_fields(cfg),
        "benchmarks": read_benchmarks(cfg),
        "fallbacks": fallbacks.records,
        "search": search_summary(cfg),
        "seconds": round(time.perf_counter() - start, 2),
    }


def search_summary(cfg: Config) -> dict | None:
    """How `medqa tune` chose outputs/best/: the rule, and per trial its val answer-loss gain over the base model
    and its PubMedQA dev accuracy change; draws them as outputs/tradeoff.png (when both were measured)."""
    search = read_search(cfg)
    if search is None:
        return None
    keys = (
        "trial",
        "learning_rate",
        "weight_decay",
        "lora_r",
        "lora_alpha",
        "lora_targets",
        "lora_dropout",
        "max_steps",
        "status",
        "best_step",
        "best_val_answer_loss",
        "gain",
        "knowledge_acc",
        "knowledge_base_acc",
        "knowledge_change",
        "abstract_change",
        "eligible",
        "chosen",
    )
    trials = [{k: t[k] for k in keys if k in t} for t in search["trials"]]
    selection = search["chosen"].get("selection", {"objective": "answer_loss", "rule": "lowest val answer_loss"})
    plotted = any(t.get("gain") is not None and t.get("knowledge_change") is not None for t in trials)
    if plotted:
        rule = Rule(**{k: selection[k] for k in Rule.__dataclass_fields__ if k in selection})
        plot_tradeoff(trials, rule.drop_limit, paths(cfg).tradeoff)
    return {
        "selection": selection,
        "trials": trials,
        "plot": paths(cfg).tradeoff.name if plotted else None,
        # `medqa.frontier`: the adapter outputs/best/ holds, its scale and the front it was chosen from
        "chosen_source": search["chosen"].get("trial"),
        "adapter_scale": search["chosen"].get("adapter_scale", 1.0),
        "frontier": search["chosen"].get("frontier"),
    }


def _search_lines(report: dict) -> list[str]:
    """The search's trials: what each gained on val and kept on the PubMedQA dev set, and which was chosen."""
    s = report.get("search")
    if not s:
        return []
    sel = s["selection"]
    lines = [
        "## Choosing the adapter",
        "",
        f"`medqa tune` chose `tuned (best trial)` by tune.objective={sel['objective']}: {sel['rule']}. Gain: base "
        "val answer_loss minus the trial's kept checkpoint's, in nats per answer token (> 0: better than the base). "
        "Knowledge, on the PubMedQA dev questions (never the test ones), against the base model: accuracy change "
        "and abstract loss change (relative).",
        "",
    ]
    if sel.get("eligible") is False:
        lines += [f"> **{sel.get('message')}**", ""]
    lines += [
        "| trial | learning rate | LoRA r | val answer_loss | gain | dev accuracy | change | abstract loss change | "
        "eligible | chosen |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for t in s["trials"]:
        lines.append(
            f"| {t.get('trial')} | {_fmt(t.get('learning_rate'), '.2e')} | {t.get('lora_r', '-')} | "
            f"{_fmt(t.get('best_val_answer_loss'), '.4f')} | {_fmt(t.get('gain'), '+.4f')} | "
            f"{_fmt(t.get('knowledge_acc'))} | {_fmt(t.get('knowledge_change'), '+.3f')} | "
            f"{_fmt(t.get('abstract_change'), '+.2%')} | "
            f"{_yes(t.get('eligible'))} | {'**yes**' if t.get('chosen') else ''} |"
        )
    lines.append("")
    if s.get("plot"):
        lines += [f"![gain vs knowledge kept per trial]({s['plot']})", ""]
    front = s.get("frontier")
    if front:
        c = front["chosen"]
        lines += [
            f"The frontier scored every kept adapter at scales {', '.join(f'{a:g}' for a in front['alphas'])} "
            f"({front['points']} points, {front['on_front']} on the Pareto front; {front['csv']}). The rule chose "
            f"**{c['source']} at adapter scale {c['alpha']:g}**: val answer perplexity "
            f"{_fmt(c.get('answer_perplexity_change'), '+.1%')} against the base model, abstract loss "
            f"{_fmt(c.get('abstract_change'), '+.2%')}, PubMedQA dev accuracy change "
            f"{_fmt(c.get('knowledge_change'), '+.3f')} on the questions scored at each point.",
            "",
        ]
        final = front.get("final_dev_pubmedqa")
        if final:
            lines += [
                f"On all {final['questions']} PubMedQA dev questions the chosen point answers "
                f"{final['knowledge_acc']:.3f} against the base model's {final['knowledge_base_acc']:.3f} "
                f"(change {final['knowledge_change']:+.3f}; always answering {final['majority_answer']!r}: "
                f"{final['majority_baseline_acc']:.3f}), abstract loss {_fmt(final.get('abstract_change'), '+.2%')}.",
                "",
            ]
    return lines


def _yes(x) -> str:
    return "-" if x is None else ("yes" if x else "no")


def _bertscore_lines(report: dict) -> list[str]:
    setting = report.get("bertscore")
    if not setting:
        return []
    if setting.startswith("BERTScore: off"):
        return [setting, ""]
    rows = [
        f"| {name} | {m['generation']['bertscore_precision']:.4f} | {m['generation']['bertscore_recall']:.4f} | "
        f"{m['generation']['bertscore_f1']:.4f} |"
        for name, m in report["models"].items()
    ]
    return [
        f"BERTScore of the generated answers (encoder `{setting}`, no idf, no rescaling):",
        "",
        "| model | precision | recall | F1 |",
        "|---|---|---|---|",
        *rows,
        "",
    ]


def _external_table(report: dict) -> list[str]:
    """The same answer-loss comparison on another source's test records (evaluate.external_test)."""
    ext = report.get("external")
    if not ext:
        return []
    rejected = sum(ext["rejected"].values())
    cut = (
        f"{ext['truncated']} of them cut at data.max_length ({ext['max_length']} tokens)" if "truncated" in ext else ""
    )
    overlap = ext.get("also_in_test")
    lines = [
        f"## Another data set: {ext['name']}",
        "",
        f"`{ext['source']}`: {ext['read']} records read, {ext['kept']} scored{f', {cut}' if cut else ''}; "
        f"{rejected} left out ({describe_counts(ext['rejected'])}). Cleaned as the training data and never "
        "split; questions also in our train or val split are left out (val chose the checkpoint)."
        + (
            ""
            if overlap is None
            else " None of the scored questions is also in the in-domain test split."
            if overlap == 0
            else f" {overlap} of the scored questions {'is' if overlap == 1 else 'are'} also in the in-domain test "
            "split: kept (the answers come from another source), so the two test sets share that many questions."
        ),
        "",
        "| model | answer_loss | answer perplexity | 95% CI | Δ loss vs base | p (paired bootstrap) |",
        "|---|---|---|---|---|---|",
    ]
    for name, m in report["models"].items():
        t, vs = m["external"], m["external"].get("vs_base", {})
        ci = t.get("answer_perplexity_ci95")
        lines.append(
            f"| {name} | {t['answer_loss']:.4f} | {t['answer_perplexity']:.2f} | "
            f"{f'{ci[0]:.2f}–{ci[1]:.2f}' if ci else '-'} | {_fmt(vs.get('loss_delta'), '+.4f')} | "
            f"{_fmt(vs.get('p_value'), '.4f')} |"
        )
    return lines + [""]


def _knowledge_table(report: dict) -> list[str]:
    """PubMedQA and the abstract loss before and after fine-tuning, next to the HealthCareMagic gain (when they
    were measured)."""
    rows = {name: m for name, m in report["models"].items() if "pubmedqa" in m}
    if not rows:
        return []
    first = next(iter(rows.values()))["pubmedqa"]
    n = first["questions"]
    lines = [
        "## Knowledge kept",
        "",
        f"PubMedQA ({n} expert-labelled test questions, zero-shot, lm-evaluation-harness's definition: the "
        "answer with the highest log-likelihood among yes/no/maybe), its predicted-answer shares beside the "
        f"majority-answer baseline ({first.get('majority_answer', '?')!r} always: "
        f"{_fmt(first.get('majority_baseline_acc'))}), and the abstract loss: nats per token on the same "
        "questions' abstracts (a paired, continuous measure), beside the test answer-loss change.",
        "",
        "| model | PubMedQA accuracy (95% CI) | macro-F1 | answered yes / no / maybe | Δ accuracy vs base (95% CI) | "
        "p (lost accuracy) | abstract loss | Δ abstract loss vs base (95% CI) | test answer perplexity | "
        "Δ answer_loss vs base |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in rows.items():
        p, vs = m["pubmedqa"], m["pubmedqa"].get("vs_base", {})
        ci = p.get("acc_ci95")
        dci = vs.get("acc_delta_ci95")
        share = p.get("predicted_share", {})
        aci = vs.get("abstract_change_ci95")
        lines.append(
            f"| {name} | {p['acc']:.3f}{f' ({ci[0]:.3f}–{ci[1]:.3f})' if ci else ''} | {p['macro_f1']:.3f} | "
            f"{' / '.join(f'{share.get(c, 0):.0%}' for c in ('yes', 'no', 'maybe'))} | "
            f"{_fmt(vs.get('acc_delta'), '+.3f')}{f' ({dci[0]:+.3f} to {dci[1]:+.3f})' if dci else ''} | "
            f"{_fmt(vs.get('p_value_lost'), '.3f')} | {_fmt(p.get('abstract_loss'), '.4f')} | "
            f"{_fmt(vs.get('abstract_change'), '+.2%')}{f' ({aci[0]:+.2%} to {aci[1]:+.2%})' if aci else ''} | "
            f"{m['test']['answer_perplexity']:.2f} | {_fmt(m.get('vs_base', {}).get('loss_delta'), '+.4f')} |"
        )
    return lines + [
        "",
        "p (lost accuracy): share of paired bootstrap resamples in which the model is not worse than "
        "the base; a small p means fine-tuning cost PubMedQA accuracy. Δ abstract loss: relative change "
        "(model / base - 1), positive = the model finds PubMed text less likely than the base did.",
        "",
    ]


def _benchmark_table(report: dict) -> list[str]:
    """`medqa benchmark`'s lm-evaluation-harness scores (outputs/benchmarks/summary.json), when it has run."""
    b = report.get("benchmarks")
    if not b:
        return []
    return [
        "## Knowledge kept: lm-evaluation-harness",
        "",
        f"lm-eval {b['lm_eval']} on {', '.join(b['tasks'])} (zero-shot, {b['dtype']}; per-question logs in "
        "outputs/benchmarks/). Δ: model - base on the same questions, 95% paired-bootstrap interval; p (lost): "
        "share of resamples in which the model is not worse (small p: fine-tuning cost that score).",
        "",
        *b["table"],
        "",
    ]


def _fmt(x, spec=".3f") -> str:
    return "-" if x is None or (isinstance(x, float) and np.isnan(x)) else format(x, spec)


def _source_table(report: dict) -> list[str]:
    """data.sources: each model's test answer perplexity on each source's examples alone, and the paired change."""
    models = report["models"]
    names = [n for m in models.values() for n in (m["test"].get("by_source") or {})]
    if not names:
        return []
    lines = [
        "## Per source (test split)",
        "",
        "| model | source | examples | answer_loss | answer perplexity | 95% CI | Δ loss vs base | p |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, m in models.items():
        for source, t in (m["test"].get("by_source") or {}).items():
            vs = (m.get("vs_base_by_source") or {}).get(source, {})
            ci = t.get("answer_perplexity_ci95")
            lines.append(
                f"| {name} | {source} | {t['examples']} | {t['answer_loss']:.4f} | "
                f"{t['answer_perplexity']:.2f} | {f'{ci[0]:.2f}–{ci[1]:.2f}' if ci else '-'} | "
                f"{_fmt(vs.get('loss_delta'), '+.4f')} | {_fmt(vs.get('p_value'), '.4f')} |"
            )
    return lines + [""]


def render_markdown(report: dict, n_samples: int) -> str:
    lines = ["# medqa evaluation report", ""]
    for warning in report.get("sanity_warnings") or []:
        lines += [f"> **{warning}**", ""]
    lines += [
        f"Test split: {report['test_examples']} examples; answers generated for {report['generated']}; every "
        f"model scored in {report.get('dtype', 'its load dtype')}.",
        "",
        "| model | test answer_loss | answer perplexity | 95% CI | Δ loss vs base | p (paired bootstrap) | "
        "ROUGE-1 | ROUGE-2 | ROUGE-L | BLEU | mean words | empty | looping |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in report["models"].items():
        t, g, vs = m["test"], m["generation"], m.get("vs_base", {})
        ci = t.get("answer_perplexity_ci95")
        lines.append(
            f"| {name} | {t['answer_loss']:.4f} | {t['answer_perplexity']:.2f} | "
            f"{f'{ci[0]:.2f}–{ci[1]:.2f}' if ci else '-'} | {_fmt(vs.get('loss_delta'), '+.4f')} | "
            f"{_fmt(vs.get('p_value'), '.4f')} | {g['rouge1']:.3f} | {g['rouge2']:.3f} | {g['rougeL']:.3f} | "
            f"{g['bleu']:.2f} | {g['mean_words']:.1f} | {g['empty_share']:.0%} | {g['repetitive_share']:.0%} |"
        )
    lines += [
        "",
        "answer_loss: mean negative log-likelihood per answer token (nats) over all answer tokens of the "
        "test split; perplexity = exp(answer_loss). p: share of paired bootstrap resamples in which the "
        "model is not better than the base (one-sided).",
        "",
    ]
    lines += _source_table(report)
    lines += _bertscore_lines(report)
    lines += _external_table(report)
    lines += _knowledge_table(report)
    lines += _benchmark_table(report)
    lines += _search_lines(report)
    lines += ["## Samples", ""]
    for s in report["samples"][:n_samples]:
        lines += [f"**Question.** {s['question']}", "", f"**Reference (doctor).** {s['reference']}", ""]
        lines += [f"**{name}.** {s[name] or '(empty)'}" + "\n" for name in report["models"]]
    card = report["model_card"]
    lines += [
        "## Model card",
        "",
        f"- Base model: `{card['base_model']}`",
        f"- Data: {card['data']}",
        f"- LoRA: {card['lora']}",
        f"- Training: {card['training']}",
        f"- Intended use: {card['intended_use']}",
        f"- Limits: {card['limits']}",
        f"- Licence of the data: {card['licence']}",
        "",
    ]
    return "\n".join(lines)
