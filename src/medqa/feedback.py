"""`medqa feedback`: what the chat page's ratings say, and the rated pairs as preference-tuning data.

Reads `outputs/chat/feedback.jsonl` (`medqa.ratings.read_feedback`: a damaged line is reported by its number and
skipped) and writes `outputs/chat/feedback_summary.json`: the ratings per configuration, i.e. per pair of models
(their fingerprints: a retrained adapter is another configuration even under the same folder name) and per
generation settings (a rating made with settings changed in the page is set apart in its own row, and counted).
Per configuration: fine-tuned wins, base wins, ties, "both bad", and the fine-tuned win rate over the decided
ratings (wins / (wins + losses); ties and "both bad" prefer neither) with its 95% Wilson score interval, which
stays inside [0, 1] and keeps its coverage for the few ratings a person gives (the normal-approximation interval
does neither). A "better" or "worse" given to two identical answers counts as a tie.

`--export-preferences FILE` writes one JSON object a line, {"prompt", "chosen", "rejected"}: the standard
(non-conversational) preference format that TRL's DPOTrainer reads. The prompt is the text the model saw: the
tokenizer's chat template around the question (and the chosen model's earlier turns) where the config uses one,
else `prompt.template`. Ties and "both bad" give no pair and are skipped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

from medqa.artifacts import write_text_atomic
from medqa.faults import guard
from medqa.modeling import load_tokenizer
from medqa.prompts import template_text
from medqa.ratings import BASE, TUNED, read_feedback, workdir_relative
from medqa.schema import Config
from medqa.workdir import paths

log = logging.getLogger(__name__)

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile: a two-sided 95% interval
INTERVAL = "95% Wilson score interval of the fine-tuned win rate (wins / (wins + losses); ties and both bad left out)"


@dataclass
class FeedbackResult:
    """The summary (as written to feedback_summary.json), where it went, and the preference file (if asked)."""

    summary: dict
    out: Path | None
    preferences: Path | None = None

    def table(self) -> str:
        s = self.summary
        if not s["ratings"]:
            return s["message"]
        import pandas as pd

        rows = [
            {
                "base": g["models"][BASE],
                "fine-tuned": g["models"][TUNED],
                "fingerprints": f"{g['fingerprints'][BASE][:8]}/{g['fingerprints'][TUNED][:8]}",
                "settings": g["settings_fingerprint"] + (" (changed in the page)" if g["settings_changed"] else ""),
                "ratings": g["ratings"],
                "fine-tuned wins": g["wins"],
                "base wins": g["losses"],
                "ties": g["ties"],
                "both bad": g["both_bad"],
                "win rate [95% Wilson]": _rate(g),
            }
            for g in s["configurations"]
        ]
        skipped = f" ({len(s['skipped_lines'])} damaged line(s) skipped)" if s["skipped_lines"] else ""
        lines = [f"{s['ratings']} ratings in {s['source']}{skipped}", pd.DataFrame(rows).to_string(index=False)]
        if s["settings_changed"]:
            lines.append(
                f"{s['settings_changed']} rating(s) made with generation settings changed in the page: set apart "
                "in their own row(s)."
            )
        return "\n".join(lines)


@guard("feedback")  # a write the OS refuses: one paragraph (medqa.faults)
def feedback(cfg: Config, export_preferences: str | Path | None = None) -> FeedbackResult:
    """Summarise outputs/chat/feedback.jsonl into feedback_summary.json; with `export_preferences`, also write the
    decided ratings as prompt/chosen/rejected JSON lines to that file."""
    source = paths(cfg).chat_feedback
    ratings, problems = read_feedback(source) if source.exists() else ([], [])
    for _, problem in problems:
        log.warning(problem)
    summary = summarise(ratings, [number for number, _ in problems], workdir_relative(cfg, source))
    if not ratings:
        what = "has no ratings" if source.exists() else "does not exist"
        summary["message"] = (
            f"Nothing to summarise: {summary['source']} {what} yet. Rate answers in `medqa chat` first."
        )
        return FeedbackResult(summary, None)
    preferences = None
    if export_preferences is not None:
        preferences = Path(export_preferences)
        rows = preference_rows(cfg, ratings)
        # atomic, as every artifact: a full disk mid-write leaves the previous file, never half of one
        write_text_atomic(preferences, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        summary["exported_pairs"] = len(rows)
    out = paths(cfg).chat_feedback_summary
    write_text_atomic(out, json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    return FeedbackResult(summary, out, preferences)


def outcome(rating: dict) -> str:
    """ "win" (the fine-tuned answer preferred), "loss", "tie" or "both bad"."""
    if rating["rating"] == "both bad":
        return "both bad"
    answers = rating["answers"]
    if rating.get("preferred") is None or answers.get(BASE, "").strip() == answers.get(TUNED, "").strip():
        return "tie"
    return "win" if rating["preferred"] == TUNED else "loss"


def summarise(ratings: list[dict], skipped_lines: list[int], source: str) -> dict:
    """The summary of `ratings`, one entry per configuration (models' fingerprints and generation settings)."""
    groups: dict[tuple, dict] = {}
    for r in ratings:
        settings = r.get("settings", {})
        key_settings = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
        fingerprints = {name: r["models"].get(name, {}).get("fingerprint", "?") for name in (BASE, TUNED)}
        g = groups.setdefault(
            (fingerprints[BASE], fingerprints[TUNED], key_settings),
            {
                "models": {name: r["models"].get(name, {}).get("label", name) for name in (BASE, TUNED)},
                "fingerprints": fingerprints,
                "settings_fingerprint": key_settings,
                "settings": settings,
                "settings_changed": bool(r.get("settings_changed")),
                "ratings": 0,
                "blind": 0,
                **{k: 0 for k in ("wins", "losses", "ties", "both_bad")},
            },
        )
        g["ratings"] += 1
        g["blind"] += bool(r.get("blind"))
        g[{"win": "wins", "loss": "losses", "tie": "ties", "both bad": "both_bad"}[outcome(r)]] += 1
    for g in groups.values():
        decided = g["wins"] + g["losses"]
        g["win_rate"] = g["wins"] / decided if decided else None
        g["interval_95"] = wilson(g["wins"], decided)
    return {
        "source": source,
        "ratings": len(ratings),
        "skipped_lines": skipped_lines,
        "interval": INTERVAL,
        "settings_changed": sum(bool(r.get("settings_changed")) for r in ratings),
        "configurations": sorted(groups.values(), key=lambda g: (g["settings_changed"], -g["ratings"])),
    }


def wilson(successes: int, n: int, z: float = Z95) -> list[float] | None:
    """The Wilson score interval [low, high] of a proportion (successes out of n); None when n is 0."""
    if n == 0:
        return None
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [max(0.0, centre - half), min(1.0, centre + half)]


def preference_rows(cfg: Config, ratings: list[dict]) -> list[dict]:
    """{"prompt", "chosen", "rejected"} per decided rating (a win or a loss), the prompt as the model saw it."""
    tokenizer = load_tokenizer(cfg)
    rows = []
    for r in ratings:
        if outcome(r) not in ("win", "loss"):
            continue
        chosen = r["preferred"]
        rejected = TUNED if chosen == BASE else BASE
        history = [tuple(turn) for turn in r.get("history", {}).get(chosen, [])]
        before, after, _ = template_text(tokenizer, cfg.prompt, history)
        rows.append(
            {
                "prompt": before + r["question"] + after,
                "chosen": r["answers"][chosen],
                "rejected": r["answers"][rejected],
            }
        )
    return rows


def _rate(g: dict) -> str:
    if g["win_rate"] is None:
        return "-"
    low, high = g["interval_95"]
    return f"{g['win_rate']:.2f} [{low:.2f}, {high:.2f}]"
