"""`medqa feedback` on a feedback.jsonl written by the chat page's own writer (medqa.ratings): two configurations
(a retrained adapter: another fingerprint), ratings made with settings changed in the page set apart, ties, "both
bad", a damaged line and a line that is not a rating (reported by number and skipped, no traceback); the Wilson
interval against scipy's; the exported preference pairs load with `datasets` as prompt / chosen / rejected, with the
prompt as the model saw it (prompt.template, or the tokenizer's chat template); an empty or missing file says there
is nothing to summarise."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import REPO, SAMPLE, demo_config

from medqa.cli import main

DEMO = ["--config", str(REPO / "configs" / "demo.yaml")]
SETTINGS = {"max_new_tokens": 64, "do_sample": False}
MODELS = {
    "one": {
        "base": {"label": "models/tiny-biogpt", "fingerprint": "b" * 64},
        "fine-tuned": {"label": "outputs/finetune (step 4)", "fingerprint": "1" * 64},
    },
    "two": {  # the adapter trained again: the same folder, other weights
        "base": {"label": "models/tiny-biogpt", "fingerprint": "b" * 64},
        "fine-tuned": {"label": "outputs/finetune (step 8)", "fingerprint": "2" * 64},
    },
}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A workdir with the tiny demo model (its tokenizer builds the prompts) and no ratings yet."""
    from medqa.prepare import make_tiny_model

    work = tmp_path_factory.mktemp("feedback")
    make_tiny_model(demo_config(work))
    return work


def _rate(cfg, n: int, first: str, side: str, rating: str, models: str = "one", same=False, changed=()) -> None:
    """Record, with the page's writer, a rating of side `side` of question `n`, shown with `first` as A."""
    from medqa.ratings import Rating, record_feedback

    second = "base" if first == "fine-tuned" else "fine-tuned"
    answers = {"base": f"Rest and ice for question {n}.", "fine-tuned": f"See a doctor about question {n}."}
    if same:
        answers["fine-tuned"] = answers["base"]
    turn = {
        "question": f"My knee hurts ({n}). What should I do?",
        "history": {"base": [], "fine-tuned": []},
        "answers": answers,
        "settings": {**SETTINGS, "max_new_tokens": 20} if changed else SETTINGS,
        "settings_changed": list(changed),
        "reference": None,
        "blind": True,
        "order": {"A": first, "B": second},
        "order_seed": 42,
        "order_draw": n,
    }
    record_feedback(cfg, Rating(turn, side, rating).entry(MODELS[models]))


def _write_ratings(cfg) -> list[int]:
    """The feedback file of the tests below; returns the numbers of the two bad lines."""
    from medqa.workdir import paths

    _rate(cfg, 0, "fine-tuned", "A", "better")  # win
    _rate(cfg, 1, "base", "A", "better")  # loss
    _rate(cfg, 2, "base", "A", "worse")  # win: B (fine-tuned) preferred
    _rate(cfg, 3, "fine-tuned", "B", "worse")  # win: B is base, rated worse
    _rate(cfg, 4, "base", "B", "tie")  # tie
    _rate(cfg, 5, "fine-tuned", "A", "both bad")  # both bad
    _rate(cfg, 6, "base", "A", "better", same=True)  # identical answers: a tie whatever was clicked
    with open(paths(cfg).chat_feedback, "a", encoding="utf-8") as fh:
        fh.write('{"question": "cut off while it was writ\n')  # line 8: damaged
        fh.write("[1, 2]\n")  # line 9: JSON, not a rating
    _rate(cfg, 9, "fine-tuned", "A", "better", models="two")  # win
    _rate(cfg, 10, "base", "A", "better", models="two")  # loss
    _rate(cfg, 11, "fine-tuned", "A", "worse", changed=["max_new_tokens"])  # loss, settings changed: set apart
    return [8, 9]


def test_summary_export_and_damaged_lines(workdir, tmp_path, capsys, caplog):
    import datasets

    from medqa.workdir import paths

    work = shutil.copytree(workdir, tmp_path / "work")
    cfg = demo_config(work)
    bad = _write_ratings(cfg)
    out = tmp_path / "prefs" / "dpo.jsonl"
    args = [*DEMO, f"workdir={work}", f"data.source={SAMPLE}", "--export-preferences", str(out)]
    assert main(["feedback", *args]) == 0
    printed = capsys.readouterr()
    assert "Traceback" not in printed.err + printed.out + caplog.text
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 2  # each bad line: one paragraph naming the file, the line and the fix
    for number, message in zip(bad, warned):
        assert f"feedback.jsonl, line {number} " in message and "delete or repair that line" in message
    assert "line 8 is not a whole JSON object (Invalid control character at column 40)" in warned[0]
    assert "10 ratings in outputs/chat/feedback.jsonl" in printed.out
    assert "0.75 [" in printed.out  # configuration one: 3 wins of 4 decided

    summary = json.loads(paths(cfg).chat_feedback_summary.read_text())
    assert summary["source"] == "outputs/chat/feedback.jsonl" and str(work) not in json.dumps(summary)
    assert summary["ratings"] == 10 and summary["skipped_lines"] == bad and summary["settings_changed"] == 1
    assert "Wilson" in summary["interval"]
    rows = {(g["models"]["fine-tuned"], g["settings_changed"]): g for g in summary["configurations"]}
    assert set(rows) == {("outputs/finetune (step 4)", False), ("outputs/finetune (step 8)", False),
                         ("outputs/finetune (step 4)", True)}  # fmt: skip
    counts = {k: [g[c] for c in ("ratings", "wins", "losses", "ties", "both_bad")] for k, g in rows.items()}
    assert counts == {
        ("outputs/finetune (step 4)", False): [7, 3, 1, 2, 1],
        ("outputs/finetune (step 8)", False): [2, 1, 1, 0, 0],
        ("outputs/finetune (step 4)", True): [1, 0, 1, 0, 0],
    }
    one = rows[("outputs/finetune (step 4)", False)]
    assert one["win_rate"] == pytest.approx(0.75) and one["fingerprints"]["fine-tuned"] == "1" * 64
    assert one["interval_95"] == pytest.approx(_scipy_wilson(3, 4))
    assert summary["configurations"][-1]["settings_changed"]  # set apart: listed last

    # 3 + 1 wins and 1 + 1 + 1 losses decided; ties, identical answers and "both bad" give no pair
    pairs = datasets.load_dataset("json", data_files=str(out), split="train")
    assert pairs.column_names == ["prompt", "chosen", "rejected"] and pairs.num_rows == 7 == summary["exported_pairs"]
    first = pairs[0]
    template = cfg.prompt.template.replace("{question}", "My knee hurts (0). What should I do?")
    assert first == {
        "prompt": template,
        "chosen": "See a doctor about question 0.",
        "rejected": "Rest and ice for question 0.",
    }
    assert pairs[1]["chosen"] == "Rest and ice for question 1."  # a loss: base chosen


def test_the_prompt_is_built_with_the_chat_template_where_there_is_one(workdir, tmp_path):
    """prompt.use_chat_template with a tokenizer that has one: the prompt is the template's rendering of the question
    (after the chosen model's earlier turns), ending with the assistant's header, as at generation time."""
    from test_real_model_support import CHAT
    from transformers import AutoTokenizer

    from medqa.feedback import preference_rows

    work = shutil.copytree(workdir, tmp_path / "work")
    folder = work / "models" / "tiny-biogpt"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = CHAT
    tokenizer.save_pretrained(folder)
    cfg = demo_config(work, "prompt.use_chat_template=true")
    rating = {
        "question": "and my neck?",
        "history": {"base": [["my back hurts", "rest it"]], "fine-tuned": [["my back hurts", "see a doctor"]]},
        "answers": {"base": "ice it", "fine-tuned": "see a physiotherapist"},
        "rating": "better",
        "preferred": "fine-tuned",
        "models": MODELS["one"],
    }
    (row,) = preference_rows(cfg, [rating])
    messages = [
        {"role": "user", "content": "my back hurts"},
        {"role": "assistant", "content": "see a doctor"},
        {"role": "user", "content": "and my neck?"},
    ]
    assert row["prompt"] == tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert row["prompt"].endswith("<assistant> ") and (row["chosen"], row["rejected"]) == (
        "see a physiotherapist",
        "ice it",
    )


@pytest.mark.parametrize("content", [None, "", "\n\n"], ids=["missing", "empty", "blank-lines"])
def test_nothing_to_summarise(tmp_path, capsys, content):
    from medqa.workdir import paths

    cfg = demo_config(tmp_path)
    if content is not None:
        paths(cfg).chat_feedback.parent.mkdir(parents=True)
        paths(cfg).chat_feedback.write_text(content)
    assert main(["feedback", *DEMO, f"workdir={tmp_path}", f"data.source={SAMPLE}"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Nothing to summarise: outputs/chat/feedback.jsonl ")
    assert ("does not exist" if content is None else "has no ratings") in out
    assert not paths(cfg).chat_feedback_summary.exists()


def test_only_damaged_lines_are_reported_and_nothing_is_summarised(tmp_path, capsys, caplog):
    from medqa.workdir import paths

    cfg = demo_config(tmp_path)
    paths(cfg).chat_feedback.parent.mkdir(parents=True)
    paths(cfg).chat_feedback.write_bytes(b'{"question": "a", "answers": {}, "rating": "better", "mod\xff')
    assert main(["feedback", *DEMO, f"workdir={tmp_path}", f"data.source={SAMPLE}"]) == 0
    printed = capsys.readouterr()
    assert "line 1 is not a whole JSON object (Unterminated string starting at column 54)" in caplog.text
    assert "Traceback" not in printed.err + caplog.text and "Nothing to summarise" in printed.out


@pytest.mark.parametrize("wins,n", [(0, 1), (1, 1), (3, 4), (7, 20), (50, 100), (0, 0)])
def test_wilson_interval_matches_scipy(wins, n):
    from medqa.feedback import wilson

    if n == 0:
        assert wilson(wins, n) is None
    else:
        assert wilson(wins, n) == pytest.approx(_scipy_wilson(wins, n), abs=1e-12)


def _scipy_wilson(k: int, n: int) -> list[float]:
    from scipy.stats import binomtest

    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    return [ci.low, ci.high]
