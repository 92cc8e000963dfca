"""What a run found, in sentences written from its own numbers: the closing cell of each notebook.

Each function takes the artifacts a stage wrote (prepare_report.json, metrics.json, report.json, a trial's
trial.json) as dicts and returns Markdown, so the text a notebook ends with changes when the numbers do and can
never claim what the run did not measure. Nothing here computes a metric: it reads and compares them.
"""

from __future__ import annotations

import math

from medqa.report import lm_eval_accuracy

__all__ = ["prepare_findings", "baseline_findings", "train_findings", "final_findings", "search_space_table"]


def prepare_findings(report: dict) -> str:
    """Records read, kept per split, rejected by reason (largest first), truncated; per source when mixed."""
    kept = report["kept"]
    rejected = report["rejected"]
    lines = [
        f"Of **{report['read']:,}** records read, **{sum(kept.values()):,}** were kept "
        f"({_splits(kept)}) and **{sum(rejected.values()):,}** rejected"
        + (f": {_reasons(rejected)}." if rejected else ".")
        + " Every rejected record is in `data/rejected.jsonl` with its reason.",
        f"{report['truncated']:,} kept examples ({_share(report['truncated'], sum(kept.values()))}) were longer than "
        f"`data.max_length` = {report['max_length']} tokens and were cut (long questions first, then answer tails)"
        + (": raise `data.max_length` if the budget allows." if report["truncated"] else "."),
    ]
    for name, s in (report.get("sources") or {}).items():
        lines.append(
            f"Source **{name}**: read {s['read']:,}, kept {sum(s['kept'].values()):,} ({_splits(s['kept'])}), "
            f"rejected {sum(s['rejected'].values()):,}" + (f" ({_reasons(s['rejected'])})" if s["rejected"] else "")
        )
    return _md(lines)


def baseline_findings(metrics: dict) -> str:
    """The untuned model's test (and val) answer perplexity, with the uniform-guess reference."""
    test, val = metrics["test"], metrics.get("val")
    vocab = (metrics.get("tokenizer") or {}).get("vocab_size")
    lines = [
        f"Before fine-tuning, the model's test answer perplexity is **{test['answer_perplexity']:.2f}** "
        f"(95% CI {_ci(test['answer_perplexity_ci95'])}) over {test['examples']:,} doctor answers "
        f"({test['answer_tokens']:,} answer tokens)" + (f"; on val {val['answer_perplexity']:.2f}." if val else ".")
    ]
    if vocab:
        ratio = vocab / test["answer_perplexity"]
        lines.append(
            f"Guessing uniformly over its {vocab:,}-token vocabulary would score {vocab:,}: the untuned model is "
            f"{ratio:,.0f} times better than that, so the measurement is sane. This is the figure fine-tuning "
            "must beat."
        )
    return _md(lines)


def train_findings(metrics: dict, baseline: dict | None = None) -> str:
    """The fine-tuned adapter against the baseline on test and val; the kept checkpoint; the knowledge kept."""
    test = metrics["test"]
    lines = [
        f"Fine-tuning trained {metrics['trainable_parameters']:,} of {metrics['total_parameters']:,} parameters "
        f"({_share(metrics['trainable_parameters'], metrics['total_parameters'])}) for {metrics['steps']} steps."
    ]
    if baseline:
        b = baseline["test"]
        change = test["answer_perplexity"] / b["answer_perplexity"] - 1
        verb = "lowered" if change < 0 else "raised"
        lines.append(
            f"It {verb} test answer perplexity from {b['answer_perplexity']:.2f} to "
            f"**{test['answer_perplexity']:.2f}** "
            f"({change:+.1%}; 95% CI {_ci(test['answer_perplexity_ci95'])})"
            + (
                f" and val from {baseline['val']['answer_perplexity']:.2f} to "
                f"{metrics['val']['answer_perplexity']:.2f}."
                if baseline.get("val") and metrics.get("val")
                else "."
            )
        )
    else:
        lines.append(f"Test answer perplexity: **{test['answer_perplexity']:.2f}** (no baseline to compare with).")
    chosen = (metrics.get("selection") or {}).get("checkpoint")
    if chosen:
        fell_back = metrics["selection"].get("eligible") is False
        how = "by the rule's fallback" if fell_back else "by the rule"
        lines.append(
            f"The kept checkpoint is step {chosen['step']} of {metrics['steps']} (val answer loss "
            f"{chosen['answer_loss']:.4f}), chosen {how} `{metrics['selection']['objective']}`"
            + _knowledge_clause(chosen.get("knowledge_change"), chosen.get("knowledge_base_acc"))
            + _abstract_clause(chosen.get("abstract_change"))
        )
        if fell_back:
            lines.append(
                "No checkpoint kept its knowledge within the rule's limits, so the rule fell back to the nearest "
                "miss: a lower learning rate, fewer steps or a smaller `lora.r` (a search over them, notebook 4), "
                "or the adapter scaled back after training (the frontier, notebook 4) may keep more."
            )
    return _md(lines)


def final_findings(report: dict, val_losses: dict[str, float] | None = None) -> str:
    """Each model against the base on test (answer perplexity with its paired p, PubMedQA through lm-eval or medqa's
    scorer); when the search's best trial won on validation but lost to the plain fine-tune on test, say so.

    `val_losses`: the val answer loss each model was chosen by (fine-tuned: metrics.json's best_val_answer_loss;
    the best trial: trial.json's), by the report's model names."""
    models = report["models"]
    base = models.get("base")
    lines = []
    for name, m in models.items():
        if name == "base" or base is None:
            continue
        vs = m.get("vs_base") or {}
        before, after = base["test"]["answer_perplexity"], m["test"]["answer_perplexity"]
        lines.append(
            f"**{name}**: test answer perplexity {before:.2f} -> {after:.2f} ({after / before - 1:+.1%}"
            + (f", paired p {vs['p_value']:.3f}" if "p_value" in vs else "")
            + ")"
            + _knowledge_kept(report, name)
            + "."
        )
    tuned = next((n for n in models if n.startswith("tuned")), None)
    if tuned and "fine-tuned" in models and val_losses and tuned in val_losses and "fine-tuned" in val_losses:
        val_t, val_f = val_losses[tuned], val_losses["fine-tuned"]
        test_t, test_f = models[tuned]["test"]["answer_loss"], models["fine-tuned"]["test"]["answer_loss"]
        won_val, won_test = val_t < val_f, test_t < test_f
        if won_val == won_test:  # validation and test agree
            story = "and on test too"
        elif won_val:
            story = (
                "but lost to it on test: with this few val examples the search chose by noise as much as by "
                "signal; more val records or more trials would make its choice firmer"
            )
        else:
            story = "and won on test nonetheless"
        lines.append(
            f"The search's choice ({tuned}) {'beat' if won_val else 'did not beat'} the plain fine-tune on validation "
            f"(val answer loss {val_t:.4f} vs {val_f:.4f}) {story} (test answer loss {test_t:.4f} vs {test_f:.4f})."
        )
    target = target_sentence(report)
    if target:
        lines.append(
            "Against the target (test answer perplexity at least 40% below the base model's, PubMedQA accuracy at "
            "most 2 points and abstract loss at most 2% worse):"
        )
        lines.append(target)
    return _md(lines) if lines else "Only the base model was evaluated: train an adapter to compare."


def search_space_table(space: dict) -> list[dict]:
    """Ray Tune's search space as rows a person can read (a sampler's bounds and scale, a list's choices),
    instead of `<ray.tune.search.sample.Float at 0x...>`."""
    rows = []
    for key, domain in space.items():
        if not hasattr(domain, "sampler"):
            rows.append({"parameter": key, "sampled": "fixed", "values": repr(domain)})
            continue
        sampler = type(domain.get_sampler()).__name__.strip("_").lower()
        if hasattr(domain, "categories"):
            rows.append({"parameter": key, "sampled": "choice", "values": ", ".join(map(str, domain.categories))})
        else:
            scale = "log-uniform" if "log" in sampler else "uniform" if "uniform" in sampler else sampler
            kind = "integer" if type(domain).__name__ == "Integer" else "float"
            rows.append(
                {"parameter": key, "sampled": f"{kind}, {scale}", "values": f"{domain.lower:g} to {domain.upper:g}"}
            )
    return rows


def _knowledge_kept(report: dict, name: str) -> str:
    """PubMedQA test accuracy change of `name` with its p, from medqa's scorer (with the abstract loss change)
    when it scored at least as many questions as lm-eval (benchmarks), else from lm-eval."""
    pub = report["models"][name].get("pubmedqa") or {}
    bench = ((report.get("benchmarks") or {}).get("models") or {}).get(name) or {}
    lm_eval_n = max((bench.get("questions") or {}).values(), default=0)
    if "vs_base" in pub and pub.get("questions", 0) >= lm_eval_n:
        vs = pub["vs_base"]
        base_acc = pub["acc"] - vs["acc_delta"]
        text = (
            f"; PubMedQA accuracy {base_acc:.3f} -> {pub['acc']:.3f} ({vs['acc_delta']:+.3f}"
            + (f", p of a loss {vs['p_value_lost']:.3f}" if vs.get("p_value_lost") is not None else "")
            + f", {pub['questions']} questions)"
        )
        if vs.get("abstract_change") is not None:
            ci = vs.get("abstract_change_ci95")
            text += f", abstract loss {vs['abstract_change']:+.2%}" + (
                f" (95% CI {ci[0]:+.2%} to {ci[1]:+.2%})" if ci else ""
            )
        return text
    acc = lm_eval_accuracy(report, name)
    if acc and acc["delta"] is not None:
        return (
            f"; {acc['task']} accuracy {acc['base_value']:.3f} -> {acc['value']:.3f} "
            f"({acc['delta']:+.3f}, p of a loss {acc['p_lost']:.3f}, {acc['questions']} questions, lm-eval)"
        )
    if "vs_base" in pub:
        return f"; PubMedQA accuracy {pub['acc']:.3f} ({pub['vs_base']['acc_delta']:+.3f} vs base)"
    return ""


# The target a chosen adapter is held to (README, "The trade-off"): answer perplexity at least 40% below the base
# model's, PubMedQA accuracy at most 2 points below, abstract loss at most 2% above, on the test split.
TARGET = {"perplexity_drop": 0.40, "accuracy_drop": 0.02, "abstract_rise": 0.02}


def target_check(report: dict, name: str) -> dict | None:
    """Whether `name` met the target on test: each criterion's value, limit and verdict; None without the
    numbers (PubMedQA with the abstract loss, and the base model)."""
    models = report["models"]
    m, base = models.get(name), models.get("base")
    if not m or not base or "vs_base" not in (m.get("pubmedqa") or {}):
        return None
    vs = m["pubmedqa"]["vs_base"]
    ppl = m["test"]["answer_perplexity"] / base["test"]["answer_perplexity"] - 1
    checks = {
        "answer perplexity": (ppl, -TARGET["perplexity_drop"], ppl <= -TARGET["perplexity_drop"]),
        "PubMedQA accuracy": (
            vs["acc_delta"],
            -TARGET["accuracy_drop"],
            vs["acc_delta"] >= -TARGET["accuracy_drop"] - 1e-9,
        ),
    }
    a = vs.get("abstract_change")
    # not measured counts as not met: the target is a claim about all three
    checks["abstract loss"] = (a, TARGET["abstract_rise"], a is not None and a <= TARGET["abstract_rise"])
    shortfall = sum(
        max(0.0, (v - lim) if what == "abstract loss" else (lim - v) if what == "PubMedQA accuracy" else (v - lim))
        for what, (v, lim, _) in checks.items()
        if v is not None
    )
    return {"met": all(ok for _, _, ok in checks.values()), "checks": checks, "shortfall": shortfall}


def target_sentence(report: dict) -> str:
    """One sentence per adapter: met the target, or which criteria it missed and by how much."""
    out = []
    for name in report["models"]:
        if name == "base":
            continue
        t = target_check(report, name)
        if t is None:
            continue
        parts = [
            (
                f"{what} not measured"
                if value is None
                else f"{what} {value:+.3f} (limit {limit:+.2f})"
                if what == "PubMedQA accuracy"
                else f"{what} {value:+.1%} (limit {limit:+.0%})"
            )
            + ("" if ok or value is None else " missed")
            for what, (value, limit, ok) in t["checks"].items()
        ]
        verdict = "meets the target" if t["met"] else "misses the target"
        out.append(f"**{name}** {verdict}: {', '.join(parts)}.")
    checked = {n: target_check(report, n) for n in report["models"] if n != "base"}
    checked = {n: t for n, t in checked.items() if t}
    if checked and not any(t["met"] for t in checked.values()):
        closest = min(checked, key=lambda n: checked[n]["shortfall"])
        out.append(f"No adapter meets it; the closest is **{closest}**.")
    return _md(out)


def _knowledge_clause(change: float | None, base_acc: float | None) -> str:
    if change is None or not math.isfinite(change):
        return "."
    where = f" from the base model's {base_acc:.3f}" if base_acc is not None else ""
    return f"; at that step its PubMedQA dev accuracy had changed by {change:+.3f}{where} " + (
        "(nothing forgotten on these questions)." if change >= 0 else "(some knowledge lost)."
    )


def _abstract_clause(change: float | None) -> str:
    if change is None or not math.isfinite(change):
        return ""
    return f" Its abstract loss on the dev abstracts was {change:+.2%} against the base model's."


def _splits(kept: dict) -> str:
    return ", ".join(f"{split} {n:,}" for split, n in kept.items())


def _reasons(rejected: dict) -> str:
    return ", ".join(f"{n:,} `{reason}`" for reason, n in sorted(rejected.items(), key=lambda kv: (-kv[1], kv[0])))


def _share(part: int, whole: int) -> str:
    return f"{part / whole:.1%}" if whole else "n/a"


def _ci(pair) -> str:
    return f"{pair[0]:.2f} to {pair[1]:.2f}"


def _md(lines: list[str]) -> str:
    return "\n\n".join(lines)
