"""`medqa benchmark`: lm-evaluation-harness on medqa's loaded models, offline on the shipped PubMedQA questions;
medqa's own PubMedQA scorer and lm-eval agree per question; a Hub task with no cached data is one paragraph."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

pytest.importorskip("lm_eval")

from conftest import REPO, demo_config, prepare_demo  # noqa: E402

from medqa.benchmark import (
    LOCAL_PUBMEDQA,
    BenchmarkDataError,
    benchmark,
    build_task_manager,  # noqa: E402
    check_tasks,
    run_tasks,
)
from medqa.pubmedqa import CHOICES, context_text, encode_pair, load_items, score_items, subset  # noqa: E402
from medqa.workdir import paths  # noqa: E402

QUICK = [
    "train.max_steps=6",
    "train.eval_steps=3",
    "train.logging_steps=3",
    "scoring.bootstrap_samples=200",
    "evaluate.num_questions=2",
    "evaluate.pubmedqa_questions=0",
    "evaluate.benchmarks=[pubmedqa_local]",
    "evaluate.benchmark_questions=5",
    "generate.max_new_tokens=4",
]


def test_two_scorers_one_answer(tiny_model_dir, tmp_path):
    """Per question and choice, medqa's scorer and lm-eval's run give the same log-likelihood (to 1e-4) and the same
    prediction, including a question longer than the model's window (left truncation)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    cfg = demo_config(tmp_path, "evaluate.benchmark_questions=6", "evaluate.benchmarks=[pubmedqa_local]")
    items = subset(load_items(), 6, cfg.seed)  # the questions the local task holds
    window = model.config.max_position_embeddings
    longest = max(len(sum(encode_pair(tok, context_text(x), " yes"), [])) for x in items)
    assert longest > window + 1, "the check needs a question cut from the left"

    run = run_tasks(cfg, model, tok, [LOCAL_PUBMEDQA], build_task_manager(cfg, tmp_path / "tasks"))
    samples = sorted(run["samples"][LOCAL_PUBMEDQA], key=lambda s: s["doc_id"])
    assert [s["doc"]["id"] for s in samples] == [x["id"] for x in items]
    assert [s["target"] for s in samples] == [x["answer"] for x in items]
    assert [a[1] for a in samples[0]["arguments"]] == [" " + c for c in CHOICES]
    theirs = np.array([[r[0] for r in s["filtered_resps"]] for s in samples])

    ours = score_items(model, tok, items, batch_size=4)
    np.testing.assert_allclose(ours.loglik, theirs, atol=1e-4)
    assert list(ours.predicted) == [int(np.argmax(row)) for row in theirs]
    assert [s["acc"] for s in samples] == [float(p == g) for p, g in zip(ours.predicted, ours.gold)]
    assert run["results"][LOCAL_PUBMEDQA]["acc,none"] == pytest.approx(float((ours.predicted == ours.gold).mean()))


def test_hub_task_without_cached_data_is_one_paragraph(tmp_path, monkeypatch):
    """lm-eval's own medmcqa definition, offline with an empty datasets cache: one paragraph naming the task and the
    fix. (Indexing all of lm-eval's tasks takes ~20 s, so its medmcqa folder is put on an include path alone.)"""
    import lm_eval.tasks
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    shutil.copytree(lm_eval.tasks.__path__[0] + "/medmcqa", tmp_path / "medmcqa")
    manager = TaskManager(include_path=str(tmp_path / "medmcqa"), include_defaults=False)
    with pytest.raises(BenchmarkDataError) as err:
        check_tasks(["medmcqa"], manager)
    text = str(err.value)
    assert "'medmcqa'" in text and "HF_DATASETS_OFFLINE" in text and "pubmedqa_local" in text and "\n" not in text
    with pytest.raises(BenchmarkDataError, match="not an lm-evaluation-harness task"):
        check_tasks(["medmcqa_typo"], manager)


@pytest.fixture(scope="module")
def benchmarked(tmp_path_factory):
    from medqa.train import train

    workdir = prepare_demo(tmp_path_factory.mktemp("bench"), *QUICK)
    cfg = demo_config(workdir, *QUICK)
    train(cfg)
    return cfg, benchmark(cfg)


def test_benchmark_stage_writes_logs_summary_and_paired_changes(benchmarked):
    cfg, result = benchmarked
    out = paths(cfg).benchmarks
    summary = json.loads((out / "summary.json").read_text())
    assert summary == json.loads(json.dumps(result.summary))
    assert set(summary["models"]) == {"base", "fine-tuned"}
    for m in summary["models"].values():
        lines = (out / m["dir"] / f"samples_{LOCAL_PUBMEDQA}.jsonl").read_text().splitlines()
        assert len(lines) == m["questions"][LOCAL_PUBMEDQA] == 5
        acc = np.mean([json.loads(line)["acc"] for line in lines])
        score = m["tasks"][LOCAL_PUBMEDQA]["acc"]
        assert score["value"] == pytest.approx(acc) and score["stderr"] is not None
        assert json.loads((out / m["dir"] / "results.json").read_text())["results"][LOCAL_PUBMEDQA]
    tuned, base = summary["models"]["fine-tuned"], summary["models"]["base"]
    vs = tuned["vs_base"][LOCAL_PUBMEDQA]["acc"]
    assert vs["delta"] == pytest.approx(
        tuned["tasks"][LOCAL_PUBMEDQA]["acc"]["value"] - base["tasks"][LOCAL_PUBMEDQA]["acc"]["value"]
    )
    assert vs["delta_ci95"][0] <= vs["delta"] <= vs["delta_ci95"][1] and 0 < vs["p_lost"] <= 1
    assert any(row.startswith(f"| {LOCAL_PUBMEDQA} | acc | fine-tuned | 5 |") for row in summary["table"])


def test_report_carries_the_benchmark_table(benchmarked):
    from medqa.evaluate import evaluate

    cfg, result = benchmarked
    md = evaluate(cfg).report_md.read_text()
    assert "## Knowledge kept: lm-evaluation-harness" in md
    assert all(row in md for row in result.summary["table"])
    report = json.loads(paths(cfg).report_json.read_text())
    assert report["benchmarks"]["models"]["fine-tuned"]["vs_base"] == result.summary["models"]["fine-tuned"]["vs_base"]


def test_cli_benchmark_without_tasks_is_a_config_error(tmp_path, capsys):
    from medqa.cli import main

    rc = main(
        ["benchmark", "--config", str(REPO / "configs" / "demo.yaml"), f"workdir={tmp_path}", "evaluate.benchmarks=[]"]
    )
    assert rc == 2 and "evaluate.benchmarks is empty" in capsys.readouterr().err
