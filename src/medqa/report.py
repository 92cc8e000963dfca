"""report.json: its shape, its one writer and reader, and every view of it.

`medqa evaluate` builds a `Report` and hands it to `write_report`, which renders report.md from it
(`medqa.report_markdown`, every section a view of the report alone) and replaces both files together. Everything else
reads: notebook 4's frames (`final_comparison_frame`, `by_source_frame`, `knowledge_frame`, and
`benchmark_frame` of `medqa benchmark`'s summary, report.json's `benchmarks`), the findings
(`lm_eval_accuracy`), the markdown sections and the lm-eval table (`report_markdown.benchmark_rows`, also what
`medqa benchmark` prints). Nothing here scores a model or draws a plot.

The search's trial rows (`TrialRow`, report.json's `search.trials`) hold every parameter the search varies, as
`medqa.schema` declares them (`TRIAL_PARAMS`), and its results (`TRIAL_RESULTS`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TypedDict

import pandas as pd

from medqa import schema
from medqa.artifacts import replace_together
from medqa.report_markdown import render_markdown

# ------------------------------------------------------------------------------------------------- shape


class TrialRow(TypedDict, total=False):
    """One trial of the search (a row of its results.csv): its parameters (`TRIAL_PARAMS`), then its results."""

    trial: str
    status: str  # completed, stopped early, error
    best_step: int  # the kept checkpoint's step
    best_val_answer_loss: float
    gain: float  # base val answer_loss minus the kept checkpoint's (nats per answer token; > 0: better than base)
    knowledge_acc: float  # PubMedQA dev accuracy at the kept checkpoint
    knowledge_base_acc: float
    knowledge_change: float
    abstract_change: float  # relative change of the dev abstracts' loss against the base model
    eligible: bool  # within the rule's limits
    chosen: bool


class SearchSummary(TypedDict):
    """How `medqa tune` chose outputs/best/ (report.json's `search`)."""

    selection: dict  # the rule (trial.json's `selection`)
    trials: list[TrialRow]
    plot: str | None  # outputs/tradeoff.png's name when drawn
    chosen_source: str | None  # the trial outputs/best/ came from
    adapter_scale: float  # the LoRA update as trained times this (`medqa.frontier`)
    frontier: dict | None  # the frontier's points and choice, when it ran


class ModelEntry(TypedDict, total=False):
    """One model's results (report.json's `models[name]`); `vs_base*` for a fine-tuned one only."""

    adapter: str | None
    adapter_scale: float | None  # 1 unless the frontier scaled it; None for the base model
    test: dict  # `metrics.summarize` on the test split, with `by_source` under data.sources
    dtype: str
    generation: dict  # ROUGE, BLEU, the answers' shape (`textmetrics`); BERTScore when on
    external: dict  # evaluate.external_test's answer loss (with `vs_base`), when configured
    pubmedqa: dict  # `pubmedqa.summarize` plus the abstract loss and the majority baseline (with `vs_base`)
    vs_base: dict  # `metrics.paired_bootstrap` of the test answer loss against the base model
    vs_base_by_source: dict  # the same within each source


class Report(TypedDict):
    """report.json, in the order it is written."""

    model: str
    dtype: str
    sanity_warnings: list[str]
    external: dict | None  # evaluate.external_test's accounting (`medqa.external`)
    bertscore: str  # the encoder, or why BERTScore is off
    test_examples: int
    generated: int  # test questions answered by every model
    models: dict[str, ModelEntry]
    samples: list[dict]  # question, reference and each model's answer
    model_card: dict  # `modelcard.card_fields`
    benchmarks: dict | None  # `medqa benchmark`'s summary.json
    fallbacks: list[dict]  # speed-ups that could not run here
    search: SearchSummary | None
    seconds: float


def trial_column(key: str) -> str:
    """A searched config key's column in results.csv and in a trial row: train.learning_rate -> learning_rate,
    lora.r -> lora_r."""
    return key.split(".", 1)[1] if key.startswith("train.") else key.replace(".", "_")


TRIAL_PARAMS = tuple(trial_column(key) for key, _ in schema.searched().values())
TRIAL_RESULTS = tuple(k for k in TrialRow.__annotations__ if k != "trial")
DEFAULT_SELECTION = {"objective": "answer_loss", "rule": "lowest val answer_loss"}


def search_summary(search: dict | None, plot_name: str) -> SearchSummary | None:
    """report.json's `search` from `workdir.read_search` (trial.json and results.csv; None when tune has not run).
    `plot` is `plot_name` when the trials can be drawn (`tradeoff_drawable`); drawing it is the caller's step."""
    if search is None:
        return None
    keys = ("trial", *TRIAL_PARAMS, *TRIAL_RESULTS)
    trials = [TrialRow(**{k: t[k] for k in keys if k in t}) for t in search["trials"]]
    chosen = search["chosen"]
    return SearchSummary(
        selection=chosen.get("selection", DEFAULT_SELECTION),
        trials=trials,
        plot=plot_name if tradeoff_drawable(trials) else None,
        chosen_source=chosen.get("trial"),
        adapter_scale=chosen.get("adapter_scale", 1.0),
        frontier=chosen.get("frontier"),
    )


def tradeoff_drawable(trials: list[TrialRow]) -> bool:
    """Whether some trial measured both its gain and its knowledge change (the trade-off plot's two axes)."""
    return any(t.get("gain") is not None and t.get("knowledge_change") is not None for t in trials)


# ------------------------------------------------------------------------------------------------- files


def write_report(report_json: Path, report_md: Path, report: Report, n_samples: int) -> None:
    """report.json and report.md (rendered from it, `n_samples` answers shown), replaced together: both are written
    beside their targets first, then renamed; a failure at any point leaves the previous pair as it was."""
    texts = {
        Path(report_json): json.dumps(report, indent=2, ensure_ascii=False) + "\n",
        Path(report_md): render_markdown(report, n_samples),
    }
    replace_together(texts)


def read_report(path: Path) -> Report:
    """report.json as `write_report` wrote it."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


def final_comparison_frame(report: Report) -> pd.DataFrame:
    """Notebook 4's final comparison: per model its test answer loss and perplexity with the interval, the paired p
    against the base model, and the generated answers' ROUGE, BLEU and share of looping answers."""
    rows = {
        name: {
            "answer_loss": m["test"]["answer_loss"],
            "answer_perplexity": m["test"]["answer_perplexity"],
            "95% CI": m["test"]["answer_perplexity_ci95"],
            "p vs base": m.get("vs_base", {}).get("p_value"),
            **{k: m["generation"][k] for k in ("rouge1", "rouge2", "rougeL", "bleu", "repetitive_share")},
        }
        for name, m in report["models"].items()
    }
    return pd.DataFrame(rows).T


def by_source_frame(report: Report) -> pd.DataFrame | None:
    """evaluate's test answer perplexity per source and model (report.json's `by_source`), with the paired change
    in answer loss against the base model within each source; None when the run had one source."""
    rows = []
    for name, m in report["models"].items():
        for source, t in (m["test"].get("by_source") or {}).items():
            vs = (m.get("vs_base_by_source") or {}).get(source, {})
            rows.append(
                {
                    "model": name,
                    "source": source,
                    "examples": t["examples"],
                    "answer_perplexity": t["answer_perplexity"],
                    "95% CI": t["answer_perplexity_ci95"],
                    "Δ answer_loss vs base": vs.get("loss_delta"),
                    "p": vs.get("p_value"),
                }
            )
    return pd.DataFrame(rows).set_index(["source", "model"]).sort_index() if rows else None


def knowledge_frame(report: Report) -> pd.DataFrame | None:
    """PubMedQA test accuracy and the abstract loss per model beside its HealthCareMagic test answer perplexity:
    medqa's scorer (`pubmedqa`: accuracy with its interval, the predicted-answer shares beside the majority-answer
    baseline, macro-F1, the abstract loss and their paired changes) and lm-eval's accuracy (report.json's
    `benchmarks`) when `medqa benchmark` ran; None when neither did."""
    rows = {}
    for name, m in report["models"].items():
        row = {"test answer perplexity": m["test"]["answer_perplexity"]}
        row["Δ answer_loss vs base"] = (m.get("vs_base") or {}).get("loss_delta")
        if "pubmedqa" in m:
            row.update(_pubmedqa_cells(m["pubmedqa"]))
        acc = lm_eval_accuracy(report, name)
        if acc:
            row.update(
                {
                    f"lm-eval {acc['task']} acc": acc["value"],
                    "lm-eval Δ acc": acc["delta"],
                    "lm-eval questions": acc["questions"],
                }
            )
        if len(row) > 2:
            rows[name] = row
    return pd.DataFrame(rows).T if rows else None


def _pubmedqa_cells(p: dict) -> dict[str, Any]:
    vs = p.get("vs_base") or {}
    share = p.get("predicted_share") or {}
    return {
        "PubMedQA acc": p["acc"],
        "acc 95% CI": p.get("acc_ci95"),
        "Δ acc vs base": vs.get("acc_delta"),
        "Δ acc 95% CI": vs.get("acc_delta_ci95"),
        "p (lost)": vs.get("p_value_lost"),
        "macro-F1": p.get("macro_f1"),
        "answered yes/no/maybe": " / ".join(f"{share.get(c, 0):.0%}" for c in ("yes", "no", "maybe")),
        "majority baseline": p.get("majority_baseline_acc"),
        "questions": p.get("questions"),
        "abstract loss": p.get("abstract_loss"),
        "Δ abstract loss": vs.get("abstract_change"),
        "Δ abstract 95% CI": vs.get("abstract_change_ci95"),
    }


def benchmark_frame(summary: dict) -> pd.DataFrame:
    """`medqa benchmark`'s summary (report.json's `benchmarks`) as notebook 4 shows it: one row per task, metric
    and model with its score, stderr and, against the base model, the change and the one-sided p that it was
    lost."""
    rows = []
    for name, m in summary["models"].items():
        for task, metrics in m["tasks"].items():
            for metric, score in metrics.items():
                vs = ((m.get("vs_base") or {}).get(task) or {}).get(metric) or {}
                rows.append(
                    {
                        "task": task,
                        "metric": metric,
                        "model": name,
                        "score": score["value"],
                        "stderr": score["stderr"],
                        "Δ vs base": vs.get("delta"),
                        "p (lost)": vs.get("p_lost"),
                    }
                )
    return pd.DataFrame(rows)


def lm_eval_accuracy(report: Report, name: str) -> dict | None:
    """lm-eval's accuracy of model `name` on the first benchmark task that reports one (report.json's
    `benchmarks`): task, value, the base model's value, questions, and against the base delta and p_lost (None for
    the base model); None when `medqa benchmark` did not run or no task has an accuracy."""
    models = (report.get("benchmarks") or {}).get("models") or {}
    b = models.get(name) or {}
    for task, metrics in (b.get("tasks") or {}).items():
        if "acc" in metrics:
            vs = ((b.get("vs_base") or {}).get(task) or {}).get("acc") or {}
            base = ((models.get("base") or {}).get("tasks") or {}).get(task, {}).get("acc", {})
            return {
                "task": task,
                "value": metrics["acc"]["value"],
                "base_value": base.get("value"),
                "questions": (b.get("questions") or {}).get(task),
                "delta": vs.get("delta"),
                "p_lost": vs.get("p_lost"),
            }
    return None
