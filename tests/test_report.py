"""report.json's one home (`medqa.report`): its key paths pinned on a real evaluate run, report.md a view of report.json
alone, the two files replaced together, the search's rows holding every searched parameter, and notebook 4's table."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import copy_trained, demo_config

from medqa import report as rp
from medqa.modelcard import card_fields
from medqa.report_markdown import render_markdown, render_summary
from medqa.schema import Config

QUICK = [
    "train.max_steps=2",
    "train.eval_steps=2",
    "train.report_to=[]",
    "scoring.bootstrap_samples=20",
    "scoring.knowledge_questions=0",
    "evaluate.num_questions=2",
    "evaluate.samples_in_report=1",
    "evaluate.pubmedqa_questions=4",
    "generate.max_new_tokens=4",
]


def _small_report(answer: str = "rest") -> dict:
    metrics = {"answer_loss": 2.0, "answer_perplexity": 7.39, "answer_perplexity_ci95": [7.0, 7.8]}
    generation = dict.fromkeys(("rouge1", "rouge2", "rougeL", "bleu", "mean_words", "empty_share"), 0.5)
    return {
        "test_examples": 1,
        "generated": 1,
        "models": {"base": {"test": metrics, "generation": {**generation, "repetitive_share": 0.0}}},
        "samples": [{"question": "q", "reference": "r", "base": answer}],
        "model_card": card_fields(Config()),
    }


def _key_paths(obj, prefix: str = "") -> set[str]:
    """Every key path of a JSON value: dict keys joined by '.', a list's elements as '[]' (their union)."""
    paths = {prefix} if prefix else set()
    if isinstance(obj, dict):
        for k, v in obj.items():
            paths |= _key_paths(v, f"{prefix}.{k}" if prefix else k)
    elif isinstance(obj, list):
        for v in obj:
            paths |= _key_paths(v, f"{prefix}[]")
    return paths


@pytest.fixture(scope="module")
def evaluated(trained_demo, tmp_path_factory):
    """The shared adapter (a tiny model fine-tuned for a few steps) evaluated with PubMedQA (no search, no
    benchmark)."""
    from medqa.evaluate import evaluate

    cfg = demo_config(copy_trained(trained_demo, tmp_path_factory.mktemp("report") / "w"), *QUICK)
    return cfg, evaluate(cfg)


def test_report_json_key_paths_are_pinned_and_report_md_is_its_view(evaluated):
    """The key paths of report.json (model names kept, lists as []) are the ones recorded here: a change to the
    report's shape is a change to this test. report.md is rendered from report.json alone: reading report.json
    back renders the same text."""
    from medqa.workdir import paths

    cfg, result = evaluated
    out = paths(cfg)
    report = rp.read_report(out.report_json)
    assert report == json.loads(json.dumps(result.report))
    assert render_markdown(report, cfg.evaluate.samples_in_report) == out.report_md.read_text(encoding="utf-8")
    assert out.report_md.read_text(encoding="utf-8").startswith(render_summary(report) + "\n## Samples\n")
    assert list(report) == list(rp.Report.__annotations__)
    for entry in report["models"].values():
        assert set(entry) <= set(rp.ModelEntry.__annotations__)
    # model_card's fields: modelcard.card_fields; a sanity warning's presence depends on the 2-step model's loss
    got = {p for p in _key_paths(report) if not p.startswith(("model_card.", "fallbacks[]", "sanity_warnings[]"))}
    assert got == PINNED, f"added: {sorted(got - PINNED)}; gone: {sorted(PINNED - got)}"


GOLDEN = Path(__file__).parent / "golden"  # this run's files as written before the house moves (commit 37619d1)


def _content(text: str, roots: dict[str, str]):
    """A JSON artifact's content: local paths as placeholders, and without times and the config's echo (a new
    setting with its default changes the echo, not what was measured)."""
    for root, name in roots.items():
        text = text.replace(root, name)

    def strip(v):
        if isinstance(v, dict):
            return {k: strip(x) for k, x in v.items() if "seconds" not in k and k != "config"}
        return [strip(x) for x in v] if isinstance(v, list) else v

    return strip(json.loads(text))


def _assert_same(found, expected, where: str = "") -> None:
    if isinstance(expected, dict):
        assert isinstance(found, dict) and sorted(found) == sorted(expected), f"{where}: keys differ"
        for k in expected:
            _assert_same(found[k], expected[k], f"{where}.{k}")
    elif isinstance(expected, list):
        assert isinstance(found, list) and len(found) == len(expected), f"{where}: lengths differ"
        for i, (f, e) in enumerate(zip(found, expected)):
            _assert_same(f, e, f"{where}[{i}]")
    elif isinstance(expected, float):
        assert found == pytest.approx(expected, rel=1e-4, abs=1e-6), f"{where}: {found} != {expected}"
    else:
        assert found == expected, f"{where}: {found!r} != {expected!r}"


def test_report_and_metrics_hold_what_they_held_before_the_moves(evaluated, trained_demo):
    """report.json and the baseline's and fine-tune's metrics.json of one demo run (the shared adapter, then
    evaluate) hold the same keys and values as the same run wrote before the house moves (train.py split, report.py,
    one scoring step: tests/golden/, from commit 37619d1), minus times, local paths and the config's echo. A change
    meant to alter their content writes new golden files with MEDQA_WRITE_GOLDEN=1."""
    from conftest import REPO

    cfg, _ = evaluated
    work = Path(cfg.workdir)
    roots = {str(work): "<workdir>", str(trained_demo): "<workdir>", str(REPO): "<repo>"}
    files = {
        "report.json": work / "outputs" / "report.json",
        "finetune_metrics.json": work / "outputs" / "finetune" / "metrics.json",
        "baseline_metrics.json": work / "outputs" / "baseline" / "metrics.json",
    }
    for name, path in files.items():
        text = path.read_text(encoding="utf-8")
        if os.environ.get("MEDQA_WRITE_GOLDEN") == "1":
            for root, placeholder in roots.items():
                text = text.replace(root, placeholder)
            (GOLDEN / name).write_text(text, encoding="utf-8")
        expected = _content((GOLDEN / name).read_text(encoding="utf-8"), {})
        _assert_same(_content(text, roots), expected, name)


def test_cli_prints_the_report_up_to_its_samples(evaluated, capsys):
    from medqa.cli import _evaluate

    cfg, result = evaluated
    _evaluate(cfg, None)
    printed = capsys.readouterr().out
    md = result.report_md.read_text(encoding="utf-8")
    assert printed.startswith(md.split("## Samples")[0]) and "## Samples" not in printed


def test_a_failure_while_writing_report_md_leaves_the_previous_pair(tmp_path, monkeypatch):
    """Both files or neither: a failure writing report.md (a full disk) or renaming it into place leaves the
    previous report.json and report.md byte for byte, and no temporary file beside them."""
    json_path, md_path = tmp_path / "report.json", tmp_path / "report.md"
    rp.write_report(json_path, md_path, _small_report("old"), 1)
    before = (json_path.read_bytes(), md_path.read_bytes())
    real_write = Path.write_text

    def full_disk(self, text, *args, **kwargs):
        if self.name.startswith(".report.md"):
            real_write(self, text[:10], *args, **kwargs)  # half written, then the disk is full
            raise OSError(28, "No space left on device")
        return real_write(self, text, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(Path, "write_text", full_disk)
        with pytest.raises(OSError, match="No space left"):
            rp.write_report(json_path, md_path, _small_report("new"), 1)
    assert (json_path.read_bytes(), md_path.read_bytes()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json", "report.md"]

    real_replace = os.replace

    def fail_on_md(src, dst):
        if Path(dst).name == "report.md":
            raise OSError("interrupted")
        return real_replace(src, dst)

    with monkeypatch.context() as m:
        m.setattr(os, "replace", fail_on_md)
        with pytest.raises(OSError, match="interrupted"):
            rp.write_report(json_path, md_path, _small_report("new"), 1)
    assert (json_path.read_bytes(), md_path.read_bytes()) == before  # report.json, already replaced, put back
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json", "report.md"]

    rp.write_report(json_path, md_path, _small_report("new"), 1)  # and a write that succeeds replaces both
    assert rp.read_report(json_path)["samples"][0]["base"] == "new" and "**base.** new" in md_path.read_text()


def test_search_rows_hold_every_searched_parameter_and_no_plot_is_drawn(tmp_path):
    """A trial row keeps each parameter the schema lets a search vary (lora_alpha among them) and the results, and
    nothing else of results.csv (its path, attempts); search_summary only says whether the plot can be drawn."""
    from medqa import schema

    assert set(rp.TRIAL_PARAMS) == {
        "learning_rate",
        "weight_decay",
        "lora_r",
        "lora_alpha",
        "lora_dropout",
        "lora_targets",
        "max_steps",
    }
    assert len(rp.TRIAL_PARAMS) == len(schema.searched())
    row = {"trial": "t1", "path": "/x", "attempts": 1, **dict.fromkeys(rp.TRIAL_PARAMS, 1), "gain": 0.1}
    chosen = {"trial": "t1", "selection": {"objective": "answer_loss", "rule": "r"}}
    summary = rp.search_summary({"chosen": chosen, "trials": [row]}, "tradeoff.png")
    assert list(summary["trials"][0]) == ["trial", *rp.TRIAL_PARAMS, "gain"]
    assert summary["plot"] is None and summary["chosen_source"] == "t1" and summary["adapter_scale"] == 1.0
    measured = {**row, "knowledge_change": -0.01}
    assert rp.search_summary({"chosen": chosen, "trials": [measured]}, "tradeoff.png")["plot"] == "tradeoff.png"
    assert rp.search_summary(None, "tradeoff.png") is None
    assert list(tmp_path.iterdir()) == []


def test_notebook_4s_frames_show_the_report_and_the_benchmark_summary():
    """Notebook 4's final comparison and lm-eval tables: one row per model (per task, metric and model), each cell
    the report's value at its key path, the base model's comparison cells empty."""
    report = _small_report()
    report["models"]["fine-tuned"] = {**report["models"]["base"], "vs_base": {"p_value": 0.01}}
    final = rp.final_comparison_frame(report)
    assert list(final.index) == ["base", "fine-tuned"]
    assert final.loc["fine-tuned", "answer_perplexity"] == 7.39 and final.loc["fine-tuned", "p vs base"] == 0.01
    assert final.loc["base", "95% CI"] == [7.0, 7.8] and final.loc["base", "p vs base"] is None
    assert list(final.columns[-5:]) == ["rouge1", "rouge2", "rougeL", "bleu", "repetitive_share"]

    acc = {"acc": {"value": 0.5, "stderr": 0.05}}
    summary = {
        "models": {
            "base": {"tasks": {"pubmedqa_local": acc}},
            "tuned": {
                "tasks": {"pubmedqa_local": {"acc": {"value": 0.4, "stderr": 0.04}}},
                "vs_base": {"pubmedqa_local": {"acc": {"delta": -0.1, "p_lost": 0.02}}},
            },
        }
    }
    bench = rp.benchmark_frame(summary).astype(object).where(lambda f: f.notna(), None)
    assert bench.to_dict("records") == [
        {"task": "pubmedqa_local", "metric": "acc", "model": "base", "score": 0.5, "stderr": 0.05,
         "Δ vs base": None, "p (lost)": None},
        {"task": "pubmedqa_local", "metric": "acc", "model": "tuned", "score": 0.4, "stderr": 0.04,
         "Δ vs base": -0.1, "p (lost)": 0.02},
    ]  # fmt: skip


# report.json's key paths on that run (no search, benchmark, external set or sources: their sections are None).
MODEL = [
    *("adapter", "adapter_scale", "dtype", "generation", "pubmedqa", "test"),
    *(f"generation.{k}" for k in ("bleu", "empty_share", "mean_words", "repetitive_share", "rouge1", "rouge2")),
    "generation.rougeL",
    *(f"pubmedqa.{k}" for k in ("abstract_loss", "abstract_tokens", "acc", "acc_bytes", "acc_ci95", "acc_ci95[]")),
    *(f"pubmedqa.{k}" for k in ("acc_norm", "macro_f1", "macro_f1_ci95", "macro_f1_ci95[]", "majority_answer")),
    *(f"pubmedqa.{k}" for k in ("majority_baseline_acc", "predicted_share", "questions")),
    *(f"pubmedqa.predicted_share.{k}" for k in ("yes", "no", "maybe")),
    *(f"test.{k}" for k in ("answer_loss", "answer_perplexity", "answer_perplexity_ci95", "answer_perplexity_ci95[]")),
    *(f"test.{k}" for k in ("answer_tokens", "bits_per_token", "examples", "sequence_loss", "sequence_perplexity")),
    "test.sequence_tokens",
]
VS_BASE = [
    *("vs_base", "vs_base.loss_delta", "vs_base.loss_delta_ci95", "vs_base.loss_delta_ci95[]", "vs_base.p_value"),
    *(f"pubmedqa.vs_base{k}" for k in ("", ".abstract_change", ".abstract_change_ci95", ".abstract_change_ci95[]")),
    *(f"pubmedqa.vs_base.{k}" for k in ("abstract_delta", "abstract_delta_ci95", "abstract_delta_ci95[]")),
    *(f"pubmedqa.vs_base.{k}" for k in ("abstract_loss", "abstract_loss_base", "acc_delta", "acc_delta_ci95")),
    *(f"pubmedqa.vs_base.{k}" for k in ("acc_delta_ci95[]", "p_value_lost", "p_value_not_lower")),
]
PINNED = {
    *("benchmarks", "bertscore", "dtype", "external", "fallbacks", "generated", "model", "model_card", "models"),
    *("sanity_warnings", "search", "seconds", "test_examples"),
    *(f"samples{k}" for k in ("", "[]", "[].base", "[].fine-tuned", "[].question", "[].reference")),
    *("models.base", "models.fine-tuned"),
    *(f"models.base.{k}" for k in MODEL),
    *(f"models.fine-tuned.{k}" for k in MODEL + VS_BASE),
}
