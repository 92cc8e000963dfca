"""report.md: every section a view of report.json (`medqa.report.Report`) alone, so that reading report.json back
renders the same text (`render_markdown(read_report(path)) == report.md`).

`render_summary` is report.md up to its samples: what `medqa evaluate` prints.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from medqa.records import describe_counts

if TYPE_CHECKING:
    from medqa.report import Report


def render_markdown(report: Report, n_samples: int) -> str:
    """report.md: the summary (`render_summary`), the first `n_samples` answers side by side, the model card."""
    return "\n".join(summary_lines(report) + sample_lines(report, n_samples) + card_lines(report))


def render_summary(report: Report) -> str:
    """report.md without its samples and model card: what `medqa evaluate` prints."""
    return "\n".join(summary_lines(report))


def summary_lines(report: Report) -> list[str]:
    """Every table of report.md, in order: the models on test, then each measured extra, then the search."""
    return (
        _models_table(report)
        + _source_table(report)
        + _bertscore_lines(report)
        + _external_table(report)
        + _knowledge_table(report)
        + _benchmark_table(report)
        + _search_lines(report)
    )


def sample_lines(report: Report, n_samples: int) -> list[str]:
    lines = ["## Samples", ""]
    for s in report["samples"][:n_samples]:
        lines += [f"**Question.** {s['question']}", "", f"**Reference (doctor).** {s['reference']}", ""]
        lines += [f"**{name}.** {s[name] or '(empty)'}" + "\n" for name in report["models"]]
    return lines


def card_lines(report: Report) -> list[str]:
    card = report["model_card"]
    return [
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


def _fmt(x, spec: str = ".3f") -> str:
    return "-" if x is None or (isinstance(x, float) and np.isnan(x)) else format(x, spec)


def _loss_cells(t: dict, vs: dict) -> str:
    """answer_loss | answer perplexity | 95% CI | Δ loss vs base | p, for one model on one set."""
    ci = t.get("answer_perplexity_ci95")
    return (
        f"{t['answer_loss']:.4f} | {t['answer_perplexity']:.2f} | {f'{ci[0]:.2f}–{ci[1]:.2f}' if ci else '-'} | "
        f"{_fmt(vs.get('loss_delta'), '+.4f')} | {_fmt(vs.get('p_value'), '.4f')}"
    )


def _models_table(report: Report) -> list[str]:
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
        g = m["generation"]
        lines.append(
            f"| {name} | {_loss_cells(m['test'], m.get('vs_base', {}))} | {g['rouge1']:.3f} | {g['rouge2']:.3f} | "
            f"{g['rougeL']:.3f} | {g['bleu']:.2f} | {g['mean_words']:.1f} | {g['empty_share']:.0%} | "
            f"{g['repetitive_share']:.0%} |"
        )
    return lines + [
        "",
        "answer_loss: mean negative log-likelihood per answer token (nats) over all answer tokens of the "
        "test split; perplexity = exp(answer_loss). p: share of paired bootstrap resamples in which the "
        "model is not better than the base (one-sided).",
        "",
    ]


def _source_table(report: Report) -> list[str]:
    """data.sources: each model's test answer perplexity on each source's examples alone, and the paired change."""
    models = report["models"]
    if not any(m["test"].get("by_source") for m in models.values()):
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
            lines.append(f"| {name} | {source} | {t['examples']} | {_loss_cells(t, vs)} |")
    return lines + [""]


def _bertscore_lines(report: Report) -> list[str]:
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


def _external_table(report: Report) -> list[str]:
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
        lines.append(f"| {name} | {_loss_cells(m['external'], m['external'].get('vs_base', {}))} |")
    return lines + [""]


def _knowledge_table(report: Report) -> list[str]:
    """PubMedQA and the abstract loss before and after fine-tuning, next to the HealthCareMagic gain (when they
    were measured)."""
    rows = {name: m for name, m in report["models"].items() if "pubmedqa" in m}
    if not rows:
        return []
    first = next(iter(rows.values()))["pubmedqa"]
    lines = [
        "## Knowledge kept",
        "",
        f"PubMedQA ({first['questions']} expert-labelled test questions, zero-shot, lm-evaluation-harness's "
        "definition: the answer with the highest log-likelihood among yes/no/maybe), its predicted-answer shares "
        f"beside the majority-answer baseline ({first.get('majority_answer', '?')!r} always: "
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
        ci, dci, aci = p.get("acc_ci95"), vs.get("acc_delta_ci95"), vs.get("abstract_change_ci95")
        share = p.get("predicted_share", {})
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


def _benchmark_table(report: Report) -> list[str]:
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
        *benchmark_rows(b),
        "",
    ]


def benchmark_rows(summary: dict) -> list[str]:
    """`medqa benchmark`'s summary.json as markdown rows: task, metric, then per model score ± stderr and Δ vs
    base."""
    lines = [
        "| task | metric | model | questions | score ± stderr | Δ vs base (95% CI) | p (lost) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, m in summary["models"].items():
        for task, metrics in m["tasks"].items():
            for metric, s in metrics.items():
                vs = m.get("vs_base", {}).get(task, {}).get(metric, {})
                ci = vs.get("delta_ci95")
                err = f" ± {s['stderr']:.3f}" if s.get("stderr") is not None else ""
                n = m["questions"].get(task, "-")
                lines.append(
                    f"| {task} | {metric} | {name} | {n} | {s['value']:.3f}{err} | "
                    f"{_fmt(vs.get('delta'), '+.3f')}{f' ({ci[0]:+.3f} to {ci[1]:+.3f})' if ci else ''} | "
                    f"{_fmt(vs.get('p_lost'), '.3f')} |"
                )
    return lines


def _search_lines(report: Report) -> list[str]:
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
        eligible = "-" if t.get("eligible") is None else ("yes" if t.get("eligible") else "no")
        lines.append(
            f"| {t.get('trial')} | {_fmt(t.get('learning_rate'), '.2e')} | {t.get('lora_r', '-')} | "
            f"{_fmt(t.get('best_val_answer_loss'), '.4f')} | {_fmt(t.get('gain'), '+.4f')} | "
            f"{_fmt(t.get('knowledge_acc'))} | {_fmt(t.get('knowledge_change'), '+.3f')} | "
            f"{_fmt(t.get('abstract_change'), '+.2%')} | {eligible} | {'**yes**' if t.get('chosen') else ''} |"
        )
    lines.append("")
    if s.get("plot"):
        lines += [f"![gain vs knowledge kept per trial]({s['plot']})", ""]
    return lines + _frontier_lines(s.get("frontier"))


def _frontier_lines(front: dict | None) -> list[str]:
    """The frontier's choice among every kept adapter at every scale, and its score on all PubMedQA dev questions."""
    if not front:
        return []
    c = front["chosen"]
    lines = [
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
