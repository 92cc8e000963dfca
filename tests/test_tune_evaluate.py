"""Stage 4: Ray Tune search, final evaluation, and `ask`."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from conftest import REPO, SAMPLE, copy_workdir, demo_config, prepare_demo

from medqa.workdir import paths

QUICK = [
    "train.epochs=1",
    "train.eval_steps=20",
    "train.logging_steps=10",
    "scoring.bootstrap_samples=200",
    "tune.num_samples=2",
    "evaluate.num_questions=6",
]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return prepare_demo(tmp_path_factory.mktemp("tune"), *QUICK)


@pytest.fixture(scope="module")
def searched(prepared):
    from medqa.tune import tune

    cfg = demo_config(prepared, *QUICK)
    return cfg, tune(cfg)


def test_search_writes_results_and_best(searched):
    cfg, result = searched
    table = pd.read_csv(result.experiment_dir / "results.csv")
    assert len(table) == 2
    assert {
        "learning_rate",
        "weight_decay",
        "best_val_answer_loss",
        "best_val_answer_perplexity",
        "steps",
        "status",
        "attempts",
    } <= set(table.columns)
    assert table["learning_rate"].between(*cfg.tune.learning_rate).all()
    assert set(table["status"]) <= {"completed", "stopped early"}
    # ASHA's max_t is the Trainer's own step count, so no trial is cut before its last steps by rounding.
    from medqa.runplan import planned_steps
    from medqa.workdir import load_split

    assert (table["max_steps"] == planned_steps(cfg, load_split(cfg, "train"))).all()
    assert (table.loc[table["status"] == "completed", "steps"] == table["max_steps"].max()).all()
    assert (result.experiment_dir / "search.png").exists() and (result.experiment_dir / "curves.png").exists()
    assert result.experiment_dir.parent == paths(cfg).outputs and result.experiment_dir.name.startswith("ray_")
    best = json.loads((result.best_dir / "trial.json").read_text())
    # the frontier: the base model and each trial's kept checkpoint at every scale > 0 (no plain fine-tune here)
    front = pd.read_csv(paths(cfg).frontier / "frontier.csv")
    assert len(front) == 1 + 2 * 7 and set(front["alpha"]) == set(cfg.tune.frontier_alphas)
    as_trained = front[front["alpha"] == 1.0].set_index("source")["val_answer_loss"]
    for _, trial in table.iterrows():  # rescored as trained: the trial's own in-training val answer loss
        assert as_trained[trial["trial"]] == pytest.approx(trial["best_val_answer_loss"], abs=1e-4)
    # tune.objective default: the lowest val answer loss of every point, saved already scaled
    chosen = front[front["chosen"]].iloc[0]
    assert chosen["val_answer_loss"] == front.loc[front["alpha"] > 0, "val_answer_loss"].min()
    assert best["best_val_answer_loss"] == pytest.approx(chosen["val_answer_loss"])
    assert best["adapter_scale"] == chosen["alpha"] and best["trial"] == chosen["source"]
    assert (paths(cfg).frontier / "frontier.png").stat().st_size > 10_000
    # each trial's kept checkpoint with its PubMedQA dev scores (demo: scoring.knowledge_questions=8), the chosen one
    assert {"best_val_objective", "gain", "knowledge_acc", "knowledge_change", "eligible", "chosen"} <= set(
        table.columns
    )
    assert (table["best_val_objective"] == table["best_val_answer_loss"]).all()
    assert table["chosen"].sum() == 1 and table.loc[table["chosen"], "trial"].item() == best["trial"]
    assert best["selection"]["objective"] == "answer_loss" and best["selection"]["eligible"]
    assert (result.experiment_dir / "tradeoff.png").exists()
    assert (result.best_dir / "adapter_model.safetensors").exists()
    # Only adapters are kept: no optimizer states or full model weights anywhere in the experiment.
    assert not list(result.experiment_dir.rglob("optimizer.pt"))
    assert not list(result.experiment_dir.rglob("model.safetensors"))


def test_resuming_a_search_under_changed_settings_refuses(searched):
    """A finished (or interrupted) experiment is only restored for the same search: another search space, or
    other training settings, would rewrite outputs/best under labels that are not its own."""
    from medqa.manifest import StaleArtifactError
    from medqa.tune import tune

    cfg, result = searched
    best = (result.best_dir / "trial.json").read_text()
    with pytest.raises(StaleArtifactError) as info:
        tune(demo_config(paths(cfg).root, *QUICK, "tune.resume=true", "tune.learning_rate=[0.001, 0.002]"))
    assert "tune.learning_rate" in str(info.value) and "tune.resume=false" in str(info.value)
    assert (result.best_dir / "trial.json").read_text() == best


def test_a_finished_search_is_read_back_not_run_again(searched, tmp_path):
    """load_search (notebook 4's REUSE_SEARCH, after `make real-search`) returns the search tune() wrote, and
    refuses in one paragraph a search made with other settings or none at all."""
    from medqa.errors import MedqaError
    from medqa.manifest import StaleArtifactError
    from medqa.tune import load_search

    cfg, result = searched
    read = load_search(cfg)
    assert read.experiment_dir == result.experiment_dir and read.best_dir == result.best_dir
    pd.testing.assert_frame_equal(read.results, pd.read_csv(result.experiment_dir / "results.csv"))
    assert read.best == json.loads((result.best_dir / "trial.json").read_text())
    with pytest.raises(StaleArtifactError, match="tune.learning_rate"):
        load_search(demo_config(paths(cfg).root, *QUICK, "tune.learning_rate=[0.001, 0.002]"))
    with pytest.raises(MedqaError, match="No search to read") as info:
        load_search(demo_config(tmp_path, *QUICK))
    assert "make real-search" in str(info.value) and "\n" not in str(info.value)


def test_best_adapter_reloads_and_scores_as_reported(searched):
    import datasets

    from medqa.metrics import evaluate_answer_loss
    from medqa.modeling import load_adapter_model

    cfg, result = searched
    model = load_adapter_model(cfg, result.best_dir)
    val = datasets.load_from_disk(str(paths(cfg).tokenized_split("val")))
    m, _ = evaluate_answer_loss(model, val, 1, batch_size=5, bootstrap_samples=0)
    assert m["answer_loss"] == pytest.approx(result.best["best_val_answer_loss"], abs=1e-4)


@pytest.mark.slow
def test_crashing_trial_is_retried_and_reported(prepared, tmp_path, monkeypatch):
    """Slow (a search with a trial that crashes): the only test that Ray retries a crashing trial
    (tune.max_failures) and that the report counts its attempts."""
    from medqa.tune import FAIL_ENV, tune

    monkeypatch.setenv(FAIL_ENV, "1")
    cfg = demo_config(copy_workdir(prepared, tmp_path), *QUICK)
    result = tune(cfg)
    table = result.results
    assert (result.experiment_dir / "injected_failure").exists()
    assert sorted(table["attempts"]) == [1, 2]  # one trial failed once and was retried
    assert (table["status"] != "error").all()
    assert (result.best_dir / "adapter_model.safetensors").exists()


def _ray_state(workdir) -> str:
    text = ""
    for path in (workdir / "outputs").glob("ray_*/experiment_state-*.json"):
        try:
            text += path.read_text()
        except OSError:  # replaced while we read it
            pass
    return text


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGINT", "SIGKILL"])
def test_interrupted_search_resumes_without_rerunning(prepared, tmp_path, sig):
    """`medqa tune` is stopped with Ctrl-C (SIGINT) or killed (SIGKILL) once its first trial has finished;
    tune.resume=true then restores the experiment, runs only the unfinished trial, and ends with both.

    Slow (a real search stopped mid-way, twice): the only test that a search stopped by a signal restores and runs
    just its unfinished trial; the fast set restores a finished search
    (test_a_finished_search_is_chosen_from_again_under_another_rule)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from medqa.tune import ATTEMPTS, FINISHED, tune

    workdir = copy_workdir(prepared, tmp_path)
    args = [f"workdir={workdir}", *QUICK, "tune.max_concurrent=1", "tune.grace_period=5", "train.epochs=2"]
    log = open(tmp_path / "tune.log", "w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "medqa",
            "tune",
            "--config",
            str(REPO / "configs" / "demo.yaml"),
            f"data.source={SAMPLE}",
            *args,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=os.environ.copy(),
        cwd=REPO,
    )
    try:
        deadline = time.time() + 240
        # Finished for Ray means recorded as TERMINATED in its experiment state (the trial's own log comes first).
        while not list((workdir / "outputs").glob(f"ray_*/{FINISHED}")) or "TERMINATED" not in _ray_state(workdir):
            assert proc.poll() is None and time.time() < deadline, (
                "the search ended before it could be interrupted:\n" + (tmp_path / "tune.log").read_text()[-3000:]
            )
            time.sleep(0.5)
        proc.send_signal(getattr(signal, sig))
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    experiment = next((workdir / "outputs").glob("ray_*"))
    finished_first = (experiment / FINISHED).read_text().split()
    assert len(finished_first) == 1
    result = tune(demo_config(workdir, *args[1:], "tune.resume=true"))  # demo_config passes the same data.source
    assert result.experiment_dir == experiment
    attempts = (experiment / ATTEMPTS).read_text().split()
    assert attempts.count(finished_first[0]) == 1  # the finished trial was not run again
    assert len(result.results) == 2 and (result.results["status"] == "completed").all()


def test_evaluate_report(searched):
    from medqa.evaluate import evaluate

    cfg, _ = searched
    from medqa.train import train

    train(cfg)
    result = evaluate(cfg)
    report = json.loads(paths(cfg).report_json.read_text())
    assert set(report["models"]) == {"base", "fine-tuned", "tuned (best trial)"}
    baseline = json.loads((paths(cfg).baseline / "metrics.json").read_text())
    for key in ("answer_loss", "answer_perplexity", "sequence_loss"):
        assert report["models"]["base"]["test"][key] == pytest.approx(baseline["test"][key], abs=1e-6)
    tuned = report["models"]["fine-tuned"]
    assert tuned["test"]["answer_loss"] < report["models"]["base"]["test"]["answer_loss"]
    assert tuned["vs_base"]["loss_delta"] < 0 and tuned["vs_base"]["p_value"] < 0.05
    for key in ("rouge1", "rouge2", "rougeL", "bleu", "mean_words", "empty_share", "repetitive_share"):
        assert key in tuned["generation"]
    assert len(report["samples"]) == 6 and {"question", "reference", "base", "fine-tuned"} <= set(report["samples"][0])
    md = result.report_md.read_text()
    assert "| fine-tuned |" in md and "Model card" in md and "academic research only" in md
    # knowledge kept: PubMedQA before vs after (demo: 8 questions), next to the answer-loss change
    assert report["models"]["base"]["pubmedqa"]["questions"] == cfg.evaluate.pubmedqa_questions == 8
    kept = tuned["pubmedqa"]["vs_base"]
    assert kept["acc_delta"] == pytest.approx(tuned["pubmedqa"]["acc"] - report["models"]["base"]["pubmedqa"]["acc"])
    assert "## Knowledge kept" in md and "PubMedQA (8 expert-labelled test questions" in md
    # how the search chose its adapter: every trial's gain and dev knowledge change, drawn in outputs/tradeoff.png
    search = report["search"]
    assert len(search["trials"]) == 2 and sum(t["chosen"] for t in search["trials"]) == 1
    assert all(
        t["knowledge_change"] == pytest.approx(t["knowledge_acc"] - t["knowledge_base_acc"]) for t in search["trials"]
    )
    assert "## Choosing the adapter" in md and "![gain vs knowledge kept per trial](tradeoff.png)" in md
    assert paths(cfg).tradeoff.exists()


def test_ask_ends_with_disclaimer(searched, tmp_path, capsys):
    from medqa.ask import DISCLAIMER
    from medqa.cli import main

    cfg, result = searched
    questions = tmp_path / "q.txt"
    questions.write_text("I have a sore throat since two days.\n\nMy knee hurts when I climb stairs.\n")
    rc = main(
        [
            "ask",
            "--config",
            str(REPO / "configs" / "demo.yaml"),
            f"workdir={cfg.workdir}",
            "--file",
            str(questions),
            "What helps against a dry cough?",
            "--adapter",
            str(result.best_dir),
            "generate.max_new_tokens=12",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0 and out.count(DISCLAIMER) == 3 and "dry cough" in out and "knee" in out


def test_with_a_frontier_the_rule_is_applied_after_the_search(searched):
    """The trials compete on val answer loss when a frontier runs, so the selection rule's settings may change
    between the search and reading it (or resuming it): only they."""
    from medqa.manifest import StaleArtifactError
    from medqa.tune import load_search

    cfg, result = searched
    assert cfg.tune.frontier_alphas
    other_rule = ["tune.objective=answer_loss_within_knowledge", "tune.knowledge_measure=both"]
    assert load_search(demo_config(paths(cfg).root, *QUICK, *other_rule)).experiment_dir == result.experiment_dir
    with pytest.raises(StaleArtifactError, match="tune.frontier_alphas"):
        load_search(demo_config(paths(cfg).root, *QUICK, *other_rule, "tune.frontier_alphas=[]"))


def test_a_finished_search_is_chosen_from_again_under_another_rule(searched, tmp_path):
    """tune.resume=true on a finished frontier search with a rule on accuracy: no trial runs again, and the frontier
    chooses on the dev questions (`check_on_dev`), at most tune.final_knowledge_checks points scored there."""
    import shutil

    from medqa.tune import ATTEMPTS, tune

    cfg, result = searched
    root = tmp_path / "again"
    shutil.copytree(paths(cfg).root, root)
    attempts = (root / "outputs" / result.experiment_dir.name / ATTEMPTS).read_text()
    rule = [
        "tune.resume=true",
        "tune.objective=answer_loss_within_knowledge",
        "tune.knowledge_measure=both",
        "tune.final_knowledge_checks=2",
    ]
    again = tune(demo_config(root, *QUICK, *rule))
    assert again.experiment_dir.parent == root / "outputs"
    assert (again.experiment_dir / ATTEMPTS).read_text() == attempts  # restored, not re-run
    trial = json.loads((again.best_dir / "trial.json").read_text())
    assert trial["selection"]["knowledge_measure"] == "both" and "dev questions" in trial["selection"]["message"]
    front = pd.read_csv(root / "outputs" / "frontier" / "frontier.csv")
    checked = front["dev_knowledge_change"].notna()
    assert 1 <= checked.sum() <= 2 and checked[front["chosen"]].all()
    assert trial["frontier"]["final_dev_pubmedqa"]["knowledge_change"] == pytest.approx(
        front.loc[front["chosen"], "dev_knowledge_change"].item()
    )
