"""Tables for the notebooks: token lengths, before/after cleaning, and the original project's keyword views
(medical specialty and urgency counts), read from the files `prepare` wrote."""

from __future__ import annotations

import re

import pandas as pd

from medqa.prompts import IGNORE_INDEX
from medqa.schema import Config
from medqa.sources import read_records
from medqa.workdir import SPLITS, load_records, load_split, paths, read_metrics

# Keyword views as in the original project's analysis: a question counts for every group whose keyword it has.
SPECIALTY_KEYWORDS: dict[str, list[str]] = {
    "cardiology": ["heart", "chest pain", "palpitation", "blood pressure", "hypertension", "cholesterol"],
    "dermatology": ["skin", "rash", "itch", "acne", "pimple", "eczema", "mole"],
    "gastroenterology": ["stomach", "abdominal", "diarrhea", "diarrhoea", "constipation", "acidity", "liver"],
    "neurology": ["headache", "migraine", "seizure", "numbness", "dizziness", "vertigo", "nerve"],
    "orthopedics": ["back pain", "knee", "joint", "fracture", "shoulder", "spine", "bone"],
    "gynecology": ["period", "menstrual", "pregnan", "vaginal", "uterus", "ovar", "pcos"],
    "pulmonology": ["cough", "asthma", "breath", "lung", "wheez", "phlegm"],
    "psychiatry": ["anxiety", "depress", "stress", "panic", "sleep", "insomnia"],
    "urology": ["urine", "urinat", "kidney", "bladder", "prostate"],
    "ent": ["ear", "throat", "tonsil", "sinus", "nose"],
    "pediatrics": ["my son", "my daughter", "baby", "infant", "child", "month old"],
}
URGENCY_KEYWORDS: dict[str, list[str]] = {
    "emergency": [
        "emergency",
        "unconscious",
        "can't breathe",
        "cannot breathe",
        "severe bleeding",
        "suicid",
        "chest pain",
        "stroke",
        "seizure",
    ],
    "urgent": ["severe", "bleeding", "high fever", "unbearable", "worsening", "blood in"],
    "routine": [],  # everything else
}


def load_splits(cfg: Config) -> dict[str, list[dict]]:
    return {s: load_records(cfg, s) for s in SPLITS}


def token_lengths(cfg: Config) -> pd.DataFrame:
    """One row per tokenized example: split, prompt tokens, answer tokens (incl. EOS), total."""
    rows = []
    for s in SPLITS:
        ds = load_split(cfg, s, limit=False)
        for labels in ds["labels"]:
            answer = sum(1 for label in labels if label != IGNORE_INDEX)
            rows.append(
                {
                    "split": s,
                    "prompt_tokens": len(labels) - answer,
                    "answer_tokens": answer,
                    "total_tokens": len(labels),
                }
            )
    return pd.DataFrame(rows)


def _matches(text: str, keyword: str) -> bool:
    return re.search(r"\b" + re.escape(keyword), text) is not None


def keyword_counts(texts: list[str], groups: dict[str, list[str]]) -> pd.Series:
    """How many texts mention each group's keywords (case-insensitive). A group with no keywords counts the
    texts that matched no other group."""
    counts = dict.fromkeys(groups, 0)
    for text in texts:
        low = text.lower()
        hit = False
        for name, words in groups.items():
            if words and any(_matches(low, w) for w in words):
                counts[name] += 1
                hit = True
        for name, words in groups.items():
            if not words and not hit:
                counts[name] += 1
    return pd.Series(counts, name="questions").sort_values(ascending=False)


def urgency_counts(texts: list[str]) -> pd.Series:
    """Each text gets the first urgency level whose keywords it has (emergency before urgent), else routine."""
    levels = dict.fromkeys(URGENCY_KEYWORDS, 0)
    for text in texts:
        low = text.lower()
        level = next(
            (name for name, words in URGENCY_KEYWORDS.items() if any(_matches(low, w) for w in words)), "routine"
        )
        levels[level] += 1
    return pd.Series(levels, name="questions")


def before_after(cfg: Config, n: int = 5) -> pd.DataFrame:
    """Kept records whose text cleaning changed most, beside their originals."""
    raw = read_records(cfg.data.source, cfg.data.hub_split)
    rows = []
    for s, records in load_splits(cfg).items():
        for r in records:
            orig = raw[r["index"]]
            q0, a0 = str(orig[cfg.data.question_field]), str(orig[cfg.data.answer_field])
            changed = abs(len(a0) - len(r["answer"])) + abs(len(q0) - len(r["question"]))
            rows.append(
                {
                    "split": s,
                    "index": r["index"],
                    "original_question": q0,
                    "question": r["question"],
                    "original_answer": a0,
                    "answer": r["answer"],
                    "chars_removed": changed,
                }
            )
    df = pd.DataFrame(rows)
    return df.sort_values(["chars_removed", "index"], ascending=[False, True]).head(n).reset_index(drop=True)


def metrics_frame(runs: dict[str, dict]) -> pd.DataFrame:
    """Baseline vs fine-tuned (or any runs) side by side: one row per run and split."""
    rows = []
    for name, metrics in runs.items():
        for split in ("val", "test"):
            m = metrics.get(split)
            if not m:
                continue
            ci = m.get("answer_perplexity_ci95") or [float("nan"), float("nan")]
            rows.append(
                {
                    "model": name,
                    "split": split,
                    "examples": m["examples"],
                    "answer tokens": m["answer_tokens"],
                    "answer_loss": m["answer_loss"],
                    "answer_perplexity": m["answer_perplexity"],
                    "95% CI low": ci[0],
                    "95% CI high": ci[1],
                    "bits/token": m["bits_per_token"],
                    "sequence_perplexity": m["sequence_perplexity"],
                }
            )
    return pd.DataFrame(rows).set_index(["split", "model"]).sort_index()


def load_metrics(cfg: Config, stage: str) -> dict | None:
    """outputs/<stage>/metrics.json, or None when that stage has not run."""
    return read_metrics(paths(cfg).outputs / stage)


def per_source_table(report: dict) -> pd.DataFrame:
    """prepare_report.json's per-source accounting, one row per source (read, kept per split, rejected by reason,
    truncated) and a total row equal to the report's overall figures."""
    rows = {}
    for name, s in report["sources"].items():
        rows[name] = {
            "read": s["read"],
            **{f"kept: {k}": v for k, v in s["kept"].items()},
            **{f"rejected: {k}": v for k, v in s["rejected"].items()},
            "truncated": s["truncated"],
        }
    table = pd.DataFrame(rows).T.fillna(0).astype(int)
    table.loc["total"] = table.sum()
    return table
